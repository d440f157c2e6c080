"""Running policies on an engine and writing the run directory.

``run`` resolves policy names, builds the routing once, runs every policy on the chosen engine
(with a progress bar), adds speedups over ``monde`` and writes ``summary.json``, the CSVs, the
trace and the plots. Both engines come through here; Ray is imported only for ``emulate``.

An emulated run that fails part-way still writes the run directory: ``summary.json`` with the
policies that finished, the failing one marked ``"status": "failed"`` with its error and the
records it had, the CSVs and the trace (no plots); then the error is raised again, naming
the directory, so the command line exits non-zero with one paragraph. Any other failure or
an interrupt (Ctrl-C, SIGTERM) during the run also leaves a ``summary.json`` saying
``"status": "failed"`` with the error. Results are written to a staging directory that
:mod:`cluster.studies.rundir` moves into place when the run ends, so a run directory never mixes two
runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import policies
from cluster.core.metrics import PolicyRecords, summarize
from cluster.core.routing import build_routing
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines import fanout
from cluster.studies import report, rundir

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
        plots: bool = True, overwrite: bool = False, routing: Routing | None = None,
        **engine_opts: Any) -> RunResult:
    """Runs ``policy_names`` on ``engine`` and writes the run directory.

    Every input is checked before the run directory exists: policy names, the engine, the
    routing (``routing``, when the caller built it already, else built here) and ``out``
    (:mod:`cluster.studies.rundir`). Results go to a staging directory moved into place at the end;
    a run that fails or is interrupted still gets its ``summary.json``, with
    ``"status": "failed"`` and the error.
    """
    names = list(dict.fromkeys(policy_names))
    for n in names:
        policies.resolve(n)  # fail on a bad name before any work
    if engine not in ("analytic", "emulate"):
        from cluster.core.errors import ConfigError

        raise ConfigError(f"--engine {engine!r} is not allowed: must be analytic or emulate")
    routing = routing if routing is not None else build_routing(cfg)
    stage = rundir.Staging.create(out, engine, overwrite)
    try:
        summaries, records = _run_into(stage.path, cfg, routing, names, engine, console,
                                       progress, plots, engine_opts)
    except BaseException as exc:
        if not (stage.path / "summary.json").exists():  # failed before any result was written
            report.write_summary(stage.path, cfg, engine, {}, {
                "status": "failed", "error": _describe(exc), "not_run": names})
        run_dir = stage.commit()
        if isinstance(exc, _Partial):
            if exc.failure.interrupted:
                raise KeyboardInterrupt from None
            from cluster.core.errors import EmulationError

            raise EmulationError(f"{exc.failure}; partial results in "
                                 f"{run_dir / 'summary.json'}") from exc.failure
        raise
    return RunResult(stage.commit(), summaries, records)


class _Partial(Exception):
    """An emulated run that stopped early; its partial results are already written."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by the user (Ctrl-C or SIGTERM)"
    from cluster.core.errors import NdpmoeError

    if isinstance(exc, NdpmoeError):  # already one paragraph for the user
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")  # a bug: say what kind


def _run_into(run_dir: Path, cfg: Config, routing: Routing, names: list[str], engine: str,
              console, progress: bool, plots: bool, engine_opts: dict[str, Any]
              ) -> tuple[dict[str, dict[str, Any]], list[PolicyRecords]]:
    failure = None
    if engine == "emulate":
        from cluster.engines.emulate import PartialRunError, run_emulation  # imports Ray

        try:
            summaries, records, extra = run_emulation(cfg, routing, names, run_dir, console=console,
                                                      progress=progress, **engine_opts)
        except PartialRunError as exc:
            failure = exc
            summaries, records, extra = exc.summaries, exc.records, exc.extra
    else:
        summaries, records = {}, []
        steps = routing.decode_steps + 1

        def done(rec: PolicyRecords) -> None:
            records.append(rec)
            summaries[rec.policy] = summarize(rec, cfg.ndp.num_ndp_units)

        try:
            with _progress(console, progress) as bar:
                tasks = {n: bar.add_task(n, total=steps) for n in names}
                # policies side by side on the cores (cluster.engines.fanout), finished ones kept
                fanout.run_policies(cfg, routing, names, done,
                                    lambda n, k: bar.advance(tasks[n], k))
            records.sort(key=lambda r: names.index(r.policy))
            summaries = {n: summaries[n] for n in names}
        except BaseException as exc:  # keep the policies that finished
            report.add_speedups(summaries)
            report.write_summary(run_dir, cfg, engine, summaries, {
                "status": "failed", "error": _describe(exc),
                "not_run": [n for n in names if n not in summaries]})
            raise
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
        raise _Partial(failure)
    if plots:
        report.write_plots(run_dir, summaries, records)
    return summaries, records
