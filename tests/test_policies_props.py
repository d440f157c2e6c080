"""Properties every plan of every scheduler satisfies, over random models, routings and systems.

DESIGN.md section 4: each (token, expert) pair is computed exactly once, TP slices cover
d_ff exactly once, capacities are never exceeded, and a plan's makespan is at least the cost
model's lower bound. ``tp-lb`` is never slower than ``tp`` on the same step. Runs are
deterministic byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies
from cluster.core.cost import CostModel
from cluster.core.errors import ConfigError
from cluster.core.knobs import PolicySpec
from cluster.core.metrics import write_steps_csv
from cluster.core.routing import build_routing
from cluster.core.selection import group_by_expert
from cluster.core.spec import Config, ModelSpec, NdpSpec, WorkloadSpec
from cluster.engines.analytic import run_policy
from policies import ALL_UNITS, GPU, Plan, StepInput

SCHEDULERS = policies.names("scheduler")
SLOP = 1e-9  # relative: float sums taken in another order may differ in the last bits


@st.composite
def systems(draw) -> Config:
    """A small random MoE model on 1..8 NDP units, with random policy knobs."""
    experts = draw(st.integers(2, 64))
    model = ModelSpec(
        name="random", num_layers=2,
        d_model=draw(st.sampled_from([16, 64, 256, 1024, 2048, 4096])),
        d_ff=draw(st.one_of(st.integers(1, 12), st.integers(1, 4096))),  # often below the units
        num_experts=experts, top_k=draw(st.integers(1, min(8, experts))),
        num_heads=4, num_kv_heads=4, head_dim=16, vocab_size=1000)
    policy = PolicySpec(fetch_buffer_experts=draw(st.integers(0, experts)),
                        eplb_period_steps=1, eplb_window_steps=4,
                        eplb_redundant_per_unit=draw(st.integers(0, 2)))
    return Config(ndp=NdpSpec(num_ndp_units=draw(st.integers(1, 8))), model=model,
                  workload=WorkloadSpec(prompt_tokens=4, output_tokens=4), policy=policy)


@st.composite
def steps(draw, cfg: Config) -> StepInput:
    """Tokens 1..32 each routed to top_k distinct experts, and a random cached subset."""
    E, k = cfg.model.num_experts, cfg.model.top_k
    tokens = draw(st.integers(1, 32))
    ids = np.array([draw(st.lists(st.integers(0, E - 1), min_size=k, max_size=k, unique=True))
                    for _ in range(tokens)], dtype=np.int32)
    cached = draw(st.frozensets(st.integers(0, E - 1)))
    return StepInput(0, draw(st.sampled_from(["prefill", "decode"])), group_by_expert(ids), cached)


def with_split(cfg: Config, split: str) -> Config:
    import dataclasses

    return cfg.replace(policy=dataclasses.replace(cfg.policy, lb_split=split))


def variants(cfg: Config) -> Iterator[tuple[str, Config]]:
    """Every scheduler, plus ``tp-lb`` with the fractional split."""
    for name in SCHEDULERS:
        yield name, cfg
    yield "tp-lb", with_split(cfg, "fractional")


def plan_of(name: str, cfg: Config, step: StepInput) -> Plan:
    sched = policies.get("scheduler", name)(cfg, CostModel(cfg))
    sched.observe(step)  # stateful schedulers (eplb) re-plan from what they saw
    return sched.plan(step)


def check_plan(plan: Plan, step: StepInput, cfg: Config, who: str) -> None:
    d_ff, N = cfg.model.d_ff, cfg.ndp.num_ndp_units
    fetched = plan.fetched_experts()
    for t in plan.tasks:  # compact form: the GPU, one unit, or a TP task over all units
        assert t.device in (GPU, ALL_UNITS) or 0 <= t.device < N, (
            f"{who}: device {t.device} with {N} units")
    tasks = plan.expand(N)
    # devices, columns and tokens are well formed
    for t in tasks:
        assert t.device == GPU or 0 <= t.device < N, f"{who}: device {t.device} with {N} units"
        assert 0 <= t.col_start < t.col_end <= d_ff, f"{who}: columns {t} of d_ff {d_ff}"
        assert t.expert in step.routed, f"{who}: task for idle expert {t.expert}"
        assert t.tokens and set(t.tokens) <= set(step.routed[t.expert]), f"{who}: tokens {t}"
    # each routed (token, expert) pair: its tasks cover [0, d_ff) exactly once
    cover: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t in tasks:
        for tok in t.tokens:
            cover.setdefault((tok, t.expert), []).append((t.col_start, t.col_end))
    pairs = {(tok, e) for e, toks in step.routed.items() for tok in toks}
    assert set(cover) == pairs, f"{who}: pairs computed != pairs routed"
    for pair, spans in cover.items():
        spans.sort()
        edge = 0
        for lo, hi in spans:
            assert lo == edge, f"{who}: {pair} columns {spans} overlap or leave a gap"
            edge = hi
        assert edge == d_ff, f"{who}: {pair} columns {spans} stop short of {d_ff}"
    # the GPU only computes weights it holds: cached, or fetched in this plan
    for t in (t for t in tasks if t.device == GPU):
        if t.expert in step.cached:
            continue
        assert t.expert in fetched, f"{who}: GPU runs expert {t.expert}, neither cached nor fetched"
        got = [(f.col_start, f.col_end) for f in plan.fetches if f.expert == t.expert]
        assert any(lo <= t.col_start and t.col_end <= hi for lo, hi in got), (
            f"{who}: GPU computes columns {t.col_start}..{t.col_end} of expert {t.expert}, "
            f"fetched {got}")
    for f in plan.fetches:
        assert f.expert in step.routed and f.expert not in step.cached, f"{who}: fetch {f}"
        assert 0 <= f.col_start < f.col_end <= d_ff, f"{who}: fetch {f}"
    assert len(plan.fetches) == len(fetched), f"{who}: an expert fetched twice"
    # no schedule beats the cost model's bound
    cost = CostModel(cfg)
    timing = policies.time_plan(plan, cost, N)
    bound = policies.lower_bound_s(plan, cost, N)
    assert timing.makespan_s >= bound * (1 - SLOP), f"{who}: {timing.makespan_s} < {bound}"
    assert len(timing.unit_busy_s) == N and all(b >= 0 for b in timing.unit_busy_s)
    # per-unit timing detail agrees with itself: activations in, work, partial out, combine
    for u, busy in enumerate(timing.unit_busy_s):
        if busy == 0:
            assert u not in timing.unit_done_s, f"{who}: idle unit {u} sends a partial"
            continue
        arrive, done = timing.unit_arrival_s[u], timing.unit_done_s[u]
        assert done == pytest.approx(arrive + busy, rel=SLOP), who
        assert arrive < done < timing.partial_arrival_s[u] <= timing.gpu_ready_s, who
    assert all(f <= timing.gpu_ready_s for f in timing.fetch_done_s.values()), who
    assert timing.gpu_ready_s < timing.makespan_s, who  # the combine comes last
    # the compact tensor-parallel form times exactly like the per-unit tasks it stands for
    expanded = policies.time_plan(Plan(plan.layer, tasks, plan.fetches), cost, N)
    assert expanded.makespan_s == pytest.approx(timing.makespan_s, rel=SLOP), who
    assert expanded.unit_busy_s == pytest.approx(timing.unit_busy_s, rel=SLOP), who
    assert expanded.link_bytes == timing.link_bytes, who


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_plan_computes_each_pair_once_on_devices_holding_the_weights(data) -> None:
    cfg = data.draw(systems())
    step = data.draw(steps(cfg))
    for name, c in variants(cfg):
        check_plan(plan_of(name, c, step), step, c, f"{name}/{c.policy.lb_split}")


def check_fetch_buffer(plan: Plan, cfg: Config, who: str) -> None:
    """The on-demand fetch buffer holds at most ``fetch_buffer_experts`` experts' weights."""
    fetched = plan.fetched_experts()
    shown = [(f.expert, f.col_start, f.col_end) for f in plan.fetches]
    assert len(fetched) <= cfg.fetch_buffer_experts, (
        f"{who}: {len(fetched)} experts fetched {shown}, buffer {cfg.fetch_buffer_experts}")
    columns = sum(f.col_end - f.col_start for f in plan.fetches)
    assert columns <= cfg.fetch_buffer_experts * cfg.model.d_ff, (
        f"{who}: fetched {columns} columns {shown}, buffer {cfg.fetch_buffer_experts} "
        f"x {cfg.model.d_ff}")


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_on_demand_fetches_fit_the_fetch_buffer(data) -> None:
    cfg = data.draw(systems())
    step = data.draw(steps(cfg))
    for name, c in variants(cfg):
        check_fetch_buffer(plan_of(name, c, step), c, f"{name}/{c.policy.lb_split}")


