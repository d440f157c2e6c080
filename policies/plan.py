"""Plans: what one MoE step does, and the timing rules every engine applies to them.

A :class:`Plan` says which device computes which expert (or which ``d_ff`` column slice of
it) for which tokens, and which expert weights cross the host link on demand. Timing rules
(:func:`time_plan`), shared by the policies' estimates and the analytic engine:

1. The step starts when the GPU's router has run (t = 0).
2. The host link serves three priorities, preemptively: activations and partial outputs
   (latency-critical, FIFO by release time), then on-demand expert fetches in plan order,
   then background prefetches (handled by the engine in the gaps left).
3. Each NDP unit gets one activation message (the tokens any of its tasks needs), runs its
   tasks back to back, and returns one partial output per token (it sums its gate-weighted
   expert outputs locally, which is exact because the combine is linear).
4. The GPU runs experts it holds first, then fetched experts as their fetches complete.
5. The step ends when the GPU has every partial and its own results, plus the combine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.cost import CostModel

GPU = -1  # device id of the GPU in a Task; NDP units are 0..N-1


@dataclass(frozen=True, slots=True)
class Task:
    """Compute expert ``expert`` columns ``[col_start, col_end)`` of d_ff for ``tokens``."""

    device: int
    expert: int
    col_start: int
    col_end: int
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Move expert ``expert`` columns ``[col_start, col_end)`` NDP -> GPU, on demand."""

    expert: int
    col_start: int
    col_end: int


@dataclass(frozen=True, slots=True)
class Plan:
    """One MoE step of one layer: tasks, on-demand fetches (in link order)."""

    layer: int
    tasks: tuple[Task, ...]
    fetches: tuple[Fetch, ...] = ()

    def gpu_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.device == GPU]

    def fetched_experts(self) -> set[int]:
        return {f.expert for f in self.fetches}


@dataclass
class Interval:
    """A span of busy time on one resource, for traces."""

    resource: str  # "gpu", "ndp0".., "link"
    kind: str  # "expert", "activation", "partial", "fetch", "combine"
    start_s: float
    end_s: float
    label: str = ""


@dataclass
class StepTiming:
    """When a plan's step ends and what each resource did, relative to the step start."""

    makespan_s: float
    unit_busy_s: list[float]
    gpu_busy_s: float
    link_bytes: dict[str, int]
    link_busy_s: float
    link_segments: list[tuple[float, float]] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)


def _fill_gaps(busy: list[tuple[float, float]], start: float, durations: list[float]
               ) -> list[list[tuple[float, float]]]:
    """Serves ``durations`` in order, preemptively, in the gaps of sorted disjoint ``busy``.

    Returns, per item, the list of (start, end) segments it occupied.
    """
    out: list[list[tuple[float, float]]] = []
    t, i, n = start, 0, len(busy)
    for d in durations:
        segs: list[tuple[float, float]] = []
        remaining = d
        while True:
            while i < n and busy[i][1] <= t:
                i += 1
            if i < n and busy[i][0] <= t:
                t = busy[i][1]
                i += 1
                continue
            gap_end = busy[i][0] if i < n else math.inf
            if t + remaining <= gap_end:
                segs.append((t, t + remaining))
                t += remaining
                break
            segs.append((t, gap_end))
            remaining -= gap_end - t
            t = busy[i][1]
            i += 1
        out.append(segs)
    return out


