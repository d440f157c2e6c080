"""EPLB: DeepSeek's published example reproduced exactly, and its use on NDP units.

The four array functions must give DeepSeek EPLB's README output for the README's input; the
``eplb`` scheduler's placement never puts two replicas of one expert on one unit, gives every
unit the same number of slots, is never worse than plain expert parallelism, and its plans
still compute every routed (token, expert) pair exactly once.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.core.routing import build_routing
from cluster.engines.analytic import run_policy
from policies import GPU
from policies.eplb import (
    EMPTY,
    Eplb,
    balanced_packing,
    ep_placement,
    place_on_units,
    rebalance_experts,
    replicate_experts,
    slots_per_unit,
    spread_replicas,
    unit_loads,
)

# deepseek-ai/EPLB README: two layers of 12 experts in 4 groups, 16 replicas, 2 nodes x 4 GPUs
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def assert_consistent(phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray) -> None:
    """log2phy lists exactly the slots phy2log gives each expert; logcnt counts them."""
    layers, num_logical = logcnt.shape
    assert log2phy.shape == (layers, num_logical, logcnt.max())
    for layer in range(layers):
        counts = np.bincount(phy2log[layer], minlength=num_logical)
        assert counts.tolist() == logcnt[layer].tolist()
        for e in range(num_logical):
            c = logcnt[layer, e]
            assert c >= 1, f"layer {layer}: expert {e} has no replica"
            slots = log2phy[layer, e, :c]
            assert sorted(slots.tolist()) == np.flatnonzero(phy2log[layer] == e).tolist()
            assert (log2phy[layer, e, c:] == -1).all()


def colocated(slots: np.ndarray) -> list[tuple[int, int]]:
    """(unit, expert) pairs where the unit holds the expert more than once."""
    return [(u, e) for u, row in enumerate(slots.tolist()) for e in set(row)
            if e != EMPTY and row.count(e) > 1]


# --- DeepSeek's algorithm ------------------------------------------------------------------


def test_readme_example_gives_the_published_phy2log() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                               [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert_consistent(phy2log, log2phy, logcnt)


def test_readme_example_keeps_each_group_on_one_node() -> None:
    """Hierarchical: 4 groups of 3 experts, 2 groups per node; slots 0-7 are node 0."""
    phy2log, _, _ = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)
    for layer in range(2):
        for node in range(2):
            groups = {e // 3 for e in phy2log[layer, node * 8:(node + 1) * 8].tolist()}
            assert len(groups) == 2


def test_balanced_packing_fills_every_pack_exactly() -> None:
    weight = np.array([[5.0, 1, 9, 3, 3, 7], [1, 1, 1, 1, 1, 1]])
    pack, rank = balanced_packing(weight, 3)
    for r in range(2):
        for p in range(3):
            assert sorted(rank[r][pack[r] == p].tolist()) == [0, 1]
    # heaviest first into the lightest open pack: 9 | 7 | 5, 3 -> 8 (full), 3 -> 10 (full), 1
    assert pack[0].tolist() == [2, 0, 0, 2, 1, 1]
    assert np.bincount(pack[0], weights=weight[0]).tolist() == [10, 10, 8]
    # equal weights: items in index order, equal packs lowest first
    assert pack[1].tolist() == [0, 1, 2, 0, 1, 2]


def test_replicate_experts_gives_replicas_to_the_highest_load_per_replica() -> None:
    phy2log, rank, logcnt = replicate_experts(np.array([[10.0, 40, 20]]), 6)
    # per replica 10/40/20 -> 1 gets one (20, 20 tie: lowest id) -> 1 again (13.3) -> 2
    assert phy2log.tolist() == [[0, 1, 2, 1, 1, 2]]
    assert rank.tolist() == [[0, 0, 0, 1, 2, 1]]
    assert logcnt.tolist() == [[1, 3, 2]]


def test_rebalance_rejects_slots_that_do_not_split_over_the_gpus() -> None:
    with pytest.raises(ValueError, match="do not split"):
        rebalance_experts(np.array([[10, 20, 30, 40]]), 7, 2, 2, 4)


@settings(deadline=None, max_examples=150)
@given(st.data())
def test_rebalance_maps_are_consistent(data) -> None:
    num_nodes = data.draw(st.sampled_from([1, 2, 4]))
    num_groups = num_nodes * data.draw(st.integers(1, 3))
    num_logical = num_groups * data.draw(st.integers(1, 4))
    num_gpus = num_nodes * data.draw(st.integers(1, 3))
    per_gpu = data.draw(st.integers(-(-num_logical // num_gpus), -(-num_logical // num_gpus) + 3))
    layers = data.draw(st.integers(1, 3))
    weight = np.array(data.draw(st.lists(st.lists(st.integers(0, 500), min_size=num_logical,
                                                  max_size=num_logical),
                                         min_size=layers, max_size=layers)))
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_gpus * per_gpu, num_groups,
                                                 num_nodes, num_gpus)
    assert phy2log.shape == (layers, num_gpus * per_gpu)
    assert_consistent(phy2log, log2phy, logcnt)


# --- on NDP units -------------------------------------------------------------------------


def test_eplb_can_colocate_replicas_and_the_placement_separates_them() -> None:
    """Two equally hot experts, 2 units of 2 slots: EPLB packs both replicas of expert 0 on
    unit 0 (equal replica loads, ties to the lowest pack); the unit placement swaps them."""
    phy2log, _, _ = rebalance_experts(np.array([[64, 64]]), 4, 1, 1, 2)
    assert phy2log.reshape(2, 2).tolist() == [[0, 0], [1, 1]]
    slots = place_on_units(np.array([64, 64]), 2, 1)
    assert colocated(slots) == []
    assert [sorted(row) for row in slots.tolist()] == [[0, 1], [0, 1]]


def test_an_expert_never_gets_more_replicas_than_units() -> None:
    """One expert takes nearly all tokens: EPLB would give it 3 replicas on 2 units."""
    load = np.array([1000, 1, 1, 1])
    _, _, logcnt = rebalance_experts(load[None], 6, 1, 1, 2)
    assert logcnt[0, 0] == 3
    slots = place_on_units(load, 2, 1)
    assert colocated(slots) == []
    assert set(slots.ravel().tolist()) == {0, 1, 2, 3}
    assert np.count_nonzero(slots == 0) == 2


def test_replication_beats_expert_parallelism_on_skewed_load() -> None:
    load = np.floor(1000 / np.arange(1, 65) ** 1.2)  # Zipf: expert 0 is the hottest
    slots = place_on_units(load, 4, 1)
    assert slots.shape == (4, 17)
    assert (slots != EMPTY).all() and colocated(slots) == []
    assert unit_loads(slots, load).max() < 0.8 * unit_loads(ep_placement(64, 4, 17), load).max()


@settings(deadline=None, max_examples=300)
@given(load=st.lists(st.integers(0, 10_000), min_size=1, max_size=64),
       num_units=st.integers(1, 16), redundant=st.integers(0, 3))
def test_placement_properties(load, num_units, redundant) -> None:
    load = np.array(load)
    per_unit = slots_per_unit(load.size, num_units, redundant)
    slots = place_on_units(load, num_units, redundant)
    assert slots.shape == (num_units, per_unit)  # every unit the same number of slots
    assert colocated(slots) == [], "a unit holds two replicas of one expert"
    assert set(slots[slots != EMPTY].tolist()) == set(range(load.size)), "an expert has no replica"
    ep = ep_placement(load.size, num_units, per_unit)
    assert unit_loads(slots, load).max() <= unit_loads(ep, load).max() * (1 + 1e-9)


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_spreading_keeps_every_replica_and_separates_them(data) -> None:
    """Any slot table whose experts have at most N replicas each can be separated by swaps."""
    num_units = data.draw(st.integers(1, 8))
    per_unit = data.draw(st.integers(1, 6))
    num_experts = data.draw(st.integers(per_unit, min(per_unit + 6, num_units * per_unit)))
    counts = [1] * num_experts  # then fill the remaining slots without exceeding N each
    for _ in range(num_units * per_unit - num_experts):
        e = data.draw(st.sampled_from([e for e in range(num_experts) if counts[e] < num_units]))
        counts[e] += 1
    flat = data.draw(st.permutations([e for e, c in enumerate(counts) for _ in range(c)]))
    slots = np.array(flat).reshape(num_units, per_unit)
    load = np.array(data.draw(st.lists(st.integers(0, 100), min_size=num_experts,
                                       max_size=num_experts)))
    out = spread_replicas(slots, load)
    assert out.shape == slots.shape
    assert colocated(out) == []
    assert np.bincount(out.ravel(), minlength=num_experts).tolist() == counts


# --- the scheduler -------------------------------------------------------------------------


def assert_each_pair_once(plan, step, d_ff: int, num_units: int) -> None:
    cover: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t in plan.expand(num_units):
        assert t.device == GPU or 0 <= t.device < num_units
        for tok in t.tokens:
            cover.setdefault((tok, t.expert), []).append((t.col_start, t.col_end))
    assert set(cover) == {(tok, e) for e, toks in step.routed.items() for tok in toks}
    for pair, spans in cover.items():
        assert spans == [(0, d_ff)], f"{pair}: columns {spans}"


def test_scheduler_replicates_and_still_computes_every_pair_once(tiny, monkeypatch) -> None:
    cfg = tiny("policy.eplb_period_steps=2", "policy.eplb_window_steps=4",
               "policy.eplb_redundant_per_unit=2", "workload.batch_size=4")
    N, d_ff = cfg.ndp.num_ndp_units, cfg.model.d_ff
    seen: list[Eplb] = []
    replicated = []
    original_plan, original_init = Eplb.plan, Eplb.__init__

    def init(self, *args) -> None:
        original_init(self, *args)
        seen.append(self)

    def plan(self, step):
        out = original_plan(self, step)
        assert_each_pair_once(out, step, d_ff, N)
        replicated.append(max(len(u) for u in self.units[step.layer]))
        return out

    monkeypatch.setattr(Eplb, "__init__", init)
    monkeypatch.setattr(Eplb, "plan", plan)
    rec = run_policy(cfg, build_routing(cfg), "eplb")
    assert len(rec.tokens) == cfg.workload.output_tokens
    assert max(replicated) > 1, "no step ran with a replicated expert"
    (sched,) = seen
    for layer_units in sched.units:
        for units in layer_units:
            assert units and len(set(units)) == len(units)
            assert all(0 <= u < N for u in units)