def test_fractional_split_does_not_fetch_past_a_full_buffer() -> None:
    # one unit, a one-expert buffer, four experts with a token each: tp-lb fetches one whole
    # expert; the fractional split must not add a slice of a second one beyond the buffer
    cfg = Config(ndp=NdpSpec(num_ndp_units=1),
                 model=ModelSpec(name="m", num_layers=1, d_model=64, d_ff=1024, num_experts=4,
                                 top_k=1, num_heads=4, num_kv_heads=4, head_dim=16),
                 policy=PolicySpec(fetch_buffer_experts=1, lb_split="fractional"))
    step = StepInput(0, "prefill", {0: (0,), 1: (1,), 2: (2,), 3: (3,)})
    plan = plan_of("tp-lb", cfg, step)
    check_plan(plan, step, cfg, "tp-lb/fractional")
    check_fetch_buffer(plan, cfg, "tp-lb/fractional")


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_load_balanced_tp_is_never_slower_than_tp(data) -> None:
    cfg = data.draw(systems())
    step = data.draw(steps(cfg))
    N = cfg.ndp.num_ndp_units
    spans = {}
    for label, c, name in [("tp", cfg, "tp"), ("tp-lb", cfg, "tp-lb"),
                           ("tp-lb/fractional", with_split(cfg, "fractional"), "tp-lb")]:
        spans[label] = policies.time_plan(plan_of(name, c, step), CostModel(c), N).makespan_s
    assert spans["tp-lb"] <= spans["tp"] * (1 + SLOP), spans
    assert spans["tp-lb/fractional"] <= spans["tp-lb"] * (1 + SLOP), spans


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tp_lb_fast_prefix_timing_equals_timing_the_built_plans(data) -> None:
    # tp-lb times every prefix from suffix sums instead of building each plan; the shortcut
    # must give what time_plan gives for the plan it stands for
    cfg = data.draw(systems())
    step = data.draw(steps(cfg))
    sched = policies.get("scheduler", "tp-lb")(cfg, CostModel(cfg))
    cached = [sched.gpu_task(e, t) for e, t in step.routed.items() if e in step.cached]
    order = [e for _, e in sorted((-len(t), e) for e, t in step.routed.items()
                                  if e not in step.cached)]
    span = sched._span_fn(step, cached, order)
    for m in range(len(order) + 1):
        built = sched._build(step, cached, order, m)
        timed = policies.time_plan(built, sched.cost, cfg.ndp.num_ndp_units).makespan_s
        assert span(m) == pytest.approx(timed, rel=SLOP), f"prefix {m} of {order}"