def time_plan(plan: Plan, cost: CostModel, num_units: int, record: bool = False) -> StepTiming:
    """Applies the module's timing rules to ``plan``; ``record`` keeps intervals for traces."""
    d_ff = cost.cfg.model.d_ff
    unit_tasks: list[list[Task]] = [[] for _ in range(num_units)]
    gpu_tasks: list[Task] = []
    for t in plan.tasks:
        (gpu_tasks if t.device == GPU else unit_tasks[t.device]).append(t)
    intervals: list[Interval] = []
    link_bytes = {"activation": 0, "partial": 0, "fetch": 0}

    # Priority 0 on the link: one activation message per busy unit, then partials on release.
    link_t = 0.0
    busy: list[tuple[float, float]] = []
    unit_busy = [0.0] * num_units
    releases: list[tuple[float, int, int]] = []  # (unit done, unit, n_tokens)
    for u, tasks in enumerate(unit_tasks):
        if not tasks:
            continue
        toks = len(set().union(*(t.tokens for t in tasks))) if len(tasks) > 1 else len(tasks[0].tokens)
        nbytes = cost.activation_bytes(toks)
        link_bytes["activation"] += nbytes
        start, link_t = link_t, link_t + cost.transfer_s(nbytes)
        busy.append((start, link_t))
        t_u = link_t
        for task in tasks:
            dur = cost.ndp_expert_s(len(task.tokens), (task.col_end - task.col_start) / d_ff)
            if record:
                intervals.append(Interval(f"ndp{u}", "expert", t_u, t_u + dur,
                                          f"L{plan.layer} e{task.expert}"))
            t_u += dur
            unit_busy[u] += dur
        releases.append((t_u, u, toks))
        if record:
            intervals.append(Interval("link", "activation", start, link_t, f"act->ndp{u}"))
    releases.sort()
    partial_end = 0.0
    for done, u, toks in releases:
        nbytes = cost.activation_bytes(toks)
        link_bytes["partial"] += nbytes
        start = max(done, link_t)
        link_t = start + cost.transfer_s(nbytes)
        busy.append((start, link_t))
        partial_end = link_t
        if record:
            intervals.append(Interval("link", "partial", start, link_t, f"ndp{u}->gpu"))

    # Priority 1: on-demand fetches in the gaps.
    fetch_done: dict[int, float] = {}
    segments = list(busy)
    if plan.fetches:
        durs = []
        for f in plan.fetches:
            frac = (f.col_end - f.col_start) / d_ff
            link_bytes["fetch"] += int(cost.expert_bytes * frac)
            durs.append(cost.fetch_s(frac))
        for f, segs in zip(plan.fetches, _fill_gaps(busy, 0.0, durs)):
            fetch_done[f.expert] = segs[-1][1]
            segments.extend(segs)
            if record:
                intervals.extend(Interval("link", "fetch", a, b, f"L{plan.layer} e{f.expert}")
                                 for a, b in segs)

    # The GPU: resident experts first, fetched ones as they arrive.
    gpu_t, gpu_busy = 0.0, 0.0
    ordered = sorted(gpu_tasks, key=lambda t: fetch_done.get(t.expert, -1.0))
    for task in ordered:
        start = max(gpu_t, fetch_done.get(task.expert, 0.0))
        dur = cost.gpu_expert_s(len(task.tokens), (task.col_end - task.col_start) / d_ff)
        gpu_t = start + dur
        gpu_busy += dur
        if record:
            intervals.append(Interval("gpu", "expert", start, gpu_t, f"L{plan.layer} e{task.expert}"))

    n_tokens = len(set().union(*(t.tokens for t in plan.tasks))) if plan.tasks else 0
    n_partials = len(releases) + (1 if gpu_tasks else 0)
    ready = max(gpu_t, partial_end)
    combine = cost.gpu_combine_s(n_tokens, n_partials)
    if record:
        intervals.append(Interval("gpu", "combine", ready, ready + combine, f"L{plan.layer}"))
    segments.sort()
    link_busy = sum(b - a for a, b in segments)
    return StepTiming(ready + combine, unit_busy, gpu_busy + combine, link_bytes, link_busy,
                      segments, intervals)


def lower_bound_s(plan: Plan, cost: CostModel, num_units: int) -> float:
    """A bound no schedule of the plan's work can beat, from the cost model.

    ``max(NDP bytes / all NDP bandwidth, NDP flops / all NDP compute, link bytes / link
    bandwidth, GPU roofline time of its tasks)``; launch overheads and latencies left out.
    """
    d_ff = cost.cfg.model.d_ff
    ndp_bytes = ndp_flops = gpu_s = 0.0
    for t in plan.tasks:
        flops, nbytes = cost.expert_work(len(t.tokens), (t.col_end - t.col_start) / d_ff)
        if t.device == GPU:
            gpu_s += max(flops / cost.gpu_flops, nbytes / cost.gpu_bw)
        else:
            ndp_bytes += nbytes
            ndp_flops += flops
    link = sum(cost.expert_bytes * (f.col_end - f.col_start) / d_ff for f in plan.fetches)
    return max(ndp_bytes / (num_units * cost.ndp_bw), ndp_flops / (num_units * cost.ndp_flops),
               link / cost.link_bw, gpu_s)
