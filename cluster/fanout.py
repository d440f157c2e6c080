"""The policies of one analytic run, side by side on the machine's cores.

Each policy's episode is independent of the others (same config, same routing), so
:func:`run_policies` runs them in worker processes, one per core and at most one per
policy, and hands each finished :class:`~cluster.metrics.PolicyRecords` to the caller as it
arrives. Workers report progress (output tokens done) through a queue that the caller's
progress bar drains. With one worker everything runs in this process, in order.

Workers are started with ``spawn`` (the parent runs a progress-bar thread, which ``fork``
would copy mid-flight), so they know the policies the ``policies`` package registers; a
policy registered by the caller's own code runs in this process. An exception or an interrupt in the parent terminates the workers
at once; what finished before stays with the caller.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Sequence

import policies
from cluster.analytic import run_policy
from cluster.metrics import PolicyRecords
from cluster.routing import Routing
from cluster.spec import Config

REPORT_EVERY_TOKENS = 16  # a worker's progress messages: one per this many output tokens


def default_workers(num_policies: int) -> int:
    return max(1, min(num_policies, os.cpu_count() or 1))


def run_policies(cfg: Config, routing: Routing, names: Sequence[str],
                 on_done: Callable[[PolicyRecords], None],
                 progress: Callable[[str, int], None] = lambda name, k: None,
                 workers: int | None = None) -> None:
    """Runs every policy in ``names``; ``on_done(records)`` as each finishes (any order),
    ``progress(name, tokens)`` as output tokens complete."""
    workers = default_workers(len(names)) if workers is None else max(1, min(workers, len(names)))
    if workers <= 1 or not all(_importable(n) for n in names):
        for n in names:
            on_done(run_policy(cfg, routing, n, progress=lambda k, n=n: progress(n, k)))
        return
    ctx = multiprocessing.get_context("spawn")
    tokens = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokens,))
    try:
        pending = [pool.apply_async(_run_one, (cfg, routing, n)) for n in names]
        while pending:
            _drain(tokens, progress, timeout_s=0.05)
            for res in [r for r in pending if r.ready()]:
                pending.remove(res)
                on_done(res.get())
        _drain(tokens, progress, timeout_s=0.0)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _importable(name: str) -> bool:
    """Whether a fresh process knows the policy: its parts come with the ``policies`` package
    (a policy registered at run time by the caller's own code exists only in this process)."""
    choice = policies.resolve(name)
    return all(policies.get(kind, part).__module__.startswith("policies.")
               for kind, part in (("scheduler", choice.scheduler), ("prefetcher", choice.prefetcher)))


_tokens_q = None  # in a worker: where it reports output tokens done


def _worker_init(q) -> None:
    global _tokens_q
    _tokens_q = q


def _run_one(cfg: Config, routing: Routing, name: str) -> PolicyRecords:
    done = [0]

    def report(k: int) -> None:
        done[0] += k
        if done[0] >= REPORT_EVERY_TOKENS:
            _tokens_q.put((name, done[0]))
            done[0] = 0

    rec = run_policy(cfg, routing, name, progress=report)
    if done[0]:
        _tokens_q.put((name, done[0]))
    return rec


def _drain(q, progress: Callable[[str, int], None], timeout_s: float) -> None:
    try:
        name, k = q.get(timeout=timeout_s) if timeout_s else q.get_nowait()
        progress(name, k)
        while True:
            name, k = q.get_nowait()
            progress(name, k)
    except queue.Empty:
        return
