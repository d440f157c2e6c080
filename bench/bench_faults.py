"""Emulated runs under random injected faults: none may hang, each must end right.

    .venv/bin/python bench/bench_faults.py [--runs 20] [--seed 0] [--wall-limit-s 120]
                                           [--out bench/results/bench_faults.json]

Each run is a whole ``ndpmoe run --engine emulate`` (``cluster.studies.runner.run``: cluster start,
weight generation, dilation calibration, the measured run, the run directory) of a tiny
config (olmoe-1b-7b, 4 MoE layers, batch 1, 6 in / 4 out, one tp-family policy, heartbeat
timeout 2 s) with one or two faults drawn from a seeded RNG: ``kill:ndpK@stepS``,
``slow:ndpKxF``, ``delay:link+Nus``, ``drop:P``. Even runs have recovery on, odd runs off. One
Ray instance serves every run.

Verdicts:

- recovery on, or no kill: the run must finish, its final hidden states must equal a
  single-process reference forward pass (``cluster.core.reference.reference_forward``) to a
  relative error of 1e-4 and its counters must add up (``retries == dropped_messages +
  duplicate_commands``; a recovery per kill that fired);
- recovery off with a kill: the run must fail with an EmulationError naming the killed unit,
  and leave a partial ``summary.json`` marking the policy failed;
- any run past ``--wall-limit-s`` is a hang (a SIGALRM ends it) and fails the bench.

Each finished run's fidelity (measured e2e latency against the analytic prediction) is
reported, not judged: the wall time spent on lost commands and recoveries is paused out of
emulated time, so a run that paused should measure as well as one that did not, and the tally
gives the largest error of each. (``delay:link+Nus`` lets the modelled hops absorb up to half
the control path, so auto D is lower with a delay, 9-32 here, and the error a little larger
whether or not the run paused.)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cluster.core.config import load_config
from cluster.core.errors import EmulationError
from cluster.core.faults import inject_overrides
from cluster.core.reference import reference_forward
from cluster.core.routing import build_routing
from cluster.engines.emulate import choose_scale
from cluster.studies import runner

BASE = ("model.num_layers=4", "workload.prompt_tokens=6", "workload.output_tokens=4",
        "weights.memory_budget_bytes=67108864", "emulate.heartbeat_timeout_s=2")
POLICIES = ("tp", "tp-lb", "paper")
KINDS = ("kill", "slow", "delay", "drop")
UNITS = 4
REL_TOL = 1e-4


class RunTimeout(Exception):
    """A run went past the hard wall limit: it hung."""


def _alarm(signum: int, frame: Any) -> None:
    raise RunTimeout()


def draw_faults(rng: np.random.Generator) -> list[str]:
    """One or two distinct fault kinds with random, bounded parameters."""
    kinds = rng.choice(KINDS, size=int(rng.integers(1, 3)), replace=False)
    out = []
    for k in sorted(kinds, key=KINDS.index):
        if k == "kill":
            out.append(f"kill:ndp{rng.integers(UNITS)}@step{rng.integers(1, 4)}")
        elif k == "slow":
            out.append(f"slow:ndp{rng.integers(UNITS)}x{rng.uniform(1.5, 4.0):.1f}")
        elif k == "delay":
            out.append(f"delay:link+{rng.integers(10, 500)}us")
        else:
            out.append(f"drop:{rng.uniform(0.01, 0.1):.3f}")
    return out


def one_run(i: int, specs: list[str], recover: bool, policy: str, work: Path,
            wall_limit_s: float) -> dict[str, Any]:
    overrides = [*BASE, f"emulate.recover={'true' if recover else 'false'}", *inject_overrides(specs)]
    cfg = load_config(model="olmoe-1b-7b", overrides=overrides)
    faults = cfg.faults
    killed = sorted({f"ndp{k.unit}" for k in faults.kills})
    expect = "error" if killed and not recover else "ok"
    row: dict[str, Any] = {"run": i, "faults": ";".join(specs), "recover": recover, "policy": policy,
                           "expected": expect}
    out = work / f"run{i:02d}"
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, wall_limit_s)
    try:
        res = runner.run(cfg, [policy], engine="emulate", out=out, progress=False, plots=False,
                         save_outputs=True)
        outcome, error = "ok", ""
    except RunTimeout:
        outcome, error = "hang", f"no end within {wall_limit_s:g} s"
    except EmulationError as exc:
        outcome, error = "error", str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["wall_s"] = time.monotonic() - t0
    row["outcome"], row["error"] = outcome, error
    summary_path = out / "summary.json"
    s = {}
    if summary_path.exists():
        s = json.loads(summary_path.read_text())["policies"].get(policy, {})
    for key in ("recoveries", "recovery_wall_s", "retries", "retry_wall_s", "dropped_messages",
                "duplicate_commands", "pauses", "injected_kills", "fidelity_error", "fidelity",
                "dilation", "overruns", "max_over_mean"):
        if key in s:
            row[key] = s[key]
    if outcome == "ok":
        scale = choose_scale(cfg)
        ref = reference_forward(cfg, build_routing(cfg), scale)
        got = np.load(out / "outputs.npz")[policy.replace("+", "_")]
        row["output_rel_error"] = float(np.abs(got - ref).max() / np.abs(ref).max())
        row["correct"] = row["output_rel_error"] <= REL_TOL
        fired = len(res.summaries[policy].get("injected_kills", []))
        # a kill that found no work for its unit never fires; then a clean finish is right
        counted = (row["retries"] == row["dropped_messages"] + row["duplicate_commands"]
                   and row["recoveries"] == fired)
        row["within_target"] = row["fidelity_error"] <= cfg.emulate.target_fidelity
        row["ok"] = row["correct"] and counted and (expect == "ok" or not fired)
        row["note"] = ("" if row["ok"] else "a kill fired but the run did not fail"
                       if expect != "ok" and fired else "wrong outputs" if not row["correct"]
                       else "counters do not add up")
    elif outcome == "error":
        named = sorted(set(re.findall(r"\b(ndp\d+|gpu)\b", error)))
        partial = s.get("status") == "failed"
        row["named"] = named
        row["partial_summary"] = partial
        row["ok"] = expect == "error" and bool(set(killed) & set(named)) and partial
        row["note"] = "" if row["ok"] else "unexpected error"
    else:
        row["ok"] = False
        row["note"] = "hang"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wall-limit-s", type=float, default=120.0, help="per run; past it = a hang")
    ap.add_argument("--out", default="bench/results/bench_faults.json")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file: one line per run, the table unwrapped
        console = Console(width=150)
    rng = np.random.default_rng(args.seed)
    plans = [(draw_faults(rng), i % 2 == 0, str(rng.choice(POLICIES))) for i in range(args.runs)]
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_faults-") as tmp:
            for i, (specs, recover, policy) in enumerate(plans):
                row = one_run(i, specs, recover, policy, Path(tmp), args.wall_limit_s)
                rows.append(row)
                mark = "[green]ok[/]" if row["ok"] else "[red]FAIL[/]"
                console.print(f"run {i:2d} {mark} {row['outcome']:5s} recover={'on ' if recover else 'off'} "
                              f"{policy:6s} {row['faults']:40s} {row['wall_s']:5.1f} s "
                              f"{row.get('note', '')}", highlight=False)
    finally:
        ray.shutdown()
    total_s = time.monotonic() - t0

    t = Table(title=f"bench_faults: {len(rows)} emulated runs with random injected faults "
              f"(seed {args.seed})", title_justify="left")
    for col in ("run", "recover", "faults", "policy", "outcome", "wall", "recov.", "paused",
                "drops", "retries", "rel err", "fidelity", "verdict"):
        t.add_column(col, justify="left" if col in ("faults", "policy", "outcome", "verdict") else "right")
    for r in rows:
        err = f"{r['output_rel_error']:.1e}" if "output_rel_error" in r else "-"
        fid = f"{100 * r['fidelity_error']:.2f}%" if r.get("fidelity_error") is not None else "-"
        verdict = "ok" if r["ok"] else f"FAIL {r.get('note', '')}"
        if r["outcome"] == "error" and r["ok"]:
            verdict = f"ok: error names {', '.join(r['named'])}"
        paused = r.get("recovery_wall_s", 0.0) + r.get("retry_wall_s", 0.0)
        t.add_row(str(r["run"]), "on" if r["recover"] else "off", r["faults"], r["policy"],
                  r["outcome"], f"{r['wall_s']:.1f} s", str(r.get("recoveries", "-")),
                  f"{paused:.2f} s" if "pauses" in r else "-", str(r.get("dropped_messages", "-")),
                  str(r.get("retries", "-")), err, fid, verdict)
    console.print(t)
    tally = {
        "runs": len(rows),
        "passed": sum(r["ok"] for r in rows),
        "hangs": sum(r["outcome"] == "hang" for r in rows),
        "recover_on": {"runs": sum(r["recover"] for r in rows),
                       "correct_outputs": sum(r["recover"] and r["outcome"] == "ok" and r.get("correct", False)
                                              for r in rows),
                       "recoveries": sum(r.get("recoveries", 0) for r in rows if r["recover"])},
        "recover_off": {"runs": sum(not r["recover"] for r in rows),
                        "correct_outputs": sum(not r["recover"] and r["outcome"] == "ok" and r.get("correct", False)
                                               for r in rows),
                        "clear_errors": sum(not r["recover"] and r["outcome"] == "error" and r["ok"] for r in rows)},
        "faults_drawn": {k: sum(k + ":" in r["faults"] for r in rows) for k in KINDS},
        "dropped_messages": sum(r.get("dropped_messages", 0) for r in rows),
        "retries": sum(r.get("retries", 0) for r in rows),
        "duplicate_commands": sum(r.get("duplicate_commands", 0) for r in rows),
        "paused_wall_s": sum(r.get("recovery_wall_s", 0.0) + r.get("retry_wall_s", 0.0)
                             for r in rows if r["outcome"] == "ok"),
        "max_fidelity_error": max((r["fidelity_error"] for r in rows if r["outcome"] == "ok"),
                                  default=None),
        "max_fidelity_error_paused": max((r["fidelity_error"] for r in rows
                                          if r["outcome"] == "ok" and r.get("pauses")), default=None),
        "max_fidelity_error_no_delay": max((r["fidelity_error"] for r in rows if r["outcome"] == "ok"
                                            and "delay:" not in r["faults"]), default=None),
        "over_target": [r["run"] for r in rows if r["outcome"] == "ok" and not r["within_target"]],
        "max_wall_s": max((r["wall_s"] for r in rows), default=0.0),
        "total_s": total_s,
    }
    console.print(f"[bold]{tally['passed']}/{tally['runs']} runs ended as they must[/]: "
                  f"{tally['hangs']} hangs; recovery on: {tally['recover_on']['correct_outputs']}/"
                  f"{tally['recover_on']['runs']} correct outputs ({tally['recover_on']['recoveries']} "
                  f"recoveries); recovery off: {tally['recover_off']['correct_outputs']} correct outputs, "
                  f"{tally['recover_off']['clear_errors']} clear errors naming the killed unit; "
                  f"{tally['dropped_messages']} commands lost, {tally['retries']} retried "
                  f"({tally['duplicate_commands']} duplicates); {tally['paused_wall_s']:.1f} s of "
                  f"wall time paused out of emulated time; max fidelity error (e2e) "
                  f"{100 * (tally['max_fidelity_error'] or 0):.2f}% (runs that paused: "
                  f"{100 * (tally['max_fidelity_error_paused'] or 0):.2f}%, runs without a link "
                  f"delay: {100 * (tally['max_fidelity_error_no_delay'] or 0):.2f}%); longest run "
                  f"{tally['max_wall_s']:.1f} s; total {total_s:.0f} s", highlight=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tally": tally, "runs": rows, "seed": args.seed,
                               "wall_limit_s": args.wall_limit_s, "config": list(BASE),
                               "cpus": os.cpu_count()}, indent=2))
    console.print(f"wrote {out}")
    if tally["passed"] != tally["runs"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
