"""The GPU and NDP-unit actors as plain classes, and the loop that serves them.

Each device turns one decoded request (:class:`actors.wire.Message`) into one reply: it does
the real numpy work and stamps the reply with the *emulated* times its own cost model gives
(queueing on the device is exact: a task starts at ``max(arrival, device free)``). Devices
never sleep: pacing to the wall clock is the scheduler's (it holds the only clock of the run
and paces every step to its emulated end), so that message latency is absorbed by the
dilation instead of adding up. Ray wraps these classes only in :mod:`cluster.launch`.

Requests (``task`` messages, field ``kind``):

- NDP ``moe``: ``arrival_s``, ``meta`` = ``[[expert, col_lo, col_hi, n_rows], ...]`` (true
  d_ff columns); arrays ``xn[n, d]``, ``rows[sum n_rows]`` int32 (into ``xn``),
  ``gates[sum n_rows]`` float32. Reply: ``done_s``, ``busy_s`` and the partial ``[n, d]``.
- GPU ``begin``: ``phase``, ``step``: load the step's token embeddings.
- GPU ``dense``: ``index``, ``start_s``, ``ctx``: one leading dense layer.
- GPU ``attention``: ``layer``, ``start_s``, ``ctx``: the attention stand-in and norm of a
  MoE layer; reply carries ``xn``.
- GPU ``moe``: ``start_s``, ``meta`` = ``[[expert, col_lo, col_hi, n_rows, ready_s], ...]``,
  ``parts`` = ``[[unit, n_rows, arrival_s], ...]``; arrays: ``rows``, ``gates`` of the GPU's
  tasks, then per partial its array and its rows (int32, into the step's tokens).
- GPU ``end``: store the step's final hidden states. GPU ``collect``: reply with all outputs.
- both: ``reset`` (a new policy starts at emulated 0); NDP ``warm``: array ``[n, 4]`` int32
  of ``(layer, expert, col_lo, col_hi)`` slices to generate before the run.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from actors import kernels as K
from actors import wire
from actors.clock import wall_now
from actors.transport import Transport
from cluster import reference as R
from cluster.cost import CostModel
from cluster.errors import EmulationError, ProtocolError
from cluster.spec import Config


def _policy_cost(cfg: Config, fields: dict[str, Any]) -> CostModel:
    """The cost model of the policy about to run: a ``reset`` may carry the NDP internal
    bandwidth of that policy's cost config (reduced-bit-width NDP weights, see
    ``cluster.analytic.policy_cost_config``)."""
    bw = fields.get("ndp_internal_bw_gbps")
    if bw is None or bw == cfg.ndp.internal_bw_gbps:
        return CostModel(cfg)
    return CostModel(cfg.replace(ndp=dataclasses.replace(cfg.ndp, internal_bw_gbps=float(bw))))


def _reply(task_id: int, fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> list:
    return wire.encode("result", {"task_id": task_id, **fields}, list(arrays))


class NdpUnit:
    """NDP unit ``unit``: holds slices of experts (generated from the seed) and runs them."""

    def __init__(self, cfg: Config, unit: int, scale: float) -> None:
        self.cfg, self.unit = cfg, unit
        self.cost = CostModel(cfg)
        self.sm = R.scaled_model(cfg, scale)
        self.weights: dict[tuple[int, int, int, int], K.ExpertWeights] = {}
        self.free_s = 0.0

    def slice(self, layer: int, expert: int, lo: int, hi: int) -> K.ExpertWeights:
        """The weights of true columns ``[lo, hi)`` of an expert, generated once and kept."""
        sm = self.sm
        lo_s, hi_s = K.column_slice(lo, hi, sm.model.d_ff, sm.d_ff_s)
        key = (layer, expert, lo_s, hi_s)
        w = self.weights.get(key)
        if w is None:
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
            self.free_s = 0.0
            self.cost = _policy_cost(self.cfg, f)
            return _reply(f["task_id"], {"unit": self.unit})
        if kind == "warm":
            held = self.warm([tuple(x) for x in msg.arrays[0].tolist()])
            return _reply(f["task_id"], {"unit": self.unit, "bytes": held})
        if kind != "moe":
            raise ProtocolError(f"NDP unit {self.unit} got an unknown task kind {kind!r}")
        xn, rows, gates = msg.arrays
        d_ff = self.sm.model.d_ff
        start = max(float(f["arrival_s"]), self.free_s)
        busy = 0.0
        tasks = []
        off = 0
        for expert, lo, hi, n in f["meta"]:
            busy += self.cost.ndp_expert_s(n, (hi - lo) / d_ff)
            tasks.append((rows[off:off + n], gates[off:off + n], self.slice(f["layer"], expert, lo, hi)))
            off += n
        t0 = wall_now()
        partial = K.partial_for_tasks(xn, tasks)
        real = wall_now() - t0
        self.free_s = start + busy
        return _reply(f["task_id"], {"unit": self.unit, "done_s": self.free_s, "busy_s": busy,
                                     "start_s": start, "real_s": real}, [partial])


class GpuDevice:
    """The GPU: attention stand-ins, dense layers, shared experts, cached/fetched experts,
    and the combine of every partial into the residual stream. Holds the hidden states."""

    def __init__(self, cfg: Config, scale: float) -> None:
        self.cfg = cfg
        self.cost = CostModel(cfg)
        self.sm = R.scaled_model(cfg, scale)
        self.gw = R.gpu_weights(self.sm)
        self.experts: dict[tuple[int, int, int, int], K.ExpertWeights] = {}
        w = cfg.workload
        self.outputs = np.zeros((w.batch_size, w.prompt_tokens + w.output_tokens - 1,
                                 self.sm.d_model_s), dtype=np.float32)
        self.x: np.ndarray | None = None
        self.xn: np.ndarray | None = None
        self.phase, self.step = "prefill", 0

    def expert(self, layer: int, expert: int, lo: int, hi: int) -> K.ExpertWeights:
        """Weights of a cached or fetched expert (slice). Regenerated from the seed, not
        shipped: the link is charged for their bytes by the scheduler's link model."""
        sm = self.sm
        lo_s, hi_s = K.column_slice(lo, hi, sm.model.d_ff, sm.d_ff_s)
        key = (layer, expert, lo_s, hi_s)
        w = self.experts.get(key)
        if w is None:
            if len(self.experts) > 4096:
                self.experts.clear()
            w = self.experts[key] = K.expert_slice(sm.seed, layer, expert, sm.d_model_s, sm.d_ff_s,
                                                   lo_s, hi_s)
        return w

    def _positions(self) -> list[int]:
        P = self.cfg.workload.prompt_tokens
        return list(range(P)) if self.phase == "prefill" else [P + self.step - 1]

    def handle(self, msg: wire.Message) -> list:
        f = msg.fields
        kind, tid = f["kind"], f["task_id"]
        B = self.cfg.workload.batch_size
        if kind == "reset":
            self.outputs[:] = 0
            self.x = self.xn = None
            return _reply(tid, {})
        if kind == "begin":
            self.phase, self.step = f["phase"], f["step"]
            pos = self._positions()
            self.x = K.token_embeddings(self.sm.seed, B, pos, self.sm.d_model_s).reshape(
                B * len(pos), self.sm.d_model_s)
            return _reply(tid, {})
        if self.x is None:
            raise ProtocolError(f"GPU got {kind!r} before 'begin'")
        n = self.x.shape[0]
        if kind == "dense":
            i = f["index"]
            self.x = K.layer_mix(self.x, self.gw.dense_attention[i])
            self.x = self.x + K.swiglu(K.rms_norm(self.x), *self.gw.dense_ffn[i])
            done = f["start_s"] + self.cost.gpu_dense_layer_s(n, f["ctx"], B)
            return _reply(tid, {"done_s": done})
        if kind == "attention":
            self.x, self.xn = R.moe_layer_input(self.gw, f["layer"], self.x)
            done = f["start_s"] + self.cost.gpu_layer_s(n, f["ctx"], B)
            return _reply(tid, {"done_s": done}, [self.xn])
        if kind == "moe":
            return self._moe(f, msg.arrays)
        if kind == "end":
            pos = self._positions()
            self.outputs[:, pos[0]:pos[-1] + 1] = self.x.reshape(B, len(pos), -1)
            return _reply(tid, {})
        if kind == "collect":
            return _reply(tid, {}, [self.outputs])
        raise ProtocolError(f"GPU got an unknown task kind {kind!r}")

    def _moe(self, f: dict[str, Any], arrays: list[np.ndarray]) -> list:
        """Own experts in order of readiness, then every partial, then the combine.

        Timing as :func:`policies.plan.time_plan`: experts run back to back, each no earlier
        than its weights are ready; the combine starts when the last partial has arrived.
        """
        xn, layer, start = self.xn, f["layer"], float(f["start_s"])
        d_ff = self.sm.model.d_ff
        rows, gates = arrays[0], arrays[1]
        meta = sorted(enumerate(f["meta"]), key=lambda im: (im[1][4], im[0]))
        offs = np.cumsum([0] + [m[3] for m in f["meta"]])
        t, busy, tasks = start, 0.0, []
        for i, (expert, lo, hi, cnt, ready) in meta:
            dur = self.cost.gpu_expert_s(cnt, (hi - lo) / d_ff)
            t = max(t, ready) + dur
            busy += dur
            tasks.append((rows[offs[i]:offs[i + 1]], gates[offs[i]:offs[i + 1]],
                          self.expert(layer, expert, lo, hi)))
        t0 = wall_now()
        out = R.shared_output(self.gw, layer, xn)
        K.partial_for_tasks(xn, tasks, out=out)
        covered = set(np.asarray(rows).tolist())
        last = start
        for j, (_unit, _cnt, arrival) in enumerate(f["parts"]):
            part, prow = arrays[2 + 2 * j], arrays[3 + 2 * j]
            out[prow] += part
            covered.update(np.asarray(prow).tolist())
            last = max(last, arrival)
        self.x = self.x + out
        real = wall_now() - t0
        n_parts = len(f["parts"]) + (1 if f["meta"] else 0)
        combine = self.cost.gpu_combine_s(len(covered), n_parts)
        done = max(t, last) + combine
        return _reply(f["task_id"], {"done_s": done, "busy_s": busy + combine, "real_s": real})


