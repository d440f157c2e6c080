"""The analytic engine: executes plans on a virtual clock. Deterministic and fast.

One run of one policy walks the workload in order: the prefill (every prompt token at once,
layer by layer), then one decode step per further output token. At every MoE layer the GPU
first runs attention and the router (cost model), the policy plans the step, and
:func:`policies.plan.time_plan` times it. Background prefetches (issued by the prefetcher)
use the link whenever step traffic does not: in the idle time between steps and in the
gaps inside a step (they are the lowest priority and never delay step traffic). A
prefetched expert serves a step only if it arrived before the step began.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

import policies
from cluster.cost import CostModel
from cluster.metrics import PolicyRecords, StepRecord, TokenRecord
from cluster.routing import Routing, calibration_counts, group_by_expert
from cluster.spec import Config
from policies.prefetch import Key, PrefetchContext, Prefetcher


@dataclass
class BackgroundLink:
    """Background prefetch traffic on the host link, served in the gaps of step traffic."""

    cost: CostModel
    queue: deque = field(default_factory=deque)  # [key, remaining seconds]
    cursor: float = 0.0
    arrived: dict[Key, float] = field(default_factory=dict)
    bytes_moved: int = 0
    experts_moved: int = 0

    def push(self, keys: list[Key], now: float) -> None:
        if not self.queue:
            self.cursor = max(self.cursor, now)
        for k in keys:
            self.queue.append([k, self.cost.fetch_s()])

    def advance(self, until: float, busy: list[tuple[float, float]] = ()) -> None:
        """Moves queued prefetches through ``[cursor, until]`` minus the ``busy`` intervals."""
        t = self.cursor
        for a, b in [*busy, (until, until)]:
            while self.queue and t < a:
                item = self.queue[0]
                step = min(item[1], a - t)
                item[1] -= step
                t += step
                if item[1] <= 1e-15:
                    self.queue.popleft()
                    self.arrived[item[0]] = t
                    self.bytes_moved += self.cost.expert_bytes
                    self.experts_moved += 1
            t = max(t, b)
            if not self.queue:
                break
        self.cursor = max(self.cursor, until) if self.queue else max(t, self.cursor)


def decode_future(routing: Routing) -> list[list[dict[int, int]]]:
    """[decode step][layer] -> {expert: tokens}: what only the oracle may see."""
    out = []
    for s in range(routing.decode_steps):
        out.append([{e: len(t) for e, t in group_by_expert(routing.decode_ids(s, lay)).items()}
                    for lay in range(routing.num_layers)])
    return out


def make_prefetcher(cfg: Config, name: str, routing: Routing) -> Prefetcher:
    cls = policies.get("prefetcher", name)
    ctx = PrefetchContext(cfg, cfg.cache_capacity_experts)
    if name == "oracle":
        ctx.future = decode_future(routing)
    if name == "profiled":
        ctx.calibration = calibration_counts(cfg)
    return cls(ctx)


def run_policy(cfg: Config, routing: Routing, name: str,
               progress: Callable[[int], None] | None = None,
               trace_steps: range = range(1, 3)) -> PolicyRecords:
    """Runs one policy (a name ``policies.resolve`` accepts) through the whole workload.

    Steps whose index is in ``trace_steps`` (0 = prefill, 1.. = decode) keep busy intervals
    of every resource for the Chrome trace.
    """
    choice = policies.resolve(name)
    cost = CostModel(cfg)
    sched = policies.get("scheduler", choice.scheduler)(cfg, cost)
    pf = make_prefetcher(cfg, choice.prefetcher, routing)
    rec = PolicyRecords(name, choice.scheduler, choice.prefetcher)
    N, L, B, P = cfg.ndp.num_ndp_units, cfg.model.num_layers, cfg.workload.batch_size, cfg.workload.prompt_tokens
    bg = BackgroundLink(cost)
    for key in pf.preload():
        bg.arrived[key] = 0.0
    t = 0.0

    def moe_step(phase: str, step: int, layer: int, routed: Mapping[int, tuple[int, ...]]) -> None:
        nonlocal t
        bg.advance(t)
        resident = frozenset(e for e in pf.cache.layer(layer) if bg.arrived.get((layer, e), np.inf) <= t)
        inp = policies.StepInput(layer, phase, routed, resident)
        plan = sched.plan(inp)
        traced = step in trace_steps
        timing = policies.time_plan(plan, cost, N, record=traced)
        start, end = t, t + timing.makespan_s
        if traced:
            for iv in timing.intervals:
                iv.start_s += start
                iv.end_s += start
            rec.intervals.extend(timing.intervals)
        bg.advance(end, [(start + a, start + b) for a, b in timing.link_segments])
        gpu_tasks = [tk for tk in plan.tasks if tk.device == policies.GPU]
        rec.steps.append(StepRecord(
            name, phase, step, layer, start, end, len(routed),
            sum(1 for e in routed if e in resident), len(plan.fetches), len(gpu_tasks),
            timing.gpu_busy_s, timing.unit_busy_s, timing.link_bytes["activation"],
            timing.link_bytes["partial"], timing.link_bytes["fetch"],
            policies.lower_bound_s(plan, cost, N)))
        t = end
        sched.observe(inp)
        if phase == "decode":
            fetched = [f.expert for f in plan.fetches if f.col_start == 0 and f.col_end == cfg.model.d_ff]
            more = pf.after_step(layer, step - 1, {e: len(v) for e, v in routed.items()}, fetched)
            for e in fetched:  # fetched on demand and admitted: already on the GPU
                if (layer, e) in pf.cache:
                    bg.arrived.setdefault((layer, e), t)
            _drop_evicted(bg, pf)
            if more:
                bg.push(more, t)

    def gpu(seconds: float, step: int, label: str) -> None:
        nonlocal t
        if step in trace_steps:
            rec.intervals.append(policies.plan.Interval("gpu", "layer", t, t + seconds, label))
        t += seconds
        rec.gpu_other_busy_s += seconds

    # Prefill: all prompt tokens of the batch in one step per layer.
    n_pre = B * P
    for _ in range(cfg.model.num_dense_layers):
        gpu(cost.gpu_dense_layer_s(n_pre, P, B), 0, "dense layer")
    for layer in range(L):
        gpu(cost.gpu_layer_s(n_pre, P, B), 0, f"L{layer} attention+router")
        moe_step("prefill", 0, layer, group_by_expert(routing.prefill_ids(layer)))
    gpu(cost.gpu_head_s(B), 0, "lm head")
    rec.tokens.append(TokenRecord(name, 0, t, t))
    bg.push(pf.after_prefill(routing.prefill_counts(cfg.model.num_experts)), t)
    if progress:
        progress(1)
    # Decode: one step per further output token.
    for s in range(routing.decode_steps):
        ctx = P + s + 1
        for _ in range(cfg.model.num_dense_layers):
            gpu(cost.gpu_dense_layer_s(B, ctx, B), s + 1, "dense layer")
        for layer in range(L):
            gpu(cost.gpu_layer_s(B, ctx, B), s + 1, f"L{layer} attention+router")
            moe_step("decode", s + 1, layer, group_by_expert(routing.decode_ids(s, layer)))
        gpu(cost.gpu_head_s(B), s + 1, "lm head")
        rec.tokens.append(TokenRecord(name, s + 1, t, t - rec.tokens[-1].time_s))
        if progress:
            progress(1)
    rec.prefetch_bytes = bg.bytes_moved
    rec.prefetched_experts = bg.experts_moved
    return rec


def _drop_evicted(bg: BackgroundLink, pf: Prefetcher) -> None:
    """Evicted keys stop being resident; queued fetches of evicted keys are cancelled."""
    if not pf.cache.evicted:
        return
    for key in pf.cache.evicted:
        if key not in pf.cache:
            bg.arrived.pop(key, None)
    pf.cache.evicted.clear()
    if bg.queue:
        bg.queue = deque(item for item in bg.queue if item[0] in pf.cache)
