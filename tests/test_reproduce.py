"""``ndpmoe reproduce``: a small run end to end, and the pieces its report rests on."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import policies
from cluster.cli import main
from cluster.studies import reproduce as R
from cluster.studies.reproduce import common, headline, prefetchers, sensitivity, spot_check
from cluster.studies.reproduce.run import jobs_of, ray_ready

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUICK_MODELS = R.QUICK["models"]
QUICK_UNITS = R.QUICK["units"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """One ``--quick`` run (2 models + the contrast model, units 2 and 4, 32 in / 16 out)."""
    out = tmp_path_factory.mktemp("reproduce") / "run"
    rc = main(["reproduce", "--quick", "--workers", "2", "--quiet", "--out", str(out)])
    assert rc == 0
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_quick_run_writes_the_report_the_tables_and_the_figures(quick_run) -> None:
    assert (quick_run / "report.md").stat().st_size > 0
    assert (quick_run / "results.json").exists()
    for name in ("headline", "ablation", "prefetch_budget", "prefetchers", "sensitivity"):
        rows = _csv(quick_run / f"{name}.csv")
        assert rows, name
    for name in ("headline_speedup", "ablation", "prefetch_budget", "prefetchers",
                 "sensitivity_tornado"):
        data = (quick_run / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name  # a drawn figure, not an empty canvas
    report = (quick_run / "report.md").read_text()
    for png in quick_run.glob("*.png"):
        assert f"({png.name})" in report, f"{png.name} is not shown in the report"


def test_headline_csv_has_every_model_unit_and_policy_with_a_positive_speedup(quick_run) -> None:
    rows = _csv(quick_run / "headline.csv")
    models = (*QUICK_MODELS, *common.CONTRAST_MODELS)
    want = {(m, str(n), p) for m in models for n in QUICK_UNITS for p in headline.HEADLINE_POLICIES}
    assert {(r["model"], r["units"], r["policy"]) for r in rows} == want
    assert len(rows) == len(want)
    for r in rows:
        assert float(r["speedup_vs_monde"]) > 0
        assert float(r["e2e_latency_s"]) > 0
        if r["policy"] == "monde":
            assert float(r["speedup_vs_monde"]) == pytest.approx(1.0)
        assert r["in_average"] == ("yes" if r["model"] in QUICK_MODELS else "no")


def test_report_average_and_maximum_match_the_csv_and_leave_out_the_contrast(quick_run) -> None:
    rows = [r for r in _csv(quick_run / "headline.csv") if r["policy"] == "paper"]
    averaged = [float(r["speedup_vs_monde"]) for r in rows if r["in_average"] == "yes"]
    assert len(averaged) == len(QUICK_MODELS) * len(QUICK_UNITS)
    report = (quick_run / "report.md").read_text()
    avg = re.search(r"\| average speedup of paper over monde \| 2\.41x \| ([\d.]+)x \|", report)
    mx = re.search(r"\| maximum speedup \| 2\.56x \| ([\d.]+)x", report)
    assert avg and mx, "headline table missing from report.md"
    assert float(avg.group(1)) == pytest.approx(sum(averaged) / len(averaged), abs=0.006)
    assert float(mx.group(1)) == pytest.approx(max(averaged), abs=0.006)


def test_ablation_reuses_the_headline_latencies(quick_run) -> None:
    head = {(r["model"], r["policy"]): float(r["e2e_latency_s"])
            for r in _csv(quick_run / "headline.csv") if r["units"] == "4"}
    for r in _csv(quick_run / "ablation.csv"):
        assert float(r["paper_e2e_latency_s"]) == pytest.approx(head[(r["model"], "paper")], rel=1e-5)
        assert float(r["paper_vs_monde"]) == pytest.approx(
            head[(r["model"], "monde")] / head[(r["model"], "paper")], rel=1e-4)


def test_prefetch_budget_zero_means_no_cache_and_no_hits(quick_run) -> None:
    rows = _csv(quick_run / "prefetch_budget.csv")
    assert {float(r["cache_fraction"]) for r in rows} == set(R.QUICK["cache_fractions"])
    for r in rows:
        if float(r["cache_fraction"]) == 0:
            assert int(r["cache_experts"]) == 0
            assert float(r["prefetch_hit_rate"]) == 0
            assert float(r["speedup_vs_no_cache"]) == pytest.approx(1.0)


def test_prefetchers_include_the_shifted_calibration_and_registered_neighbours(quick_run) -> None:
    rows = _csv(quick_run / "prefetchers.csv")
    variants = {r["variant"] for r in rows}
    ran = {r["policy"] for r in rows}
    assert {f"tp-lb+{p}" for p in prefetchers.PREFETCHERS} <= variants
    assert {prefetchers.PROFILED_OTHER, prefetchers.PROFILED_FLAT} <= variants
    for name in prefetchers.NEIGHBOURS:
        registered = name in policies.all_policy_names() or name in policies.names("prefetcher")
        assert registered == bool({name, f"tp-lb+{name}"} & ran), name


def test_context_aware_runs_with_reduced_bit_ndp_experts_and_says_what_that_costs(quick_run) -> None:
    """Its rows run at 8 and 4 NDP bits (not at fp16, where it would be prefill-freq's pinning
    plus MoNDE's rule); fewer bits read fewer bytes, so 4 bits is faster than 8 for every model."""
    rows = [r for r in _csv(quick_run / "prefetchers.csv") if r["policy"] == "context-aware"]
    widths = {r["variant"].rsplit(", ", 1)[1] for r in rows}
    assert widths == {f"{b}-bit NDP experts" for b in prefetchers.REDUCED_BITS} == {
        "8-bit NDP experts", "4-bit NDP experts"}
    for model in {r["model"] for r in rows}:
        by = {r["variant"].rsplit(", ", 1)[1]: float(r["e2e_latency_s"]) for r in rows if r["model"] == model}
        assert by["4-bit NDP experts"] < by["8-bit NDP experts"], model
    report = (quick_run / "report.md").read_text()
    assert "this emulator does not measure that accuracy cost" in report


def test_sensitivity_has_a_base_row_and_both_directions_of_each_scaled_assumption(quick_run) -> None:
    rows = _csv(quick_run / "sensitivity.csv")
    assert sum(r["assumption"] == "base" for r in rows) == 1
    keys = [r["key"] for r in rows if r["assumption"] != "base"]
    for v in sensitivity.SENSITIVITY:
        assert keys.count(v.key) == len(v.values), v.key
    for r in rows:
        s = float(r["speedup_paper_vs_monde"])
        assert s == pytest.approx(float(r["monde_e2e_latency_s"]) / float(r["paper_e2e_latency_s"]),
                                  rel=1e-4)


def test_equal_configs_run_once() -> None:
    opts = R.options(quick=True, workers=1)
    cases = R.all_cases(opts)
    jobs = jobs_of(cases)
    pairs = {(c.cfg, c.policy) for c in cases}
    assert sum(len(j.policies) for j in jobs) == len(pairs) < len(cases)
    assert len({j.cfg for j in jobs}) == len(jobs)


def test_headline_stats_average_only_the_paper_models() -> None:
    rows = [{"model": "a", "units": 2, "policy": "paper", "in_average": True, "speedup_vs_monde": 2.0},
            {"model": "a", "units": 4, "policy": "paper", "in_average": True, "speedup_vs_monde": 3.0},
            {"model": "c", "units": 2, "policy": "paper", "in_average": False, "speedup_vs_monde": 9.0},
            {"model": "a", "units": 2, "policy": "tp", "in_average": True, "speedup_vs_monde": 5.0}]
    st = headline.headline_stats(rows)
    assert st == {"points": 2, "avg": 2.5, "max": 3.0, "min": 2.0, "argmax": ("a", 4)}


def test_quick_defaults_give_way_to_explicit_values() -> None:
    o = R.options(quick=True, units=[3, 2, 3], output_tokens=8)
    assert o.units == (2, 3)
    assert o.output_tokens == o.sweep_output_tokens == 8
    assert o.prompt_tokens == R.QUICK["prompt_tokens"]
    assert o.focus_units == 3  # 4 is not swept: the middle of the sweep


def test_bad_override_or_model_fails_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["reproduce", "--quick", "--out", str(out), "--set", "link.bw_gbs=10"]) == 2
    assert "link.bw_gbs" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(out), "--models", "gpt-5"]) == 2
    assert "gpt-5" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(out), "--workers", "0"]) == 2
    assert not out.exists()


