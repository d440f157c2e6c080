"""One policy's run as the scheduler sees it (:class:`PolicyRun`): the plan of each MoE step,
the commands that carry it out, and the books recovery needs; :class:`EmulationStats` holds
what was observed. Time is read through the dispatcher's clock."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import policies
from actors import wire
from actors.dispatcher import Dispatcher
from actors.peers import GPU_PEER, LINK_PEER, unit_name, unit_peer
from actors.world import World
from cluster.core import kernels as K
from cluster.core.cost import CostModel
from cluster.core.errors import EmulationError
from cluster.core.faults import Kill
from cluster.core.selection import Routing, group_by_expert
from cluster.core.spec import Config
from policies.build import make_prefetcher, policy_cost_config
from policies.prefetch import Decision


@dataclass
class EmulationStats:
    """What the scheduler observed while one policy ran (device and link reports added)."""

    messages: int = 0
    wall_s: float = 0.0
    epoch_s: float = 0.0
    decisions_s: list[float] = field(default_factory=list)  # real plan time per MoE step
    recoveries: int = 0
    recovery_wall_s: float = 0.0  # wall time the run was paused for recoveries
    retries: int = 0  # sequenced commands sent again (a lost send, or a late acknowledgement)
    retry_wall_s: float = 0.0  # wall time the run was paused for lost commands
    dropped: int = 0  # sends lost by the injected drop fault
    duplicates: int = 0  # copies of commands the devices already had (retries sent too early)
    abandoned: int = 0  # commands a unit died before acknowledging (recovery re-issues them)
    abandoned_sends: int = 0  # ...and their sends (not in retries, dropped)
    pauses: int = 0  # times the run's clock was paused
    kills: list[str] = field(default_factory=list)  # injected kills fired
    reports: dict[str, Any] = field(default_factory=dict)  # device/link name -> its report
    steps: list[dict[str, Any]] = field(default_factory=list)  # per MoE step, what was decided
    plans: list[Any] = field(default_factory=list)  # the plans, in step order
    ratios: list[float] = field(default_factory=list)  # real compute / modelled, every slot
    tokens_completed: int = 0
    routed_late_s: list[float] = field(default_factory=list)  # router event receipt - its stamp
    dispatch_s: list[float] = field(default_factory=list)  # receipt to last command sent

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "wall_s": self.wall_s, "recoveries": self.recoveries,
                "recovery_wall_s": self.recovery_wall_s, "retries": self.retries,
                "retry_wall_s": self.retry_wall_s, "dropped_messages": self.dropped,
                "duplicate_commands": self.duplicates, "abandoned_commands": self.abandoned,
                "abandoned_sends": self.abandoned_sends, "pauses": self.pauses,
                "injected_kills": list(self.kills)}


def step_order(cfg: Config, decode_steps: int) -> list[tuple[str, int, int]]:
    """(phase, step, layer) of every MoE step of a run, in the order the GPU reaches them."""
    L = cfg.model.num_layers
    out = [("prefill", 0, layer) for layer in range(L)]
    for s in range(1, decode_steps + 1):
        out += [("decode", s, layer) for layer in range(L)]
    return out


class PolicyRun:
    """One policy's run on the devices, from the scheduler's side: plan, dispatch, record.

    Keeps the scheduler's books: which experts have landed on the GPU (as it reported), which
    transfers are in flight (prefetches, kept fetches), which transfer id each key has.
    """

    def __init__(self, cfg: Config, net: Dispatcher, world: World, kills: list[Kill], name: str,
                 routing: Routing, dilation: float, decode_steps: int) -> None:
        self.cfg, self.name, self.routing = cfg, name, routing
        self.net, self.world = net, world
        self.kills = kills  # the cluster's kills still to fire (shared: each fires once)
        cfg = self.cfg
        choice = policies.resolve(name)
        sched_cls = policies.get("scheduler", choice.scheduler)
        self.cost_cfg = policy_cost_config(cfg, sched_cls, policies.get("prefetcher", choice.prefetcher))
        self.cost = CostModel(self.cost_cfg)
        self.sched = sched_cls(cfg, self.cost)
        self.pf = make_prefetcher(cfg, choice.prefetcher, routing)
        self.choice = choice
        self.D = dilation
        self.lat_s = self.cost.link_latency_s
        self.N = cfg.ndp.num_ndp_units
        self.d_ff = cfg.model.d_ff
        self.order = step_order(cfg, decode_steps)
        self.held: dict[int, set[int]] = {}  # layer -> experts the prefetcher holds, per its decisions
        self.landed: dict[tuple[int, int], int] = {}  # key -> transfer id, on the GPU
        self.inflight: dict[tuple[int, int], int] = {}  # key -> transfer id, prefetch in flight
        self.pids = itertools.count(1)
        self.orders = itertools.count(1)
        self.stats = EmulationStats()
        self.where: tuple[str, int, int] = ("prefill", 0, -1)
        self.tokens_done = 0
        # books for recovery (what a restarted unit must be sent again)
        self.unit_cmds: dict[int, tuple[int, dict[str, Any], list[np.ndarray]]] = {}  # last step
        self.ships: dict[int, dict[int, tuple[str, list[int], float, int]]] = {}  # unit -> pid ->
        self.cancelled: set[int] = set()  # transfer ids cancelled at the link
        self.upgraded: set[int] = set()  # prefetches upgraded to on-demand fetches

    # --- one MoE step ---------------------------------------------------------------------
    def _step_routing(self, phase: str, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.routing
        if phase == "prefill":
            w = r.topk_weights[:, : r.prompt_tokens, layer]
            return r.prefill_ids(layer), w.reshape(-1, w.shape[-1])
        return r.decode_ids(step - 1, layer), r.topk_weights[:, r.prompt_tokens + step - 1, layer]

    def on_routed(self, f: dict[str, Any]) -> None:
        seq, layer = int(f["seq"]), int(f["layer"])
        phase, step, lay = self.order[seq]
        if lay != layer:
            raise EmulationError(f"gpu reached layer {layer} where the scheduler expected {lay} "
                                 f"(MoE step {seq})")
        self.where = (phase, step, layer)
        self.stats.routed_late_s.append(self.world.now() - float(f["at_s"]))  # receipt vs effect
        for lay_, e, pid in f["landed"]:
            key = (int(lay_), int(e))
            if self.inflight.get(key) == int(pid):
                del self.inflight[key]
                self.landed[key] = int(pid)
        t0 = self.net.clock()
        ids, weights = self._step_routing(phase, step, layer)
        routed = group_by_expert(ids)
        pf = self.pf
        resident = frozenset(e for e in self.held.get(layer, ()) if (layer, e) in self.landed)
        inp = policies.StepInput(layer, phase, routed, resident)
        plan = self.sched.plan(inp)
        more: list[tuple[int, int]] = []
        evicted: list[tuple[int, int]] = []
        fetched_whole = [fe.expert for fe in plan.fetches if fe.col_start == 0 and fe.col_end == self.d_ff]
        if phase == "decode":
            said = pf.decide_after_step(layer, step - 1, {e: len(v) for e, v in routed.items()}, fetched_whole)
            more, evicted = list(said.fetch), self.apply(said)
        self.sched.observe(inp)
        decision = self.net.clock() - t0
        self.stats.decisions_s.append(decision)
        charge = decision if self.cfg.emulate.charge_decision_time else 0.0
        at = float(f["at_s"]) + self.D * (charge + self.lat_s)  # the commands take effect then
        self._dispatch(seq, phase, step, layer, plan, ids, weights, more, evicted, at)
        self.stats.dispatch_s.append(self.net.clock() - t0)
        self.stats.steps.append({"seq": seq, "phase": phase, "step": step, "layer": layer,
                                 "active": len(routed), "hits": sum(1 for e in routed if e in resident),
                                 "fetched": len(plan.fetches), "decision_s": decision,
                                 "gpu_experts": sum(1 for t in plan.tasks if t.device == policies.GPU)})
        self.stats.plans.append(plan)

    def _prefetch_orders(self, keys: list[tuple[int, int]]) -> dict[int, list[list[int]]]:
        """Ship orders, by holding unit, for the prefetcher's keys not already on the GPU or
        on their way (each gets a transfer id and its place in the link's issue order)."""
        pre: dict[int, list[list[int]]] = {}
        for key in keys:
            if key in self.landed or key in self.inflight or not self.holds(key):
                continue
            pid = next(self.pids)
            self.inflight[key] = pid
            pre.setdefault(key[1] % self.N, []).append([key[0], key[1], 0, self.d_ff, pid,
                                                        next(self.orders)])
        return pre

    def apply(self, d: Decision) -> list[tuple[int, int]]:
        """A prefetcher's decision: what it holds from now on (the scheduler never looks into
        its cache); returns the keys it evicted."""
        held = self.held
        for lay, e in (*d.fetch, *d.admit):
            held.setdefault(lay, set()).add(e)
        for lay, e in d.evict:
            held[lay].discard(e)
        return list(d.evict)

    def holds(self, key: tuple[int, int]) -> bool:
        return key[1] in self.held.get(key[0], ())

    def _dispatch(self, seq: int, phase: str, step: int, layer: int, plan: policies.Plan,
                  ids: np.ndarray, weights: np.ndarray, more: list[tuple[int, int]],
                  evicted: list[tuple[int, int]], at: float) -> None:
        net, N, d_ff = self.net, self.N, self.d_ff
        memo: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

        def gates_of(t: policies.Task) -> np.ndarray:
            """Gate weights of a task's tokens: the slices of one expert share them."""
            key = (t.expert, t.tokens)
            g = memo.get(key)
            if g is None:
                g = memo[key] = K.gate_weights_for(ids, weights, t.expert, t.tokens)
            return g

        per_unit: dict[int, list[policies.Task]] = {}
        gpu_tasks: list[policies.Task] = []
        for t in plan.expand(N):
            (gpu_tasks if t.device == policies.GPU else per_unit.setdefault(t.device, [])).append(t)
        cached_pid = dict(self.landed)  # as the plan saw it, before this step's evictions
        # evictions: landed ones leave the GPU's cache, in-flight ones are cancelled
        evict_pids, cancel = [], []
        for key in evicted:
            if key in self.landed:
                evict_pids.append(self.landed.pop(key))
            elif key in self.inflight:
                pid = self.inflight.pop(key)
                evict_pids.append(pid)
                cancel.append(pid)
        # on-demand fetches: upgrade a prefetch in flight, else ship from the unit holding it
        ships: dict[int, list[list[int]]] = {}
        upgrades: list[list[int]] = []
        fetch_pid: dict[tuple[int, int, int], int] = {}
        keep: list[int] = []
        for fe in plan.fetches:
            key = (layer, fe.expert)
            whole = fe.col_start == 0 and fe.col_end == d_ff
            order = next(self.orders)
            if whole and key in self.inflight:
                pid = self.inflight[key]
                upgrades.append([pid, order])
            else:
                pid = next(self.pids)
                ships.setdefault(fe.expert % N, []).append(
                    [layer, fe.expert, fe.col_start, fe.col_end, pid, order])
                if whole and self.holds(key):  # admitted: the GPU keeps it when it lands
                    keep.append(pid)
                    self.inflight[key] = pid
            fetch_pid[(fe.expert, fe.col_start, fe.col_end)] = pid
        pre = self._prefetch_orders(more)  # background prefetches after this step's fetches
        if cancel:
            self.cancelled.update(cancel)
            net.post(LINK_PEER, "cancel", {"pids": cancel, "at_s": at})
        if upgrades:
            self.upgraded.update(p for p, _ in upgrades)
            net.post(LINK_PEER, "upgrade", {"items": upgrades, "at_s": at, "seq": seq})
            by_unit: dict[int, list[int]] = {}
            for (lay, e), pid in self.inflight.items():
                if lay == layer and any(pid == p for p, _ in upgrades):
                    by_unit.setdefault(e % N, []).append(pid)
            for u, pids in sorted(by_unit.items()):  # still queued at the unit: send them next
                net.post(unit_peer(u), "expedite", {"pids": pids})
        for u, items in sorted(ships.items()):
            self._ship(u, "fetch", items, at, seq)
        for u, items in sorted(pre.items()):
            self._ship(u, "prefetch", items, at)
        if self.kills and phase == "decode" and self.inject:
            self._inject_kills(step, layer, per_unit)
        # the units' shards (units of a tensor-parallel step share tokens and gates: built once)
        unit_rows: dict[int, np.ndarray] = {}
        built: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.unit_cmds = {}
        for u, tasks in sorted(per_unit.items()):
            key = tuple((t.expert, t.tokens) for t in tasks)
            got = built.get(key)
            if got is None:
                toks = np.unique(np.fromiter((x for t in tasks for x in t.tokens), dtype=np.int64))
                rows = np.searchsorted(toks, np.fromiter((x for t in tasks for x in t.tokens),
                                                         dtype=np.int64)).astype(np.int32)
                gates = np.concatenate([gates_of(t) for t in tasks]).astype(np.float32)
                got = built[key] = (toks.astype(np.int32), rows, gates)
            unit_rows[u] = got[0]
            meta = [[t.expert, t.col_start, t.col_end, len(t.tokens)] for t in tasks]
            cmd = {"seq": seq, "layer": layer, "at_s": at, "meta": meta}
            self.unit_cmds[u] = (seq, cmd, [got[1], got[2]])
            net.post(unit_peer(u), "moe", cmd, [got[1], got[2]])
        # the GPU: its experts (cached transfer or fetch to wait for), units, evictions
        meta, rows, gates = [], [], []
        for t in gpu_tasks:
            tok = np.asarray(t.tokens, dtype=np.int64)
            pid = fetch_pid.get((t.expert, t.col_start, t.col_end))
            if pid is None:  # a fetch may cover a wider slice than this task (fractional split)
                pid = next((p for (e, lo, hi), p in fetch_pid.items()
                            if e == t.expert and lo <= t.col_start and t.col_end <= hi), None)
            fetched = pid is not None
            if not fetched:
                pid = cached_pid.get((layer, t.expert))
                if pid is None:
                    raise EmulationError(f"plan of {self.name} runs L{layer} e{t.expert} on the GPU "
                                         f"but it is neither cached nor fetched")
            meta.append([t.expert, t.col_start, t.col_end, len(tok), pid, int(fetched)])
            rows.append(tok.astype(np.int32))
            gates.append(gates_of(t))
        units = sorted(per_unit)
        arrays = [np.concatenate(rows) if rows else np.zeros(0, np.int32),
                  np.concatenate(gates).astype(np.float32) if gates else np.zeros(0, np.float32),
                  *(unit_rows[u] for u in units)]
        net.post(GPU_PEER, "moe", {"seq": seq, "layer": layer, "at_s": at, "meta": meta,
                                   "units": units, "evict": evict_pids, "keep": keep}, arrays)
        self.stats.messages += 1 + len(per_unit) + len(ships) + len(pre)

    def on_token(self, f: dict[str, Any]) -> None:
        self.tokens_done += 1
        self.stats.tokens_completed = self.tokens_done
        if int(f["step"]) != 0:
            return
        counts = self.routing.prefill_counts(self.cfg.model.num_experts)
        said = self.pf.decide_after_prefill(counts)
        more, evicted = list(said.fetch), self.apply(said)
        at = float(f["at_s"]) + self.D * self.lat_s
        pre = self._prefetch_orders(more)
        for key in evicted:  # (a prefetcher that evicts at the end of prefill)
            self.landed.pop(key, None)
            self.inflight.pop(key, None)
        for u, items in sorted(pre.items()):
            self._ship(u, "prefetch", items, at)

    def _ship(self, u: int, cls: str, items: list[list[int]], at: float, seq: int | None = None) -> None:
        """Orders unit ``u`` to ship weights to the GPU, and keeps the order in the books."""
        book = self.ships.setdefault(u, {})
        for it in items:
            book[it[4]] = (cls, it, at, -1 if seq is None else seq)
        fields = {"class": cls, "items": items, "at_s": at}
        if seq is not None:
            fields["seq"] = seq
        self.net.post(unit_peer(u), "ship", fields)

    def resend_ships(self, u: int, done: set[int]) -> int:
        """Sends restarted unit ``u`` again the ship orders whose weights are not ``done``
        (reached the GPU, held by the link, cancelled), in their first order; prefetches
        upgraded since go out at once (``expedite``). Returns how many."""
        book = self.ships.get(u, {})
        for pid in [p for p in book if p in done or p in self.cancelled]:
            del book[pid]
        groups: list[tuple[tuple[str, float, int], list[list[int]]]] = []
        for _pid, (cls, it, at, seq) in book.items():
            key = (cls, at, seq)
            if groups and groups[-1][0] == key:
                groups[-1][1].append(it)
            else:
                groups.append((key, [it]))
        for (cls, at, seq), items in groups:
            fields = {"class": cls, "items": items, "at_s": at}
            if seq >= 0:
                fields["seq"] = seq
            self.net.post(unit_peer(u), "ship", fields)
        up = sorted(p for p in book if p in self.upgraded and book[p][0] == "prefetch")
        if up:
            self.net.post(unit_peer(u), "expedite", {"pids": up})
        return len(book)

    def _inject_kills(self, step: int, layer: int, per_unit: dict[int, list]) -> None:
        """Tells each unit due to die now to ``die``, just before its shards of this step."""
        for k in list(self.kills):
            if step >= k.step and k.unit in per_unit:
                self.kills.remove(k)
                # the fault strikes now: with recovery on, the run pauses here until the unit
                # is back (World); without, the run fails when the unit is found dead
                if self.net.recover:
                    self.world.hold(("down", unit_peer(k.unit)), "recovery")
                self.net.tr.send(unit_peer(k.unit), wire.encode("task", {
                    "task_id": next(self.net.ids), "kind": "die"}))
                self.stats.kills.append(f"{unit_name(k.unit)}@decode step {step}, layer {layer}")

    inject = True
