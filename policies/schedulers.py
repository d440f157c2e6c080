"""Step schedulers: ``ep``, ``monde``, ``tp``, ``tp-lb`` (DESIGN.md section 4).

Experts resident in the GPU cache run on the GPU under every scheduler (the cache is the
prefetcher's business); the schedulers differ in where the other experts run.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.core.knobs import LB_SPLITS, Knobs
from policies.base import Scheduler, StepInput, tp_bounds
from policies.plan import ALL_UNITS, GPU, Fetch, Plan, Task, time_plan
from policies.registry import register


@register("scheduler", "ep")
class ExpertParallel(Scheduler):
    """Expert parallel, NDP only: each expert runs whole on its home unit (e mod N)."""

    def plan(self, step: StepInput) -> Plan:
        d_ff = self.d_ff
        tasks = tuple(
            self.gpu_task(e, toks) if e in step.cached else Task(e % self.num_units, e, 0, d_ff, toks)
            for e, toks in step.routed.items()
        )
        return Plan(step.layer, tasks)


@register("scheduler", "monde")
class MoNDE(Scheduler):
    """MoNDE (DAC'24): hot experts (fetch + GPU cheaper than NDP in place) move to the GPU.

    Per expert, with its routed token count n: hot iff ``fetch_s + gpu_expert_s(n) <
    ndp_expert_s(n)`` on its home unit. The decision is per expert, as in MoNDE, and does
    not account for link contention between hot experts. At most ``fetch_buffer_experts``
    are fetched per step, most tokens first.
    """

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        self._hot_of: dict[int, bool] = {}  # token count -> hot

    def ndp_time_s(self, n: int) -> float:
        """What computing an expert for ``n`` tokens costs where it lives (its home unit)."""
        return self.cost.ndp_expert_s(n)

    def is_hot(self, n: int) -> bool:
        """Whether fetching an expert of ``n`` tokens and running it on the GPU beats the NDP
        side; it depends on ``n`` alone, so it is worked out once per count."""
        hot = self._hot_of.get(n)
        if hot is None:
            cost = self.cost
            hot = self._hot_of[n] = cost.fetch_s() + cost.gpu_expert_s(n) < self.ndp_time_s(n)
        return hot

    def cold_tasks(self, e: int, toks: tuple[int, ...]) -> list[Task]:
        """Where a cold expert runs: whole, on its home unit."""
        return [Task(e % self.num_units, e, 0, self.d_ff, toks)]

    def plan(self, step: StepInput) -> Plan:
        d_ff = self.d_ff
        hot: list[tuple[int, int]] = []
        tasks: list[Task] = []
        for e, toks in step.routed.items():
            n = len(toks)
            if e in step.cached:
                tasks.append(self.gpu_task(e, toks))
            elif self.is_hot(n):
                hot.append((-n, e))
            else:
                tasks.extend(self.cold_tasks(e, toks))
        hot.sort()
        fetches = []
        for i, (_, e) in enumerate(hot):
            toks = step.routed[e]
            if i < self.max_fetch:
                fetches.append(Fetch(e, 0, d_ff))
                tasks.append(self.gpu_task(e, toks))
            else:
                tasks.extend(self.cold_tasks(e, toks))
        return Plan(step.layer, tuple(tasks), tuple(fetches))


@register("scheduler", "tp")
class TensorParallel(Scheduler):
    """Tensor parallel over NDP units: every expert split along d_ff across all N units."""

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        self.bounds = [b for b in tp_bounds(self.d_ff, self.num_units) if b[1] > b[0]]

    def ndp_tasks(self, e: int, toks: tuple[int, ...]) -> list[Task]:
        return [Task(ALL_UNITS, e, 0, self.d_ff, toks)]

    def plan(self, step: StepInput) -> Plan:
        tasks: list[Task] = []
        for e, toks in step.routed.items():
            if e in step.cached:
                tasks.append(self.gpu_task(e, toks))
            else:
                tasks.extend(self.ndp_tasks(e, toks))
        return Plan(step.layer, tuple(tasks))


@dataclass(frozen=True)
class TpLbKnobs(Knobs):
    """``tp-lb``'s knob: ``lb_split`` ``expert`` (whole experts move to the GPU, the paper)
    or ``fractional`` (the next expert may also be split by columns, beyond the paper)."""

    lb_split: str = "expert"

    def __post_init__(self) -> None:
        self.one_of("lb_split", LB_SPLITS)


@register("scheduler", "tp-lb", knobs=TpLbKnobs)
class TensorParallelLoadBalanced(TensorParallel):
    """The paper's load-balancing-aware GPU/NDP split on top of ``tp`` (minimises the makespan).

    Cached experts run on the GPU. The other active experts are ranked by routed tokens
    (most first); the scheduler moves the best prefix of that ranking to the GPU (fetched on
    demand, fetch and GPU compute pipelined), choosing the prefix length whose step makespan
    under :func:`~policies.plan.time_plan` is smallest. Prefix length 0 is the ``tp`` plan,
    so the result is never slower than ``tp`` under the same timing rules. Up to 16
    candidates every prefix is considered (one whose GPU side alone already takes longer
    than the best so far is not timed); beyond, a binary search for the point where the GPU
    side overtakes the NDP side, checked against its neighbours and against ``tp``.
    With ``policy.lb_split = "fractional"`` the next expert after the best prefix may also be
    split by columns between the GPU and the NDP units (an extension beyond the paper).
    """

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        self.widths = [hi - lo for lo, hi in self.bounds]
        # a slowed unit's work is its healthy work times its factor, as in time_plan; with
        # d_ff < N some units get no slice, so map each non-empty slice to its real unit
        slice_units = [u for u, (lo, hi) in enumerate(tp_bounds(self.d_ff, self.num_units)) if hi > lo]
        self.factor = [cost.unit_factor[u] for u in slice_units]
        self._fetch_s = cost.fetch_s()
        self.uniform = len(set(self.widths)) == 1 and all(f == 1.0 for f in self.factor)
        # an expert's time depends only on its token count: computed once per count
        self._ndp_of: dict[int, dict[int, float]] = {w: {} for w in sorted(set(self.widths))}
        self._gpu_of: dict[int, float] = {}
        self._combine_of: dict[int, dict[int, float]] = {}
        self._decided: dict[tuple, tuple[int, float]] = {}  # step shape -> best prefix, makespan

    def _add_token_count(self, n: int) -> None:
        for w, per_n in self._ndp_of.items():
            per_n[n] = self.cost.ndp_expert_s(n, w / self.d_ff)
        self._gpu_of[n] = self.cost.gpu_expert_s(n)

    def plan(self, step: StepInput) -> Plan:
        cached_tasks: list[Task] = []
        cands: list[tuple[int, int]] = []
        cached, d_ff = step.cached, self.d_ff
        for e, toks in step.routed.items():
            if e in cached:
                cached_tasks.append(Task(GPU, e, 0, d_ff, toks))  # as self.gpu_task
            else:
                cands.append((-len(toks), e))
        cands.sort()
        order = [e for _, e in cands]
        shape = self._shape(step, cached_tasks, order)
        decided = self._decided.get(shape)
        if decided is None:
            if len(self._decided) >= 4096:  # large batches rarely repeat a shape: stay small
                self._decided.clear()
            decided = self._decided[shape] = self._best_prefix(step, cached_tasks, order)
        best, best_span = decided
        plan = self._build(step, cached_tasks, order, best)
        if (self.knobs.lb_split == "fractional" and best < len(order)
                and len(plan.fetches) < self.max_fetch):
            plan = self._fractional(step, plan, best_span, order[best])
        return plan

    def _shape(self, step: StepInput, cached_tasks: list[Task], order: list[int]) -> tuple:
        """What :meth:`_prefix_timing` depends on, expert ids left out: the candidates'
        token ids in rank order and the cached experts' (their counts and the sizes of their
        unions follow). Steps of one shape get the same prefix; at batch 1 (every expert
        holds token 0) a run has a handful of shapes."""
        routed = step.routed
        return tuple([routed[e] for e in order]), tuple([t.tokens for t in cached_tasks])

    def _best_prefix(self, step: StepInput, cached_tasks: list[Task], order: list[int]
                     ) -> tuple[int, float]:
        """The prefix length of ``order`` to move to the GPU, and its makespan."""
        limit = min(len(order), self.max_fetch)
        span, bound = self._prefix_timing(step, cached_tasks, order)
        memo: dict[int, float] = {}

        def at(m: int) -> float:
            if m not in memo:
                memo[m] = span(m)
            return memo[m]

        if limit <= 16:
            # every prefix, but one whose GPU-side lower bound already loses to the best so
            # far cannot win: skip timing it (the margin keeps rounding from deciding)
            best, best_span = 0, at(0)
            for m in range(1, limit + 1):
                if bound(m) > best_span * (1 + 1e-9):
                    continue
                if at(m) < best_span:
                    best, best_span = m, memo[m]
        else:
            lo, hi = 0, limit  # the first m where one more fetched expert stops helping
            while lo < hi:
                mid = (lo + hi) // 2
                if at(mid + 1) < at(mid):
                    lo = mid + 1
                else:
                    hi = mid
            best = min({0, max(0, lo - 1), lo, min(limit, lo + 1)}, key=lambda m: (at(m), m))
            best_span = memo[best]
        return best, best_span

    def _build(self, step: StepInput, cached_tasks: list[Task], order: list[int], m: int) -> Plan:
        routed, d_ff = step.routed, self.d_ff
        tasks = list(cached_tasks)
        tasks += [Task(GPU, e, 0, d_ff, routed[e]) for e in order[:m]]  # as self.gpu_task
        tasks += [Task(ALL_UNITS, e, 0, d_ff, routed[e]) for e in order[m:]]
        fetches = tuple(Fetch(e, 0, d_ff) for e in order[:m])
        return Plan(step.layer, tuple(tasks), fetches)

    def _span_fn(self, step: StepInput, cached_tasks: list[Task], order: list[int]):
        """``span(m)``: the makespan ``time_plan`` gives the plan moving ``order[:m]`` to the GPU."""
        return self._prefix_timing(step, cached_tasks, order)[0]

    def _prefix_timing(self, step: StepInput, cached_tasks: list[Task], order: list[int]):
        """``span(m)``, the makespan ``time_plan`` gives the plan moving ``order[:m]`` to the
        GPU, and ``bound(m)``, a lower bound of it from the GPU side alone.

        ``span`` applies the rules of :func:`policies.plan.time_plan`, specialised to this
        plan shape (every NDP unit holds a slice of every remaining expert), from suffix sums
        instead of building and timing each plan (tested equal). ``bound(m)`` is O(1): the
        GPU cannot finish before the m-th fetch has crossed the link (m fetches back to back)
        and its last expert has run, nor before it has run all of its experts.
        """
        cost, U, F = self.cost, len(self.bounds), len(order)
        routed = step.routed
        ndp_of, gpu_of = self._ndp_of, self._gpu_of
        # one pass from the last candidate back: suffix sums of unit work (one column per
        # distinct slice width) and suffix token-union sizes; GPU time of each candidate
        cols = {w: [0.0] * (F + 1) for w in ndp_of}
        col_of_n = [(col, ndp_of[w]) for w, col in cols.items()]
        suffix_toks = [0] * (F + 1)
        gpu_s = [0.0] * F
        seen: set[int] = set()
        for i in range(F - 1, -1, -1):
            toks = routed[order[i]]
            n = len(toks)
            if n not in gpu_of:
                self._add_token_count(n)
            for col, per_n in col_of_n:
                col[i] = col[i + 1] + per_n[n]
            gpu_s[i] = gpu_of[n]
            seen.update(toks)
            suffix_toks[i] = len(seen)
        unit_suffix = [cols[w] for w in self.widths]
        factor = self.factor
        all_tokens = seen
        for t in cached_tasks:
            all_tokens.update(t.tokens)
        g0 = 0.0
        for t in cached_tasks:
            n = len(t.tokens)
            if n not in gpu_of:
                self._add_token_count(n)
            g0 += gpu_of[n]
        fetch = self._fetch_s
        n_tokens = len(all_tokens)
        combine = self._combine_of.get(n_tokens)
        if combine is None:  # by the number of partials the GPU sums
            combine = self._combine_of[n_tokens] = {p: cost.gpu_combine_s(n_tokens, p)
                                                    for p in {0, 1, U, U + 1}}
        has_cached = bool(cached_tasks)
        unit_range = range(U)
        unit_counts = range(1, U + 1)
        uniform = self.uniform

        def span(m: int) -> float:
            partial_end = t_a = 0.0
            units = U if m < F else 0
            starts: list[float] = []  # partials on the link: [start, start + t_a)
            t = 0.0
            if units:
                # activations go out back to back (units 0..U-1), then each partial leaves
                # when its unit is done and the link is free
                t_a = cost.transfer_s(cost.activation_bytes(suffix_toks[m]))
                link_t = t = U * t_a
                if uniform:  # one slice width, no slowed unit: already in unit order
                    s_m = unit_suffix[0][m]
                    rel = [c * t_a + s_m for c in unit_counts]
                else:
                    rel = sorted([(u + 1) * t_a + unit_suffix[u][m] * factor[u] for u in unit_range])
                for done in rel:
                    start = done if done > link_t else link_t
                    starts.append(start)
                    link_t = start + t_a
                partial_end = link_t
            # fetches, back to back in the gaps the partials leave after the activations (as
            # _fill_gaps serves them); the GPU runs each fetched expert once it has arrived
            g = g0
            i, nb, k = 0, len(starts), 0
            while k < m and i < nb:
                remaining = fetch
                while True:
                    while i < nb and starts[i] + t_a <= t:
                        i += 1
                    if i == nb:
                        t += remaining
                        break
                    if starts[i] <= t:
                        t = starts[i] + t_a
                        i += 1
                        continue
                    if t + remaining <= starts[i]:
                        t += remaining
                        break
                    remaining -= starts[i] - t
                    t = starts[i] + t_a
                    i += 1
                g = (t if t > g else g) + gpu_s[k]
                k += 1
            for j in range(k, m):  # the link is free from here on
                t += fetch
                g = (t if t > g else g) + gpu_s[j]
            parts = units + (1 if (has_cached or m) else 0)
            return max(g, partial_end) + combine[parts]

        gpu_prefix = [g0]
        for x in gpu_s:
            gpu_prefix.append(gpu_prefix[-1] + x)

        def bound(m: int) -> float:
            parts = (U if m < F else 0) + 1
            return max(m * fetch + gpu_s[m - 1], gpu_prefix[m]) + combine[parts]

        return span, bound

    def _fractional(self, step: StepInput, plan: Plan, span: float, e: int) -> Plan:
        """Tries moving the first ``c`` columns of expert ``e`` to the GPU; keeps the best."""
        toks = step.routed[e]
        rest = [t for t in plan.tasks if t.expert != e]
        best_plan, best_span = plan, span
        for q in (1, 2, 3):  # a quarter, a half, three quarters of the columns
            c = self.d_ff * q // 4
            if c <= 0 or c >= self.d_ff:
                continue
            cand = Plan(step.layer, (*rest, Task(GPU, e, 0, c, toks), Task(ALL_UNITS, e, c, self.d_ff, toks)),
                        (*plan.fetches, Fetch(e, 0, c)))
            s = time_plan(cand, self.cost, self.num_units).makespan_s
            if s < best_span:
                best_plan, best_span = cand, s
        return best_plan
