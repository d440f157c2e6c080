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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from cluster.core.cost import CostModel

GPU = -1  # device id of the GPU in a Task; NDP units are 0..N-1
ALL_UNITS = -2  # a tensor-parallel task: its columns are split over every unit (tp_bounds)


def tp_bounds(d_ff: int, num_units: int) -> list[tuple[int, int]]:
    """Contiguous ``d_ff`` column slices, one per unit, sizes differing by at most one.

    Units beyond ``d_ff`` get an empty slice (and no work).
    """
    return [(u * d_ff // num_units, (u + 1) * d_ff // num_units) for u in range(num_units)]


class Task(NamedTuple):
    """Compute expert ``expert`` columns ``[col_start, col_end)`` of d_ff for ``tokens``.

    ``device`` is :data:`GPU`, a unit index, or :data:`ALL_UNITS`: the columns are split over
    the N units by :func:`tp_bounds` (unit u computes ``col_start + tp_bounds(width, N)[u]``).
    A plan keeps tensor-parallel work in that compact form (one task instead of N) so that
    plans at stress scale stay cheap; :meth:`Plan.expand` gives the per-unit tasks.
    A named tuple rather than a frozen dataclass: as immutable, and three times cheaper to
    build (a stress-scale plan holds a few hundred).
    """

    device: int
    expert: int
    col_start: int
    col_end: int
    tokens: tuple[int, ...]


class Fetch(NamedTuple):
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

    def expand(self, num_units: int) -> tuple[Task, ...]:
        """Tasks with every :data:`ALL_UNITS` task replaced by its non-empty per-unit slices."""
        out: list[Task] = []
        for t in self.tasks:
            if t.device != ALL_UNITS:
                out.append(t)
                continue
            for u, (lo, hi) in enumerate(tp_bounds(t.col_end - t.col_start, num_units)):
                if hi > lo:
                    out.append(Task(u, t.expert, t.col_start + lo, t.col_start + hi, t.tokens))
        return tuple(out)


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
    unit_arrival_s: dict[int, float] = field(default_factory=dict)  # activations arrive
    unit_done_s: dict[int, float] = field(default_factory=dict)  # partial ready on the unit
    partial_arrival_s: dict[int, float] = field(default_factory=dict)  # partial at the GPU
    fetch_done_s: dict[int, float] = field(default_factory=dict)  # expert weights at the GPU
    gpu_ready_s: float = 0.0  # everything in: the combine starts
    backlog_segments: list[list[tuple[float, float]]] = field(default_factory=list)


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


def time_plan(plan: Plan, cost: CostModel, num_units: int, record: bool = False,
              fetch_s: Mapping[int, float] | None = None,
              backlog_s: Sequence[float] = ()) -> StepTiming:
    """Applies the module's timing rules to ``plan``; ``record`` keeps intervals for traces.

    The engine may say more about the link than the plan does: ``fetch_s`` overrides the
    duration of expert ``e``'s on-demand fetch (a prefetch of it already in flight is
    upgraded to the fetch class and owes only what it has left; 0 if it landed since the
    router ran); ``backlog_s`` are prefetches queued in the fetch class ahead of this step's
    fetches (``link.prefetch_priority = equal``), served first in the gaps; their segments
    come back in ``StepTiming.backlog_segments``.
    """
    d_ff = cost.cfg.model.d_ff
    unit_tasks: dict[int, list[Task]] = {}  # explicit per-unit tasks, by unit
    gpu_tasks: list[Task] = []
    groups: dict[tuple[int, int], list[Task]] = {}
    for t in plan.tasks:
        dev = t.device
        if dev == GPU:
            gpu_tasks.append(t)
        elif dev == ALL_UNITS:
            key = (t.col_start, t.col_end)
            if key in groups:
                groups[key].append(t)
            else:
                groups[key] = [t]
        elif dev in unit_tasks:
            unit_tasks[dev].append(t)
        else:
            unit_tasks[dev] = [t]
    intervals: list[Interval] = []
    single = _single_token(plan.tasks)
    work, toks, slices = _unit_loads(unit_tasks, groups, cost, num_units, d_ff, single, record)
    act_bytes, latency, link_bw = cost.act_bytes_per_token, cost.link_latency_s, cost.link_bw_bytes_per_s

    # Priority 0 on the link: one activation message per busy unit, then partials on release.
    link_t = 0.0
    busy: list[tuple[float, float]] = []
    releases: list[tuple[float, int, float]] = []  # (unit done, unit, message seconds)
    arrival: dict[int, float] = {}
    partial_at: dict[int, float] = {}
    n_act = 0
    link_busy = 0.0  # the sum over ``busy`` in order (sorted: no fetch comes between)
    for u in range(num_units):
        if not toks[u]:
            continue
        nbytes = toks[u] * act_bytes
        n_act += nbytes
        msg_s = latency + nbytes / link_bw  # its partial output is as large: as long
        start, link_t = link_t, link_t + msg_s
        busy.append((start, link_t))
        link_busy += link_t - start
        arrival[u] = link_t
        releases.append((link_t + work[u], u, msg_s))
        if record:
            intervals.append(Interval("link", "activation", start, link_t, f"act->ndp{u}"))
            t_u = link_t
            pieces = [(t, t.col_end - t.col_start) for t in unit_tasks.get(u, ())]
            pieces += [(t, hi - lo) for (lo, hi), tasks in slices[u] for t in tasks]
            for task, width in pieces:
                dur = cost.ndp_unit_expert_s(u, len(task.tokens), width / d_ff)
                intervals.append(Interval(f"ndp{u}", "expert", t_u, t_u + dur,
                                          f"L{plan.layer} e{task.expert}"))
                t_u += dur
    releases.sort()
    partial_end = 0.0
    for done, u, msg_s in releases:
        start = done if done > link_t else link_t
        link_t = start + msg_s
        busy.append((start, link_t))
        link_busy += link_t - start
        partial_end = link_t
        partial_at[u] = link_t
        if record:
            intervals.append(Interval("link", "partial", start, link_t, f"ndp{u}->gpu"))
    link_bytes = {"activation": n_act, "partial": n_act, "fetch": 0}

    # Priority 1: on-demand fetches in the gaps.
    fetch_done: dict[int, float] = {}
    segments = busy
    backlog_segments: list[list[tuple[float, float]]] = []
    if plan.fetches or backlog_s:
        segments = list(busy)
        durs = list(backlog_s)
        moving = []
        for f in plan.fetches:
            frac = (f.col_end - f.col_start) / d_ff
            link_bytes["fetch"] += int(cost.ndp_expert_bytes * frac)
            override = fetch_s.get(f.expert) if fetch_s else None
            if override == 0.0:  # landed since the router ran: ready at once
                fetch_done[f.expert] = 0.0
                continue
            moving.append(f)
            durs.append(cost.fetch_s(frac) if override is None else override)
        filled = _fill_gaps(busy, 0.0, durs)
        backlog_segments = filled[:len(backlog_s)]
        for segs in backlog_segments:
            segments.extend(segs)
        for f, segs in zip(moving, filled[len(backlog_s):]):
            fetch_done[f.expert] = segs[-1][1]
            segments.extend(segs)
            if record:
                intervals.extend(Interval("link", "fetch", a, b, f"L{plan.layer} e{f.expert}")
                                 for a, b in segs)
        segments.sort()
        link_busy = sum([b - a for a, b in segments])

    # The GPU: resident experts first, fetched ones as they arrive.
    gpu_t, gpu_busy = 0.0, 0.0
    if fetch_done:
        gpu_tasks.sort(key=lambda t: fetch_done.get(t.expert, -1.0))
    for task in gpu_tasks:
        ready = fetch_done.get(task.expert, 0.0)
        start = ready if ready > gpu_t else gpu_t
        dur = cost.gpu_expert_s(len(task.tokens), (task.col_end - task.col_start) / d_ff)
        gpu_t = start + dur
        gpu_busy += dur
        if record:
            intervals.append(Interval("gpu", "expert", start, gpu_t, f"L{plan.layer} e{task.expert}"))

    if single:
        n_tokens = 1
    else:
        n_tokens = len(set().union(*(t.tokens for t in plan.tasks))) if plan.tasks else 0
    n_partials = len(releases) + (1 if gpu_tasks else 0)
    ready = gpu_t if gpu_t > partial_end else partial_end
    combine = cost.gpu_combine_s(n_tokens, n_partials)
    if record:
        intervals.append(Interval("gpu", "combine", ready, ready + combine, f"L{plan.layer}"))
    return StepTiming(ready + combine, work, gpu_busy + combine, link_bytes, link_busy,
                      segments, intervals, arrival, {u: d for d, u, _ in releases}, partial_at,
                      fetch_done, ready, backlog_segments)


def _single_token(tasks: tuple[Task, ...]) -> bool:
    """Whether every task holds exactly one token, the same one (batch-1 decode)."""
    if not tasks or len(tasks[0].tokens) != 1:
        return False
    tok = tasks[0].tokens
    return all(t.tokens == tok for t in tasks)


@lru_cache(maxsize=4096)
def _tp_slices(width: int, num_units: int) -> tuple[tuple[int, int, int], ...]:
    """The non-empty slices of :func:`tp_bounds` as ``(unit, start, end)``."""
    return tuple((u, a, b) for u, (a, b) in enumerate(tp_bounds(width, num_units)) if b > a)


def _unit_loads(unit_tasks: dict[int, list[Task]], groups: dict[tuple[int, int], list[Task]],
                cost: CostModel, num_units: int, d_ff: int, one_token: bool = False,
                want_slices: bool = True):
    """Per unit: busy seconds, tokens it needs, and (``want_slices``) its tensor-parallel slices.

    A group of :data:`ALL_UNITS` tasks sharing a column range gives each unit a slice of at
    most two distinct widths, so its cost is computed once per width, not once per unit (then
    scaled by the unit's slow-down factor, ``cost.unit_factor``). ``one_token``: every task
    holds the same single token (batch-1 decode), so a unit with any task needs exactly one.
    """
    factor = cost.unit_factor
    ndp_s = cost.ndp_expert_s
    work = [0.0] * num_units
    token_sets: list[set[int] | None] = [None] * num_units
    for u, tasks in unit_tasks.items():
        w = 0.0
        for task in tasks:
            w += ndp_s(len(task.tokens), (task.col_end - task.col_start) / d_ff) * factor[u]
        work[u] = w
        if not one_token:
            token_sets[u] = set().union(*(t.tokens for t in tasks))
    no_slices = [[]] * num_units  # read only
    if not groups:  # explicit per-unit tasks only
        if one_token:
            return work, [1 if u in unit_tasks else 0 for u in range(num_units)], no_slices
        return work, [len(ts) if ts is not None else 0 for ts in token_sets], no_slices
    slices = [[] for _ in range(num_units)] if want_slices else no_slices
    unions: list[set[int]] = []
    member: list[list[int]] = [[] for _ in range(num_units)]  # groups with a slice on u
    for gi, ((lo, hi), tasks) in enumerate(groups.items()):
        if not one_token:
            unions.append(set().union(*(t.tokens for t in tasks)))
        per_width: dict[int, float] = {}
        for u, a, b in _tp_slices(hi - lo, num_units):
            w = b - a
            if w not in per_width:
                per_width[w] = _sum_ndp(tasks, w / d_ff, ndp_s)
            work[u] += per_width[w] * factor[u]
            member[u].append(gi)
            if want_slices:
                slices[u].append(((lo + a, lo + b), tasks))
    if one_token:
        return work, [1 if (u in unit_tasks or member[u]) else 0 for u in range(num_units)], slices
    toks = [0] * num_units
    counted: dict[tuple[int, ...], int] = {}
    for u in range(num_units):
        if token_sets[u] is not None:
            toks[u] = len(token_sets[u].union(*(unions[g] for g in member[u])))
        elif member[u]:
            key = tuple(member[u])
            if key not in counted:
                counted[key] = len(set().union(*(unions[g] for g in key)))
            toks[u] = counted[key]
    return work, toks, slices


def _sum_ndp(tasks: list[Task], frac: float, ndp_s) -> float:
    """``sum(ndp_s(len(t.tokens), frac) for t in tasks)``, asking ``ndp_s`` again only when
    the token count changes (a batch-1 step's tasks all hold one token)."""
    total, last_n, x = 0, -1, 0.0
    for t in tasks:
        n = len(t.tokens)
        if n != last_n:
            x, last_n = ndp_s(n, frac), n
        total += x
    return total


def lower_bound_s(plan: Plan, cost: CostModel, num_units: int) -> float:
    """A bound no schedule of the plan's work can beat, from the cost model.

    ``max(NDP bytes / all NDP bandwidth, NDP flops / all NDP compute, link bytes / link
    bandwidth, GPU roofline time of its tasks)``; launch overheads and latencies left out.
    A unit slowed ``f`` times counts for ``1 / f`` of a unit in "all NDP" (the work, however
    split, cannot finish sooner than on units of that total speed).

    An :data:`ALL_UNITS` task is summed in closed form, not slice by slice: its slices cover
    its columns once (their flops and weight bytes add up to the whole range's) and each of
    its ``k`` non-empty slices reads the tokens' activations (``k`` times the activation bytes).
    """
    d_ff = cost.cfg.model.d_ff
    fpt, wbytes, abytes = cost.expert_flops_per_token, cost.ndp_expert_bytes, 2 * cost.act_bytes_per_token
    ndp_bytes = ndp_flops = gpu_s = 0.0
    for t in plan.tasks:
        n = len(t.tokens)
        width = t.col_end - t.col_start
        if t.device == GPU:
            gpu_s += cost.gpu_expert_roofline_s(n, width / d_ff)
            continue
        k = 1 if t.device != ALL_UNITS else min(width, num_units)
        frac = width / d_ff
        ndp_flops += fpt * frac * n
        ndp_bytes += wbytes * frac + k * n * abytes
    link = sum(cost.ndp_expert_bytes * (f.col_end - f.col_start) / d_ff for f in plan.fetches)
    speed = cost.unit_speed_sum if len(cost.unit_factor) == num_units else num_units
    return max(ndp_bytes / (speed * cost.ndp_bw_bytes_per_s), ndp_flops / (speed * cost.ndp_flops_per_s),
               link / cost.link_bw_bytes_per_s, gpu_s)
