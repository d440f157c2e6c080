"""Running policies on an engine and writing the run directory.

``run`` resolves policy names, builds the routing once, runs every policy on the chosen engine
(:mod:`cluster.engines.base`: one interface, a typed :class:`RunResult` back, speed-ups included)
with a progress bar and writes ``summary.json``, the CSVs, the trace and the plots. Ray is
imported only for ``emulate``.

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
from pathlib import Path
from typing import Any

import policies
from cluster.core.errors import EmulationError
from cluster.core.metrics import RunResult
from cluster.core.routing import build_routing
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines.base import Engine, RunFailed, describe
from cluster.engines.base import engine as engine_named
from cluster.studies import report, rundir

DEFAULT_POLICIES = ("ep", "monde", "tp", "tp-lb", "paper")


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
    eng = _engine(engine, console, progress, engine_opts)
    routing = routing if routing is not None else build_routing(cfg)
    stage = rundir.Staging.create(out, engine, overwrite)
    try:
        result = _run_into(stage.path, eng, cfg, routing, names, console, progress, plots)
    except BaseException as exc:
        if not (stage.path / "summary.json").exists():  # failed before any result was written
            report.write_summary(RunResult(engine, cfg, {}, status="failed", error=describe(exc),
                                           not_run=names), stage.path)
        run_dir = stage.commit()
        if isinstance(exc, _Partial):
            if exc.failure.interrupted:
                raise KeyboardInterrupt from None
            raise EmulationError(f"{exc.failure.cause}; partial results in "
                                 f"{run_dir / 'summary.json'}") from exc.failure.cause
        raise
    result.run_dir = stage.commit()
    return result


def _engine(name: str, console, progress: bool, opts: dict[str, Any]) -> Engine:
    if name == "emulate":
        return engine_named(name, console=console, show_progress=progress, **opts)
    return engine_named(name, **opts)


class _Partial(Exception):
    """An emulated run that stopped early; its partial results are already written."""

    def __init__(self, failure: RunFailed) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _run_into(run_dir: Path, eng: Engine, cfg: Config, routing: Routing, names: list[str],
              console, progress: bool, plots: bool) -> RunResult:
    failure = None
    try:
        if eng.name == "analytic":
            steps = routing.decode_steps + 1
            with _progress(console, progress) as bar:
                tasks = {n: bar.add_task(n, total=steps) for n in names}
                # policies side by side on the cores (cluster.engines.fanout), finished ones kept
                result = eng.run(cfg, routing, names, lambda n, k: bar.advance(tasks[n], k), run_dir)
        else:
            result = eng.run(cfg, routing, names, run_dir=run_dir)
    except RunFailed as exc:
        if eng.name == "analytic":  # keep the policies that finished, then fail
            report.write_summary(exc.result, run_dir)
            raise exc.cause from None
        failure, result = exc, exc.result
    report.write_summary(result, run_dir)
    report.write_records(run_dir, result.records)
    report.write_trace(run_dir, result.records)
    if failure is not None:
        raise _Partial(failure)
    if plots:
        report.write_plots(run_dir, result.summaries, result.records)
    return result
