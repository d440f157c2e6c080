"""The scheduler actor: drives an :class:`~cluster.analytic.Episode` through the devices.

The scheduler owns the run's only clock and the host-link model (it plays the root complex
between the GPU and the NDP units). For every MoE step it asks the policy for a plan (the
episode does), times it with the shared rules of :func:`policies.plan.time_plan`, and then:

1. sends each NDP unit its tasks with the activations of the tokens it needs, stamped with
   the emulated time the link model delivers them;
2. collects every unit's partial output, stamped by the unit's own cost model;
3. sends the GPU its own tasks (each with the time its weights are ready: at once if cached,
   when the link delivers the fetch otherwise) and every partial with its link arrival time;
4. receives the GPU's completion time, checks every device's stamps against the plan's timing
   (a mismatch is a bug and is counted), and paces: sleeps until the step's emulated end.

Pacing makes wall-clock time follow emulated time times the dilation D. When the real work
and messaging of a segment take longer than its modelled duration x D, the scheduler reaches
the pacing point late: that is an **overrun**, counted with its lag, never hidden. Reported
emulated latency is the clock's reading (wall-clock / D) at the last token.

Fetched and prefetched expert weights are regenerated on the GPU from the seed rather than
shipped; the link model charges their bytes. Ray appears nowhere here (see cluster.launch).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import policies
from actors import kernels as K
from actors import wire
from actors.clock import Clock, RealClock, wall_now
from actors.transport import Transport
from cluster.analytic import Episode, Executor
from cluster.errors import EmulationError
from cluster.metrics import PolicyRecords
from cluster.routing import Routing
from cluster.spec import Config

GPU_PEER = b"gpu"


def unit_peer(u: int) -> bytes:
    return f"ndp{u}".encode()


@dataclass
class EmulationStats:
    """What the scheduler measured while driving one policy."""

    segments: int = 0
    overruns: int = 0
    lag_max_s: float = 0.0
    lag_total_s: float = 0.0
    stamp_mismatches: int = 0
    stamp_mismatch_max_s: float = 0.0
    messages: int = 0
    ratios: list[float] = field(default_factory=list)  # real wall / modelled, per segment
    wall_s: float = 0.0
    emulated_e2e_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"overruns": self.overruns, "paced_segments": self.segments,
                "lag_max_s": self.lag_max_s, "lag_total_s": self.lag_total_s,
                "stamp_mismatches": self.stamp_mismatches, "messages": self.messages,
                "wall_s": self.wall_s}


class Dispatcher:
    """The scheduler's messaging: task ids, sends, and gathering replies within a deadline."""

    def __init__(self, transport: Transport, timeout_s: float) -> None:
        self.tr, self.timeout_s = transport, timeout_s
        self.ids = itertools.count(1)
        self.sent = 0

    def send(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> int:
        tid = next(self.ids)
        self.tr.send(peer, wire.encode("task", {"task_id": tid, **fields}, list(arrays)))
        self.sent += 1
        return tid

    def gather(self, waiting: dict[int, bytes], what: str) -> dict[bytes, wire.Message]:
        """Replies to every task in ``waiting`` (task id -> peer), within the deadline."""
        out: dict[bytes, wire.Message] = {}
        deadline = wall_now() + self.timeout_s
        while waiting:
            left = deadline - wall_now()
            got = self.tr.recv(left) if left > 0 else None
            if got is None:
                names = ", ".join(sorted(p.decode() for p in waiting.values()))
                raise EmulationError(f"no reply from {names} within {self.timeout_s:g} s while "
                                     f"awaiting {what}")
            peer, frames = got
            msg = wire.decode(frames)
            if msg.type == "error":
                raise EmulationError(f"{peer.decode()} rejected {what}: {msg.fields['message']}")
            tid = msg.fields.get("task_id")
            if msg.type != "result" or tid not in waiting:
                continue  # a stale or stray reply: ignore
            out[waiting.pop(tid)] = msg
        return out

    def call(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "") -> wire.Message:
        tid = self.send(peer, fields, arrays)
        return self.gather({tid: peer}, what or fields.get("kind", "?"))[peer]

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        """Round trips to ``peer`` in wall seconds (calibration and health)."""
        out = []
        for i in range(n):
            t0 = wall_now()
            self.tr.send(peer, wire.encode("ping", {"seq": i}))
            deadline = t0 + self.timeout_s
            while True:
                left = deadline - wall_now()
                got = self.tr.recv(left) if left > 0 else None
                if got is None:
                    raise EmulationError(f"{peer.decode()} did not answer a ping within {self.timeout_s:g} s")
                msg = wire.decode(got[1])
                if msg.type == "pong" and msg.fields["seq"] == i:
                    break
            out.append(wall_now() - t0)
        return out


class EmulationExecutor(Executor):
    """Runs an episode's work on the devices over ``transport`` and paces it on ``clock``.

    ``calibrate``: no sleeping; record how long each segment's real work takes relative to
    its modelled duration (the dilation calibration).
    """

    def __init__(self, cfg: Config, routing: Routing, transport: Transport, clock: Clock,
                 timeout_s: float, calibrate: bool = False, tolerance_s: float = 0.0,
                 net: Dispatcher | None = None) -> None:
        self.cfg, self.routing, self.tr, self.clock = cfg, routing, transport, clock
        self.timeout_s = timeout_s
        self.calibrate = calibrate
        self.tolerance_s = tolerance_s
        self.stats = EmulationStats()
        self.net = net or Dispatcher(transport, timeout_s)
        self.xn: np.ndarray | None = None
        self.current: tuple[str, int] | None = None
        self.last_mark: tuple[float, float] = (wall_now(), 0.0)  # (wall, emulated) at last pace
        self.n_units = cfg.ndp.num_ndp_units

    def _send(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> int:
        self.stats.messages += 1
        return self.net.send(peer, fields, arrays)

    def call(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "") -> wire.Message:
        self.stats.messages += 1
        return self.net.call(peer, fields, arrays, what)

    # --- pacing ---------------------------------------------------------------------------
    def _pace(self, target_s: float) -> None:
        """Wall-clock catches up with emulated ``target_s``; lateness is an overrun."""
        st = self.stats
        st.segments += 1
        wall = wall_now()
        prev_wall, prev_emu = self.last_mark
        if self.calibrate:
            modelled = target_s - prev_emu
            if modelled > 0:
                st.ratios.append((wall - prev_wall) / modelled)
            self.last_mark = (wall, target_s)
            return
        lag = self.clock.now_s() - target_s
        if lag > self.tolerance_s:
            st.overruns += 1
            st.lag_total_s += lag
            st.lag_max_s = max(st.lag_max_s, lag)
        else:
            self.clock.sleep_until_s(target_s)
        self.last_mark = (wall_now(), target_s)

    def _check(self, got: float, want: float) -> None:
        err = abs(got - want)
        if err > 1e-9 + 1e-9 * abs(want):
            self.stats.stamp_mismatches += 1
            self.stats.stamp_mismatch_max_s = max(self.stats.stamp_mismatch_max_s, err)

    # --- Executor hooks -------------------------------------------------------------------
    def _begin(self, phase: str, step: int) -> None:
        if self.current != (phase, step):
            self.current = (phase, step)
            self.call(GPU_PEER, {"kind": "begin", "phase": phase, "step": step})

    def _ctx(self, phase: str, step: int) -> int:
        P = self.cfg.workload.prompt_tokens
        return P if phase == "prefill" else P + step

    def gpu_work(self, kind: str, phase: str, step: int, layer: int, start_s: float,
                 seconds: float) -> None:
        self._begin(phase, step)
        if kind == "head":
            self._pace(start_s + seconds)
            return
        if kind == "dense":
            r = self.call(GPU_PEER, {"kind": "dense", "index": layer, "start_s": start_s,
                                     "ctx": self._ctx(phase, step)})
        else:
            r = self.call(GPU_PEER, {"kind": "attention", "layer": layer, "start_s": start_s,
                                     "ctx": self._ctx(phase, step)})
            self.xn = np.array(r.arrays[0])
        self._check(r.fields["done_s"], start_s + seconds)
        self._pace(start_s + seconds)

    def _step_routing(self, phase: str, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.routing
        if phase == "prefill":
            w = r.topk_weights[:, : r.prompt_tokens, layer]
            return r.prefill_ids(layer), w.reshape(-1, w.shape[-1])
        return r.decode_ids(step - 1, layer), r.topk_weights[:, r.prompt_tokens + step - 1, layer]

    def moe(self, phase: str, step: int, layer: int, plan: policies.Plan,
            timing: policies.StepTiming, start_s: float) -> None:
        ids, weights = self._step_routing(phase, step, layer)
        xn = self.xn
        per_unit: dict[int, list[policies.Task]] = {}
        gpu_tasks: list[policies.Task] = []
        for t in plan.expand(self.n_units):
            (gpu_tasks if t.device == policies.GPU else per_unit.setdefault(t.device, [])).append(t)
        # 1. activations and tasks to the units, stamped with their link arrival
        waiting: dict[int, bytes] = {}
        unit_rows: dict[int, np.ndarray] = {}
        for u, tasks in sorted(per_unit.items()):
            toks = np.unique(np.concatenate([np.asarray(t.tokens, dtype=np.int64) for t in tasks]))
            unit_rows[u] = toks.astype(np.int32)
            meta, rows, gates = [], [], []
            for t in tasks:
                tok = np.asarray(t.tokens, dtype=np.int64)
                meta.append([t.expert, t.col_start, t.col_end, len(tok)])
                rows.append(np.searchsorted(toks, tok).astype(np.int32))
                gates.append(K.gate_weights_for(ids, weights, t.expert, tok))
            tid = self._send(unit_peer(u), {
                "kind": "moe", "layer": layer, "arrival_s": start_s + timing.unit_arrival_s[u],
                "meta": meta}, [np.ascontiguousarray(xn[toks]), np.concatenate(rows),
                                np.concatenate(gates).astype(np.float32)])
            waiting[tid] = unit_peer(u)
        results = self.net.gather(waiting, f"layer {layer} expert shards") if waiting else {}
        # 2. the GPU: its own tasks (ready when cached or fetched) and every partial
        meta, rows, gates = [], [], []
        for t in gpu_tasks:
            tok = np.asarray(t.tokens, dtype=np.int64)
            ready = start_s + timing.fetch_done_s.get(t.expert, 0.0)
            meta.append([t.expert, t.col_start, t.col_end, len(tok), ready])
            rows.append(tok.astype(np.int32))
            gates.append(K.gate_weights_for(ids, weights, t.expert, tok))
        parts, arrays = [], [
            np.concatenate(rows) if rows else np.zeros(0, np.int32),
            np.concatenate(gates).astype(np.float32) if gates else np.zeros(0, np.float32)]
        for u in sorted(per_unit):
            r = results[unit_peer(u)]
            self._check(r.fields["done_s"], start_s + timing.unit_done_s[u])
            parts.append([u, len(unit_rows[u]), start_s + timing.partial_arrival_s[u]])
            arrays += [r.arrays[0], unit_rows[u]]
        done = self.call(GPU_PEER, {"kind": "moe", "layer": layer, "start_s": start_s,
                                    "meta": meta, "parts": parts}, arrays, f"layer {layer} combine")
        end = start_s + timing.makespan_s
        self._check(done.fields["done_s"], end)
        self._pace(end)

    def token_done(self, step: int, time_s: float) -> None:
        self.call(GPU_PEER, {"kind": "end"})
        self.current = None


class SchedulerCore:
    """The scheduler actor's body: run policies, collect outputs. Plain class (Ray-free)."""

    def __init__(self, cfg: Config, routing: Routing, transport: Transport) -> None:
        self.cfg, self.routing, self.tr = cfg, routing, transport
        self.timeout_s = cfg.emulate.recv_timeout_s
        self.net = Dispatcher(transport, self.timeout_s)

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        return self.net.ping(peer, n)

    def _all(self, fields: dict[str, Any], what: str, units_only: bool = False,
             arrays: dict[int, list[np.ndarray]] | None = None) -> dict[bytes, wire.Message]:
        peers = {} if units_only else {GPU_PEER: -1}
        peers.update({unit_peer(u): u for u in range(self.cfg.ndp.num_ndp_units)})
        if arrays is not None:
            peers = {p: u for p, u in peers.items() if u in arrays}
        waiting = {self.net.send(p, fields, (arrays or {}).get(u, [])): p for p, u in peers.items()}
        return self.net.gather(waiting, what)

    def reset(self, ndp_internal_bw_gbps: float | None = None) -> None:
        """A new policy starts: devices forget their queues and take its cost model."""
        bw = self.cfg.ndp.internal_bw_gbps if ndp_internal_bw_gbps is None else ndp_internal_bw_gbps
        self._all({"kind": "reset", "ndp_internal_bw_gbps": float(bw)}, "reset")

    def warm(self, layouts: dict[int, list[tuple[int, int, int, int]]]) -> dict[int, int]:
        """Has each unit generate its weight slices before any timed work."""
        arrays = {u: [np.asarray(lay, dtype=np.int32).reshape(-1, 4)] for u, lay in layouts.items()}
        saved, self.net.timeout_s = self.net.timeout_s, max(self.timeout_s, 600.0)
        try:
            got = self._all({"kind": "warm"}, "weight generation", units_only=True, arrays=arrays)
        finally:
            self.net.timeout_s = saved
        return {int(m.fields["unit"]): int(m.fields["bytes"]) for m in got.values()}

    def run_policy(self, name: str, dilation: float = 1.0, clock: Clock | None = None,
                   calibrate: bool = False, max_decode_steps: int | None = None, progress=None,
                   trace_steps: range = range(1, 3)) -> tuple[PolicyRecords, EmulationStats]:
        """Runs one policy through the workload on the devices; returns records and stats.

        The run's clock (a :class:`RealClock` at ``dilation`` unless ``clock`` is given)
        starts at emulated 0 once the devices are reset.
        """
        routing = self.routing
        if max_decode_steps is not None and max_decode_steps < routing.decode_steps:
            keep = routing.prompt_tokens + max_decode_steps
            routing = Routing(routing.topk_ids[:, :keep], routing.topk_weights[:, :keep],
                              routing.prompt_tokens, routing.source)
        ex = EmulationExecutor(self.cfg, routing, self.tr, clock, self.timeout_s, calibrate=calibrate,
                               net=self.net)
        episode = Episode(self.cfg, routing, name, executor=ex, trace_steps=trace_steps)
        self.reset(episode.cost.cfg.ndp.internal_bw_gbps)
        if clock is None:  # the run's emulated time starts now, with everything ready
            clock = ex.clock = RealClock(dilation)
        w0 = wall_now()
        ex.last_mark = (w0, 0.0)
        if not calibrate:
            clock.sleep_until_s(0.0)
        rec = episode.run(progress)
        ex.stats.wall_s = wall_now() - w0
        ex.stats.emulated_e2e_s = clock.now_s() if not calibrate else 0.0
        return rec, ex.stats

    def collect(self) -> np.ndarray:
        return np.array(self.net.call(GPU_PEER, {"kind": "collect"}).arrays[0])

    def shutdown(self) -> None:
        for peer in [GPU_PEER, *(unit_peer(u) for u in range(self.cfg.ndp.num_ndp_units))]:
            with contextlib.suppress(EmulationError):
                self.tr.send(peer, wire.encode("shutdown"))