def test_tp_slices_split_d_ff_evenly_and_skip_empty_units() -> None:
    from policies import tp_bounds

    assert tp_bounds(768, 4) == [(0, 192), (192, 384), (384, 576), (576, 768)]
    assert tp_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [hi - lo for lo, hi in tp_bounds(3, 5)] == [0, 1, 0, 1, 1]
    cfg = Config(ndp=NdpSpec(num_ndp_units=5),
                 model=ModelSpec(name="narrow", num_layers=1, d_ff=3, num_experts=4, top_k=2))
    plan = plan_of("tp", cfg, StepInput(0, "decode", {1: (0,), 2: (0,)}))
    slices = [t for t in plan.expand(5) if t.expert == 1]
    assert sorted((t.col_start, t.col_end) for t in slices) == [(0, 1), (1, 2), (2, 3)]
    assert len({t.device for t in slices}) == 3  # three units, one column each; two idle
    busy = policies.time_plan(plan, CostModel(cfg), 5).unit_busy_s
    assert sum(b > 0 for b in busy) == 3


def test_tp_lb_fetches_hot_experts_when_many_tokens_share_them(tiny) -> None:
    cfg = tiny()
    routed = {e: tuple(range(64)) for e in range(8)}  # prefill-like: 64 tokens on 8 experts
    plan = plan_of("tp-lb", cfg, StepInput(0, "prefill", routed))
    cost = CostModel(cfg)
    tp = policies.time_plan(plan_of("tp", cfg, StepInput(0, "prefill", routed)), cost, 4)
    assert plan.fetches, "no expert moved to the GPU"
    assert policies.time_plan(plan, cost, 4).makespan_s < tp.makespan_s


def test_ep_home_unit_paces_a_step_with_two_experts_on_one_unit(tiny) -> None:
    cfg = tiny()
    plan = plan_of("ep", cfg, StepInput(0, "decode", {0: (0,), 4: (0,), 1: (0,)}))
    assert sorted((t.expert, t.device) for t in plan.tasks) == [(0, 0), (1, 1), (4, 0)]
    busy = policies.time_plan(plan, CostModel(cfg), 4).unit_busy_s
    assert busy[0] == pytest.approx(2 * busy[1]) and busy[2] == busy[3] == 0


def test_cached_experts_run_on_the_gpu_under_every_scheduler(tiny) -> None:
    cfg = tiny()
    step = StepInput(0, "decode", {3: (0,), 9: (0,)}, cached=frozenset({3, 40}))
    for name, c in variants(cfg):
        plan = plan_of(name, c, step)
        assert [(t.device, t.expert) for t in plan.tasks if t.expert == 3] == [(GPU, 3)], name
        assert 3 not in plan.fetched_experts(), name


