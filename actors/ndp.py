"""An NDP unit (:class:`NdpUnit`): holds its slices of the experts, runs a step's shards once
the scheduler's command and the GPU's activations are both there, and ships the experts it
holds whole to the GPU over the link when told (see :mod:`actors.devices`)."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from actors import wire
from actors.devices import Device, Program, Until, int_field, reply, slice_cols
from actors.peers import GPU, unit_name
from cluster.core import kernels as K
from cluster.core.errors import ProtocolError
from cluster.core.spec import Config

SHIP_WINDOW = 4  # prefetch transfers a unit keeps at the link (flow control by credits)


class NdpUnit(Device):
    """NDP unit ``unit``: holds slices of experts (generated from the seed) and runs them."""

    def __init__(self, cfg: Config, unit: int, scale: float) -> None:
        self.unit = unit
        self.name = unit_name(unit)
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
                return slice_cols(whole, lo_s, hi_s, sm.d_ff_s)
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
            return reply(f, {"unit": self.unit})
        if kind == "warm":
            held = self.warm([tuple(x) for x in msg.arrays[0].tolist()])
            return reply(f, {"unit": self.unit, "bytes": held})
        if kind == "report":
            return reply(f, {"unit": self.unit}, [wire.json_array(self.report())])
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
            self.acts[int_field(f, "seq")] = msg
        else:
            raise ProtocolError(f"{self.name} got an unexpected {msg.type}/{f.get('kind')!r}")

    def _check_moe(self, f: dict[str, Any], arrays: list[np.ndarray]) -> None:
        int_field(f, "seq"), int_field(f, "layer")
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
        true_bytes = int(self.cost.ndp_expert_bytes * (hi - lo) / self.sm.model.d_ff)
        self.send_link({"kind": f["class"], "dst": GPU, "at_s": float(f["at_s"]),
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
            self.send_link({"kind": "partial", "dst": GPU, "at_s": self.free_s, "seq": seq,
                            "unit": self.unit,
                            "true_bytes": int(self.cost.activation_bytes(xn.shape[0])),
                            "label": f"{self.name}->{GPU}"}, [partial])
