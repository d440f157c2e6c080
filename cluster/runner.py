"""Running policies on an engine and writing the run directory.

``run`` resolves policy names, builds the routing once, runs every policy on the chosen engine
(with a progress bar), adds speedups over ``monde`` and writes ``summary.json``, the CSVs, the
trace and the plots. Both engines come through here; Ray is imported only for ``emulate``.

An emulated run that fails part-way still writes the run directory: ``summary.json`` with the
policies that finished, the failing one marked ``"status": "failed"`` with its error and the
records it had, the CSVs and the trace (no plots); then the error is raised again, naming
the directory, so the command line exits non-zero with one paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import policies
from cluster import report
from cluster.analytic import run_policy
from cluster.metrics import PolicyRecords, summarize
from cluster.routing import build_routing
from cluster.spec import Config

DEFAULT_POLICIES = ("ep", "monde", "tp", "tp-lb", "paper")


@dataclass
class RunResult:
    run_dir: Path
    summaries: dict[str, dict[str, Any]]
    records: list[PolicyRecords]


def _progress(console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                    disable=not enabled, transient=False)


def run(cfg: Config, policy_names: Sequence[str], engine: str = "analytic",
        out: str | Path | None = None, console=None, progress: bool = True,
        plots: bool = True, **engine_opts: Any) -> RunResult:
    """Runs ``policy_names`` on ``engine`` and writes the run directory."""
    names = list(dict.fromkeys(policy_names))
    for n in names:
        policies.resolve(n)  # fail on a bad name before any work
    if engine not in ("analytic", "emulate"):
        from cluster.errors import ConfigError

        raise ConfigError(f"--engine {engine!r} is not allowed: must be analytic or emulate")
    run_dir = Path(out) if out else report.new_run_dir(engine=engine)
    run_dir.mkdir(parents=True, exist_ok=True)
    routing = build_routing(cfg)
    failure = None
    if engine == "emulate":
        from cluster.emulate import PartialRunError, run_emulation  # imports Ray

        try:
            summaries, records, extra = run_emulation(cfg, routing, names, run_dir, console=console,
                                                      progress=progress, **engine_opts)
        except PartialRunError as exc:
            failure = exc
            summaries, records, extra = exc.summaries, exc.records, exc.extra
    else:
        summaries, records = {}, []
        steps = routing.decode_steps + 1
        with _progress(console, progress) as bar:
            for n in names:
                task = bar.add_task(n, total=steps)
                rec = run_policy(cfg, routing, n, progress=lambda k, t=task: bar.advance(t, k))
                records.append(rec)
                summaries[n] = summarize(rec, cfg.ndp.num_ndp_units)
        extra = {}
    report.add_speedups(summaries)
    extra = {
        "routing": {"source": routing.source, "batch": routing.batch,
                    "prompt_tokens": routing.prompt_tokens, "decode_steps": routing.decode_steps},
        "cache_capacity_experts": cfg.cache_capacity_experts,
        "notes": [
            "Times are modelled (emulated) seconds of the target hardware.",
            "eplb: moving replica weights between units is not charged on the link.",
        ],
        **extra,
    }
    report.write_summary(run_dir, cfg, engine, summaries, extra)
    report.write_records(run_dir, records)
    report.write_trace(run_dir, records)
    if failure is not None:
        from cluster.errors import EmulationError

        if failure.interrupted:
            raise KeyboardInterrupt
        raise EmulationError(f"{failure}; partial results in {run_dir / 'summary.json'}") from failure
    if plots:
        report.write_plots(run_dir, summaries, records)
    return RunResult(run_dir, summaries, records)
