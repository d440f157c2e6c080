"""The analytic engine: executes plans on a virtual clock. Deterministic and fast.

One run of one policy walks the workload in order: the prefill (every prompt token at once,
layer by layer), then one decode step per further output token. At every MoE layer the GPU
first runs attention and the router (cost model); the router's output reaches the host's
scheduler one link latency later, the policy plans the step, and the commands reach the
devices one more latency later (the hops the emulation cluster really makes, DESIGN.md
section 5); :func:`policies.plan.time_plan` times the step from there. Background
prefetches (issued by the prefetcher) use the link whenever step traffic does not: in the
idle time between steps and in the gaps inside a step (``link.prefetch_priority = lowest``)
or share the on-demand class, first come first served (``equal``). A prefetched expert
serves a step only if it arrived before the router ran; an on-demand fetch of one still in
flight upgrades it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import policies
from cluster.core.cost import CostModel
from cluster.core.metrics import PolicyRecords, StepRecord, TokenRecord
from cluster.core.selection import Routing, decode_groups, group_by_expert
from cluster.core.spec import Config
from policies.build import make_prefetcher, ndp_weight_bits, policy_cost_config
from policies.prefetch import Decision, Key


@dataclass
class BackgroundLink:
    """Background prefetch traffic on the host link, served in the gaps of step traffic."""

    cost: CostModel
    queue: deque = field(default_factory=deque)  # [key, remaining seconds]
    cursor: float = 0.0
    arrived: dict[Key, float] = field(default_factory=dict)
    bytes_moved: int = 0
    experts_moved: int = 0
    queued: set[Key] = field(default_factory=set)  # the keys in ``queue`` (each once)

    def push(self, keys: list[Key], now: float) -> None:
        if not self.queue:
            self.cursor = max(self.cursor, now)
        for k in keys:
            if k not in self.arrived and k not in self.queued:
                self.queue.append([k, self.cost.fetch_s()])
                self.queued.add(k)

    def take(self, key: Key) -> float | None:
        """An on-demand fetch of ``key`` upgrades its queued prefetch: the fetch owes only
        what the prefetch has left (None if ``key`` is not queued)."""
        if key not in self.queued:
            return None
        for i, item in enumerate(self.queue):
            if item[0] == key:
                del self.queue[i]
                self.queued.discard(key)
                return item[1]
        return None  # pragma: no cover - ``queued`` names only keys in the queue

    def keep(self, wanted: Callable[[Key], bool]) -> None:
        """Drops the queued prefetches whose key is not ``wanted``."""
        self.queue = deque(item for item in self.queue if wanted(item[0]))
        self.queued = {item[0] for item in self.queue}

    def _pop(self) -> list:
        item = self.queue.popleft()
        self.queued.discard(item[0])
        return item

    def served_in_step(self, segments: list[list[tuple[float, float]]], start: float,
                       makespan: float) -> None:
        """Equal priority: the queue's head items were served in a step's gaps (``segments``
        relative to ``start``), up to its end; complete ones have arrived."""
        for segs in segments:
            item = self.queue[0]
            got = sum(min(b, makespan) - a for a, b in segs if a < makespan)
            if got >= item[1] - 1e-15 and segs and segs[-1][1] <= makespan:
                self._pop()
                self.arrived.setdefault(item[0], start + segs[-1][1])
                self.bytes_moved += self.cost.ndp_expert_bytes
                self.experts_moved += 1
                continue
            item[1] -= got
            break
        self.cursor = max(self.cursor, start)

    def landed(self, keys: list[Key], now: float) -> None:
        """Keys that reached the GPU another way (an on-demand fetch): resident from ``now``,
        and no longer worth moving in the background."""
        new = [k for k in keys if k not in self.arrived]
        for k in new:
            self.arrived[k] = now
        gone = {k for k in new if k in self.queued}
        if gone:
            self.keep(lambda k: k not in gone)

    def advance(self, until: float, busy: Sequence[tuple[float, float]] = (),
                offset: float = 0.0) -> None:
        """Moves queued prefetches through ``[cursor, until]`` minus the ``busy`` intervals
        (sorted, relative to ``offset``)."""
        if not self.queue:  # nothing to move: the cursor moves as the loop below would move it
            end = offset + busy[0][1] if busy else until
            if end > self.cursor:
                self.cursor = end
            return
        t = self.cursor
        for a, b in [*[(offset + a, offset + b) for a, b in busy], (until, until)]:
            while self.queue and t < a:
                item = self.queue[0]
                step = min(item[1], a - t)
                item[1] -= step
                t += step
                if item[1] <= 1e-15:
                    self._pop()
                    self.arrived.setdefault(item[0], t)  # an on-demand copy may have come first
                    self.bytes_moved += self.cost.ndp_expert_bytes
                    self.experts_moved += 1
            t = max(t, b)
            if not self.queue:
                break
        self.cursor = max(self.cursor, until) if self.queue else max(t, self.cursor)


class Executor:
    """Where an :class:`Episode`'s work really happens. The analytic engine's does nothing.

    The emulation engine overrides these hooks to run the real matmuls on its actors and to
    pace wall-clock time; the episode's timing rules stay the same for both engines.
    """

    def gpu_work(self, kind: str, phase: str, step: int, layer: int, start_s: float,
                 seconds: float) -> None:
        """GPU-only work: ``attention`` (+ router) of a MoE layer, a ``dense`` layer, ``head``."""

    def moe(self, phase: str, step: int, layer: int, plan: policies.Plan,
            timing: policies.StepTiming, start_s: float) -> None:
        """One MoE step, planned and timed (``timing`` is relative to ``start_s``)."""

    def token_done(self, step: int, time_s: float) -> None:
        """An output token is ready at emulated ``time_s``."""


class Episode:
    """One policy through the whole workload: the step order, the cache and prefetch books.

    Shared by both engines: the analytic engine runs it with a do-nothing :class:`Executor`,
    the emulation cluster's scheduler with one that drives its actors.
    """

    def __init__(self, cfg: Config, routing: Routing, name: str,
                 executor: Executor | None = None, trace_steps: range = range(1, 3),
                 lower_bounds: bool = True) -> None:
        self.cfg, self.routing, self.name = cfg, routing, name
        self.lower_bounds = lower_bounds  # False: StepRecord.lower_bound_s stays 0 (not needed)
        choice = policies.resolve(name)
        sched_cls = policies.get("scheduler", choice.scheduler)
        pf_cls = policies.get("prefetcher", choice.prefetcher)
        cost_cfg = policy_cost_config(cfg, sched_cls, pf_cls)
        self.cost = CostModel(cost_cfg)  # policy-specific (NDP weight bits); cfg stays as loaded
        self.sched = sched_cls(cfg, self.cost)
        self.pf = make_prefetcher(cfg, choice.prefetcher, routing)
        self.rec = PolicyRecords(name, choice.scheduler, choice.prefetcher)
        if cost_cfg is not cfg:
            self.rec.extra["ndp_weight_bits"] = ndp_weight_bits(cfg, sched_cls, pf_cls)
        self.executor = executor or Executor()
        self.trace_steps = trace_steps
        self.bg = BackgroundLink(self.cost)
        self.t = 0.0
        # constants of every MoE step
        self.num_units, self.d_ff = cfg.ndp.num_ndp_units, cfg.model.d_ff
        self.hops_s = 2 * self.cost.link_latency_s  # router -> scheduler -> devices
        self.charge_decision = cfg.emulate.charge_decision_time
        self.equal_priority = cfg.link.prefetch_priority == "equal"
        # the base class's after_step adds nothing: no need to count the routed tokens for it
        self.pf_after_step = self.pf.acts_after_steps()
        # what the prefetcher holds, per layer, as its decisions said (the engine never looks
        # into its cache), and of those the experts seen resident (landed) at an earlier step:
        # a key stays resident until it is evicted, its arrival time never changes while held
        self._held: dict[int, set[int]] = {}
        self._landed: dict[int, set[int]] = {}

    def run(self, progress: Callable[[int], None] | None = None) -> PolicyRecords:
        cfg, routing, cost, rec = self.cfg, self.routing, self.cost, self.rec
        L, B, P = cfg.model.num_layers, cfg.workload.batch_size, cfg.workload.prompt_tokens
        pre = self.pf.decide_preload()
        self._apply(pre)
        for key in pre.fetch:
            self.bg.arrived[key] = 0.0
        # Prefill: all prompt tokens of the batch in one step per layer.
        n_pre = B * P
        for i in range(cfg.model.num_dense_layers):
            self._gpu("dense", "prefill", 0, i, cost.gpu_dense_layer_s(n_pre, P, B))
        for layer in range(L):
            self._gpu("attention", "prefill", 0, layer, cost.gpu_layer_s(n_pre, P, B))
            self._moe("prefill", 0, layer, group_by_expert(routing.prefill_ids(layer)))
        self._gpu("head", "prefill", 0, -1, cost.gpu_head_s(B))
        rec.tokens.append(TokenRecord(self.name, 0, self.t, self.t))
        self.executor.token_done(0, self.t)
        # the token event reaches the scheduler, its prefetch orders the units: two hops
        after = self.pf.decide_after_prefill(routing.prefill_counts(cfg.model.num_experts))
        self.bg.push(list(after.fetch), self.t + 2 * cost.link_latency_s)
        self._apply(after)
        if progress:
            progress(1)
        # Decode: one step per further output token.
        decoded = decode_groups(routing)
        for s in range(routing.decode_steps):
            step, ctx = s + 1, P + s + 1
            for i in range(cfg.model.num_dense_layers):
                self._gpu("dense", "decode", step, i, cost.gpu_dense_layer_s(B, ctx, B))
            for layer in range(L):
                self._gpu("attention", "decode", step, layer, cost.gpu_layer_s(B, ctx, B))
                self._moe("decode", step, layer, decoded(s, layer))
            self._gpu("head", "decode", step, -1, cost.gpu_head_s(B))
            rec.tokens.append(TokenRecord(self.name, step, self.t, self.t - rec.tokens[-1].time_s))
            self.executor.token_done(step, self.t)
            if progress:
                progress(1)
        rec.prefetch_bytes = self.bg.bytes_moved
        rec.prefetched_experts = self.bg.experts_moved
        return rec

    def _gpu(self, kind: str, phase: str, step: int, layer: int, seconds: float) -> None:
        if step in self.trace_steps:
            label = {"attention": f"L{layer} attention+router", "dense": f"dense layer {layer}",
                     "head": "lm head"}[kind]
            self.rec.intervals.append(policies.plan.Interval("gpu", "layer", self.t, self.t + seconds, label))
        self.executor.gpu_work(kind, phase, step, layer, self.t, seconds)
        self.t += seconds
        self.rec.gpu_other_busy_s += seconds

    def _moe(self, phase: str, step: int, layer: int, routed: Mapping[int, tuple[int, ...]]) -> None:
        """One MoE step as the executing system runs it (DESIGN.md section 5).

        The router's output reaches the scheduler one link latency after ``t``; the plan
        (and, with ``emulate.charge_decision_time``, its measured decision time) and the
        commands to the devices one more latency later: the step's link traffic starts at
        ``start``. The cache the plan sees is what had landed by ``t``. Prefetch decisions
        and evictions take effect at ``start`` too; an on-demand fetch of an expert whose
        prefetch is still queued upgrades it (it owes what it has left).
        """
        cost, bg, pf, rec = self.cost, self.bg, self.pf, self.rec
        t = self.t
        resident = self._resident(layer, t)
        inp = policies.StepInput(layer, phase, routed, resident)
        t0 = time.perf_counter() if self.charge_decision else 0.0
        plan = self.sched.plan(inp)
        more: tuple[Key, ...] = ()
        d_ff = self.d_ff
        fetched = [f.expert for f in plan.fetches if f.col_start == 0 and f.col_end == d_ff]
        said = None
        if phase == "decode" and self.pf_after_step:
            said = pf.decide_after_step(layer, step - 1, {e: len(v) for e, v in routed.items()}, fetched)
            more = said.fetch
        decision = time.perf_counter() - t0 if self.charge_decision else 0.0
        start = t + self.hops_s + decision
        bg.advance(start)
        if said is not None:
            self._apply(said)
        overrides: dict[int, float] = {}
        for e in fetched:
            left = bg.take((layer, e))
            if left is not None:
                overrides[e] = left
            elif (layer, e) in bg.arrived and bg.arrived[(layer, e)] <= start:
                overrides[e] = 0.0  # landed after the router ran: ready at once
        backlog = [item[1] for item in bg.queue] if self.equal_priority else []
        traced = step in self.trace_steps
        timing = policies.time_plan(plan, cost, self.num_units, record=traced, fetch_s=overrides,
                                    backlog_s=backlog)
        end = start + timing.makespan_s
        if backlog:
            bg.served_in_step(timing.backlog_segments, start, timing.makespan_s)
        if more:
            bg.push(list(more), start)
        self.executor.moe(phase, step, layer, plan, timing, start)
        if traced:
            for iv in timing.intervals:
                iv.start_s += start
                iv.end_s += start
            rec.intervals.extend(timing.intervals)
        bg.advance(end, timing.link_segments, start)
        gpu_tasks = [tk.device for tk in plan.tasks].count(policies.GPU)
        link_bytes = timing.link_bytes
        rec.steps.append(StepRecord(
            self.name, phase, step, layer, start, end, len(routed),
            len(resident.intersection(routed)) if resident else 0, len(plan.fetches), gpu_tasks,
            timing.gpu_busy_s, timing.unit_busy_s, link_bytes["activation"],
            link_bytes["partial"], link_bytes["fetch"],
            policies.lower_bound_s(plan, cost, self.num_units) if self.lower_bounds else 0.0))
        self.t = end
        self.sched.observe(inp)
        if phase == "decode" and fetched:
            # fetched on demand and admitted: on the GPU from the end of the step
            held = self._held.get(layer, ())
            bg.landed([(layer, e) for e in fetched if e in held], end)


    def _resident(self, layer: int, t: float) -> frozenset[int]:
        """The experts of ``layer`` in the cache whose weights had landed by ``t``."""
        cached = self._held.get(layer)
        if not cached:
            return frozenset()
        landed = self._landed.setdefault(layer, set())
        landed &= cached
        arrived = self.bg.arrived
        for e in cached - landed:
            if arrived.get((layer, e), math.inf) <= t:
                landed.add(e)
        return frozenset(landed)

    def _apply(self, d: Decision) -> None:
        """A prefetcher's decision takes effect: its keys are held (those to fetch count as
        resident once their bytes land); evicted keys stop being resident at once and their
        queued fetches are cancelled."""
        held = self._held
        for lay, e in d.fetch:
            held.setdefault(lay, set()).add(e)
        for lay, e in d.admit:
            held.setdefault(lay, set()).add(e)
        if not d.evict:
            return
        bg = self.bg
        for lay, e in d.evict:
            held[lay].discard(e)
            if lay in self._landed:
                self._landed[lay].discard(e)  # its arrival is looked at again if it comes back
            bg.arrived.pop((lay, e), None)
        if bg.queue:
            bg.keep(lambda key: key[1] in held.get(key[0], ()))


def run_policy(cfg: Config, routing: Routing, name: str,
               progress: Callable[[int], None] | None = None,
               trace_steps: range = range(1, 3), lower_bounds: bool = True) -> PolicyRecords:
    """Runs one policy (a name ``policies.resolve`` accepts) through the whole workload.

    Steps whose index is in ``trace_steps`` (0 = prefill, 1.. = decode) keep busy intervals
    of every resource for the Chrome trace. ``lower_bounds=False`` skips the per-step lower
    bound (``steps.csv``'s column; no summary uses it), for sweeps that keep only summaries.
    """
    return Episode(cfg, routing, name, trace_steps=trace_steps,
                   lower_bounds=lower_bounds).run(progress)
