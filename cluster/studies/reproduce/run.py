"""Running the cases of ``ndpmoe reproduce``: equal configs merge into jobs, jobs run in-process,
in spawned worker processes, or as Ray tasks when Ray is already initialised.

A job builds its routing once and returns one summary per policy; nothing here knows a study.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cluster.core.spec import Config
from cluster.studies.reproduce.common import Case, Job


def jobs_of(cases: Iterable[Case]) -> list[Job]:
    """Equal configs merge into one job; longest first."""
    by_cfg: dict[Config, dict[str, None]] = {}
    for c in cases:
        by_cfg.setdefault(c.cfg, {})[c.policy] = None
    jobs = [Job(cfg, tuple(p)) for cfg, p in by_cfg.items()]
    return sorted(jobs, key=lambda j: -j.cost)


def run_job(job: Job) -> dict[str, dict[str, Any]]:
    """Worker body: the job's routing once, then every policy through the studies' shared job
    (:func:`cluster.engines.base.run_job`); returns their summaries.

    Two names for one scheduler + prefetcher pair (``paper`` and ``tp-lb+prefill-freq``)
    run once: the engine is deterministic, the second gets a copy of the first's summary.
    """
    import policies
    from cluster.core.routing import kept_routing
    from cluster.engines.base import run_job as run_policies

    ran: dict[tuple[str, str], str] = {}  # (scheduler, prefetcher) -> the name it runs as
    as_name = {}
    for name in job.policies:
        choice = policies.resolve(name)
        as_name[name] = ran.setdefault((choice.scheduler, choice.prefetcher), name)
    # the full run's 102 jobs share 17 routings
    result = run_policies(job.cfg, kept_routing(job.cfg), list(dict.fromkeys(as_name.values())))
    out: dict[str, dict[str, Any]] = {}
    for name in job.policies:
        s = copy.deepcopy(result.policies[as_name[name]].fields())
        s["cache_capacity_experts"] = job.cfg.cache_capacity_experts
        s["cache_bytes"] = job.cfg.cache_bytes
        out[name] = s
    return out


def _job(_shared: None, job: Job, _report: Callable[[Any], None]) -> dict[str, dict[str, Any]]:
    return run_job(job)


def ray_ready() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def execute(jobs: Sequence[Job], workers: int, on_done: Callable[[Job], None] = lambda j: None
            ) -> dict[Config, dict[str, dict[str, Any]]]:
    """Runs ``jobs`` in-process (1 worker), as Ray tasks (Ray initialised) or in processes."""
    results: dict[Config, dict[str, dict[str, Any]]] = {}
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            results[j.cfg] = run_job(j)
            on_done(j)
        return results
    if ray_ready():
        import ray

        task = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(j): j for j in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                j = pending.pop(ref)
                results[j.cfg] = ray.get(ref)
                on_done(j)
        return results
    from cluster.engines import fanout  # daemonic spawn workers that an interrupt ends at once

    def done(i: int, summaries: dict[str, dict[str, Any]]) -> None:
        results[jobs[i].cfg] = summaries
        on_done(jobs[i])

    fanout.run_each(_job, None, jobs, done, workers=workers)
    return results
