"""The analytic engine on a tiny config: what a run records and what its summary says."""

from __future__ import annotations

import itertools

import pytest

import policies
from cluster.core.cost import CostModel
from cluster.core.metrics import PolicyRecords, StepRecord, summarize
from cluster.core.routing import build_routing
from cluster.engines.analytic import BackgroundLink, run_policy

UNITS = 4
LAYERS = 16  # olmoe-1b-7b
POLICIES = [*policies.names("scheduler"), "paper", "tp-lb+lru", "tp-lb+lfu", "tp-lb+oracle",
            "tp-lb+profiled"]


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every policy once on OLMoE, 16 prompt + 8 output tokens, batch 1, 4 units."""
    from cluster.core.config import load_config

    cfg = load_config(model="olmoe-1b-7b", overrides=["workload.prompt_tokens=16",
                                                      "workload.output_tokens=8"])
    routing = build_routing(cfg)
    recs = {name: run_policy(cfg, routing, name) for name in POLICIES}
    return {"cfg": cfg, "routing": routing, "recs": recs,
            "sums": {n: summarize(r, UNITS) for n, r in recs.items()}}


def test_one_token_record_per_output_token_and_ttft_first(runs) -> None:
    for name, rec in runs["recs"].items():
        assert [t.index for t in rec.tokens] == list(range(8)), name
        times = [t.time_s for t in rec.tokens]
        assert all(a < b for a, b in itertools.pairwise(times)), name
        s = runs["sums"][name]
        assert 0 < s["ttft_s"] < s["e2e_latency_s"], name
        assert s["e2e_latency_s"] == times[-1]
        assert s["tpot_s"] == pytest.approx((times[-1] - times[0]) / 7, rel=1e-9), name


def test_one_prefill_step_and_one_step_per_decode_token_per_layer(runs) -> None:
    for name, rec in runs["recs"].items():
        prefill = [s for s in rec.steps if s.phase == "prefill"]
        decode = [s for s in rec.steps if s.phase == "decode"]
        assert len(prefill) == LAYERS, name
        assert len(decode) == (8 - 1) * LAYERS, name
        assert runs["sums"][name]["moe_steps"] == 8 * LAYERS
        assert [s.layer for s in prefill] == list(range(LAYERS))
        assert {s.step for s in decode} == set(range(1, 8))
        # steps follow one another on the clock
        assert all(a.end_s <= b.start_s for a, b in zip(rec.steps, rec.steps[1:])), name


def test_steps_never_beat_their_lower_bound(runs) -> None:
    for name, rec in runs["recs"].items():
        for s in rec.steps:
            assert s.makespan_s >= s.lower_bound_s * (1 - 1e-9), (name, s.step, s.layer)


def test_prefill_freq_prefetch_hits_and_tp_alone_never_does(runs) -> None:
    sums = runs["sums"]
    assert sums["paper"]["prefetch_hit_rate"] > 0
    assert sums["paper"]["prefetched_experts"] > 0
    assert sums["tp"]["prefetch_hit_rate"] == 0
    assert sums["tp"]["prefetched_experts"] == 0 and sums["tp"]["fetched_experts"] == 0
    # the oracle knows the future: no online or prompt-based prefetcher beats its hit rate
    for name in ("paper", "tp-lb+lru", "tp-lb+lfu"):
        assert sums["tp-lb+oracle"]["prefetch_hit_rate"] >= sums[name]["prefetch_hit_rate"]


def test_tp_is_perfectly_balanced_and_ep_is_not_at_batch_one(runs) -> None:
    sums = runs["sums"]
    assert runs["cfg"].model.d_ff % UNITS == 0  # equal slices
    assert sums["tp"]["max_over_mean"] == pytest.approx(1.0, abs=1e-12)
    assert sums["tp"]["balancedness"] == pytest.approx(1.0, abs=1e-12)
    # top-8 of 64 on 4 units: some unit draws more of the k experts than another
    assert sums["ep"]["max_over_mean"] > 1.2
    assert sums["ep"]["balancedness"] < 0.85


def test_policies_rank_as_the_paper_expects_on_the_tiny_run(runs) -> None:
    e2e = {n: s["e2e_latency_s"] for n, s in runs["sums"].items()}
    assert e2e["tp-lb"] <= e2e["tp"]
    assert e2e["tp"] < e2e["ep"]
    assert e2e["paper"] < e2e["monde"]


def test_link_bytes_add_up(runs) -> None:
    cfg = runs["cfg"]
    expert_bytes, act = cfg.model.expert_bytes, cfg.model.d_model * 2
    for name, rec in runs["recs"].items():
        s = runs["sums"][name]
        lb = s["link_bytes"]
        # whole-expert fetches: bytes = experts x expert size, step by step and in total
        assert lb["fetch"] == s["fetched_experts"] * expert_bytes, name
        for st in rec.steps:
            assert st.bytes_fetch == st.fetched * expert_bytes
        assert lb["prefetch"] == s["prefetched_experts"] * expert_bytes, name
        # every token that reaches a unit comes back as one partial
        assert lb["partial"] == lb["activation"], name
    # tp, batch 1: every decode step sends the token to all 4 units; prefill sends 16
    tp = runs["sums"]["tp"]["link_bytes"]
    assert tp["activation"] == LAYERS * (16 + 7) * UNITS * act
    assert tp["fetch"] == 0


def test_fractional_split_fetches_column_slices_and_is_never_slower(tiny) -> None:
    whole_cfg = tiny("workload.batch_size=4")
    split_cfg = tiny("workload.batch_size=4", "policy.lb_split=fractional")
    routing = build_routing(whole_cfg)
    whole = run_policy(whole_cfg, routing, "tp-lb")
    split = run_policy(split_cfg, routing, "tp-lb")
    expert_bytes = whole_cfg.model.expert_bytes
    split_bytes = sum(s.bytes_fetch for s in split.steps)
    assert split_bytes % expert_bytes != 0, "no slice of an expert was fetched"
    assert (4 * split_bytes) % expert_bytes == 0  # slices are quarters of d_ff
    # without a prefetcher steps are independent, so per-step gains add up over the run
    assert split.tokens[-1].time_s <= whole.tokens[-1].time_s


def test_summary_values_are_in_range(runs) -> None:
    for name, s in runs["sums"].items():
        assert s["max_over_mean"] >= 1.0, name
        assert 0 < s["balancedness"] <= 1.0, name
        assert 0 <= s["gpu_util"] <= 1.0 + 1e-9, (name, s["gpu_util"])
        assert all(0 <= u <= 1.0 + 1e-9 for u in s["unit_util"]), name
        assert len(s["unit_util"]) == UNITS
        assert 0 <= s["prefetch_hit_rate"] <= 1, name
        assert s["moe_step_p50_s"] <= s["moe_step_p99_s"], name
        assert (s["scheduler"], s["prefetcher"]) == (
            policies.resolve(name).scheduler, policies.resolve(name).prefetcher)


def test_balance_metrics_of_one_step() -> None:
    def step(busy):
        return StepRecord("p", "decode", 1, 0, 0.0, 1.0, 2, 0, 0, 0, 0.0, busy, 0, 0, 0)

    s = step([3.0, 1.0, 0.0, 0.0])
    assert s.max_over_mean == pytest.approx(3.0)  # max 3, mean 1
    assert s.balancedness == pytest.approx(1 / 3)
    idle = step([0.0, 0.0, 0.0, 0.0])
    assert idle.max_over_mean == 1.0 and idle.balancedness == 1.0
    rec = PolicyRecords("p", "ep", "none", steps=[s, step([2.0, 2.0, 2.0, 2.0]), idle])
    summary = summarize(rec, 4)
    # averaged over the steps that gave the units work, not over units; idle steps left out
    assert summary["max_over_mean"] == pytest.approx((3.0 + 1.0) / 2)
    assert summary["balancedness"] == pytest.approx((1 / 3 + 1.0) / 2)


def test_background_prefetch_waits_for_gaps_in_step_traffic(tiny) -> None:
    cost = CostModel(tiny())
    fetch = cost.fetch_s()
    link = BackgroundLink(cost)
    link.push([(0, 1), (0, 2)], now=0.0)
    link.advance(fetch / 4)
    assert link.arrived == {} and link.experts_moved == 0
    # step traffic holds the link from fetch/2 to 2 fetch: the first fetch waits it out
    link.advance(3 * fetch, busy=[(fetch / 2, 2 * fetch)])
    assert link.arrived == {(0, 1): pytest.approx(2.5 * fetch)}
    link.advance(10 * fetch)
    assert link.arrived[(0, 2)] == pytest.approx(3.5 * fetch)
    assert link.experts_moved == 2 and link.bytes_moved == 2 * cost.ndp_expert_bytes
