"""Sweeps: grids fan out as Ray tasks, bad points are recorded, heatmaps and CSV come out."""

from __future__ import annotations

import csv
import json

import pytest

from cluster.core.errors import ConfigError
from cluster.studies.sweep import (
    STRESS_AXES,
    STRESS_BASE,
    STRESS_POLICIES,
    Grid,
    aggregate,
    parse_axis,
    read_grid_file,
    sweep_command,
)

TINY_BASE = ["model.num_layers=2", "workload.prompt_tokens=4", "workload.output_tokens=3",
             "ndp.capacity_bytes=1099511627776"]


def test_axes_parse_like_set_overrides():
    assert parse_axis("ndp.num_ndp_units=2,4, 8") == ("ndp.num_ndp_units", [2, 4, 8])
    assert parse_axis("workload.alpha=0,1.5") == ("workload.alpha", [0, 1.5])
    assert parse_axis("workload.routing=synthetic,gate")[1] == ["synthetic", "gate"]
    with pytest.raises(ConfigError, match=r"section\.field=v1,v2"):
        parse_axis("ndp.num_ndp_units")


def test_grid_files_name_their_axes_policies_and_base(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('policies = ["tp", "ep"]\nset = ["model.num_layers=2"]\n'
                 '[grid]\n"ndp.num_ndp_units" = [2, 4]\n"model.top_k" = [1, 2, 4]\n')
    axes, pols, base = read_grid_file(f)
    assert axes == {"ndp.num_ndp_units": [2, 4], "model.top_k": [1, 2, 4]}
    assert pols == ["tp", "ep"] and base == ["model.num_layers=2"]
    assert Grid(axes, pols, base).num_points == 2 * 3 * 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[grid]\n"ndp.num_ndp_units" = 4\n')
    with pytest.raises(ConfigError, match="non-empty list"):
        read_grid_file(bad)


def test_the_default_stress_grid_has_over_a_thousand_points():
    assert Grid(STRESS_AXES, STRESS_POLICIES, STRESS_BASE).num_points >= 1000
    sub = Grid(STRESS_AXES, STRESS_POLICIES, STRESS_BASE, only=(0, 5))
    assert sub.num_points == 2 * len(STRESS_POLICIES)
    assert sub.configs()[1] == Grid(STRESS_AXES, STRESS_POLICIES, STRESS_BASE).configs()[5]


def _small_sweep(tmp_path, address=None) -> tuple[dict, list[dict]]:
    from rich.console import Console

    grid = Grid({"ndp.num_ndp_units": [2, 4], "model.top_k": [2, 200]}, ["ep", "tp"], TINY_BASE)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with open(tmp_path / "log.txt", "w") as log:
        doc = sweep_command(grid, tmp_path, Console(file=log), model="olmoe-1b-7b", workers=2,
                            address=address, progress=False)
    with open(tmp_path / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    return doc, rows


def test_a_small_sweep_runs_in_local_processes_and_keeps_the_grid_order(tmp_path):
    import sys

    doc, rows = _small_sweep(tmp_path)
    assert doc["points"] == 8 and doc["workers"] == 2 and doc["failed"] == 4
    assert [(r["ndp.num_ndp_units"], r["model.top_k"], r["policy"]) for r in rows] == [
        (u, k, p) for u in ("2", "4") for k in ("2", "200") for p in ("ep", "tp")]
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # no Ray without --address


@pytest.mark.ray
def test_a_small_sweep_runs_as_ray_tasks_and_writes_csv_heatmaps_and_summary(tmp_path):
    ray = pytest.importorskip("ray")
    local_rows = _small_sweep(tmp_path / "local")[1]
    doc, rows = _small_sweep(tmp_path, address="local")
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    assert doc["points"] == 8 and doc["failed"] == 4  # top_k 200 > 64 experts: recorded, not fatal
    assert len(rows) == 8
    keep = [k for k in rows[0] if k != "point_s"]  # the same rows as in local processes
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in local_rows]
    bad = [r for r in rows if r["error"]]
    assert {r["model.top_k"] for r in bad} == {"200"} and "model.top_k" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    tp = [float(r["max_over_mean"]) for r in good if r["policy"] == "tp"]
    ep = [float(r["max_over_mean"]) for r in good if r["policy"] == "ep"]
    assert all(abs(v - 1.0) < 1e-9 for v in tp)  # equal TP slices: perfectly balanced
    assert all(v >= 1.0 for v in ep)
    for metric in ("max_over_mean", "balancedness", "e2e_latency_s"):
        png = tmp_path / f"heatmap_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["points"] == 8


def test_aggregate_averages_over_the_other_axes():
    rows = [
        {"a": 1, "b": 1, "c": 0, "policy": "p", "m": 1.0},
        {"a": 1, "b": 1, "c": 1, "policy": "p", "m": 3.0},
        {"a": 2, "b": 1, "c": 0, "policy": "p", "m": 5.0},
        {"a": 2, "b": 1, "c": 0, "policy": "q", "m": 100.0},
        {"a": 2, "b": 1, "c": 1, "policy": "p", "m": None},
    ]
    xs, ys, g = aggregate(rows, "a", "b", "m", "p")
    assert xs == [1, 2] and ys == [1]
    assert g.tolist() == [[2.0, 5.0]]


def test_the_cli_refuses_a_sweep_without_axes_or_with_a_bad_policy(capsys):
    from cluster.cli import main

    assert main(["sweep", "--quiet"]) == 2
    assert "at least one axis" in capsys.readouterr().err
    assert main(["sweep", "--axis", "ndp.num_ndp_units=2,4", "--policies", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown policy 'nope'" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_local_sweep_stops_at_once_and_ends_its_workers(tmp_path, sig):
    """Ctrl-C (to the whole process group) or SIGTERM (to the CLI): exit 130 within seconds,
    no worker process left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "cluster.cli", "stress", "--out", str(tmp_path / "run"),
                          "--quiet"], start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(3)  # the workers are running points by now
    if sig == "SIGINT":
        os.killpg(p.pid, signal.SIGINT)
    else:
        p.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    out = p.communicate(timeout=60)[0].decode()
    assert p.returncode == 130, out[-2000:]
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in out
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", "-g", str(p.pid), "multiprocessing"], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"workers left behind: {left.stdout}"


def test_a_bad_policy_knob_in_a_fresh_worker_is_an_error_row_not_a_crash():
    """A sweep worker loads its point's config before anything else; the policies' knobs must
    be registered by then, so a refused knob value comes back as that point's error row."""
    import subprocess
    import sys

    code = ("import json\n"
            "from cluster.studies.sweep import run_config\n"
            "rows = run_config(None, 'olmoe-1b-7b', ['workload.prompt_tokens=4', "
            "'workload.output_tokens=2'], {'policy.odmoe_recall': 2.0}, ['tp+od-moe'])\n"
            "print(json.dumps(rows))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows == [{"policy.odmoe_recall": 2.0, "policy": "tp+od-moe",
                     "error": "policy.odmoe_recall = 2.0 is not allowed: must be a number in 0..1"}]
