"""What a step scheduler sees and the base classes policies derive from.

A scheduler turns a :class:`StepInput` (one layer's routed tokens per expert and the GPU
cache contents) into a :class:`~policies.plan.Plan`. It may keep state across steps
(``observe``), but it never reads a clock, does I/O or talks to Ray or zmq.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster.core.cost import CostModel
from cluster.core.knobs import Knobs
from cluster.core.spec import Config
from policies.plan import GPU, Plan, Task, tp_bounds  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class StepInput:
    """One MoE step of one layer.

    ``routed`` maps each active expert to the ids of the tokens routed to it (ascending);
    ``cached`` holds the experts of this layer resident in the GPU expert cache.
    """

    layer: int
    phase: str  # "prefill" or "decode"
    routed: Mapping[int, tuple[int, ...]]
    cached: frozenset[int] = frozenset()

    @property
    def num_pairs(self) -> int:
        return sum(len(t) for t in self.routed.values())


class Scheduler:
    """Base step scheduler: subclasses implement :meth:`plan`.

    ``knobs_class``: the scheduler's own settings, set by ``@register(..., knobs=...)``;
    ``self.knobs`` is the config's instance of it (None without).
    """

    name = "base"
    knobs_class: type[Knobs] | None = None

    def __init__(self, cfg: Config, cost: CostModel) -> None:
        self.cfg = cfg
        self.knobs: Any = cfg.policy.knobs_of(self.knobs_class)  # None without; checks them
        self.cost = cost
        self.num_units = cfg.ndp.num_ndp_units
        self.d_ff = cfg.model.d_ff
        self.max_fetch = cfg.fetch_buffer_experts

    def plan(self, step: StepInput) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe(self, step: StepInput) -> None:
        """Called after each step with what was routed (stateful policies learn here)."""

    def ep_unit(self, expert: int) -> int:
        """Balanced static expert-parallel placement: expert e lives on unit e mod N."""
        return expert % self.num_units

    def gpu_task(self, expert: int, tokens: tuple[int, ...]) -> Task:
        return Task(GPU, expert, 0, self.d_ff, tokens)