def test_spot_check_is_reported_beside_the_analytic_numbers(tmp_path, monkeypatch) -> None:
    """The spot check's bookkeeping, with the emulation engine swapped for a stand-in."""
    import cluster.studies.runner

    def fake_run(cfg, names, engine, out, **kw):
        assert engine == "emulate" and cfg.ndp.num_ndp_units == spot_check.SPOT_CHECK["units"]
        assert cfg.workload.output_tokens == spot_check.SPOT_CHECK["output_tokens"]
        lat = {"monde": (2.0, 2.02), "paper": (1.0, 0.99)}  # (analytic, emulated)
        summaries = {n: {"analytic_e2e_latency_s": a, "emulated_e2e_latency_s": e,
                         "fidelity_error": abs(e - a) / a,
                         "fidelity": {"e2e": abs(e - a) / a, "tpot": 0.004 if n == "paper" else 0.012},
                         "dilation": 50.0, "overruns": 3, "device_slots": {"gpu": 40, "ndp0": 60},
                         "emulator_floor": {"control_path_emulated_us": 7.5}}
                     for n, (a, e) in lat.items()}
        # what spot_check reads of runner.run's result: its summaries and run directory
        return SimpleNamespace(summaries=summaries, run_dir=Path(out))

    monkeypatch.setattr(cluster.studies.runner, "run", fake_run)
    opts = R.options(quick=True, models=["mixtral-8x7b"], units=[2], contrast_models=[],
                     workers=1, spot_check=True)
    o = R.reproduce(opts, tmp_path / "run", progress=False)
    assert o.spot["analytic_speedup"] == pytest.approx(2.0)
    assert o.spot["emulated_speedup"] == pytest.approx(2.02 / 0.99)
    assert o.spot["difference_pct"] == pytest.approx((2.02 / 0.99 / 2.0 - 1) * 100)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## 7. Emulated spot check" in report and "+2.02%" in report
    assert "monde 1.00%, paper 1.00%" in report  # e2e errors
    assert "monde 1.20%, paper 0.40%" in report  # TPOT errors
    assert "monde 3/100" in report and "7.50 us" in report
    assert "paced" not in report  # the emulation measures; it no longer replays a schedule
    assert (tmp_path / "run" / "spot_check.csv").exists()


@pytest.mark.ray
def test_points_run_as_ray_tasks_when_ray_is_up_and_give_the_same_tables(tmp_path) -> None:
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    opts = R.options(quick=True, models=["mixtral-8x7b"], units=[2], contrast_models=[], workers=2)
    local = R.reproduce(R.options(quick=True, models=["mixtral-8x7b"], units=[2], contrast_models=[],
                                  workers=1), tmp_path / "local", progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray_ready()
        remote = R.reproduce(opts, tmp_path / "ray", progress=False)
    finally:
        ray.shutdown()
    assert remote.tables == local.tables
