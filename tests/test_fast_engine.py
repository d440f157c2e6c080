"""The analytic engine's shortcuts tell the same story as the plain rules they stand for.

The golden summaries (tests/test_golden.py) pin whole runs; these check the shortcuts one by
one: tp-lb's prefix bound never exceeds the prefix's makespan, the batch-1 token shortcut of
``time_plan`` equals the general count, ``lower_bound_s`` in closed form equals the sum over
expanded slices, and policies run side by side give the records they give one after another.
"""

from __future__ import annotations

import math

import pytest

import policies
from cluster.core.config import load_config
from cluster.core.cost import CostModel
from cluster.core.metrics import summarize
from cluster.core.routing import build_routing
from cluster.core.selection import group_by_expert
from cluster.engines import fanout
from policies.plan import ALL_UNITS, GPU, Plan, Task


def _cfg(*extra: str):
    return load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None,
                       ["workload.prompt_tokens=16", "workload.output_tokens=6", *extra])


@pytest.mark.parametrize("extra", [(), ("workload.batch_size=8", "link.bw_gbps=256"),
                                   ("model.num_experts=64", "ndp.num_ndp_units=16",
                                    "workload.batch_size=32", "link.bw_gbps=256")])
def test_tp_lb_prefix_bound_never_exceeds_the_prefix_makespan(extra) -> None:
    cfg = _cfg(*extra)
    routing = build_routing(cfg)
    sched = policies.get("scheduler", "tp-lb")(cfg, CostModel(cfg))
    for s in range(routing.decode_steps):
        for layer in range(0, cfg.model.num_layers, 7):
            step = policies.StepInput(layer, "decode", group_by_expert(routing.decode_ids(s, layer)))
            order = [e for _, e in sorted((-len(t), e) for e, t in step.routed.items())]
            span, bound = sched._prefix_timing(step, [], order)
            for m in range(1, len(order) + 1):
                assert bound(m) <= span(m) * (1 + 1e-12), (s, layer, m)


def test_one_token_shortcut_counts_as_the_general_rule() -> None:
    cfg = _cfg()
    cost = CostModel(cfg)
    tok = (3,)
    plan = Plan(0, (Task(GPU, 1, 0, 768, tok), Task(ALL_UNITS, 2, 0, 768, tok),
                    Task(2, 5, 0, 768, tok)))
    twin = Plan(0, (*plan.tasks, Task(1, 9, 0, 768, ())))  # an empty task: no shortcut
    a, b = policies.time_plan(plan, cost, 4), policies.time_plan(twin, cost, 4)
    assert a.makespan_s > 0 and a.unit_arrival_s.keys() == {0, 1, 2, 3}
    assert [b_ - a_ for a_, b_ in zip(a.unit_busy_s, b.unit_busy_s)][1] > 0
    assert a.link_bytes["activation"] == b.link_bytes["activation"]  # unit 1 needs token 3 anyway


def test_lower_bound_in_closed_form_equals_the_sum_over_expanded_slices() -> None:
    cfg = _cfg("model.d_ff=10")
    cost = CostModel(cfg)
    plan = Plan(0, (Task(ALL_UNITS, 0, 0, 10, (0, 1)), Task(ALL_UNITS, 1, 4, 7, (2,)),
                    Task(3, 2, 0, 10, (0,)), Task(GPU, 3, 0, 5, (1, 2))))
    expanded = Plan(0, plan.expand(4))
    assert math.isclose(policies.lower_bound_s(plan, cost, 4),
                        policies.lower_bound_s(expanded, cost, 4), rel_tol=1e-12)


def test_policies_side_by_side_give_what_they_give_one_after_another() -> None:
    cfg = _cfg()
    routing = build_routing(cfg)
    names = ["ep", "tp-lb", "paper"]
    got: dict[str, dict] = {}
    ticks: dict[str, int] = {}

    def tick(name: str, k: int) -> None:
        ticks[name] = ticks.get(name, 0) + k

    fanout.run_policies(cfg, routing, names, lambda r: got.setdefault(r.policy, summarize(r, 4)),
                        tick, workers=2)
    one: dict[str, dict] = {}
    fanout.run_policies(cfg, routing, names, lambda r: one.setdefault(r.policy, summarize(r, 4)),
                        workers=1)
    assert got == one
    assert ticks == {n: routing.decode_steps + 1 for n in names}


def test_an_interrupt_in_the_caller_ends_every_worker_at_once() -> None:
    """The run is interrupted while the workers compute (the progress callback raises, as a
    SIGTERM turned into KeyboardInterrupt would): the call raises and no worker outlives it."""
    import multiprocessing

    cfg = load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None, [])  # seconds of work each
    routing = build_routing(cfg)
    before = {p.pid for p in multiprocessing.active_children()}

    def tick(name: str, k: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fanout.run_policies(cfg, routing, ["ep", "tp-lb", "paper"], lambda r: None, tick,
                            workers=2)
    assert [p for p in multiprocessing.active_children() if p.pid not in before] == []


def test_a_worker_exception_is_raised_in_the_caller() -> None:
    """A routing that names experts the model lacks fails inside the workers; the caller
    gets the same exception type, with the same message, as running the policy here gives."""
    from cluster.core.selection import Routing

    cfg = _cfg()
    good = build_routing(cfg)
    short = Routing(good.topk_ids + 10_000, good.topk_weights, good.prompt_tokens)
    with pytest.raises(Exception) as here:
        fanout.run_policies(cfg, short, ["ep", "tp"], lambda r: None, workers=1)
    with pytest.raises(Exception) as there:
        fanout.run_policies(cfg, short, ["ep", "tp"], lambda r: None, workers=2)
    assert type(there.value) is type(here.value) and str(there.value) == str(here.value)


def _twice_unless_a_worker(_shared, item: int, report) -> int:
    """Dies at once in a worker process (as a script without a ``__main__`` guard does under
    spawn); in the caller's process it doubles the item and reports it first."""
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:
        os._exit(3)
    report(item)
    return 2 * item


def test_work_that_kills_its_workers_finishes_in_the_caller() -> None:
    got: dict[int, int] = {}
    reports: list[tuple[int, int]] = []
    fanout.run_each(_twice_unless_a_worker, None, [5, 6, 7], got.__setitem__,
                    lambda i, v: reports.append((i, v)), workers=2)
    assert got == {0: 10, 1: 12, 2: 14}
    assert sorted(reports) == [(0, 5), (1, 6), (2, 7)]
