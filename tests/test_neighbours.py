"""The neighbour policies (context-aware, od-moe, expertflow) and paper-refresh, end to end.

Every new policy keeps the foundation's invariants over a whole analytic run: each (token,
expert) pair computed exactly once over d_ff, the cache within its capacity after every
hook, every step at or above the cost model's lower bound, the same records for the same
seed. Then what each one is for: reduced NDP bit-width makes context-aware faster; a better
predictor makes od-moe hit more; expertflow learns to hit on skewed routing with reuse;
refreshing the prefetch set pays when decode drifts away from the prompt.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import policies
import policies.build
from cluster.core.errors import ConfigError
from cluster.core.knobs import PolicySpec
from cluster.core.metrics import summarize, write_steps_csv
from cluster.core.routing import build_routing
from cluster.core.selection import Routing, group_by_expert
from cluster.engines.analytic import Episode, Executor, run_policy
from policies.build import policy_cost_config
from policies.neighbours import context_scores, gate_sums, propagate, transition_counts

NEW = ["context-aware", "od-moe", "expertflow", "paper-refresh", "monde-tp",
       "monde-tp+context-aware"]
EXPERT_BYTES = 3 * 2048 * 1024 * 2  # olmoe-1b-7b


def hit_rate(cfg, routing, name: str) -> float:
    return summarize(run_policy(cfg, routing, name), cfg.ndp.num_ndp_units)["prefetch_hit_rate"]


def e2e(cfg, routing, name: str) -> float:
    return summarize(run_policy(cfg, routing, name), cfg.ndp.num_ndp_units)["e2e_latency_s"]


class Plans(Executor):
    """Keeps every MoE step's plan and timing."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, int, policies.Plan, policies.StepTiming]] = []

    def moe(self, phase, step, layer, plan, timing, start_s) -> None:
        self.steps.append((phase, step, layer, plan, timing))


# --- registry and config -----------------------------------------------------------------

def test_the_neighbours_are_named_combinations_of_registered_parts() -> None:
    assert policies.resolve("context-aware") == policies.PolicyChoice(
        "context-aware", "monde-tp", "context-aware")
    assert policies.resolve("od-moe").scheduler == "tp-lb"
    assert policies.resolve("expertflow").prefetcher == "expertflow"
    assert policies.resolve("paper-refresh") == policies.PolicyChoice(
        "paper-refresh", "tp-lb", "prefill-freq-refresh")
    for kind, name in [("scheduler", "monde-tp"), ("prefetcher", "context-aware"),
                       ("prefetcher", "od-moe"), ("prefetcher", "expertflow"),
                       ("prefetcher", "prefill-freq-refresh")]:
        assert policies.describe(policies.get(kind, name)), f"{name} has no one-line description"
    assert {"context-aware", "od-moe", "expertflow", "paper-refresh"} <= set(policies.combos())


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("context_alpha", 1.5, "a number in 0..1"),
    ("odmoe_recall", -0.1, "a number in 0..1"),
    ("ndp_weight_bits", 0, "an integer in 1..16"),
    ("ndp_weight_bits", 32, "an integer in 1..16"),
    ("odmoe_lookahead", 0, "an integer >= 1"),
    ("expertflow_max_horizon", 0, "an integer >= 1"),
    ("refresh_period_steps", 0, "an integer >= 1"),
    ("refresh_max_swaps", -1, "an integer >= 0"),
])
def test_bad_neighbour_knobs_fail_naming_field_value_and_what_is_allowed(field, value, allowed) -> None:
    with pytest.raises(ConfigError) as exc:
        PolicySpec(**{field: value})
    msg = str(exc.value)
    assert f"policy.{field}" in msg and repr(value) in msg and allowed in msg


def test_knobs_load_from_overrides(tiny) -> None:
    cfg = tiny("policy.context_alpha=0.25", "policy.ndp_weight_bits=4", "policy.odmoe_recall=1.0",
               "policy.odmoe_lookahead=3", "policy.refresh_period_steps=8")
    p = cfg.policy
    assert (p.context_alpha, p.ndp_weight_bits, p.odmoe_recall, p.odmoe_lookahead,
            p.refresh_period_steps) == (0.25, 4, 1.0, 3, 8)


