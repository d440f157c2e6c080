"""Faults: injection specs, slow units and link delays in the model, dead and silent devices,
recovery, dropped messages, partial results (DESIGN.md section 9, issue 6).

Where Ray is not the point the devices are served on an :class:`InprocHub` with heartbeats
and the scheduler runs on a :class:`VirtualClock`; "dying" there closes the device's endpoints
(as a dead process's sockets close) or just stops it answering (a hung one), and a
"restart" serves a fresh device under the same names with a new incarnation. The Ray tests
kill real actor processes through the injected ``kill`` fault.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

import policies
from cluster.analytic import run_policy
from cluster.config import load_config
from cluster.cost import CostModel
from cluster.errors import ConfigError, EmulationError
from cluster.faults import GRAMMAR, Faults, Kill, inject_overrides, parse_inject
from cluster.routing import build_routing, group_by_expert
from cluster.spec import Config

SCALE = 1 / 16
TINY = ("workload.prompt_tokens=6", "workload.output_tokens=3", "model.num_layers=4")
REL_TOL = 1e-4


def _cfg(*overrides: str, inject: str = "") -> Config:
    extra = inject_overrides([inject]) if inject else []
    return load_config(model="olmoe-1b-7b", overrides=[*TINY, *overrides, *extra])


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --- fault specs ----------------------------------------------------------------------------

def test_a_spec_of_every_kind_parses_into_faults() -> None:
    f = parse_inject(" kill:ndp2@step40; slow:ndp1x3 ;delay:link+200us;drop:0.01;kill:ndp0@step1")
    assert f == Faults(kills=(Kill(2, 40), Kill(0, 1)), slow=((1, 3.0),), link_delay_us=200.0,
                       drop_p=0.01)
    assert f.unit_factors(4) == (1.0, 3.0, 1.0, 1.0)
    assert parse_inject("") == Faults() and not parse_inject("  ;  ")
    assert parse_inject("slow:ndp0x1.5;delay:link+2.5us").link_delay_us == 2.5


@pytest.mark.parametrize("spec, why", [
    ("kill:ndp2", "not a fault"),
    ("kill:ndp2@step0", "decode step >= 1"),
    ("kill:gpu@step3", "not a fault"),
    ("kill:ndp1@step2;kill:ndp1@step2", "given twice"),
    ("slow:ndp1x0.5", "factor must be in 1..1000"),
    ("slow:ndp1x", "not a fault"),
    ("slow:ndp1x2;slow:ndp1x3", "slowed twice"),
    ("delay:link+200ms", "not a fault"),
    ("delay:link-5us", "not a fault"),
    ("delay:link+1us;delay:link+2us", "given twice"),
    ("drop:0.9", "probability must be in 0..0.5"),
    ("drop:-0.1", "not a fault"),
    ("drop:lots", "not a fault"),
    ("explode:ndp1", "not a fault"),
])
def test_a_bad_spec_fails_at_load_naming_field_value_and_grammar(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(inject=spec)
    msg = str(err.value)
    assert "emulate.inject" in msg and repr(spec) in msg and why in msg, msg
    assert GRAMMAR in msg


@pytest.mark.parametrize("spec, why", [
    ("kill:ndp4@step1", "there is no unit ndp4: the system has ndp0..ndp3"),
    ("slow:ndp7x2", "there is no unit ndp7"),
    ("kill:ndp1@step3", "would never fire: the run has decode steps 1..2"),
])
def test_faults_must_name_units_and_steps_of_this_run(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"emulate\.inject") as err:
        _cfg(inject=spec)
    assert why in str(err.value)


def test_inject_flags_become_one_override_and_recovery_fields_validate() -> None:
    assert inject_overrides([]) == []
    ov = inject_overrides(["kill:ndp1@step2", "drop:0.05"])
    assert ov == ['emulate.inject="kill:ndp1@step2;drop:0.05"']
    cfg = _cfg("emulate.recover=true", *ov)
    assert cfg.emulate.inject == "kill:ndp1@step2;drop:0.05" and cfg.emulate.recover is True
    assert cfg.emulate.heartbeat_timeout_s == 3.0
    for bad, why in [("emulate.heartbeat_timeout_s=1.5", "a number in 2..60"),
                     ("emulate.recover=1", "true or false")]:
        with pytest.raises(ConfigError, match=why):
            _cfg(bad)


# --- slow units and link delay are part of the model ----------------------------------------

def test_a_slow_unit_raises_imbalance_and_shows_in_the_trace() -> None:
    healthy = _cfg()
    slow = _cfg(inject="slow:ndp1x3")
    routing = build_routing(healthy)
    a, b = run_policy(healthy, routing, "tp"), run_policy(slow, routing, "tp")
    from cluster.metrics import summarize

    mom_a, mom_b = summarize(a, 4)["max_over_mean"], summarize(b, 4)["max_over_mean"]
    assert mom_a == pytest.approx(1.0, abs=1e-6)  # tp: equal slices, equal work
    assert mom_b == pytest.approx(3 / ((3 + 3) / 4), rel=1e-6)  # max 3, mean 1.5: 2.0
    assert b.tokens[-1].time_s > a.tokens[-1].time_s
    # unit 1's expert intervals in the trace last three times unit 0's
    def durs(rec, unit: str) -> list[float]:
        return [iv.end_s - iv.start_s for iv in rec.intervals if iv.resource == unit
                and iv.kind == "expert"]
    d0, d1 = durs(b, "ndp0"), durs(b, "ndp1")
    assert d0 and len(d0) == len(d1)
    np.testing.assert_allclose(d1, 3 * np.asarray(d0), rtol=1e-9)
    np.testing.assert_allclose(durs(a, "ndp1"), d0, rtol=1e-9)
    # every step still respects its (slow-aware) lower bound
    assert all(s.makespan_s >= s.lower_bound_s * (1 - 1e-9) for s in b.steps)


def test_a_link_delay_adds_to_every_transfer() -> None:
    base, late = CostModel(_cfg()), CostModel(_cfg(inject="delay:link+200us"))
    assert late.link_latency_s == pytest.approx(base.link_latency_s + 200e-6)
    assert late.fetch_s() - base.fetch_s() == pytest.approx(200e-6)
    routing = build_routing(_cfg())
    t0 = run_policy(_cfg(), routing, "tp").tokens[-1].time_s
    t1 = run_policy(_cfg(inject="delay:link+200us"), routing, "tp").tokens[-1].time_s
    assert t1 > t0 + 200e-6


@pytest.mark.parametrize("units, factors", [(4, (1.0, 3.0, 1.0, 1.0)), (3, (2.5, 1.0, 7.0)),
                                            (5, (1.0, 1.0, 1.0, 1.0, 4.0))])
def test_tp_lb_fast_timing_equals_time_plan_with_slow_units(units: int, factors) -> None:
    cfg = load_config(model="olmoe-1b-7b", overrides=[f"ndp.num_ndp_units={units}", *TINY])
    cost = CostModel(cfg, unit_factor=factors)
    sched = policies.get("scheduler", "tp-lb")(cfg, cost)
    rng = np.random.default_rng(units)
    for trial in range(20):
        ids = np.stack([rng.choice(64, 8, replace=False) for _ in range(int(rng.integers(1, 24)))])
        routed = group_by_expert(ids.astype(np.int32))
        cached = frozenset(int(e) for e in rng.choice(64, int(rng.integers(0, 6)), replace=False))
        step = policies.StepInput(0, "decode", routed, cached)
        cached_tasks = [sched.gpu_task(e, t) for e, t in routed.items() if e in cached]
        order = [e for _, e in sorted((-len(t), e) for e, t in routed.items() if e not in cached)]
        span = sched._span_fn(step, cached_tasks, order)
        for m in range(len(order) + 1):
            plan = sched._build(step, cached_tasks, order, m)
            timing = policies.time_plan(plan, cost, units)
            assert span(m) == pytest.approx(timing.makespan_s, rel=1e-9), (trial, m)
            assert timing.makespan_s >= policies.lower_bound_s(plan, cost, units) * (1 - 1e-9)


# --- the measuring emulation --------------------------------------------------------------
# Recovery (--recover) and message drops (drop:P) belonged to the lock-step engine, whose
# scheduler re-sent a step's tasks and waited for replies. The measuring emulation sends
# one-way commands and data through the link; re-entering a step in flight after a restart is
# not built yet, so both are refused before anything starts (issue 9's closing note).

@pytest.mark.parametrize("overrides, field", [
    (("emulate.recover=true",), "emulate.recover"),
    (("emulate.inject=drop:0.01",), "drop"),
])
def test_recovery_and_message_drops_are_refused_by_the_emulation_before_it_starts(
        overrides, field, tmp_path) -> None:
    from cluster import emulate

    cfg = load_config(model="olmoe-1b-7b", overrides=[*TINY, *overrides])
    with pytest.raises(ConfigError, match=field):
        emulate.check_supported(cfg)


def test_a_failed_emulated_run_still_writes_its_partial_results(tmp_path, monkeypatch) -> None:
    """The runner's side, without Ray: finished policies, the failed one, then the error."""
    from cluster import emulate, runner

    cfg = _cfg()
    routing = build_routing(cfg)
    done = run_policy(cfg, routing, "tp")
    half = run_policy(cfg, routing, "ep")
    half.tokens, half.steps = half.tokens[:1], half.steps[:4]

    def failing(cfg, routing, names, run_dir, **_: Any):
        summaries = {"tp": {**emulate.summarize(done, 4), "status": "ok"},
                     "ep": emulate.failed_summary("ep", "ndp1 went silent", half, None,
                                                  ("decode", 1, 0), cfg)}
        raise emulate.PartialRunError("ndp1 went silent (policy ep)", summaries,
                                      [done, half],
                                      {"status": "failed", "error": "ndp1 went silent"})

    monkeypatch.setattr(emulate, "run_emulation", failing)
    with pytest.raises(EmulationError, match=r"ndp1 went silent.*partial results in"):
        runner.run(cfg, ["tp", "ep"], engine="emulate", out=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and list(summary["policies"]) == ["tp", "ep"]
    assert summary["policies"]["tp"]["status"] == "ok"
    ep = summary["policies"]["ep"]
    assert ep["status"] == "failed" and ep["error"] == "ndp1 went silent"
    assert ep["failed_at"] == {"phase": "decode", "step": 1, "layer": 0}
    assert ep["tokens_completed"] == 1 and ep["moe_steps_completed"] == 4
    assert (tmp_path / "steps.csv").is_file() and (tmp_path / "trace.json").is_file()


# --- Ray: real processes die ----------------------------------------------------------------

RAY_TINY = ("weights.memory_budget_bytes=67108864", "emulate.dilation=40")


@pytest.mark.ray
def test_a_killed_unit_without_recovery_fails_fast_and_leaves_a_partial_summary(
        ray_local, tmp_path) -> None:
    from cluster import runner

    cfg = _cfg(*RAY_TINY, inject="kill:ndp1@step1")
    t0 = time.monotonic()
    with pytest.raises(EmulationError) as err:
        runner.run(cfg, ["tp", "paper"], engine="emulate", out=tmp_path, progress=False)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "ndp1" in msg and "decode step 1, layer 0" in msg and "summary.json" in msg, msg
    assert "Traceback" not in msg
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_policy"] == "tp"
    assert summary["not_run"] == ["paper"]
    tp = summary["policies"]["tp"]
    assert tp["status"] == "failed" and "ndp1" in tp["error"]
    assert tp["failed_at"] == {"phase": "decode", "step": 1, "layer": 0}
    assert tp["tokens_completed"] == 1 and tp["injected_kills"] == ["ndp1@decode step 1, layer 0"]
    # detected by the heartbeat, well inside 10 s of the kill (the run's wall time is mostly it)
    assert tp["wall_s"] < 10.0 and took < 30.0, (tp["wall_s"], took)
    assert ray_local.is_initialized()
