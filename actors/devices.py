"""The GPU and NDP-unit actors as plain classes: self-throttling single servers.

Each device is a single server with a queue (DESIGN.md section 5). A task starts when its
inputs have arrived and the device is free; the device does the real numpy matmuls, then
holds its output until ``start + D x`` the task's duration from *its own* cost model. Real
work that does not fit its slot is a device **overrun**: the output leaves when the work is
done, late, and the lateness travels on. No device is told when anything should happen, and
none reports an emulated time: they report wall-clock start and end times, for the trace.

Times are wall seconds in the run's reference timebase (the scheduler's clock; a device on
another host adds its measured offset, :attr:`Device.offset_s`). Every message carries the
time it takes effect at its receiver (``at_s``): a receiver schedules from that stamp, not
from when its process happened to read the message, so host message latency shorter than the
modelled time disappears into the dilation and longer latency shows up as an overrun.

Each device body is a small coroutine program (as in SimPy): it ``yield``s a :class:`Hold`
(wall time to wait for) or a :class:`Until` (a condition on what has arrived) and the
:class:`DeviceServer` loop resumes it, receiving messages all the while. Real compute blocks
the loop; messages queue in the socket meanwhile.

- :class:`GpuDevice` runs the model forward by itself once told ``run``: embeddings, dense
  layers, attention + router of each MoE layer (stand-in matmuls, time from the cost model);
  after each router it sends the scheduler an ``event`` ``routed`` (with the expert weights
  that have landed in its cache since the last one) and waits for the step's ``cmd`` ``moe``;
  then sends each unit the activations it needs over the link, runs its own experts (cached
  ones first, fetched ones as their weights land: a wait it logs), waits for every partial,
  combines, and goes on. At each token it reads the wall clock and sends ``event`` ``token``.
  Its expert cache holds only weights that arrived over the link, keyed by transfer id;
  ``evict`` lists drop them.
- :class:`NdpUnit` holds its slices of the experts (generated from the seed before the run),
  runs a step's shards once both the scheduler's ``cmd`` ``moe`` and the GPU's activations
  have arrived, and sends its one partial per token to the GPU over the link. A ``cmd``
  ``ship`` sends the weights of an expert it holds whole to the GPU over the link (fetch or
  prefetch class), at once: the link, not the unit, is the modelled resource of a move.

Control requests (``task`` messages, answered with ``result``): ``reset`` (a new policy: its
cost config, D, the run's timebase offset, trace window; for a restarted unit also the run's
pause state, its next command number and its credit window), ``warm`` (NDP: generate slices),
``run`` (GPU: start the program at the run's epoch), ``report`` (logs, overruns, busy time),
``collect`` (GPU: final hidden states), ``preload`` (GPU: wait until keys have landed),
``status`` and ``resend`` (GPU, recovery: the MoE step in progress, which partials and which
transfer ids reached it; the step's activations again to a restarted unit).

Faults (DESIGN.md section 9): :class:`DeviceServer` answers a repeated task id from a reply
cache, sends heartbeats from its own socket, greets with ``hello`` when it (re)starts, and
obeys an injected ``die`` only when its host allows it. ``cmd`` ``pause`` freezes the device's
clock (:meth:`Device.now`: no hold ends, the program does not run, messages are still taken
in) until ``cmd`` ``resume`` gives it the run's total paused wall time, which every clock
subtracts: the scheduler pauses the whole system while it repairs a fault it injected
(:class:`actors.scheduler.World`). Commands with a sequence number (``cseq``: the scheduler
numbers them when it injects message drops) are acknowledged on receipt and applied in
order, a copy of one already applied is counted and ignored. Ray wraps these classes only in
:mod:`cluster.engines.launch`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.link import LINK_PEER
from actors.transport import Refusals, Transport
from cluster.core import kernels as K
from cluster.core import reference as R
from cluster.core.cost import CostModel
from cluster.core.errors import EmulationError, ProtocolError
from cluster.core.spec import Config

SCHED_PEER = b"sched"


@dataclass(frozen=True)
class Hold:
    """Resume the program at wall time ``until_s``."""

    until_s: float


@dataclass(frozen=True)
class Until:
    """Resume the program once ``ready()`` is true (checked after every message)."""

    ready: Callable[[], bool]


Program = Generator[Any, None, None]


def _reply(request: dict[str, Any], fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> list:
    """A ``result`` for ``request``: its task id, and which send of it (``attempt``) ran."""
    head = {"task_id": request["task_id"], "attempt": request.get("attempt", 1)}
    return wire.encode("result", {**head, **fields}, list(arrays))


def cost_from_fields(cfg: Config, f: dict[str, Any]) -> CostModel:
    """The device's cost model for the policy about to run: its own hardware (``cfg``, the one
    it was built with) with the policy's NDP-weight speed-up (``ndp_bw_factor``, reduced-bit
    NDP weights) and, for tests, ``unit_factor`` slow-downs."""
    import dataclasses

    c = cfg
    factor = float(f.get("ndp_bw_factor", 1.0))
    if factor != 1.0:
        c = cfg.replace(ndp=dataclasses.replace(cfg.ndp, internal_bw_gbps=cfg.ndp.internal_bw_gbps * factor))
    uf = f.get("unit_factor")
    return CostModel(c, tuple(float(x) for x in uf) if uf else None)


class Device:
    """What both devices share: the timebase, the program runner, work slots, the logs."""

    name = "device"

    def __init__(self, cfg: Config, scale: float) -> None:
        self.cfg = cfg
        self.cost = CostModel(cfg)
        self.sm = R.scaled_model(cfg, scale)
        self.offset_s = 0.0
        self.shift_s = 0.0  # wall seconds the run's clock was paused for (fault injection)
        self.frozen_s: float | None = None  # the clock's reading while paused, else None
        self.dilation = 1.0
        self.out: list[tuple[bytes, list]] = []
        self._prog: Program | None = None
        self._wait: Any = None
        self._new_run()

    # --- per run state --------------------------------------------------------------------
    def _new_run(self) -> None:
        self.free_s = -np.inf
        self.overruns = 0
        self.overrun_total_s = 0.0
        self.overrun_max_s = 0.0
        self.overrun_by_kind: dict[str, list[float]] = {}  # kind -> [count, lag, late start]
        self.slots = 0
        self.arrival_late: dict[str, list[float]] = {}  # message kind -> receipt - stamp (wall)
        self.ratios: list[float] = []  # real compute / modelled duration, per slot
        self.busy_by_seq: dict[int, float] = {}  # MoE step -> held wall seconds
        self.log: list[list] = []  # [kind, label, start, end] for traced steps
        self.trace_seqs = (0, -1)
        self.error: str | None = None
        # the scheduler's sequenced commands (drop faults): next expected number, those that
        # came early, and copies of ones already taken (a retry whose first send arrived)
        self.cmd_next = 1
        self.cmd_held: dict[int, wire.Message] = {}
        self.cmd_duplicates = 0

    def reset(self, f: dict[str, Any]) -> None:
        self.cost = cost_from_fields(self.cfg, f)
        self.dilation = float(f.get("dilation", 1.0))
        self.offset_s = float(f.get("offset_s", self.offset_s))
        self._prog = None
        self._wait = None
        self._new_run()
        lo, hi = f.get("trace_seqs", [0, -1])
        self.trace_seqs = (int(lo), int(hi))
        self.cmd_next = int(f.get("cseq_next", 1))
        self.shift_s, self.frozen_s = float(f.get("shift_s", 0.0)), None
        if f.get("paused"):  # a unit restarted while the run is paused joins it paused
            self.pause()

    def now(self) -> float:
        """The run's clock: wall time in the run's timebase less the time it was paused."""
        if self.frozen_s is not None:
            return self.frozen_s
        return wall_now() + self.offset_s - self.shift_s

    # --- the run's pause (fault injection: DESIGN.md section 9) -----------------------------
    def pause(self) -> None:
        """Freezes the clock: no hold ends and the program does not run until :meth:`resume`
        (messages are still taken in). The scheduler pauses every device and the link when
        it injects a fault, so that detecting and repairing it takes no emulated time."""
        if self.frozen_s is None:
            self.frozen_s = self.now()

    def resume(self, shift_s: float) -> None:
        """Thaws the clock with the run's total pause ``shift_s`` (the same for every device
        and the link, set by the scheduler, so that all share one clock again)."""
        self.shift_s = float(shift_s)
        self.frozen_s = None

    # --- the program ------------------------------------------------------------------------
    def start_program(self, prog: Program) -> None:
        self._prog, self._wait = prog, None
        self.advance()

    def advance(self) -> None:
        """Runs the program until it waits for something not yet there."""
        while self._prog is not None and self.frozen_s is None:
            w = self._wait
            if isinstance(w, Hold) and self.now() < w.until_s:
                return
            if isinstance(w, Until) and not w.ready():
                return
            try:
                self._wait = next(self._prog)
            except StopIteration:
                self._prog = self._wait = None
            except Exception as exc:  # a program error stops this device's run, named
                self._prog = self._wait = None
                self.error = f"{self.name}: {type(exc).__name__}: {exc}"
                self.out.append((SCHED_PEER, wire.encode("event", {"kind": "failed",
                                                                   "message": self.error[:2000]})))

    def next_wake_s(self) -> float:
        if self.frozen_s is not None:
            return np.inf
        return self._wait.until_s if isinstance(self._wait, Hold) else np.inf

    def work(self, modelled_s: float, fn: Callable[[], Any], ready_s: float, kind: str,
             label: str, seq: int = -1) -> Generator[Any, None, Any]:
        """One task: its slot opens at ``start = max(free, ready)`` (stamps) and closes at
        ``start + D x modelled_s``; its output is effective at the slot's end, or when the real
        work is done if that is later (an overrun, counted).

        The real work runs as soon as the inputs are physically here and the previous task's
        work is done, and the output leaves at once stamped with its effective time: a
        receiver never acts on it before then, so the time the message spends in flight
        disappears into the slot (DESIGN.md section 5). Code that must observe the wall clock
        at the slot's end (a token's time, the cache seen by the router) holds until then.
        """
        start = max(self.free_s, ready_s)
        t0 = self.now()
        out = fn()
        t1 = self.now()
        slot_end = start + self.dilation * modelled_s
        self.slots += 1
        if modelled_s > 0:
            self.ratios.append((t1 - t0) / modelled_s)
        if t1 > slot_end:
            self.overruns += 1
            self.overrun_total_s += t1 - slot_end
            self.overrun_max_s = max(self.overrun_max_s, t1 - slot_end)
            late = self.overrun_by_kind.setdefault(kind, [0, 0.0, 0.0])
            late[0] += 1
            late[1] += t1 - slot_end
            late[2] += max(0.0, t0 - start)  # of which the work began after its slot opened
        finish = max(slot_end, t1)
        self.free_s = finish
        if seq >= 0:
            self.busy_by_seq[seq] = self.busy_by_seq.get(seq, 0.0) + (finish - start)
        if self._traced(seq, start):
            self.log.append([kind, label, start, finish])
        return out
        yield  # a generator, for ``yield from`` in programs

    def _traced(self, seq: int, start: float) -> bool:
        lo, hi = self.trace_seqs
        return lo <= seq <= hi or (seq < 0 and getattr(self, "_tracing", False))

    def report(self) -> dict[str, Any]:
        return {"overruns": self.overruns, "overrun_total_s": self.overrun_total_s,
                "overrun_max_s": self.overrun_max_s, "slots": self.slots,
                "overrun_by_kind": self.overrun_by_kind,
                "arrival_late": {k: [float(np.quantile(v, q)) for q in (0.5, 0.9, 1.0)]
                                 for k, v in self.arrival_late.items()},
                "ratios": self.ratios, "busy_by_seq": {str(k): v for k, v in self.busy_by_seq.items()},
                "log": self.log, "error": self.error, "cmd_duplicates": self.cmd_duplicates,
                "shift_s": self.shift_s}

    # --- messages -----------------------------------------------------------------------------
    def handle(self, msg: wire.Message) -> list:
        """A control request (``task``): its reply frames."""
        raise NotImplementedError

    def on_message(self, peer: bytes, msg: wire.Message) -> None:
        """A ``cmd`` from the scheduler or ``data`` from the link."""
        raise ProtocolError(f"{self.name} got an unexpected {msg.type!r} message")

    def send_link(self, fields: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.out.append((LINK_PEER, wire.encode("data", fields, arrays)))


def _slice_cols(w: K.ExpertWeights, lo_s: int, hi_s: int, full_s: int) -> K.ExpertWeights:
    """Columns ``[lo_s, hi_s)`` of a whole expert's weights (contiguous copies)."""
    if lo_s == 0 and hi_s == full_s:
        return w
    g, u, d = w
    return (np.ascontiguousarray(g[:, lo_s:hi_s]), np.ascontiguousarray(u[:, lo_s:hi_s]),
            np.ascontiguousarray(d[lo_s:hi_s]))


