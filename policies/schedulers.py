"""Step schedulers: ``ep``, ``monde``, ``tp``, ``tp-lb`` (DESIGN.md section 4).

Experts resident in the GPU cache run on the GPU under every scheduler (the cache is the
prefetcher's business); the schedulers differ in where the other experts run.
"""

from __future__ import annotations

from policies.base import Scheduler, StepInput, tp_bounds
from policies.plan import ALL_UNITS, GPU, Fetch, Plan, Task, _fill_gaps, time_plan
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

    def ndp_time_s(self, n: int) -> float:
        """What computing an expert for ``n`` tokens costs where it lives (its home unit)."""
        return self.cost.ndp_expert_s(n)

    def cold_tasks(self, e: int, toks: tuple[int, ...]) -> list[Task]:
        """Where a cold expert runs: whole, on its home unit."""
        return [Task(e % self.num_units, e, 0, self.d_ff, toks)]

    def plan(self, step: StepInput) -> Plan:
        cost, d_ff = self.cost, self.d_ff
        fetch_s = cost.fetch_s()
        hot: list[tuple[int, int]] = []
        tasks: list[Task] = []
        for e, toks in step.routed.items():
            n = len(toks)
            if e in step.cached:
                tasks.append(self.gpu_task(e, toks))
            elif fetch_s + cost.gpu_expert_s(n) < self.ndp_time_s(n):
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


@register("scheduler", "tp-lb")
class TensorParallelLoadBalanced(TensorParallel):
    """The paper's load-balancing-aware GPU/NDP split on top of ``tp`` (minimises the makespan).

    Cached experts run on the GPU. The other active experts are ranked by routed tokens
    (most first); the scheduler moves the best prefix of that ranking to the GPU (fetched on
    demand, fetch and GPU compute pipelined), choosing the prefix length whose step makespan
    under :func:`~policies.plan.time_plan` is smallest. Prefix length 0 is the ``tp`` plan,
    so the result is never slower than ``tp`` under the same timing rules. Up to 16
    candidates every prefix is timed; beyond, a binary search for the point where the GPU
    side overtakes the NDP side, checked against its neighbours and against ``tp``.
    With ``policy.lb_split = "fractional"`` the next expert after the best prefix may also be
    split by columns between the GPU and the NDP units (an extension beyond the paper).
    """

    def plan(self, step: StepInput) -> Plan:
        cached_tasks: list[Task] = []
        cands: list[tuple[int, int]] = []
        for e, toks in step.routed.items():
            if e in step.cached:
                cached_tasks.append(self.gpu_task(e, toks))
            else:
                cands.append((-len(toks), e))
        cands.sort()
        order = [e for _, e in cands]
        limit = min(len(order), self.max_fetch)
        span = self._span_fn(step, cached_tasks, order)
        memo: dict[int, float] = {}

        def at(m: int) -> float:
            if m not in memo:
                memo[m] = span(m)
            return memo[m]

        if limit <= 16:
            best = min(range(limit + 1), key=lambda m: (at(m), m))
        else:
            lo, hi = 0, limit  # the first m where one more fetched expert stops helping
            while lo < hi:
                mid = (lo + hi) // 2
                if at(mid + 1) < at(mid):
                    lo = mid + 1
                else:
                    hi = mid
            best = min({0, max(0, lo - 1), lo, min(limit, lo + 1)}, key=lambda m: (at(m), m))
        plan = self._build(step, cached_tasks, order, best)
        if (self.cfg.policy.lb_split == "fractional" and best < len(order)
                and len(plan.fetches) < self.max_fetch):
            plan = self._fractional(step, plan, memo[best], order[best])
        return plan

    def _build(self, step: StepInput, cached_tasks: list[Task], order: list[int], m: int) -> Plan:
        tasks = list(cached_tasks)
        fetches = []
        for i, e in enumerate(order):
            toks = step.routed[e]
            if i < m:
                tasks.append(self.gpu_task(e, toks))
                fetches.append(Fetch(e, 0, self.d_ff))
            else:
                tasks.extend(self.ndp_tasks(e, toks))
        return Plan(step.layer, tuple(tasks), tuple(fetches))

    def _span_fn(self, step: StepInput, cached_tasks: list[Task], order: list[int]):
        """``span(m)``: the makespan ``time_plan`` gives the plan moving ``order[:m]`` to the GPU.

        The same rules as :func:`policies.plan.time_plan`, specialised to this plan shape
        (every NDP unit holds a slice of every remaining expert) so that all prefixes are
        timed from suffix sums instead of building and timing each plan (tested equal).
        """
        cost, bounds, d_ff = self.cost, self.bounds, self.d_ff
        U, F = len(bounds), len(order)
        widths = [hi - lo for lo, hi in bounds]
        # a slowed unit's work is its healthy work times its factor, as in time_plan; with
        # d_ff < N some units get no slice, so map each non-empty slice to its real unit
        slice_units = [u for u, (lo, hi) in enumerate(tp_bounds(d_ff, self.num_units)) if hi > lo]
        factor = [cost.unit_factor[u] for u in slice_units]
        distinct = sorted(set(widths))
        ntok = [len(step.routed[e]) for e in order]
        # suffix sums of unit work (one per distinct slice width) and suffix token-union sizes
        suffix: dict[int, list[float]] = {w: [0.0] * (F + 1) for w in distinct}
        suffix_toks = [0] * (F + 1)
        seen: set[int] = set()
        for i in range(F - 1, -1, -1):
            for w in distinct:
                col = suffix[w]
                col[i] = col[i + 1] + cost.ndp_expert_s(ntok[i], w / d_ff)
            seen.update(step.routed[order[i]])
            suffix_toks[i] = len(seen)
        all_tokens = set(seen)
        for t in cached_tasks:
            all_tokens.update(t.tokens)
        g0 = sum(cost.gpu_expert_s(len(t.tokens)) for t in cached_tasks)
        fetch = cost.fetch_s()
        gpu_s = [cost.gpu_expert_s(n) for n in ntok]
        n_tokens = len(all_tokens)

        def span(m: int) -> float:
            busy: list[tuple[float, float]] = []
            partial_end = 0.0
            units = U if m < F else 0
            if units:
                t_a = cost.transfer_s(cost.activation_bytes(suffix_toks[m]))
                rel = sorted(((u + 1) * t_a + suffix[widths[u]][m] * factor[u], u) for u in range(U))
                busy = [(u * t_a, (u + 1) * t_a) for u in range(U)]
                link_t = U * t_a
                for done, _ in rel:
                    start = done if done > link_t else link_t
                    link_t = start + t_a
                    busy.append((start, link_t))
                partial_end = link_t
            g = g0
            if m:
                for i, segs in enumerate(_fill_gaps(busy, 0.0, [fetch] * m)):
                    f = segs[-1][1]
                    g = (f if f > g else g) + gpu_s[i]
            parts = units + (1 if (cached_tasks or m) else 0)
            return max(g, partial_end) + cost.gpu_combine_s(n_tokens, parts)

        return span
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