# --- invariants over whole runs -----------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("batch", [1, 2])
def test_every_step_computes_each_pair_once_and_respects_the_lower_bound(tiny, name, batch) -> None:
    cfg = tiny(f"workload.batch_size={batch}", "policy.ndp_weight_bits=4", "workload.alpha=1.2",
               "workload.reuse=0.5", f"policy.expert_cache_bytes={40 * EXPERT_BYTES}")
    routing = build_routing(cfg)
    plans = Plans()
    ep = Episode(cfg, routing, name, executor=plans)
    ep.run()
    N, d_ff = cfg.ndp.num_ndp_units, cfg.model.d_ff
    assert len(plans.steps) == cfg.model.num_layers * cfg.workload.output_tokens
    for phase, step, layer, plan, timing in plans.steps:
        ids = routing.prefill_ids(layer) if phase == "prefill" else routing.decode_ids(step - 1, layer)
        routed = group_by_expert(ids)
        cover: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for t in plan.expand(N):
            for tok in t.tokens:
                cover.setdefault((tok, t.expert), []).append((t.col_start, t.col_end))
        assert set(cover) == {(tok, e) for e, toks in routed.items() for tok in toks}, (name, phase, step, layer)
        for pair, spans in cover.items():
            spans.sort()
            assert spans[0][0] == 0 and spans[-1][1] == d_ff, (name, pair, spans)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), (name, pair, spans)
        assert len(plan.fetches) <= cfg.fetch_buffer_experts
        bound = policies.lower_bound_s(plan, ep.cost, N)
        assert timing.makespan_s >= bound * (1 - 1e-9), (name, phase, step, layer)


@pytest.mark.parametrize("prefetcher", ["context-aware", "od-moe", "expertflow", "prefill-freq-refresh"])
@pytest.mark.parametrize("cache_experts", [0, 3, 40])
def test_the_cache_never_exceeds_its_capacity_after_any_hook(tiny, cache_spy, prefetcher,
                                                            cache_experts) -> None:
    cfg = tiny(f"policy.expert_cache_bytes={cache_experts * EXPERT_BYTES}", "workload.alpha=1.2",
               "workload.reuse=0.5", "policy.refresh_period_steps=2", "policy.odmoe_lookahead=3",
               "link.bw_gbps=400")
    assert cfg.cache_capacity_experts == cache_experts
    _, sizes = cache_spy(cache_experts)
    run_policy(cfg, build_routing(cfg), f"tp-lb+{prefetcher}")
    assert len(sizes) == 2 + cfg.model.num_layers * (cfg.workload.output_tokens - 1)
    if cache_experts:
        assert max(sizes) > 0, "the prefetcher never used its cache"


def test_same_seed_same_steps_csv_byte_for_byte(tiny, tmp_path: Path) -> None:
    names = ["context-aware", "od-moe", "expertflow", "paper-refresh"]

    def run(seed: int, out: Path) -> bytes:
        cfg = tiny(f"workload.seed={seed}", "workload.batch_size=2", "policy.ndp_weight_bits=4",
                   "policy.odmoe_recall=0.5", "policy.refresh_period_steps=2")
        routing = build_routing(cfg)
        write_steps_csv(out, [run_policy(cfg, routing, n) for n in names])
        return out.read_bytes()

    a = run(5, tmp_path / "a.csv")
    assert a == run(5, tmp_path / "b.csv")
    assert a != run(6, tmp_path / "c.csv")


# --- context-aware ------------------------------------------------------------------------

def test_context_scores_are_per_layer_shares_and_alpha_one_is_prefill_freq() -> None:
    counts = np.array([[4, 2, 2, 0], [0, 0, 6, 2]])
    gates = np.array([[1.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.5, 3.5]])
    s = context_scores(counts, gates, 0.5)
    assert s.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert s[0] == pytest.approx([0.5 * 0.5 + 0.5 * 0.25, 0.5 * 0.25 + 0.5 * 0.5,
                                  0.5 * 0.25 + 0.5 * 0.25, 0.0])
    # router score can reorder what counts alone would pick
    assert s[1, 3] > s[1, 2] and counts[1, 3] < counts[1, 2]
    ids = np.array([[[0, 1]], [[1, 2]]])  # [tokens, layers, k]
    w = np.array([[[0.75, 0.25]], [[0.5, 0.5]]])
    assert gate_sums(ids, w, 4).tolist() == [[0.75, 0.75, 0.5, 0.0]]


def test_context_aware_with_alpha_one_pins_what_prefill_freq_caches(tiny) -> None:
    cfg = tiny("policy.context_alpha=1.0", f"policy.expert_cache_bytes={40 * EXPERT_BYTES}")
    routing = build_routing(cfg)
    counts = routing.prefill_counts(cfg.model.num_experts)
    pins = policies.build.make_prefetcher(cfg, "context-aware", routing).after_prefill(counts)
    freq = policies.build.make_prefetcher(cfg, "prefill-freq", routing).after_prefill(counts)
    assert pins == freq and len(pins) == 40


