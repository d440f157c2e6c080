"""The GPU and NDP-unit actors as plain classes, and the loop that serves them.

Each device turns one decoded request (:class:`actors.wire.Message`) into one reply: it does
the real numpy work and stamps the reply with the *emulated* times its own cost model gives.
An NDP unit gets at most one task per MoE step and a step starts after the previous one ended,
so a unit is always free when its activations arrive: it starts at ``arrival_s`` and keeps no
timing state across steps (a restarted unit stamps exactly as the one it replaces). Devices
never sleep: pacing to the wall clock is the scheduler's (it holds the only clock of the run
and paces every step to its emulated end), so that message latency is absorbed by the
dilation instead of adding up. Ray wraps these classes only in :mod:`cluster.launch`.

Faults (DESIGN.md section 9): :class:`DeviceServer` answers a task id it has already answered
with the cached reply instead of running it again (the scheduler retries lost messages), sends
a heartbeat from its own socket, announces itself with ``hello`` when it (re)starts, and obeys
an injected ``die`` only when its host allows it (fault injection).

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
from collections import OrderedDict
from collections.abc import Callable
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


def _reply(request: dict[str, Any], fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> list:
    """A ``result`` for ``request``: its task id, and which send of it (``attempt``) ran."""
    head = {"task_id": request["task_id"], "attempt": request.get("attempt", 1)}
    return wire.encode("result", {**head, **fields}, list(arrays))


class NdpUnit:
    """NDP unit ``unit``: holds slices of experts (generated from the seed) and runs them."""

    def __init__(self, cfg: Config, unit: int, scale: float) -> None:
        self.cfg, self.unit = cfg, unit
        self.cost = CostModel(cfg)
        self.sm = R.scaled_model(cfg, scale)
        self.weights: dict[tuple[int, int, int, int], K.ExpertWeights] = {}

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
            self.cost = _policy_cost(self.cfg, f)
            return _reply(f, {"unit": self.unit})
        if kind == "warm":
            held = self.warm([tuple(x) for x in msg.arrays[0].tolist()])
            return _reply(f, {"unit": self.unit, "bytes": held})
        if kind != "moe":
            raise ProtocolError(f"NDP unit {self.unit} got an unknown task kind {kind!r}")
        xn, rows, gates = msg.arrays
        d_ff = self.sm.model.d_ff
        start = float(f["arrival_s"])
        busy = 0.0
        tasks = []
        off = 0
        for expert, lo, hi, n in f["meta"]:
            busy += self.cost.ndp_unit_expert_s(self.unit, n, (hi - lo) / d_ff)
            tasks.append((rows[off:off + n], gates[off:off + n], self.slice(f["layer"], expert, lo, hi)))
            off += n
        t0 = wall_now()
        partial = K.partial_for_tasks(xn, tasks)
        real = wall_now() - t0
        return _reply(f, {"unit": self.unit, "done_s": start + busy, "busy_s": busy,
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
        kind = f["kind"]
        B = self.cfg.workload.batch_size
        if kind == "reset":
            self.outputs[:] = 0
            self.x = self.xn = None
            return _reply(f, {})
        if kind == "begin":
            self.phase, self.step = f["phase"], f["step"]
            pos = self._positions()
            self.x = K.token_embeddings(self.sm.seed, B, pos, self.sm.d_model_s).reshape(
                B * len(pos), self.sm.d_model_s)
            return _reply(f, {})
        if self.x is None:
            raise ProtocolError(f"GPU got {kind!r} before 'begin'")
        n = self.x.shape[0]
        if kind == "dense":
            i = f["index"]
            self.x = K.layer_mix(self.x, self.gw.dense_attention[i])
            self.x = self.x + K.swiglu(K.rms_norm(self.x), *self.gw.dense_ffn[i])
            done = f["start_s"] + self.cost.gpu_dense_layer_s(n, f["ctx"], B)
            return _reply(f, {"done_s": done})
        if kind == "attention":
            self.x, self.xn = R.moe_layer_input(self.gw, f["layer"], self.x)
            done = f["start_s"] + self.cost.gpu_layer_s(n, f["ctx"], B)
            return _reply(f, {"done_s": done}, [self.xn])
        if kind == "moe":
            return self._moe(f, msg.arrays)
        if kind == "end":
            pos = self._positions()
            self.outputs[:, pos[0]:pos[-1] + 1] = self.x.reshape(B, len(pos), -1)
            return _reply(f, {})
        if kind == "collect":
            return _reply(f, {}, [self.outputs])
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
        return _reply(f, {"done_s": done, "busy_s": busy + combine, "real_s": real})


HEARTBEAT_INTERVAL_S = 1.0
REPLY_CACHE = 32  # replies kept for retried task ids: retries concern the last few tasks only


class DeviceServer:
    """Serves one device on a transport until ``shutdown``: decode, handle, reply.

    Malformed or unexpected messages are answered with an ``error`` message and counted; the
    server keeps serving (DESIGN.md section 9). Runs in the caller's thread (:meth:`serve`)
    or a background thread (:meth:`start`).

    - Idempotent by task id: a ``task`` whose id was already answered gets the cached reply
      (the last :data:`REPLY_CACHE` ones) and is not run again: the GPU's steps change its
      hidden state, so running a retried task twice would change the math.
    - ``heartbeat``: a transport of its own (zmq sockets are not thread-safe) on which a thread
      sends ``hello`` every ``heartbeat_interval_s`` with ``peer``, ``seq`` and
      ``incarnation``; the scheduler declares a device it waits on dead when these stop.
    - ``announce_to``: the peer to greet with ``hello`` on the main transport when serving
      starts, so that a restarted device's connection is known to be up.
    - ``on_die``: what an injected ``die`` task does (a Ray host exits the process); without
      it ``die`` is rejected like any unknown request.
    """

    def __init__(self, device: NdpUnit | GpuDevice, transport: Transport, poll_s: float = 0.05,
                 *, name: str = "", heartbeat: Transport | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, incarnation: int = 0,
                 announce_to: bytes | None = None, on_die: Callable[[], None] | None = None) -> None:
        self.device = device
        self.transport = transport
        self.poll_s = poll_s
        self.name = name or (f"ndp{device.unit}" if isinstance(device, NdpUnit) else "gpu")
        self.heartbeat = heartbeat
        self.heartbeat_interval_s = heartbeat_interval_s
        self.incarnation = incarnation
        self.announce_to = announce_to
        self.on_die = on_die
        self.rejected = 0
        self.handled = 0
        self.replayed = 0  # retried task ids answered from the cache
        self.beats = 0
        self._replies: OrderedDict[int, list] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None

    def _hello(self, seq: int) -> list:
        return wire.encode("hello", {"peer": self.name, "seq": seq, "incarnation": self.incarnation})

    def _die(self) -> None:
        """An injected death: the host's hook (process exit), else stop answering at once."""
        self._stop.set()
        if self.on_die is not None:
            self.on_die()

    def serve(self) -> None:
        if self.announce_to is not None:
            try:
                self.transport.send(self.announce_to, self._hello(0))
            except EmulationError:
                self.rejected += 1
        while not self._stop.is_set():
            got = self.transport.recv(self.poll_s)
            if got is None:
                continue
            peer, frames = got
            tid = None
            try:
                msg = wire.decode(frames)
                if msg.type == "shutdown":
                    break
                if msg.type == "ping":
                    self.transport.send(peer, wire.encode("pong", {"seq": msg.fields["seq"]}))
                    continue
                if msg.type != "task":
                    raise ProtocolError(f"unexpected message type {msg.type!r}")
                tid = msg.fields["task_id"]
                if msg.fields["kind"] == "die" and self.on_die is not None:
                    self._die()
                    return  # dead: no reply, no more heartbeats
                reply = self._replies.get(tid)
                if reply is not None:
                    self.replayed += 1
                else:
                    reply = self.device.handle(msg)
                    self._replies[tid] = reply
                    if len(self._replies) > REPLY_CACHE:
                        self._replies.popitem(last=False)
            except Exception as exc:  # any bad request is answered and counted; the unit serves on
                self.rejected += 1
                err = {"message": f"{type(exc).__name__}: {exc}"[:2000]}
                if isinstance(tid, int) and not isinstance(tid, bool):
                    err["task_id"] = tid
                reply = wire.encode("error", err)
            self.handled += 1
            try:
                self.transport.send(peer, reply)
            except EmulationError:
                self.rejected += 1
        self._stop.set()  # shut down: the heartbeat stops too

    def _beat(self) -> None:
        seq = 0
        while True:
            seq += 1
            try:
                self.heartbeat.send(self.announce_to or b"sched", self._hello(seq))
                self.beats += 1
            except EmulationError:  # the scheduler's queue is full or gone: beat again later
                pass
            if self._stop.wait(self.heartbeat_interval_s):
                return

    def start(self) -> threading.Thread:
        if self.heartbeat is not None:
            self._beat_thread = threading.Thread(target=self._beat, name=f"ndpmoe-hb-{self.name}",
                                                 daemon=True)
            self._beat_thread.start()
        self._thread = threading.Thread(target=self.serve, name=f"ndpmoe-{type(self.device).__name__}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._beat_thread is not None:
            self._beat_thread.join(timeout_s)
