"""``eplb``: DeepSeek EPLB replication of hot experts across NDP units.

The first four functions are DeepSeek's Expert Parallelism Load Balancer (deepseek-ai/EPLB,
``eplb.py``) re-implemented in numpy from the algorithm's description, array in, array out.
They give the same ``phy2log`` as the published README example (tests/test_eplb.py):

1. :func:`balanced_packing`: n weighted items into m packs of exactly n/m items each, heaviest
   item first into the lightest pack that still has room;
2. :func:`replicate_experts`: each further physical slot goes to the logical expert with the
   highest load per replica;
3. :func:`rebalance_experts_hierarchical`: expert groups packed to nodes, experts replicated
   within each node, replicas packed to the node's GPUs;
4. :func:`rebalance_experts`: the entry point (hierarchical when the nodes divide the groups,
   else one global node), returning ``phy2log``, ``log2phy`` and ``logcnt``.

Loads are cast to float32 first, as the reference does, so near-ties break the same way.
Ties: equal items are taken in index order, equal packs and equal experts lowest index first.

The ``eplb`` scheduler (:class:`Eplb`) uses them with the NDP units as EPLB's GPUs on a single
node with one expert group (a node boundary is what groups are for; the model has no groups),
and ``ceil(E / N) + policy.eplb_redundant_per_unit`` physical slots per unit (= E + redundant
when N divides E), at most E. EPLB itself may put two replicas of one expert on the same GPU
(and, with few experts, give one expert more replicas than there are units), which buys
nothing here, so :func:`place_on_units` repairs its placement: replicas over N are handed to
other experts, co-located replicas are swapped with another unit's replica of a different
expert, and if the result still has a busier worst unit than plain expert parallelism
(expert e on unit e mod N) the layer keeps that placement. Placement is re-planned every
``policy.eplb_period_steps`` steps of a layer from the routed tokens of its last
``policy.eplb_window_steps`` steps. Per step, an expert's tokens are split into at most as
many chunks as it has replicas, each chunk going to the replica whose unit has the least work
so far in this step. Moving replica weights between units is not charged on the link (a
simplification, stated here and in the summary's notes).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from cluster.core.knobs import Knobs
from policies.base import Scheduler, StepInput
from policies.plan import Plan, Task
from policies.registry import register

EMPTY = -1  # a physical slot holding no expert (only in the expert-parallel fallback)


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Packs n weighted items into ``num_packs`` packs of exactly n / num_packs items each.

    Greedy, per row: items in descending weight (equal weights in index order) each go to the
    lightest pack that still has room (equal packs: lowest index). With one item per pack,
    item i goes to pack i.

    Parameters:
        weight: [X, n], the weight of each item; n must be a multiple of ``num_packs``
        num_packs: number of packs

    Returns:
        pack_index: [X, n], the pack of each item
        rank_in_pack: [X, n], the item's position in its pack (in the order packed)
    """
    rows, n = weight.shape
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n, dtype=np.int64), (rows, 1)), np.zeros((rows, n), np.int64)
    pack_index = np.full((rows, n), -1, dtype=np.int64)
    rank_in_pack = np.full((rows, n), -1, dtype=np.int64)
    for r in range(rows):
        w = list(weight[r])  # numpy scalars: sums keep the input's precision
        # open packs as a heap of (weight, pack): the lightest first, ties lowest index
        open_packs = [(weight.dtype.type(0), pack) for pack in range(num_packs)]
        items = [0] * num_packs
        for item in np.argsort(-weight[r], kind="stable").tolist():
            load, pack = heapq.heappop(open_packs)
            pack_index[r, item] = pack
            rank_in_pack[r, item] = items[pack]
            items[pack] += 1
            if items[pack] < per_pack:
                heapq.heappush(open_packs, (load + w[item], pack))
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicates ``num_log`` logical experts into ``num_phy`` physical ones so that the
    largest load per replica is as small as the greedy gets it.

    Physical expert i < num_log is logical expert i; each further one goes to the logical
    expert with the highest load per replica so far (ties: lowest id).

    Parameters:
        weight: [X, num_log], the load of each logical expert
        num_phy: number of physical experts, at least num_log

    Returns:
        phy2log: [X, num_phy], the logical expert of each physical expert
        rank: [X, num_phy], the replica's rank among its expert's replicas (0 = first)
        logcnt: [X, num_log], the number of replicas of each logical expert
    """
    rows, num_log = weight.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical experts cannot hold {num_log} logical ones")
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    every_row = np.arange(rows)
    for slot in range(num_log, num_phy):
        hottest = np.argmax(weight / logcnt.astype(weight.dtype), axis=-1)
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[every_row, hottest]
        logcnt[every_row, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations: ``out[r, perm[r, i]] = i``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[-1]), perm.shape), axis=-1)
    return inv


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical_experts: int, num_groups: int,
                                   num_nodes: int, num_gpus: int
                                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hierarchical EPLB: groups to nodes, replicas within nodes, replicas to GPUs.

    Parameters:
        weight: [layers, num_logical_experts], the load of each logical expert
        num_physical_experts: physical experts after replication, a multiple of ``num_gpus``
        num_groups: expert groups (consecutive experts), dividing num_logical_experts
        num_nodes: server nodes (the fast-interconnect boundary), dividing ``num_groups``
        num_gpus: GPUs, a multiple of ``num_nodes``

    Returns:
        phy2log: [layers, num_physical_experts], the logical expert in each physical slot
            (slot p sits on GPU p // (num_physical_experts / num_gpus))
        phyrank: [layers, num_physical_experts], the replica rank of each slot's expert
        logcnt: [layers, num_logical_experts], the number of replicas of each logical expert
    """
    layers, num_logical = weight.shape
    if num_groups <= 0 or num_logical % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {num_logical} experts")
    if num_nodes <= 0 or num_groups % num_nodes:
        raise ValueError(f"{num_nodes} nodes do not divide {num_groups} groups")
    if num_gpus <= 0 or num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs are not a multiple of {num_nodes} nodes")
    if num_physical_experts % num_gpus:
        raise ValueError(f"{num_physical_experts} physical experts do not split over {num_gpus} GPUs")
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_logical // num_nodes
    phy_per_node = num_physical_experts // num_nodes
    phy_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack whole expert groups onto nodes, balancing the nodes' loads. "mlog" numbers
    # the logical experts node by node (groups in packing order), so each node owns a
    # contiguous range of log_per_node mlog ids.
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_first_mlog = (group_node * groups_per_node + group_rank) * group_size  # [layers, groups]
    log2mlog = (group_first_mlog[:, :, None] + np.arange(group_size)).reshape(layers, num_logical)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within each node; rows are (layer, node) pairs.
    node_load = np.take_along_axis(weight, mlog2log, -1).reshape(layers * num_nodes, log_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_load, phy_per_node)

    # Step 3: pack each node's physical experts onto its GPUs by load per replica.
    replica_load = np.take_along_axis(node_load / mlogcnt.astype(node_load.dtype), phy2mlog, -1)
    gpu, rank_on_gpu = balanced_packing(replica_load, num_gpus // num_nodes)
    phy2slot = gpu * phy_per_gpu + rank_on_gpu
    slot2phy = _inverse(phy2slot)

    # Back to global ids: local mlog -> global mlog (node offset) -> logical.
    slot2mlog = np.take_along_axis(phy2mlog, slot2phy, -1).reshape(layers, num_nodes, phy_per_node)
    slot2mlog = (slot2mlog + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(layers, -1)
    phy2log = np.take_along_axis(mlog2log, slot2mlog, -1)
    slot_rank = np.take_along_axis(phyrank, slot2phy, -1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, -1)
    return phy2log, slot_rank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB entry point: a replication and placement plan from estimated expert loads.

    Hierarchical when ``num_nodes`` divides ``num_groups``, else global (one node, one group).

    Parameters:
        weight: [layers, num_logical_experts], the load of each logical expert
        num_replicas: number of physical experts, a multiple of ``num_gpus``
        num_groups: number of expert groups
        num_nodes: number of server nodes
        num_gpus: number of GPUs, a multiple of ``num_nodes``

    Returns:
        phy2log: [layers, num_replicas], the logical expert of each physical slot (slot p on
            GPU p // (num_replicas / num_gpus))
        log2phy: [layers, num_logical_experts, max replicas], the slots of each logical
            expert by replica rank, -1 past its count
        logcnt: [layers, num_logical_experts], the number of replicas of each logical expert
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise ValueError(f"weight must be [layers, experts], got shape {weight.shape}")
    layers, num_logical = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    log2phy = np.full((layers, num_logical, int(logcnt.max())), -1, dtype=np.int64)
    log2phy[np.arange(layers)[:, None], phy2log, phyrank] = np.arange(num_replicas)
    return phy2log, log2phy, logcnt


# --- EPLB on NDP units -------------------------------------------------------------------


def slots_per_unit(num_experts: int, num_units: int, redundant_per_unit: int) -> int:
    """Physical expert slots per unit: ceil(E / N) + redundant, at most E (no unit holds one
    expert twice)."""
    return min(-(-num_experts // num_units) + redundant_per_unit, num_experts)


def unit_loads(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """[units] load of each unit when each expert's load is split evenly over its replicas.

    ``slots``: [units, S] expert per slot (:data:`EMPTY` for none); ``load``: [experts].
    """
    load = np.asarray(load, dtype=np.float64)
    held = slots[slots != EMPTY]
    count = np.bincount(held, minlength=load.shape[0])
    share = np.divide(load, count, out=np.zeros_like(load), where=count > 0)
    return np.where(slots != EMPTY, share[np.where(slots != EMPTY, slots, 0)], 0.0).sum(-1)


def ep_placement(num_experts: int, num_units: int, per_unit: int) -> np.ndarray:
    """Expert parallelism as slots: expert e on unit e mod N, the other slots :data:`EMPTY`."""
    slots = np.full((num_units, per_unit), EMPTY, dtype=np.int64)
    for u in range(num_units):
        homes = np.arange(u, num_experts, num_units)
        slots[u, :homes.size] = homes
    return slots


def cap_replicas(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Hands replicas beyond one per unit to other experts (a copy of ``slots``).

    While some expert has more replicas than there are units, one of its co-located replicas
    goes to the expert with the highest load per replica among those with fewer than N
    (preferring one the unit does not hold yet; ties: lowest id). Needs S <= E.
    """
    slots = slots.copy()
    num_units, num_experts = slots.shape[0], load.shape[0]
    count = np.bincount(slots.ravel(), minlength=num_experts)
    while count.max() > num_units:
        e = int(np.argmax(count))
        u = next(u for u in range(num_units) if np.count_nonzero(slots[u] == e) > 1)
        j = int(np.flatnonzero(slots[u] == e)[-1])
        per = np.where(count < num_units, load / np.maximum(count, 1), -np.inf)
        fresh = np.where(np.isin(np.arange(num_experts), slots[u]), -np.inf, per)
        f = int(np.argmax(fresh if np.isfinite(fresh).any() else per))
        slots[u, j] = f
        count[e] -= 1
        count[f] += 1
    return slots


def spread_replicas(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Separates replicas of one expert that share a unit (a copy of ``slots``).

    Each co-located replica of e on unit u is swapped with a replica of another expert f on a
    unit v that does not hold e, choosing among swaps that leave fewer co-located pairs the
    one whose busier unit (u or v, replica loads from :func:`unit_loads`) is least busy
    (ties: lowest v, then slot). Such a swap always exists while every expert has at most N
    replicas, and each one lowers the number of co-located pairs, so this terminates.
    """
    slots = slots.copy()
    num_units = slots.shape[0]
    count = np.bincount(slots.ravel(), minlength=load.shape[0])
    share = np.asarray(load, dtype=np.float64) / np.maximum(count, 1)
    busy = unit_loads(slots, load)
    while True:
        ordered = np.sort(slots, axis=1)
        pairs = np.argwhere((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY))
        if pairs.size == 0:
            return slots
        u, e = int(pairs[0, 0]), int(ordered[pairs[0, 0], pairs[0, 1]])
        held_u = set(slots[u].tolist())
        best: tuple[float, int, int] | None = None
        for v in range(num_units):
            row = slots[v].tolist()
            if v == u or e in row:
                continue
            for j, f in enumerate(row):
                if f in held_u and row.count(f) == 1:
                    continue  # moving f to u would only trade one co-located pair for another
                worst = max(busy[u] - share[e] + share[f], busy[v] - share[f] + share[e])
                if best is None or worst < best[0]:
                    best = (worst, v, j)
        if best is None:  # pragma: no cover - impossible while counts <= N (see docstring)
            raise AssertionError(f"no swap separates expert {e} on unit {u}")
        _, v, j = best
        f = int(slots[v, j])
        i = int(np.flatnonzero(slots[u] == e)[-1])
        slots[u, i], slots[v, j] = f, e
        busy[u] += share[f] - share[e]
        busy[v] += share[e] - share[f]


def place_on_units(load: np.ndarray, num_units: int, redundant_per_unit: int) -> np.ndarray:
    """EPLB placement of one layer's experts on NDP units, no expert twice on a unit.

    ``load``: [experts] recent tokens per expert. Returns ``slots``: [units, S] the expert in
    each of the unit's S = :func:`slots_per_unit` physical slots (:data:`EMPTY` only in the
    expert-parallel fallback). Every expert has at least one replica, and the busiest unit is
    never busier than under expert parallelism (by :func:`unit_loads`).
    """
    load = np.asarray(load, dtype=np.float64)
    num_experts = load.shape[0]
    per_unit = slots_per_unit(num_experts, num_units, redundant_per_unit)
    # EPLB with the units as GPUs of one node, one expert group.
    phy2log, _, _ = rebalance_experts(load[None], num_units * per_unit, 1, 1, num_units)
    slots = phy2log[0].reshape(num_units, per_unit)
    # Repair: at most N replicas per expert, then no two replicas of one expert on a unit.
    slots = spread_replicas(cap_replicas(slots, load), load)
    ep = ep_placement(num_experts, num_units, per_unit)
    if unit_loads(slots, load).max() > unit_loads(ep, load).max() * (1 + 1e-12):
        return ep
    return slots


def homes_of(slots: np.ndarray, num_experts: int) -> list[list[int]]:
    """[expert] -> the units (ascending) holding a replica of it in ``slots`` [units, S]."""
    homes: list[list[int]] = [[] for _ in range(num_experts)]
    for u, row in enumerate(slots.tolist()):
        for e in dict.fromkeys(row):  # a unit counts once per expert
            if 0 <= e < num_experts:
                homes[e].append(u)
    return homes


@dataclass(frozen=True)
class EplbKnobs(Knobs):
    """``eplb``'s knobs: redundant slots per unit, re-plan period and load window (steps of a
    layer)."""

    eplb_redundant_per_unit: int = 1
    eplb_window_steps: int = 64
    eplb_period_steps: int = 32

    def __post_init__(self) -> None:
        self.integers("eplb_redundant_per_unit", minimum=0)
        self.integers("eplb_window_steps", "eplb_period_steps")


@register("scheduler", "eplb", knobs=EplbKnobs)
class Eplb(Scheduler):
    """DeepSeek EPLB replication of hot experts over NDP units from a moving load window."""

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        p = self.knobs
        self.redundant_per_unit = p.eplb_redundant_per_unit
        self.period = p.eplb_period_steps
        L, E = cfg.model.num_layers, cfg.model.num_experts
        self.windows = [deque(maxlen=p.eplb_window_steps) for _ in range(L)]
        self.steps = [0] * L
        self.units = [[[e % self.num_units] for e in range(E)] for _ in range(L)]

    def plan(self, step: StepInput) -> Plan:
        units = self.units[step.layer]
        work = [0.0] * self.num_units
        tasks: list[Task] = []
        for e, toks in sorted(step.routed.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            if e in step.cached:
                tasks.append(self.gpu_task(e, toks))
                continue
            homes = sorted(units[e], key=lambda x: (work[x], x))
            chunks = self._chunks(len(toks), [work[u] for u in homes])
            size = -(-len(toks) // chunks)
            for i in range(chunks):
                part = toks[i * size:(i + 1) * size]
                if not part:
                    continue
                u = min(homes, key=lambda x: (work[x], x))
                work[u] += self.cost.ndp_expert_s(len(part))
                tasks.append(Task(u, e, 0, self.d_ff, part))
        return Plan(step.layer, tuple(tasks))

    def _chunks(self, n: int, loads: list[float]) -> int:
        """How many replicas share an expert's ``n`` tokens: the count whose busiest chosen
        unit finishes first. Splitting costs a full weight read per replica (NDP units are
        memory-bound at small batches), so it only pays once the tokens make compute dominate.
        ``loads``: the replicas' units' work so far, ascending.
        """
        best, best_end = 1, math.inf
        for c in range(1, min(len(loads), n) + 1):
            end = loads[c - 1] + self.cost.ndp_expert_s(-(-n // c))  # the busiest of the first c
            if end < best_end - 1e-15:
                best, best_end = c, end
        return best

    def observe(self, step: StepInput) -> None:
        load = np.zeros(self.cfg.model.num_experts)
        for e, toks in step.routed.items():
            load[e] = len(toks)
        win = self.windows[step.layer]
        win.append(load)
        self.steps[step.layer] += 1
        if self.redundant_per_unit and self.steps[step.layer] % self.period == 0:
            slots = place_on_units(np.sum(win, axis=0), self.num_units, self.redundant_per_unit)
            self.units[step.layer] = homes_of(slots, self.cfg.model.num_experts)