def _int(f: dict[str, Any], name: str) -> int:
    v = f.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"field {name!r} must be an int, got {v!r}")
    return v


SHIP_WINDOW = 4  # prefetch transfers a unit keeps at the link (flow control by credits)


class NdpUnit(Device):
    """NDP unit ``unit``: holds slices of experts (generated from the seed) and runs them."""

    def __init__(self, cfg: Config, unit: int, scale: float) -> None:
        self.unit = unit
        self.name = f"ndp{unit}"
        self.weights: dict[tuple[int, int, int, int], K.ExpertWeights] = {}
        super().__init__(cfg, scale)

    def _new_run(self) -> None:
        super()._new_run()
        self.cmds: dict[int, wire.Message] = {}
        self.acts: dict[int, wire.Message] = {}
        self.backlog: deque[tuple[dict[str, Any], list[int]]] = deque()  # prefetches to hand over
        self.window = SHIP_WINDOW  # prefetches it may have at the link, not yet delivered

    def slice(self, layer: int, expert: int, lo: int, hi: int) -> K.ExpertWeights:
        """The weights of true columns ``[lo, hi)`` of an expert, generated once and kept."""
        sm = self.sm
        lo_s, hi_s = K.column_slice(lo, hi, sm.model.d_ff, sm.d_ff_s)
        key = (layer, expert, lo_s, hi_s)
        w = self.weights.get(key)
        if w is None:
            whole = self.weights.get((layer, expert, 0, sm.d_ff_s))
            if whole is not None:
                return _slice_cols(whole, lo_s, hi_s, sm.d_ff_s)
            w = self.weights[key] = K.expert_slice(sm.seed, layer, expert, sm.d_model_s, sm.d_ff_s,
                                                   lo_s, hi_s)
        return w

    def warm(self, layouts: list[tuple[int, int, int, int]]) -> int:
        """Generates ``(layer, expert, lo, hi)`` slices ahead of the run; returns bytes held."""
        for layer, expert, lo, hi in layouts:
            self.slice(layer, expert, lo, hi)
        return sum(sum(a.nbytes for a in w) for w in self.weights.values())

    def handle(self, msg: wire.Message) -> list:
        f = msg.fields
        kind = f["kind"]
        if kind == "reset":
            self.reset(f)
            # a restarted unit: prefetches its predecessor handed the link still hold credits
            self.window = int(f.get("window", SHIP_WINDOW))
            self.start_program(self._program())
            return _reply(f, {"unit": self.unit})
        if kind == "warm":
            held = self.warm([tuple(x) for x in msg.arrays[0].tolist()])
            return _reply(f, {"unit": self.unit, "bytes": held})
        if kind == "report":
            return _reply(f, {"unit": self.unit}, [wire.json_array(self.report())])
        raise ProtocolError(f"NDP unit {self.unit} got an unknown task kind {kind!r}")

    def on_message(self, peer: bytes, msg: wire.Message) -> None:
        """Checks a command or activation when it arrives (a bad one is refused with an
        error reply and never reaches the program), then queues it."""
        f = msg.fields
        if msg.type == "cmd" and f["kind"] == "moe":
            self._check_moe(f, msg.arrays)
            self.cmds[int(f["seq"])] = msg
        elif msg.type == "cmd" and f["kind"] == "ship":
            self._ship(f)
        elif msg.type == "cmd" and f["kind"] == "expedite":
            self._expedite({int(p) for p in f.get("pids", [])})
        elif msg.type == "cmd" and f["kind"] == "credit":  # the link delivered one of ours
            self.window += 1
            self._pump()
        elif msg.type == "data" and f["kind"] == "activation":
            a = msg.arrays
            if len(a) != 1 or a[0].ndim != 2 or a[0].shape[1] != self.sm.d_model_s:
                raise ProtocolError(f"{self.name}: activations must be one [n, {self.sm.d_model_s}] array")
            self.acts[_int(f, "seq")] = msg
        else:
            raise ProtocolError(f"{self.name} got an unexpected {msg.type}/{f.get('kind')!r}")

    def _check_moe(self, f: dict[str, Any], arrays: list[np.ndarray]) -> None:
        _int(f, "seq"), _int(f, "layer")
        meta = f.get("meta")
        if not isinstance(meta, list) or len(arrays) != 2:
            raise ProtocolError(f"{self.name}: moe needs a meta list and arrays rows, gates")
        d_ff, total = self.sm.model.d_ff, 0
        for m in meta:
            if (not isinstance(m, list) or len(m) != 4 or not all(isinstance(v, int) for v in m)
                    or not 0 <= m[1] < m[2] <= d_ff or m[3] < 0):
                raise ProtocolError(f"{self.name}: bad shard {m!r} (expert, lo < hi <= {d_ff}, n)")
            total += m[3]
        rows, gates = arrays
        if rows.shape != (total,) or gates.shape != (total,):
            raise ProtocolError(f"{self.name}: rows/gates must have {total} entries (sum of shard rows)")

    def _ship(self, f: dict[str, Any]) -> None:
        """Sends expert weights it holds to the GPU over the link (a fetch or a prefetch)."""
        d_ff, m = self.sm.model.d_ff, self.sm.model
        if f.get("class") not in ("fetch", "prefetch") or not isinstance(f.get("items"), list):
            raise ProtocolError(f"{self.name}: ship needs class fetch|prefetch and items")
        for it in f["items"]:
            if (not isinstance(it, list) or len(it) != 6 or not all(isinstance(v, int) for v in it)
                    or not (0 <= it[0] < m.num_layers and 0 <= it[1] < m.num_experts
                            and 0 <= it[2] < it[3] <= d_ff)):
                raise ProtocolError(f"{self.name}: bad ship item {it!r}")
        if f["class"] == "prefetch":  # handed over as the link drains them (credits)
            self.backlog.extend((f, it) for it in f["items"])
            self._pump()
            return
        for it in f["items"]:
            self._send_weights(f, it)

    def _pump(self) -> None:
        """Prefetch weights go to the link at most ``SHIP_WINDOW`` at a time, a credit from
        the link per delivery making room for the next. A unit gets a thousand prefetch
        orders at the end of a prefill: sent at once they would fill the link's memory and
        hold up the next step's traffic behind their handling, for transfers the link would
        serve one after the other anyway. Their link arrival is their order's stamp either
        way, so first come first served is kept."""
        while self.window > 0 and self.backlog:
            f, it = self.backlog.popleft()
            self._send_weights(f, it, windowed=True)
            self.window -= 1

    def _expedite(self, pids: set[int]) -> None:
        """Prefetches the scheduler upgraded to fetches go to the link now, outside the
        window (the link credits only what was sent under it)."""
        keep = deque()
        for f, it in self.backlog:
            if it[4] in pids:
                self._send_weights(f, it)
            else:
                keep.append((f, it))
        self.backlog = keep

    def _send_weights(self, f: dict[str, Any], it: list[int], windowed: bool = False) -> None:
        layer, expert, lo, hi, pid, order = it
        w = self.slice(layer, expert, lo, hi)
        true_bytes = int(self.cost.expert_bytes * (hi - lo) / self.sm.model.d_ff)
        self.send_link({"kind": f["class"], "dst": "gpu", "at_s": float(f["at_s"]),
                        "true_bytes": true_bytes, "order": int(order), "pid": int(pid),
                        "seq": int(f.get("seq", -1)), "layer": layer, "expert": expert,
                        "lo": lo, "hi": hi, "label": f"L{layer} e{expert}",
                        "windowed": windowed}, list(w))

    def _program(self) -> Program:
        """Forever: the next step that has both its command and its activations."""
        while True:
            yield Until(lambda: any(s in self.acts for s in self.cmds))
            seq = min(s for s in self.cmds if s in self.acts)
            cmd, act = self.cmds.pop(seq), self.acts.pop(seq)
            f = cmd.fields
            xn = act.arrays[0]
            rows, gates = cmd.arrays
            d_ff = self.sm.model.d_ff
            busy, tasks, off = 0.0, [], 0
            for expert, lo, hi, n in f["meta"]:
                busy += self.cost.ndp_unit_expert_s(self.unit, n, (hi - lo) / d_ff)
                tasks.append((rows[off:off + n], gates[off:off + n],
                              self.slice(f["layer"], expert, lo, hi)))
                off += n
            ready = max(float(f["at_s"]), float(act.fields["at_s"]))
            partial = yield from self.work(busy, lambda xn=xn, tasks=tasks: K.partial_for_tasks(xn, tasks),
                                           ready, "expert", f"L{f['layer']} {len(tasks)} shards", seq)
            self.send_link({"kind": "partial", "dst": "gpu", "at_s": self.free_s, "seq": seq,
                            "unit": self.unit,
                            "true_bytes": int(self.cost.activation_bytes(xn.shape[0])),
                            "label": f"ndp{self.unit}->gpu"}, [partial])