def test_reduced_ndp_bit_width_speeds_up_context_aware_and_nothing_else(tiny) -> None:
    cfg16 = tiny("workload.output_tokens=16")
    cfg4 = tiny("workload.output_tokens=16", "policy.ndp_weight_bits=4")
    routing = build_routing(cfg16)
    assert e2e(cfg4, routing, "context-aware") < e2e(cfg16, routing, "context-aware")
    # the bit-width belongs to the policies that ask for it: others time exactly as before
    for name in ("paper", "monde", "monde-tp", "tp-lb+prefill-freq"):
        assert e2e(cfg4, routing, name) == e2e(cfg16, routing, name), name
    # 4 bits: a quarter of the weight bytes per NDP unit (exact: expert_params is a multiple of
    # 4), through the policy's own cost model; bandwidths, flops and the GPU's bytes unchanged
    ep4, ep16 = Episode(cfg4, routing, "context-aware"), Episode(cfg16, routing, "context-aware")
    assert ep4.cfg is cfg4 and ep4.cost.ndp_expert_bytes * 4 == ep16.cost.ndp_expert_bytes
    assert ep4.cost.gpu_expert_bytes == ep16.cost.gpu_expert_bytes == cfg16.model.expert_bytes
    assert ep4.cost.ndp_bw_bytes_per_s == ep16.cost.ndp_bw_bytes_per_s
    assert ep4.cost.cfg.ndp.weight_bits == 4 and cfg4.ndp.weight_bits == 16
    assert policy_cost_config(cfg16, policies.get("prefetcher", "context-aware")) is cfg16
    rec = run_policy(cfg4, routing, "context-aware")
    assert summarize(rec, 4)["ndp_weight_bits"] == 4


# --- od-moe ------------------------------------------------------------------------------

def test_od_moe_hits_more_with_a_better_predictor(tiny) -> None:
    def cfg(recall: float):
        return tiny(f"policy.odmoe_recall={recall}", "policy.odmoe_lookahead=2", "link.bw_gbps=400")

    routing = build_routing(cfg(1.0))
    good, poor = hit_rate(cfg(1.0), routing, "od-moe"), hit_rate(cfg(0.3), routing, "od-moe")
    assert good > poor > 0


def test_a_sweep_over_its_knob_keyed_by_config_keeps_every_point(tiny) -> None:
    """Configs that differ in one policy knob are different keys (as in reproduce's job
    table, and pickled to its workers): each point of the sweep keeps its own result."""
    import pickle

    from policies.neighbours import OdMoe, OdMoeKnobs

    routing = build_routing(tiny())
    results: dict = {}
    for recall in (0.2, 0.6, 1.0):
        cfg = pickle.loads(pickle.dumps(tiny(f"policy.odmoe_recall={recall}", "policy.odmoe_lookahead=2",
                                             "link.bw_gbps=400")))
        assert cfg.policy.knobs_of(OdMoeKnobs) == OdMoeKnobs(odmoe_recall=recall, odmoe_lookahead=2)
        results.setdefault(cfg, hit_rate(cfg, routing, "od-moe"))
    assert len(results) == 3
    rates = list(results.values())
    assert rates[0] < rates[1] < rates[2]
    assert OdMoe.knobs_class is OdMoeKnobs and policies.get("prefetcher", "od-moe") is OdMoe


def test_od_moe_predictor_names_as_many_experts_as_are_active_and_recall_one_is_exact(tiny) -> None:
    routing = build_routing(tiny())
    truth = policies.build.decode_future(routing)
    exact = policies.build.make_prefetcher(tiny("policy.odmoe_recall=1.0"), "od-moe", routing)
    rough = policies.build.make_prefetcher(tiny("policy.odmoe_recall=0.5"), "od-moe", routing)
    for s in range(routing.decode_steps):
        for lay in range(routing.num_layers):
            assert exact.predict(s, lay) == sorted(truth[s][lay])
            guess = rough.predict(s, lay)
            assert len(guess) == len(set(guess)) == len(truth[s][lay])


def test_od_moe_keeps_only_upcoming_layers(tiny) -> None:
    cfg = tiny("policy.odmoe_lookahead=2")
    routing = build_routing(cfg)
    pf = policies.build.make_prefetcher(cfg, "od-moe", routing)
    L = cfg.model.num_layers
    pf.after_prefill(routing.prefill_counts(cfg.model.num_experts))
    assert {k[0] for k in pf.cache} <= {0, 1}
    for s in range(routing.decode_steps):
        for lay in range(L):
            pf.after_step(lay, s, {}, [])
            ahead = {(lay + 1) % L, (lay + 2) % L}
            assert {k[0] for k in pf.cache} <= ahead, (s, lay)
            assert len(pf.cache) <= 2 * cfg.model.top_k


# --- expertflow ---------------------------------------------------------------------------

