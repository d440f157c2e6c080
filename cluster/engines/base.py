"""One interface for both engines: ``engine.run(cfg, routing, policies) -> RunResult``.

- :class:`AnalyticEngine` times the policies on a virtual clock (:mod:`cluster.engines.analytic`),
  side by side in local worker processes (:mod:`cluster.engines.fanout`), or in this process
  with ``workers=1`` (what the studies use inside their own workers).
- :class:`EmulationEngine` runs them on the emulation cluster and reads their latency off the
  wall clock (:mod:`cluster.engines.emulate`, the Ray seam; imported only when it runs).

A run that fails part-way raises :class:`RunFailed` carrying a :class:`RunResult` with
``status = "failed"`` and what finished, so the caller can still write it. Every study
(:mod:`cluster.studies`) runs its policies through :func:`run_job`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from cluster.core.errors import ConfigError, NdpmoeError
from cluster.core.metrics import PolicyRecords, PolicySummary, RunResult, summary_of
from cluster.core.selection import Routing
from cluster.core.spec import Config

Progress = Callable[[str, int], None]  # (policy, output tokens completed since the last call)

NOTES = ["Times are modelled (emulated) seconds of the target hardware.",
         "eplb: moving replica weights between units is not charged on the link."]


class Engine(Protocol):
    name: str

    def run(self, cfg: Config, routing: Routing, policies: Sequence[str],
            progress: Progress | None = None, run_dir: Path | None = None) -> RunResult: ...


class RunFailed(Exception):
    """A run that stopped early. ``result``: what it produced (``status = "failed"``);
    ``cause``: why (``KeyboardInterrupt`` for Ctrl-C or SIGTERM)."""

    def __init__(self, result: RunResult, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.result, self.cause = result, cause

    @property
    def interrupted(self) -> bool:
        return isinstance(self.cause, KeyboardInterrupt) or bool(getattr(self.cause, "interrupted", False))


def describe(exc: BaseException) -> str:
    """One line for ``summary.json``'s ``error``."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by the user (Ctrl-C or SIGTERM)"
    if isinstance(exc, NdpmoeError):  # already one paragraph for the user
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")  # a bug: say what kind


def run_facts(cfg: Config, routing: Routing) -> dict[str, Any]:
    """Run-level facts every engine reports in ``summary.json``."""
    return {
        "routing": {"source": routing.source, "batch": routing.batch,
                    "prompt_tokens": routing.prompt_tokens, "decode_steps": routing.decode_steps},
        "cache_capacity_experts": cfg.cache_capacity_experts,
        "notes": list(NOTES),
    }


class AnalyticEngine:
    """The virtual-clock engine. ``workers``: local processes to spread the policies over
    (None: as many as help; 1: in this process). ``trace``: keep per-step records for the
    trace and CSVs; ``lower_bounds``: compute each step's lower bound (both cost time and
    change nothing in the summary: sweeps and studies turn them off)."""

    name = "analytic"

    def __init__(self, workers: int | None = None, trace: bool = True, lower_bounds: bool = True) -> None:
        self.workers, self.trace, self.lower_bounds = workers, trace, lower_bounds

    def run(self, cfg: Config, routing: Routing, policies: Sequence[str],
            progress: Progress | None = None, run_dir: Path | None = None) -> RunResult:
        names = list(dict.fromkeys(policies))
        records: list[PolicyRecords] = []
        summaries: dict[str, PolicySummary] = {}

        def done(rec: PolicyRecords) -> None:
            records.append(rec)
            summaries[rec.policy] = summary_of(rec, cfg.ndp.num_ndp_units)

        try:
            if self.workers == 1 or not (self.trace and self.lower_bounds):
                from cluster.engines.analytic import run_policy

                for n in names:
                    done(run_policy(cfg, routing, n, lower_bounds=self.lower_bounds,
                                    **({} if self.trace else {"trace_steps": range(0)}),
                                    **({"progress": lambda k, n=n: progress(n, k)} if progress else {})))
            else:
                from cluster.engines import fanout

                fanout.run_policies(cfg, routing, names, done, progress or (lambda n, k: None),
                                    workers=self.workers)
        except BaseException as exc:  # keep the policies that finished
            ok = {n: summaries[n] for n in names if n in summaries}
            raise RunFailed(RunResult(self.name, cfg, ok, _ordered(records, names),
                                      extra=run_facts(cfg, routing), status="failed",
                                      error=describe(exc), not_run=[n for n in names if n not in ok]),
                            exc) from exc
        return RunResult(self.name, cfg, {n: summaries[n] for n in names}, _ordered(records, names),
                         extra=run_facts(cfg, routing))


def _ordered(records: list[PolicyRecords], names: list[str]) -> list[PolicyRecords]:
    return sorted(records, key=lambda r: names.index(r.policy))


class EmulationEngine:
    """The measuring emulation (Ray actors and zmq; imported when it runs). ``console`` and
    ``show_progress`` drive its own progress display; ``address`` attaches to a Ray cluster;
    ``save_outputs`` writes each policy's final hidden states to ``run_dir/outputs.npz``."""

    name = "emulate"

    def __init__(self, console=None, show_progress: bool = True, **opts: Any) -> None:
        self.console, self.show_progress, self.opts = console, show_progress, opts

    def run(self, cfg: Config, routing: Routing, policies: Sequence[str],
            progress: Progress | None = None, run_dir: Path | None = None) -> RunResult:
        from cluster.engines.emulate import PartialRunError, run_emulation  # imports Ray

        if run_dir is None:
            raise ConfigError("the emulation engine needs a run directory (for its trace and outputs)")
        names = list(dict.fromkeys(policies))
        try:
            summaries, records, extra = run_emulation(cfg, routing, names, run_dir, console=self.console,
                                                      progress=self.show_progress, **self.opts)
        except PartialRunError as exc:
            ok = {n: PolicySummary.from_dict(d) for n, d in exc.summaries.items() if d.get("status") != "failed"}
            bad = {n: d for n, d in exc.summaries.items() if n not in ok}
            raise RunFailed(RunResult(self.name, cfg, ok, exc.records, failures=bad,
                                      extra={**run_facts(cfg, routing), **exc.extra}), exc) from exc
        return RunResult(self.name, cfg, {n: PolicySummary.from_dict(d) for n, d in summaries.items()},
                         records, extra={**run_facts(cfg, routing), **extra})


def engine(name: str, **opts: Any) -> Engine:
    """The engine called ``name`` (``analytic`` or ``emulate``) with its options."""
    if name == "analytic":
        return AnalyticEngine(**opts)
    if name == "emulate":
        return EmulationEngine(**opts)
    raise ConfigError(f"--engine {name!r} is not allowed: must be analytic or emulate")


def run_job(cfg: Config, routing: Routing, policies: Sequence[str]) -> RunResult:
    """The studies' job: the policies on the analytic engine, in this process, without the
    per-step trace or lower bounds (which change no summary field)."""
    return AnalyticEngine(workers=1, trace=False, lower_bounds=False).run(cfg, routing, policies)
