"""The policies of one analytic run, side by side on the machine's cores.

Each policy's episode is independent of the others (same config, same routing), so
:func:`run_policies` runs them in worker processes, one per core and at most one per
policy, and hands each finished :class:`~cluster.metrics.PolicyRecords` to the caller as it
arrives. Workers report progress (output tokens done) through a queue that the caller's
progress bar drains. With one worker everything runs in this process, in order.

Workers are started with ``spawn`` (the parent runs a progress-bar thread, which ``fork``
would copy mid-flight), so they know the policies the ``policies`` package registers; a
policy registered by the caller's own code runs in this process, and so does everything when
the workers cannot start. An exception or an interrupt in the parent terminates the workers
at once; what finished before stays with the caller.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

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
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(tokens,))
    pending = {pool.submit(_run_one, cfg, routing, n): n for n in names}
    try:
        while pending:
            finished, _ = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            _drain(tokens, progress)
            for fut in finished:
                on_done(fut.result())
                del pending[fut]
        _drain(tokens, progress)
    except BrokenProcessPool:
        # a worker died before it ran anything useful, typically because the caller's
        # script starts the run at import time (no ``if __name__ == "__main__"`` guard) and
        # ``spawn`` re-imports it: run what is left here, in order
        _stop(pool)
        for n in [n for n in names if n in pending.values()]:
            on_done(run_policy(cfg, routing, n, progress=lambda k, n=n: progress(n, k)))
        return
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Ends the workers now (an interrupt must not wait for a policy to finish)."""
    workers = list(getattr(pool, "_processes", {}).values())  # no public handle before 3.14
    call_queue = getattr(pool, "_call_queue", None)
    if call_queue is not None:
        # tasks not yet read by a worker may fill the pipe; with the workers gone, the
        # queue's feeder thread would block on it forever and hang the interpreter's exit
        call_queue.cancel_join_thread()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        if proc.is_alive():
            proc.terminate()
    for proc in workers:
        proc.join(timeout=5)


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


def _drain(q, progress: Callable[[str, int], None]) -> None:
    while True:
        try:
            name, k = q.get_nowait()
        except queue.Empty:
            return
        progress(name, k)
