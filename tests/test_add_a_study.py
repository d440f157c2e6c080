"""The recipe of :mod:`cluster.studies.reproduce` ("How to add a study"), followed literally.

Step 1 is the toy study below (in a real change it is its own module): the focus point of
``paper`` and ``monde`` with the host link as is and twice as fast, a derived speedup column, a
CSV, a figure and a report section. Step 2 registers it at run time, and the fixture takes it
out again so that no other test sees it. Step 3 runs ``reproduce`` with it and reads its rows
back from the files a run writes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cluster.core.errors import ConfigError
from cluster.studies import reproduce as R
from cluster.studies.reproduce import registry
from cluster.studies.reproduce.common import (
    Case,
    Configs,
    Options,
    Outcome,
    Study,
    Tables,
    md_table,
    save,
    speedup,
)
from cluster.studies.reproduce.common import plt as _plt

# --- step 1: the study's module ----------------------------------------------------------------

FACTORS = (1, 2)
POLICIES = ("monde", "paper")
CSV_COLUMNS = {"toy_link": ("model", "units", "link_factor", "policy", "e2e_latency_s",
                            "speedup_vs_monde")}


def cases(opts: Options, load: Configs) -> list[Case]:
    n, model = opts.focus_units, opts.focus_model
    base = load(n, model)
    out = []
    for f in FACTORS:
        cfg = base if f == 1 else load(n, model, f"link.bw_gbps={base.link.bw_gbps * f!r}")
        out += [Case("toy_link", {"model": model, "units": n, "link_factor": f}, cfg, p)
                for p in POLICIES]
    return out


def derive(tables: Tables, opts: Options) -> None:
    speedup(tables.get("toy_link", []), ("link_factor",), lambda r: r["policy"] == "monde",
            "speedup_vs_monde")


def figures(o: Outcome, opts: Options) -> list[Path]:
    rows = [r for r in o.tables["toy_link"] if r["policy"] == "paper"]
    fig, ax = _plt().subplots(figsize=(4, 3))
    ax.plot([r["link_factor"] for r in rows], [r["speedup_vs_monde"] for r in rows], marker="o")
    return [save(fig, o.run_dir / "toy_link.png")]


def section(o: Outcome, opts: Options, cfg) -> list[str]:
    rows = [r for r in o.tables["toy_link"] if r["policy"] == "paper"]
    return ["## Toy: a faster host link", "",
            md_table(["link", "paper / monde"],
                     [[f"x{r['link_factor']}", f"{r['speedup_vs_monde']:.4f}x"] for r in rows]),
            "", "![toy](toy_link.png)", ""]


TOY = Study("toy_link", cases=cases, derive=derive, csvs=CSV_COLUMNS, figures=figures,
            section=section)


# --- step 2: its registration, undone after each test -------------------------------------------


@pytest.fixture
def registered():
    before = registry.names()
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)
    assert registry.names() == before


def _opts() -> Options:
    return R.options(quick=True, models=["mixtral-8x7b"], units=[2], contrast_models=[], workers=1)


# --- step 3: reproduce runs it ------------------------------------------------------------------


def test_a_registered_study_runs_and_its_rows_reach_every_output(registered, tmp_path) -> None:
    assert registry.names()[-1] == "toy_link"
    o = R.reproduce(_opts(), tmp_path / "run", progress=False, studies=["headline", "toy_link"])
    run = tmp_path / "run"

    with (run / "toy_link.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["link_factor"], r["policy"]) for r in rows] == [
        (str(f), p) for f in FACTORS for p in POLICIES]
    lat = {(r["link_factor"], r["policy"]): float(r["e2e_latency_s"]) for r in rows}
    for r in rows:  # the derived column, from the engine's latencies
        assert float(r["speedup_vs_monde"]) == pytest.approx(
            lat[(r["link_factor"], "monde")] / lat[(r["link_factor"], r["policy"])], rel=1e-5)
    assert all(v > 0 for v in lat.values())
    assert lat[("2", "monde")] != lat[("1", "monde")]  # the faster link really ran

    # At link x1 the toy's config is the headline's: it joins that job, so the latencies are the
    # headline's and only the x2 config is a job of its own.
    head = {r["policy"]: r["e2e_latency_s"] for r in o.tables["headline"]}
    assert lat[("1", "paper")] == pytest.approx(head["paper"], rel=1e-5)
    assert lat[("1", "monde")] == pytest.approx(head["monde"], rel=1e-5)
    assert o.jobs == 2

    doc = json.loads((run / "results.json").read_text())
    assert [r["policy"] for r in doc["tables"]["toy_link"]] == [p for _ in FACTORS for p in POLICIES]
    assert (run / "toy_link.png").read_bytes().startswith(b"\x89PNG")
    report = (run / "report.md").read_text()
    assert "## Toy: a faster host link" in report and "(toy_link.png)" in report
    assert "`toy_link.csv`" in report
    paper2 = next(r for r in rows if r["link_factor"] == "2" and r["policy"] == "paper")
    assert f"| x2 | {float(paper2['speedup_vs_monde']):.4f}x |" in report
    assert report.index("## 1. Headline") < report.index("## Toy") < report.index("## Assumptions")
    assert "## 3. Prefetch-budget" not in report  # only the chosen studies ran


def test_a_study_name_is_registered_once(registered) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TOY)


def test_without_the_registration_the_study_is_unknown(tmp_path) -> None:
    assert "toy_link" not in registry.names()
    assert {c.study for c in R.all_cases(_opts())}.isdisjoint({"toy_link"})
    with pytest.raises(ConfigError, match="no reproduce study named toy_link"):
        R.reproduce(_opts(), tmp_path / "run", progress=False, studies=["toy_link"])
    assert not (tmp_path / "run").exists()
