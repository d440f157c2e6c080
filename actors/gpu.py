"""The GPU (:class:`GpuDevice`): runs the model forward by itself, tells the scheduler where
each router sent its tokens, and combines its own experts with the units' partials (see
:mod:`actors.devices`)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from actors import wire
from actors.devices import Device, Hold, Program, Until, int_field, reply, slice_cols
from actors.peers import GPU, SCHED_PEER, unit_name
from cluster.core import kernels as K
from cluster.core import reference as R
from cluster.core.errors import ProtocolError
from cluster.core.spec import Config


class GpuDevice(Device):
    """The GPU: runs the model forward, its share of the experts and every combine; holds
    the hidden states and the expert cache."""

    name = GPU

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
            return reply(f, {})
        if kind == "run":
            self.start_program(self._program(float(f["epoch_s"]), int(f["decode_steps"])))
            return reply(f, {})
        if kind == "preload":
            need = {int(p) for p in f["pids"]}
            return reply(f, {"landed": sorted(need & set(self.cache))})
        if kind == "report":
            rep = self.report()
            rep.update({"tokens": self.tokens, "step_times": {str(k): v for k, v in self.step_times.items()},
                        "gpu_busy_by_seq": {str(k): v for k, v in self.gpu_busy_by_seq.items()},
                        "other_busy_s": self.other_busy_s, "waits": self.waits,
                        "cache_peak": self.cache_peak, "cache_now": len(self.cache)})
            return reply(f, {}, [wire.json_array(rep)])
        if kind == "collect":
            return reply(f, {}, [self.outputs])
        if kind == "status":  # recovery: where the GPU stands and what reached it
            cur = self.acts_out
            seq = cur[0] if cur is not None else -1
            return reply(f, {"seq": seq, "units": sorted(cur[1]) if cur is not None else [],
                              "partials": sorted(self.partials.get(seq, {})),
                              "combined": max(self.step_times, default=-1)},
                          [np.asarray(sorted(self.seen_pids), dtype=np.int64)])
        if kind == "resend":  # recovery: the step's activations again, to a restarted unit
            u, seq = int_field(f, "unit"), int_field(f, "seq")
            cur = self.acts_out
            sent = cur is not None and cur[0] == seq and u in cur[1]
            if sent:
                fields, arr = cur[1][u]
                self.send_link(fields, [arr])
            return reply(f, {"resent": sent})
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
            act = ({"kind": "activation", "dst": unit_name(u), "at_s": start, "seq": seq,
                    "true_bytes": int(cost.activation_bytes(len(r))), "label": f"act->{unit_name(u)}"},
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
        return slice_cols(w, lo_s - rlo, hi_s - rlo, rhi - rlo)
