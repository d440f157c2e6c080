"""The policies of one analytic run, side by side on the machine's cores.

Each policy's episode is independent of the others (same config, same routing), so
:func:`run_policies` runs them in worker processes, one per core and at most one per
policy, and hands each finished :class:`~cluster.core.metrics.PolicyRecords` to the caller as it
arrives. Workers report progress (output tokens done) on the same queue as their results.
With one worker everything runs in this process, in order. :func:`run_each` is the pool
itself, for any module-level function over a list of items (``reproduce`` runs its jobs on
it when Ray is not up).

The pool is a few lines of our own rather than ``ProcessPoolExecutor``: an interrupt must
end the run at once, and the executor's exit hook joins a manager thread (and the queue
feeder threads behind it) without a timeout, which under heavy load hung a SIGTERM'd run
for over a minute after it had printed that it stopped. Here the workers are daemonic
processes the parent ends itself (terminate, then kill), and nothing at exit waits on them.

Workers are started with ``spawn`` (the parent runs a progress-bar thread, which ``fork``
would copy mid-flight), so they know the policies the ``policies`` package registers; a
policy registered by the caller's own code runs in this process, and so does whatever is
left when a worker dies without a word (typically a script that starts the run at import
time, which ``spawn`` re-imports). An exception in a worker is raised here; an exception or
an interrupt here ends the workers at once, and what finished before stays with the caller.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import policies
from cluster.core.metrics import PolicyRecords
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines.analytic import run_policy

REPORT_EVERY_TOKENS = 16  # a worker's progress messages: one per this many output tokens
POLL_S = 0.05  # how often the parent looks at its workers while no message comes


def default_workers(num_policies: int) -> int:
    return max(1, min(num_policies, os.cpu_count() or 1))


class WorkerError(RuntimeError):
    """A worker's exception that could not travel back as itself; carries its traceback."""


def run_policies(cfg: Config, routing: Routing, names: Sequence[str],
                 on_done: Callable[[PolicyRecords], None],
                 progress: Callable[[str, int], None] = lambda name, k: None,
                 workers: int | None = None) -> None:
    """Runs every policy in ``names``; ``on_done(records)`` as each finishes (any order),
    ``progress(name, tokens)`` as output tokens complete."""
    workers = default_workers(len(names)) if workers is None else max(1, min(workers, len(names)))
    if not all(_importable(n) for n in names):
        workers = 1
    run_each(_policy, (cfg, routing), names, lambda i, rec: on_done(rec),
             lambda i, k: progress(names[i], k), workers)


def _policy(shared: tuple[Config, Routing], name: str, report: Callable[[int], None]
            ) -> PolicyRecords:
    """One policy's episode; output tokens reported in batches of REPORT_EVERY_TOKENS."""
    cfg, routing = shared
    done = [0]

    def tokens(k: int) -> None:
        done[0] += k
        if done[0] >= REPORT_EVERY_TOKENS:
            report(done[0])
            done[0] = 0

    rec = run_policy(cfg, routing, name, progress=tokens)
    if done[0]:
        report(done[0])
    return rec


def run_each(fn: Callable[[Any, Any, Callable[[Any], None]], Any], shared: Any,
             items: Sequence[Any], on_result: Callable[[int, Any], None],
             on_report: Callable[[int, Any], None] = lambda i, value: None,
             workers: int = 1) -> None:
    """``fn(shared, item, report)`` for every item, in ``workers`` spawned processes (here,
    in order, for one); ``on_result(i, result)`` as item ``i`` finishes (any order) and
    ``on_report(i, value)`` for each ``report(value)`` it makes. ``fn`` must be a module-level
    function and ``shared`` picklable: each worker gets ``shared`` once, then the items."""
    workers = max(1, min(workers, len(items)))
    if workers <= 1:
        _run_here(fn, shared, items, range(len(items)), on_result, on_report)
        return
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs: list = []
    left = set(range(len(items)))  # not finished yet
    try:
        for i, item in enumerate(items):
            tasks.put((i, item))
        for _ in range(workers):
            tasks.put(None)  # one stop mark per worker
        for _ in range(workers):
            p = ctx.Process(target=_worker, args=(fn, shared, tasks, results), daemon=True,
                            name="ndpmoe-worker")
            p.start()
            procs.append(p)
        while left:
            try:
                msg = results.get(timeout=POLL_S)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or \
                        all(p.exitcode is not None for p in procs):
                    # a worker died without a word (or all stopped with work missing): take
                    # what is still in flight, then finish the rest here
                    while left and (msg := _get(results, timeout=0.5)) is not None:
                        _handle(msg, left, on_result, on_report)
                    break
                continue
            _handle(msg, left, on_result, on_report)
    except BaseException:
        _stop(procs, tasks)
        raise
    if left:
        _stop(procs, tasks)
        _run_here(fn, shared, items, sorted(left), on_result, on_report)
        return
    for p in procs:
        p.join(timeout=5)
    _stop(procs, tasks)  # a no-op unless one lingers


def _get(q, timeout: float):
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


def _handle(msg, left: set, on_result: Callable[[int, Any], None],
            on_report: Callable[[int, Any], None]) -> None:
    kind, i, value = msg
    if kind == "report":
        on_report(i, value)
    elif kind == "done":
        left.discard(i)
        on_result(i, value)
    else:  # "error": the worker's exception, raised here
        raise value


def _run_here(fn, shared: Any, items: Sequence[Any], indices, on_result, on_report) -> None:
    for i in indices:
        on_result(i, fn(shared, items[i], lambda value, i=i: on_report(i, value)))


def _stop(procs: list, tasks) -> None:
    """Ends the workers now (an interrupt must not wait for a policy to finish)."""
    tasks.cancel_join_thread()  # stop marks no worker read must not hold up the exit
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join(timeout=2)


def _importable(name: str) -> bool:
    """Whether a fresh process knows the policy: its parts come with the ``policies`` package
    (a policy registered at run time by the caller's own code exists only in this process)."""
    choice = policies.resolve(name)
    return all(policies.get(kind, part).__module__.startswith("policies.")
               for kind, part in (("scheduler", choice.scheduler), ("prefetcher", choice.prefetcher)))


def _worker(fn, shared: Any, tasks, results) -> None:
    """Runs items off ``tasks`` until a stop mark; Ctrl-C is the parent's to handle (it
    ends the workers), so a worker ignores SIGINT instead of printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (task := tasks.get()) is not None:
        i, item = task
        try:
            out = fn(shared, item, lambda value, i=i: results.put(("report", i, value)))
        except Exception as exc:  # handed to the parent, which raises it
            results.put(("error", i, _portable(exc)))
            return
        results.put(("done", i, out))


def _portable(exc: Exception) -> Exception:
    """The exception itself if it survives pickling, else a WorkerError with its traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # not picklable: its text travels instead
        return WorkerError("".join(traceback.format_exception(exc)))