class GpuDevice(Device):
    """The GPU: runs the model forward, its share of the experts and every combine; holds
    the hidden states and the expert cache."""

    name = "gpu"

    def __init__(self, cfg: Config, scale: float) -> None:
        super().__init__(cfg, scale)
        self.gw = R.gpu_weights(self.sm)
        w = cfg.workload
        self.outputs = np.zeros((w.batch_size, w.prompt_tokens + w.output_tokens - 1,
                                 self.sm.d_model_s), dtype=np.float32)

    def _new_run(self) -> None:
        super()._new_run()
        self.cmds: dict[int, wire.Message] = {}
        self.partials: dict[int, dict[int, wire.Message]] = {}
        self.arrivals: dict[int, tuple[tuple[int, int, int, int], K.ExpertWeights, float]] = {}
        self.cache: dict[int, tuple[tuple[int, int, int, int], K.ExpertWeights]] = {}  # pid ->
        self.keep: set[int] = set()  # on-demand fetches to keep in the cache when they land
        self.dropped: set[int] = set()  # evicted prefetches still in flight: drop on arrival
        self.landed: list[list[int]] = []  # [layer, expert, pid] not yet reported
        self.cache_peak = 0
        self.waits: list[float] = []  # wall seconds the GPU waited for fetched weights
        self.tokens: list[tuple[int, float]] = []
        self.step_times: dict[int, tuple[float, float]] = {}  # seq -> (start, end)
        self.gpu_busy_by_seq: dict[int, float] = {}
        self.other_busy_s = 0.0
        self.seen_pids: set[int] = set()  # every transfer id that reached it this run
        # the MoE step in progress: its seq and the activations sent to each unit (kept so
        # that a restarted unit can be sent them again)
        self.acts_out: tuple[int, dict[int, tuple[dict[str, Any], np.ndarray]]] | None = None

    def handle(self, msg: wire.Message) -> list:
        f = msg.fields
        kind = f["kind"]
        if kind == "reset":
            self.reset(f)
            self.outputs[:] = 0
            return _reply(f, {})
        if kind == "run":
            self.start_program(self._program(float(f["epoch_s"]), int(f["decode_steps"])))
            return _reply(f, {})
        if kind == "preload":
            need = {int(p) for p in f["pids"]}
            return _reply(f, {"landed": sorted(need & set(self.cache))})
        if kind == "report":
            rep = self.report()
            rep.update({"tokens": self.tokens, "step_times": {str(k): v for k, v in self.step_times.items()},
                        "gpu_busy_by_seq": {str(k): v for k, v in self.gpu_busy_by_seq.items()},
                        "other_busy_s": self.other_busy_s, "waits": self.waits,
                        "cache_peak": self.cache_peak, "cache_now": len(self.cache)})
            return _reply(f, {}, [wire.json_array(rep)])
        if kind == "collect":
            return _reply(f, {}, [self.outputs])
        if kind == "status":  # recovery: where the GPU stands and what reached it
            cur = self.acts_out
            seq = cur[0] if cur is not None else -1
            return _reply(f, {"seq": seq, "units": sorted(cur[1]) if cur is not None else [],
                              "partials": sorted(self.partials.get(seq, {})),
                              "combined": max(self.step_times, default=-1)},
                          [np.asarray(sorted(self.seen_pids), dtype=np.int64)])
        if kind == "resend":  # recovery: the step's activations again, to a restarted unit
            u, seq = _int(f, "unit"), _int(f, "seq")
            cur = self.acts_out
            sent = cur is not None and cur[0] == seq and u in cur[1]
            if sent:
                fields, arr = cur[1][u]
                self.send_link(fields, [arr])
            return _reply(f, {"resent": sent})
        raise ProtocolError(f"GPU got an unknown task kind {kind!r}")

    def on_message(self, peer: bytes, msg: wire.Message) -> None:
        f = msg.fields
        late = self.now() - float(f.get("at_s", np.inf))
        if np.isfinite(late):  # how long after it took effect a message was in hand
            self.arrival_late.setdefault(f"{msg.type}:{f['kind']}", []).append(late)
        if msg.type == "cmd" and f["kind"] == "moe":
            self.cmds[int(f["seq"])] = msg
        elif msg.type == "data" and f["kind"] == "partial":
            self.partials.setdefault(int(f["seq"]), {})[int(f["unit"])] = msg
        elif msg.type == "data" and f["kind"] in ("fetch", "prefetch"):
            self._landed(f, msg.arrays)
        else:
            raise ProtocolError(f"gpu got an unexpected {msg.type}/{f.get('kind')!r}")

    def _landed(self, f: dict[str, Any], arrays: list[np.ndarray]) -> None:
        pid = int(f["pid"])
        self.seen_pids.add(pid)
        if pid in self.dropped:  # evicted while in flight
            self.dropped.discard(pid)
            return
        ref = (int(f["layer"]), int(f["expert"]), int(f["lo"]), int(f["hi"]))
        w = tuple(np.asarray(a) for a in arrays)
        self.arrivals[pid] = (ref, w, float(f["at_s"]))
        whole = ref[2] == 0 and ref[3] == self.sm.model.d_ff
        if whole and (f["kind"] == "prefetch" or pid in self.keep):
            self.keep.discard(pid)
            self.cache[pid] = (ref, w)
            self.cache_peak = max(self.cache_peak, len(self.cache))
            self.landed.append([ref[0], ref[1], pid, float(f["at_s"])])

    def _evict(self, pids: list[int]) -> None:
        for pid in pids:
            if self.cache.pop(pid, None) is None:
                self.dropped.add(pid)  # not landed yet: drop it when it does
            self.arrivals.pop(pid, None)
            self.keep.discard(pid)

    def _positions(self, phase: str, step: int) -> list[int]:
        P = self.cfg.workload.prompt_tokens
        return list(range(P)) if phase == "prefill" else [P + step - 1]

    def _gpu_work(self, seconds: float, fn: Callable[[], Any], kind: str, label: str,
                  tracing: bool) -> Generator[Any, None, Any]:
        self._tracing = tracing
        before = self.free_s
        out = yield from self.work(seconds, fn, self.free_s, kind, label)
        self.other_busy_s += self.free_s - before
        self._tracing = False
        return out

    def _program(self, epoch_s: float, decode_steps: int) -> Program:
        cfg, cost, D = self.cfg, self.cost, self.dilation
        L, B, P = cfg.model.num_layers, cfg.workload.batch_size, cfg.workload.prompt_tokens
        lat = cost.link_latency_s
        self.free_s = epoch_s
        seq = -1
        lo, hi = self.trace_seqs
        steps = [("prefill", 0)] + [("decode", s) for s in range(1, decode_steps + 1)]
        for phase, step in steps:
            pos = self._positions(phase, step)
            n, ctx = B * len(pos), (P if phase == "prefill" else P + step)
            x = K.token_embeddings(self.sm.seed, B, pos, self.sm.d_model_s).reshape(n, self.sm.d_model_s)
            tracing = lo <= seq + 1 <= hi
            for i in range(cfg.model.num_dense_layers):
                def dense(i=i, x=x):
                    y = K.layer_mix(x, self.gw.dense_attention[i])
                    return y + K.swiglu(K.rms_norm(y), *self.gw.dense_ffn[i])
                x = yield from self._gpu_work(cost.gpu_dense_layer_s(n, ctx, B), dense, "layer",
                                              f"dense layer {i}", tracing)
            for layer in range(L):
                seq += 1
                tracing = lo <= seq <= hi
                x, xn = yield from self._gpu_work(
                    cost.gpu_layer_s(n, ctx, B), lambda x=x, layer=layer: R.moe_layer_input(self.gw, layer, x),
                    "layer", f"L{layer} attention+router", tracing)
                yield Hold(self.free_s)  # the router's output, and the cache it sees, at its end
                landed = [x[:3] for x in self.landed if x[3] <= self.free_s]
                self.landed = [x for x in self.landed if x[3] > self.free_s]
                self.out.append((SCHED_PEER, wire.encode("event", {
                    "kind": "routed", "seq": seq, "layer": layer, "at_s": self.free_s + D * lat,
                    "landed": landed})))
                yield Until(lambda seq=seq: seq in self.cmds)
                x = yield from self._moe(self.cmds.pop(seq), seq, x, xn)
            yield from self._gpu_work(cost.gpu_head_s(B), lambda: None, "layer", "lm head",
                                      lo <= seq <= hi)
            yield Hold(self.free_s)  # the token is done when the head's slot ends: read then
            t_tok = self.now()
            self.tokens.append((step, t_tok))
            self.outputs[:, pos[0]:pos[-1] + 1] = x.reshape(B, len(pos), -1)
            self.out.append((SCHED_PEER, wire.encode("event", {
                "kind": "token", "step": step, "wall_s": t_tok, "at_s": self.free_s + D * lat})))
        self.out.append((SCHED_PEER, wire.encode("event", {"kind": "done", "wall_s": self.now()})))

    def _moe(self, cmd: wire.Message, seq: int, x: np.ndarray, xn: np.ndarray) -> Generator[Any, None, np.ndarray]:
        """One MoE step: activations out, own experts, partials in, combine."""
        f = cmd.fields
        cost, d_ff = self.cost, self.sm.model.d_ff
        layer = int(f["layer"])
        start = max(self.free_s, float(f["at_s"]))
        for pid in (int(p) for p in f.get("keep", [])):
            got = self.arrivals.get(pid)
            if got is None:
                self.keep.add(pid)  # cache it when it lands
            elif pid not in self.cache:  # it landed before this command: cache it now
                self.cache[pid] = (got[0], got[1])
                self.cache_peak = max(self.cache_peak, len(self.cache))
                self.landed.append([got[0][0], got[0][1], pid, got[2]])
        arrays = cmd.arrays
        rows, gates = arrays[0], arrays[1]
        units = [int(u) for u in f["units"]]
        unit_rows = {u: arrays[2 + i] for i, u in enumerate(units)}
        sent: dict[int, tuple[dict[str, Any], np.ndarray]] = {}
        for u in units:
            r = unit_rows[u]
            act = ({"kind": "activation", "dst": f"ndp{u}", "at_s": start, "seq": seq,
                    "true_bytes": int(cost.activation_bytes(len(r))), "label": f"act->ndp{u}"},
                   np.ascontiguousarray(xn[r]))
            self.send_link(act[0], [act[1]])
            sent[u] = act
        self.acts_out = (seq, sent)
        traced = self.trace_seqs[0] <= seq <= self.trace_seqs[1]
        # own experts: cached ones first (plan order), then fetched ones as their weights land
        meta = f["meta"]  # [expert, lo, hi, n_rows, transfer id, fetched]
        offs = np.cumsum([0] + [m[3] for m in meta])
        cached = {i: self._weights(layer, *m[:3], m[4]) for i, m in enumerate(meta) if not m[5]}
        self._evict([int(p) for p in f.get("evict", [])])  # after taking what this step uses
        out = R.shared_output(self.gw, layer, xn)
        order = sorted(cached)
        waiting = [i for i, m in enumerate(meta) if m[5]]
        busy = 0.0
        step_start = start
        self.free_s = max(self.free_s, start)
        while order or waiting:
            if order:
                i = order.pop(0)
                ready, w = start, cached[i]
            else:
                yield Until(lambda: any(int(meta[j][4]) in self.arrivals for j in waiting))
                i = min((j for j in waiting if int(meta[j][4]) in self.arrivals),
                        key=lambda j: self.arrivals[int(meta[j][4])][2])
                waiting.remove(i)
                pid = int(meta[i][4])
                ready = self.arrivals[pid][2]
                w = self._weights(layer, *meta[i][:3], pid)
                if pid not in self.cache:
                    self.arrivals.pop(pid, None)  # used once; a kept one stays in the cache
                if ready > self.free_s:
                    self.waits.append(ready - self.free_s)
                    if traced:
                        self.log.append(["wait", f"wait L{layer} e{meta[i][0]}", self.free_s, ready])
            expert, lo, hi, cnt = meta[i][:4]
            r, g = rows[offs[i]:offs[i + 1]], gates[offs[i]:offs[i + 1]]
            dur = cost.gpu_expert_s(int(cnt), (hi - lo) / d_ff)
            busy += dur
            yield from self.work(dur, lambda r=r, g=g, w=w: K.partial_for_tasks(xn, [(r, g, w)], out=out),
                                 ready, "expert", f"L{layer} e{expert}", seq)
        yield Until(lambda: len(self.partials.get(seq, {})) == len(units))
        parts = self.partials.pop(seq, {})
        last = max([float(m.fields["at_s"]) for m in parts.values()], default=start)
        covered = set(np.asarray(rows).tolist())
        for u in units:
            covered.update(np.asarray(unit_rows[u]).tolist())
        n_parts = len(units) + (1 if meta else 0)
        comb = cost.gpu_combine_s(len(covered), n_parts)

        def combine() -> np.ndarray:
            for u in units:
                out[unit_rows[u]] += parts[u].arrays[0]
            return x + out

        x = yield from self.work(comb, combine, last, "combine", f"L{layer}", seq)
        self.acts_out = None
        self.step_times[seq] = (step_start, self.free_s)
        self.gpu_busy_by_seq[seq] = busy + comb  # modelled; busy_by_seq has the measured
        return x

    def _weights(self, layer: int, expert: int, lo: int, hi: int, pid: int) -> K.ExpertWeights:
        sm = self.sm
        lo_s, hi_s = K.column_slice(lo, hi, sm.model.d_ff, sm.d_ff_s)
        got = self.cache.get(pid) or self.arrivals.get(pid)
        if got is None:
            raise ProtocolError(f"gpu: weights of L{layer} e{expert} (transfer {pid}) never arrived")
        ref, w = got[0], got[1]
        rlo, rhi = K.column_slice(ref[2], ref[3], sm.model.d_ff, sm.d_ff_s)
        return _slice_cols(w, lo_s - rlo, hi_s - rlo, rhi - rlo)