def test_transition_tables_predict_a_kept_expert_over_a_merely_popular_one() -> None:
    E = 4
    # expert 0 is always followed by itself; expert 3 follows everything half of the time
    src = np.array([[0, 1], [0, 2], [1, 2], [1, 2], [0, 1]])
    dst = np.array([[0, 3], [0, 1], [3, 1], [2, 1], [0, 2]])
    counts = transition_counts(src, dst, E)
    occ = np.bincount(src.ravel(), minlength=E).astype(float)
    assert counts[0, 0] == 3 and counts[1, 3] == 2
    p = propagate([0, 1], [(counts, occ)], E)
    assert p[0] == pytest.approx(1.0) and p[0] > p[3] > 0
    assert propagate([], [(counts, occ)], E).tolist() == [0.0] * E


def test_expertflow_hits_on_skewed_routing_with_reuse_and_grows_its_horizon(tiny) -> None:
    cfg = tiny("workload.alpha=1.2", "workload.reuse=0.8", "workload.output_tokens=24",
               "policy.expertflow_max_horizon=3")
    routing = build_routing(cfg)
    ep = Episode(cfg, routing, "expertflow")
    rec = ep.run()
    assert summarize(rec, 4)["prefetch_hit_rate"] > 0
    assert max(ep.pf.horizons) > 1  # accurate predictions let it look further ahead
    assert all(1 <= h <= 3 for h in ep.pf.horizons)


def test_expertflow_uses_no_future_knowledge(tiny) -> None:
    cfg = tiny()
    pf = policies.build.make_prefetcher(cfg, "expertflow", build_routing(cfg))
    assert pf.ctx.future is None and pf.ctx.prefill_ids is not None


# --- paper-refresh ------------------------------------------------------------------------

def drifting_routing(cfg, seed: int = 0) -> Routing:
    """The prompt uses experts 0..11 of every layer, the generation experts 32..43."""
    m, w = cfg.model, cfg.workload
    rng = np.random.default_rng(seed)
    S = w.prompt_tokens + w.output_tokens - 1
    ids = np.empty((1, S, m.num_layers, m.top_k), dtype=np.int32)
    for s in range(S):
        pool = np.arange(12) if s < w.prompt_tokens else np.arange(32, 44)
        for lay in range(m.num_layers):
            ids[0, s, lay] = rng.choice(pool, m.top_k, replace=False)
    return Routing(ids, np.full(ids.shape, 1 / m.top_k, dtype=np.float32), w.prompt_tokens, "drift")


def test_refreshing_the_prefetch_set_pays_when_decode_drifts_from_the_prompt(tiny) -> None:
    cfg = tiny("workload.output_tokens=24", f"policy.expert_cache_bytes={12 * 16 * EXPERT_BYTES}",
               "policy.refresh_period_steps=2", "policy.refresh_max_swaps=64")
    routing = drifting_routing(cfg)
    paper = summarize(run_policy(cfg, routing, "paper"), 4)
    refresh = summarize(run_policy(cfg, routing, "paper-refresh"), 4)
    assert paper["prefetch_hit_rate"] == 0  # the prompt's experts are never used again
    assert refresh["prefetch_hit_rate"] > 0.2
    assert refresh["e2e_latency_s"] <= paper["e2e_latency_s"]
    assert refresh["ttft_s"] == paper["ttft_s"]  # identical until the first refresh


def test_refresh_swaps_are_bounded_and_only_replace_colder_experts(tiny) -> None:
    cfg = tiny(f"policy.expert_cache_bytes={12 * 16 * EXPERT_BYTES}", "policy.refresh_period_steps=1",
               "policy.refresh_max_swaps=5", "workload.output_tokens=24")
    routing = drifting_routing(cfg)
    pf = policies.build.make_prefetcher(cfg, "prefill-freq-refresh", routing)
    pf.after_prefill(routing.prefill_counts(cfg.model.num_experts))
    before = set(pf.cache)
    L = cfg.model.num_layers
    outs = [pf.after_step(lay, s, group_by_expert_counts(routing, s, lay), [])
            for s in range(2) for lay in range(L)]
    assert not any(outs[:-1]), "refreshed before the end of a token, or on one count"
    out = outs[-1]  # after two tokens the new experts lead the old ones by the margin
    assert 0 < len(out) <= 5 and all(k[1] >= 32 for k in out)
    assert len(before - set(pf.cache)) == len(out)  # one victim per expert brought in
    assert all(k[1] < 12 for k in before - set(pf.cache))


def group_by_expert_counts(routing: Routing, step: int, layer: int) -> dict[int, int]:
    return {e: len(t) for e, t in group_by_expert(routing.decode_ids(step, layer)).items()}
