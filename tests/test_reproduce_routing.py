"""``ndpmoe reproduce``'s routing studies: their cases, derived columns and report text."""

from __future__ import annotations

import pytest

from cluster.studies import reproduce as R
from cluster.studies.reproduce import routing as RR
from cluster.studies.reproduce.run import jobs_of


@pytest.fixture(scope="module")
def quick_cases():
    opts = R.options(quick=True)
    return opts, R.all_cases(opts)


def test_real_like_headline_covers_every_model_and_unit_count(quick_cases) -> None:
    opts, cases = quick_cases
    rows = [c for c in cases if c.study == "routing_headline"]
    for routing, pols in ((RR.STATIONARY, RR.STATIONARY_POLICIES), (RR.REAL_LIKE, RR.ROUTING_POLICIES)):
        got = {(c.labels["model"], c.labels["units"], c.policy) for c in rows
               if c.labels["routing"] == routing}
        assert got == {(m, n, p) for m in opts.models for n in opts.units for p in pols}
    second = {c.cfg.workload.routing for c in rows if c.labels["routing"] == RR.SECOND_PRESET}
    assert second == {RR.SECOND_PRESET}
    assert all(c.cfg.workload.routing == RR.REAL_LIKE for c in rows
               if c.labels["routing"] == RR.REAL_LIKE)


def test_stationary_cases_run_in_the_headline_jobs(quick_cases) -> None:
    """No extra configs for the stationary rows: their policies join the headline's jobs."""
    _, cases = quick_cases
    headline_cfgs = {c.cfg for c in cases if c.study == "headline"}
    stationary = {c.cfg for c in cases if c.study == "routing_headline"
                  and c.labels["routing"] == RR.STATIONARY}
    assert stationary <= headline_cfgs
    jobs = jobs_of(cases)
    assert len({j.cfg for j in jobs}) == len(jobs)


def test_odmoe_link_scales_only_the_link(quick_cases) -> None:
    _, cases = quick_cases
    rows = [c for c in cases if c.study == "odmoe_link"]
    bws = sorted({c.cfg.link.bw_gbps for c in rows})
    assert bws == [50.0 * f for f in RR.LINK_FACTORS]
    assert {c.policy for c in rows} == set(RR.ODMOE_POLICIES)


def _rows(paper: float, drift: float, oracle: float, routing: str = RR.REAL_LIKE):
    lat = {"monde": 10.0, "paper": paper, "paper-drift": drift, "tp-lb+oracle": oracle}
    return [{"routing": routing, "model": "m", "units": 4, "policy": p, "e2e_latency_s": v,
             "prefetch_hit_rate": 0.5} for p, v in lat.items()]


def test_derive_and_summary_measure_the_gap_closed() -> None:
    tabs = {"routing_headline": _rows(5.0, 4.5, 4.0) + _rows(4.0, 4.02, 3.9, RR.STATIONARY)[:3]}
    RR.derive(tabs)
    by = {(r["routing"], r["policy"]): r for r in tabs["routing_headline"]}
    assert by[(RR.REAL_LIKE, "paper-drift")]["gap_closed"] == pytest.approx(0.5)
    assert by[(RR.REAL_LIKE, "paper")]["speedup_vs_monde"] == pytest.approx(2.0)
    s = RR.summary(tabs["routing_headline"], RR.REAL_LIKE)
    assert s["gap_closed_total"] == pytest.approx(0.5)
    st = RR.summary(tabs["routing_headline"], RR.STATIONARY)
    assert st["drift_worst"] == pytest.approx(4.0 / 4.02 - 1)


def test_section_says_whether_the_goal_was_met() -> None:
    from cluster.core.config import load_config

    cfg = load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None, [])
    met = {"routing_headline": _rows(5.0, 4.4, 4.0) + _rows(4.0, 4.0, 3.9, RR.STATIONARY)}
    RR.derive(met)
    assert "goal met" in "\n".join(RR.section_lines(met, cfg))
    missed = {"routing_headline": _rows(5.0, 4.9, 4.0) + _rows(4.0, 4.1, 3.9, RR.STATIONARY)}
    RR.derive(missed)
    assert "goal missed" in "\n".join(RR.section_lines(missed, cfg))


def test_odmoe_numbers_compare_one_fetch_with_the_ndp_slice_it_saves() -> None:
    from cluster.core.config import load_config

    cfg = load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None, [])
    n = RR.odmoe_numbers(cfg)
    assert n["fetch_s"] > 4 * n["ndp_slice_s"]  # the link: why od-moe gains little at 50 GB/s
    fast = RR.odmoe_numbers(load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None,
                                        ["link.bw_gbps=800"]))
    assert fast["fetch_s"] < fast["ndp_slice_s"]