HEARTBEAT_INTERVAL_S = 1.0
REPLY_CACHE = 32  # replies kept for retried task ids: retries concern the last few tasks only
SPIN_FREE_S = 1e-3  # a hold closer than this is slept out with time.sleep, not polled


# who may tell a device what: the scheduler commands it, the link delivers transfers (and
# credits them); an ``error`` is a peer's answer to something this device sent: counted,
# never answered
DEVICE_PEERS: dict[bytes, frozenset[str]] = {
    SCHED_PEER: frozenset({"task", "cmd", "ping", "shutdown", "error"}),
    LINK_PEER: frozenset({"data", "cmd", "error"}),  # transfers, and credits for them
}


class DeviceServer:
    """Serves one device (or the link's twin loop) on a transport until ``shutdown``.

    Only ``peers`` (name -> message types it may send; default :data:`DEVICE_PEERS`) are
    listened to: a message from anyone else is dropped unanswered and recorded in
    ``refusals``. A malformed message from a known peer, or one of a type that peer may not
    send, is answered with an ``error`` and counted (``rejected``, ``malformed``); an
    ``error`` itself is counted and never answered (two sides never trade errors forever).
    The server keeps serving (DESIGN.md section 9). Runs in the caller's thread
    (:meth:`serve`) or a background thread (:meth:`start`).

    - Idempotent by task id: a ``task`` whose id was already answered gets the cached reply.
    - ``heartbeat``: a transport of its own (zmq sockets are not thread-safe) on which a thread
      sends ``hello`` every ``heartbeat_interval_s`` with ``peer``, ``seq`` and
      ``incarnation``; the scheduler declares a device dead when these stop.
    - ``announce_to``: the peer to greet with ``hello`` on the main transport when serving
      starts, so that a restarted device's connection is known to be up.
    - ``on_die``: what an injected ``die`` task does (a Ray host exits the process); without
      it ``die`` is rejected like any unknown request.
    """

    def __init__(self, device: Device, transport: Transport, poll_s: float = 0.05,
                 *, name: str = "", heartbeat: Transport | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, incarnation: int = 0,
                 announce_to: bytes | None = None, on_die: Callable[[], None] | None = None,
                 peers: dict[bytes, frozenset[str]] | None = None) -> None:
        self.device = device
        self.peers = DEVICE_PEERS if peers is None else peers
        self.refusals = Refusals()  # unknown peers, dropped
        self.malformed = Refusals()  # known peers' bad messages, answered
        self.transport = transport
        self.poll_s = poll_s
        self.name = name or device.name
        self.heartbeat = heartbeat
        self.heartbeat_interval_s = heartbeat_interval_s
        self.incarnation = incarnation
        self.announce_to = announce_to
        self.on_die = on_die
        self.rejected = 0
        self.handled = 0
        self.replayed = 0
        self.beats = 0
        self._replies: OrderedDict[int, list] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None

    def _hello(self, seq: int) -> list:
        return wire.encode("hello", {"peer": self.name, "seq": seq, "incarnation": self.incarnation})

    def _die(self) -> None:
        self._stop.set()
        if self.on_die is not None:
            self.on_die()

    def _flush(self) -> None:
        dev = self.device
        while dev.out:
            peer, frames = dev.out.pop(0)
            try:
                self.transport.send(peer, frames)
            except EmulationError:
                self.rejected += 1

    def serve(self) -> None:
        if self.announce_to is not None:
            try:
                self.transport.send(self.announce_to, self._hello(0))
            except EmulationError:
                self.rejected += 1
        dev = self.device
        while not self._stop.is_set():
            wait = dev.next_wake_s() - dev.now()
            if wait > SPIN_FREE_S:
                got = self.transport.recv(min(self.poll_s, wait - SPIN_FREE_S))
            else:
                got = self.transport.recv(0.0)
                if got is None and wait > 0:
                    time.sleep(wait)
            while got is not None:  # everything already here, then the program
                self._handle(*got)
                if self._stop.is_set():
                    break
                got = self.transport.recv(0.0)
            dev.advance()
            self._flush()
        self._stop.set()

    def _handle(self, peer: bytes, frames: list) -> None:
        allowed = self.peers.get(peer)
        if allowed is None:  # not a peer of this run: not even an answer
            self.refusals.add(peer, "unknown peer")
            return
        tid = None
        try:
            msg = wire.decode(frames)
            if msg.type not in allowed:
                raise ProtocolError(f"{msg.type!r} is not a message {peer.decode()} sends")
            if msg.type == "error":
                self.malformed.add(peer, f"error from the peer: {msg.fields['message'][:120]}")
                self.rejected += 1
                return
            if msg.type == "shutdown":
                self._stop.set()
                return
            if msg.type == "ping":
                self.transport.send(peer, wire.encode("pong", {"seq": msg.fields["seq"],
                                                               "wall_s": wall_now()}))
                return
            if msg.type == "cmd" and peer == SCHED_PEER:
                self._command(peer, msg)
                self.handled += 1
                return
            if msg.type in ("cmd", "data"):
                self.device.on_message(peer, msg)
                self.handled += 1
                return
            if msg.type != "task":
                raise ProtocolError(f"unexpected message type {msg.type!r}")
            tid = msg.fields["task_id"]
            if msg.fields["kind"] == "die" and self.on_die is not None:
                self._die()
                return
            reply = self._replies.get(tid)
            if reply is not None:
                self.replayed += 1
            else:
                reply = self.device.handle(msg)
                self._replies[tid] = reply
                if len(self._replies) > REPLY_CACHE:
                    self._replies.popitem(last=False)
        except Exception as exc:  # any bad request is answered and counted; the device serves on
            self.rejected += 1
            self.malformed.add(peer, f"{type(exc).__name__}: {exc}"[:120])
            err = {"message": f"{self.name}: {type(exc).__name__}: {exc}"[:2000]}
            if isinstance(tid, int) and not isinstance(tid, bool):
                err["task_id"] = tid
            reply = wire.encode("error", err)
        self.handled += 1
        try:
            self.transport.send(peer, reply)
        except EmulationError:
            self.rejected += 1

    def _command(self, peer: bytes, msg: wire.Message) -> None:
        """A ``cmd`` from the scheduler. ``pause`` and ``resume`` act at once (the run's clock,
        :meth:`Device.pause`). A command with a sequence number ``cseq`` (the scheduler numbers
        its commands when it injects drops) is acknowledged at once with an ``event`` ``ack``
        and applied in number order: one that comes early waits for those before it, a copy of
        one already here (a retry whose first send did arrive) is counted and ignored."""
        dev = self.device
        f = msg.fields
        kind = f["kind"]
        if kind == "pause":
            dev.pause()
            return
        if kind == "resume":
            shift = f.get("shift_s")
            if not isinstance(shift, (int, float)) or isinstance(shift, bool):
                raise ProtocolError("resume needs shift_s, a number")
            dev.resume(float(shift))
            return
        c = f.get("cseq")
        if c is None:
            dev.on_message(peer, msg)
            return
        if type(c) is not int or c < 1:
            raise ProtocolError(f"cseq must be an int >= 1, got {c!r}")
        self.transport.send(peer, wire.encode("event", {"kind": "ack", "cseq": c}))
        if c < dev.cmd_next or c in dev.cmd_held:
            dev.cmd_duplicates += 1
            return
        dev.cmd_held[c] = msg
        error: Exception | None = None
        while dev.cmd_next in dev.cmd_held:
            m = dev.cmd_held.pop(dev.cmd_next)
            dev.cmd_next += 1
            try:
                dev.on_message(peer, m)
            except Exception as exc:  # the rest still apply; the first error is answered
                error = error or exc
        if error is not None:
            raise error

    def _beat(self) -> None:
        seq = 0
        while True:
            seq += 1
            try:
                self.heartbeat.send(self.announce_to or SCHED_PEER, self._hello(seq))
                self.beats += 1
            except EmulationError:
                pass
            if self._stop.wait(self.heartbeat_interval_s):
                return

    def start(self) -> threading.Thread:
        if self.heartbeat is not None:
            self._beat_thread = threading.Thread(target=self._beat, name=f"ndpmoe-hb-{self.name}",
                                                 daemon=True)
            self._beat_thread.start()
        self._thread = threading.Thread(target=self.serve, name=f"ndpmoe-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._beat_thread is not None:
            self._beat_thread.join(timeout_s)