def test_registry_names_every_policy_and_refuses_unknown_or_duplicate_names() -> None:
    assert set(SCHEDULERS) == {"ep", "monde", "tp", "tp-lb", "eplb", "monde-tp"}
    assert set(policies.names("prefetcher")) == {
        "none", "lru", "lfu", "profiled", "oracle", "prefill-freq",
        "context-aware", "od-moe", "expertflow", "prefill-freq-refresh", "decayed-freq"}
    assert set(policies.combos()) == {"paper", "context-aware", "od-moe", "expertflow", "paper-refresh",
                                      "paper-drift"}
    assert policies.resolve("paper") == policies.PolicyChoice("paper", "tp-lb", "prefill-freq")
    assert policies.resolve("tp") == policies.PolicyChoice("tp", "tp", "none")
    assert policies.resolve("ep+lru") == policies.PolicyChoice("ep+lru", "ep", "lru")
    with pytest.raises(ConfigError, match=r"unknown policy 'tp-bl'.*tp-lb"):
        policies.resolve("tp-bl")
    with pytest.raises(ConfigError, match=r"unknown prefetcher 'lfru'.*lfu, lru"):
        policies.resolve("tp+lfru")
    with pytest.raises(ValueError, match="already registered"):
        policies.register("scheduler", "tp")(type("Again", (policies.Scheduler,), {}))
    with pytest.raises(ValueError, match="already registered"):
        policies.register_combo("paper", "tp", "none", "again")


# --- prefetcher capacity and determinism over whole analytic runs -------------------------

@pytest.mark.parametrize("prefetcher", policies.names("prefetcher"))
@pytest.mark.parametrize("cache_experts", [0, 3, 40])
def test_prefetcher_cache_never_exceeds_its_capacity(tiny, cache_spy, prefetcher: str,
                                                     cache_experts: int) -> None:
    cfg = tiny(f"policy.expert_cache_bytes={cache_experts * 3 * 2048 * 1024 * 2}",
               "workload.alpha=1.2", "policy.fetch_buffer_experts=4")
    assert cfg.cache_capacity_experts == cache_experts
    routing = build_routing(cfg)
    made, sizes = cache_spy(cache_experts)
    rec = run_policy(cfg, routing, f"tp-lb+{prefetcher}")
    assert len(made) == 1 and len(rec.tokens) == cfg.workload.output_tokens
    L = cfg.model.num_layers
    assert len(sizes) == 2 + L * routing.decode_steps  # every hook call was checked
    if prefetcher != "none" and cache_experts:
        assert max(sizes) > 0, "the prefetcher never used its cache"


@pytest.mark.parametrize("prefetcher", policies.names("prefetcher"))
def test_the_engine_knows_what_a_prefetcher_holds_from_its_decisions_alone(tiny, monkeypatch,
                                                                        prefetcher: str) -> None:
    """The engine never looks into a prefetcher's cache: after each decision it applies, its
    view (what the decisions fetched or admitted, less what they evicted) is the cache."""
    from cluster.engines import analytic

    cfg = tiny(f"policy.expert_cache_bytes={12 * 3 * 2048 * 1024 * 2}", "workload.alpha=1.2",
               "policy.fetch_buffer_experts=4")
    real, checks = analytic.Episode._apply, []

    def apply(self, d) -> None:
        real(self, d)
        held = {(lay, e) for lay, es in self._held.items() for e in es}
        assert held == set(self.pf.cache)
        checks.append(len(held))

    monkeypatch.setattr(analytic.Episode, "_apply", apply)
    run_policy(cfg, build_routing(cfg), f"tp-lb+{prefetcher}")
    assert len(checks) >= 2  # preload and after prefill at least
    if prefetcher != "none":
        assert max(checks) > 0


def steps_csv(records, path: Path) -> bytes:
    write_steps_csv(path, records)
    return path.read_bytes()


def test_same_seed_same_records_byte_for_byte(tiny, tmp_path: Path) -> None:
    names = [*SCHEDULERS, "paper", "tp-lb+lru", "tp-lb+oracle", "tp-lb+profiled"]

    def run(seed: int) -> list:
        cfg = tiny(f"workload.seed={seed}", "workload.batch_size=2")
        routing = build_routing(cfg)
        return [run_policy(cfg, routing, n) for n in names]

    a = steps_csv(run(11), tmp_path / "a.csv")
    b = steps_csv(run(11), tmp_path / "b.csv")
    c = steps_csv(run(12), tmp_path / "c.csv")
    assert a == b
    assert a != c
    assert a.count(b"\n") == 1 + len(names) * 16 * 8  # header + 16 layers x (prefill + 7 decode)