class DeviceServer:
    """Serves one device on a transport until ``shutdown``: decode, handle, reply.

    Malformed or unexpected messages are answered with an ``error`` message and counted; the
    server keeps serving (DESIGN.md section 9). Runs in the caller's thread (:meth:`serve`)
    or a background thread (:meth:`start`).
    """

    def __init__(self, device: NdpUnit | GpuDevice, transport: Transport, poll_s: float = 0.05) -> None:
        self.device = device
        self.transport = transport
        self.poll_s = poll_s
        self.rejected = 0
        self.handled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        while not self._stop.is_set():
            got = self.transport.recv(self.poll_s)
            if got is None:
                continue
            peer, frames = got
            try:
                msg = wire.decode(frames)
                if msg.type == "shutdown":
                    break
                if msg.type == "ping":
                    self.transport.send(peer, wire.encode("pong", {"seq": msg.fields["seq"]}))
                    continue
                if msg.type != "task":
                    raise ProtocolError(f"unexpected message type {msg.type!r}")
                reply = self.device.handle(msg)
            except Exception as exc:  # any bad request is answered and counted; the unit serves on
                self.rejected += 1
                reply = wire.encode("error", {"message": f"{type(exc).__name__}: {exc}"[:2000]})
            self.handled += 1
            try:
                self.transport.send(peer, reply)
            except EmulationError:
                self.rejected += 1

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name=f"ndpmoe-{type(self.device).__name__}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
