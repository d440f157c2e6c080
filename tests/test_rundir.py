"""Run directories never lie, and an emulated run is costed before it starts.

A run directory holds one whole run or nothing: ``--out`` must be new or empty unless
``--overwrite`` replaces an earlier run directory; a run that fails or is interrupted still
leaves ``summary.json`` with ``"status": "failed"`` and the error; ``summary.json`` is strict
JSON. An emulated run prints its estimated wall time and memory, and one above
``emulate.max_wall_s`` or the machine's memory is refused before Ray starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.engines import base
from cluster.engines.emulate import machine_memory_bytes
from cluster.studies import report

ANALYTIC = ["run", "--engine", "analytic", "--model", "olmoe-1b-7b", "--quiet", "--no-plots",
            "--set", "workload.prompt_tokens=4", "--set", "workload.output_tokens=4",
            "--policies", "tp", "paper"]


def _no_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


def strict(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=_no_constant)


def err_text(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_a_run_leaves_one_directory_with_strict_json_and_status_ok(tmp_path, capsys):
    assert main([*ANALYTIC, "--out", str(tmp_path / "out")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left
    s = strict(tmp_path / "out" / "summary.json")
    assert s["status"] == "ok" and set(s["policies"]) == {"tp", "paper"}
    strict(tmp_path / "out" / "config.json")


def test_summary_json_turns_nan_and_infinity_into_null():
    text = report.strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text, parse_constant=_no_constant) == {"a": None, "b": [None, 1.5],
                                                             "c": {"d": None}}


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert main([*ANALYTIC, "--out", str(f)]) == 2
    assert "exists and is not a directory" in err_text(capsys)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("out", ["/proc/x", "/proc/x/y"])
def test_out_that_cannot_be_created_is_refused(capsys, out):
    assert main([*ANALYTIC, "--out", out]) == 2
    text = err_text(capsys)
    assert f"--out '{out}'" in text and "Traceback" not in text


def test_out_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([*ANALYTIC, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is not a directory" in err_text(capsys)


def test_non_empty_out_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([*ANALYTIC, "--out", str(out)]) == 2
    text = err_text(capsys)
    assert "not empty" in text and "--overwrite" in text
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # --overwrite replaces only an earlier run directory, never a folder of other things
    assert main([*ANALYTIC, "--out", str(out), "--overwrite"]) == 2
    assert "earlier run directory" in err_text(capsys)
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_empty_out_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert main([*ANALYTIC, "--out", str(out)]) == 0
    assert strict(out / "summary.json")["status"] == "ok"


def test_overwrite_replaces_an_earlier_run_with_nothing_left_over(tmp_path):
    out = tmp_path / "out"
    assert main([*ANALYTIC, "--out", str(out)]) == 0
    (out / "latency_by_policy.png").write_bytes(b"an old plot")  # not written by --no-plots
    assert main([*ANALYTIC[:-2], "ep", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "latency_by_policy.png").exists()
    assert set(strict(out / "summary.json")["policies"]) == {"ep"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _fail_after_first_policy(monkeypatch, exc: BaseException) -> None:
    """The second policy to finish raises ``exc`` in the run's own process (however the
    policies are run: in order, or side by side in workers)."""
    real, calls = base.summary_of, []

    def summary_of(rec, *a, **kw):
        calls.append(rec.policy)
        if len(calls) == 2:
            raise exc
        return real(rec, *a, **kw)

    monkeypatch.setattr(base, "summary_of", summary_of)


def test_a_failed_run_says_failed_with_the_error_and_keeps_what_finished(tmp_path, monkeypatch,
                                                                         capsys):
    _fail_after_first_policy(monkeypatch, MemoryError("out of memory in the middle of the run"))
    with pytest.raises(MemoryError):  # a bug stays a traceback; the directory still tells
        main([*ANALYTIC, "--out", str(tmp_path / "out")])
    s = strict(tmp_path / "out" / "summary.json")
    assert s["status"] == "failed" and "MemoryError: out of memory" in s["error"]
    assert len(s["policies"]) == 1 and set(s["policies"]) | set(s["not_run"]) == {"tp", "paper"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_run_exits_130_with_partial_results(tmp_path, monkeypatch, capsys):
    _fail_after_first_policy(monkeypatch, KeyboardInterrupt())
    assert main([*ANALYTIC, "--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    s = strict(tmp_path / "out" / "summary.json")
    assert s["status"] == "failed" and "interrupted" in s["error"]
    assert len(s["policies"]) == 1 and len(s["not_run"]) == 1


def test_a_killed_run_leaves_no_directory_that_looks_finished(tmp_path):
    from cluster.studies.rundir import Staging

    stage = Staging.create(tmp_path / "out", "analytic")
    (stage.path / "summary.json").write_text("{}")
    # the process dies here: nothing was committed
    assert not (tmp_path / "out").exists()
    assert stage.path.name.startswith(".out.partial-")


# --- estimates before work -------------------------------------------------------------------
def _ray_untouched() -> None:
    import ray

    assert not ray.is_initialized()


def test_emulate_prints_its_estimate_before_starting(tmp_path, capsys):
    rc = main(["run", "--quiet", "--dilation", "1e6", "--out", str(tmp_path / "out")])
    out = " ".join(capsys.readouterr().out.split())
    assert rc == 2
    assert "estimate: about" in out and "wall" in out and "memory about" in out
    _ray_untouched()


def test_an_absurd_dilation_is_refused_with_the_numbers_and_the_override(tmp_path, capsys):
    assert main(["run", "--quiet", "--dilation", "1e6", "--out", str(tmp_path / "out")]) == 2
    text = err_text(capsys)
    assert "emulate.max_wall_s = 900 s" in text and "--set emulate.max_wall_s=" in text
    assert "D = 1e+06" in text and " h " in text
    assert not (tmp_path / "out").exists()
    _ray_untouched()


def test_an_unknown_dilation_is_estimated_from_a_stated_assumption(tmp_path, capsys):
    # the paper's 512 / 512 workload on the emulator: many minutes even at a modest D
    argv = ["run", "--quiet", "--policies", "ep", "monde", "--set", "workload.output_tokens=512",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    text = err_text(capsys)
    assert "assumed D = 50" in text and "emulate.max_wall_s" in text
    _ray_untouched()


def test_a_memory_budget_above_the_machine_is_refused_before_ray(tmp_path, capsys):
    budget = machine_memory_bytes()  # the weights alone would take all of it
    assert main(["run", "--quiet", "--set", f"weights.memory_budget_bytes={budget}",
                 "--out", str(tmp_path / "out")]) == 2
    text = err_text(capsys)
    assert f"weights.memory_budget_bytes = {budget}" in text
    assert "half this machine's memory" in text and "weights.memory_budget_bytes <=" in text
    assert not (tmp_path / "out").exists()
    _ray_untouched()


def test_the_estimate_is_not_refused_for_the_default_run(tmp_path):
    from cluster.core.config import load_config
    from cluster.core.routing import build_routing
    from cluster.engines import preflight

    cfg = load_config(overrides=["workload.prompt_tokens=16", "workload.output_tokens=8"])
    names = ["ep", "monde", "tp", "tp-lb", "paper"]
    est = preflight.estimate(cfg, build_routing(cfg), names)
    preflight.check(est, cfg)  # raises if refused
    assert est.dilation_assumed and est.dilation == preflight.ASSUMED_DILATION
    assert 0 < est.wall_s < cfg.emulate.max_wall_s
    assert est.weight_bytes <= 2 * (1 << 30) and est.memory_bytes < machine_memory_bytes()


def test_sigterm_during_an_analytic_run_exits_130_with_partial_results(tmp_path):
    """The signal goes to the process this test started, by its pid; it starts no children."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", "--engine", "analytic",
                             "--no-plots", "--policies", "ep", "monde", "tp", "tp-lb", "paper",
                             "eplb", "tp-lb+lru", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline()  # printed once the inputs are checked, before the work
        assert "ndpmoe analytic" in header, header
        time.sleep(1.0)  # seven policies at 512 / 512: many seconds of work left
        assert proc.poll() is None, proc.communicate()[0]
        children = _descendants(proc.pid)  # worker processes, if the policies run side by side
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
        text = header + text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "interrupted" in text
    s = strict(out / "summary.json")
    assert s["status"] == "failed" and "interrupted" in s["error"] and s["not_run"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    end = time.monotonic() + 20
    while any(_alive(c) for c in children) and time.monotonic() < end:
        time.sleep(0.2)
    assert not [c for c in children if _alive(c)], "a child of the run survived it"


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    st = _ppid_and_state(pid)
    return st is not None and st[1] != "Z"


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _ppid_and_state(int(d))) is not None:
            parent[int(d)] = st[0]
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out
