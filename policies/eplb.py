"""``eplb``: DeepSeek EPLB-style replication of hot experts across NDP units.

Each layer keeps a moving window of per-expert loads (routed tokens over the last
``policy.eplb_window_steps`` steps) and, every ``policy.eplb_period_steps`` steps of that layer,
re-plans ``eplb_redundant_per_unit * N`` redundant replicas:

1. replicate: repeatedly give one more replica to the expert with the highest load per
   replica (at most one replica per unit);
2. pack: place replicas, heaviest per-replica load first, on the least-loaded unit that does
   not already hold that expert (no two replicas of one expert share a unit).

Home placement is expert parallel (expert e on unit e mod N). Per step, an expert's tokens are
split into at most as many chunks as it has replicas, each chunk going to the replica whose
unit has the least work so far in this step. Moving replica weights between units is not
charged on the link (a simplification, stated here and in the summary's notes).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from policies.base import Scheduler, StepInput
from policies.plan import Plan, Task
from policies.registry import register


def replicate_and_pack(load: np.ndarray, num_units: int, redundant: int) -> list[list[int]]:
    """Replica units per expert for one layer.

    ``load``: [experts] recent tokens per expert. Returns ``units[e]``: the units holding
    expert e, its home unit (e mod N) first. Deterministic: ties break by expert id.
    """
    num_experts = load.shape[0]
    replicas = [1] * num_experts
    budget = redundant
    while budget > 0:
        per = [(-(load[e] / replicas[e]), e) for e in range(num_experts) if replicas[e] < num_units]
        if not per:
            break
        _, e = min(per)
        if load[e] <= 0:
            break
        replicas[e] += 1
        budget -= 1
    units = [[e % num_units] for e in range(num_experts)]
    unit_load = np.zeros(num_units)
    for e in range(num_experts):
        unit_load[e % num_units] += load[e] / replicas[e]
    extra = sorted((-(load[e] / replicas[e]), e) for e in range(num_experts)
                    for _ in range(replicas[e] - 1))
    for neg, e in extra:
        free = [u for u in range(num_units) if u not in units[e]]
        u = min(free, key=lambda x: (unit_load[x], x))
        units[e].append(u)
        unit_load[u] += -neg
    return units


@register("scheduler", "eplb")
class Eplb(Scheduler):
    """DeepSeek EPLB-style replication of hot experts over NDP units from a moving load window."""

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        p = cfg.policy
        self.redundant = p.eplb_redundant_per_unit * self.num_units
        self.period = p.eplb_period_steps
        L, E = cfg.model.num_layers, cfg.model.num_experts
        self.windows = [deque(maxlen=p.eplb_window_steps) for _ in range(L)]
        self.steps = [0] * L
        self.units = [[[e % self.num_units] for e in range(E)] for _ in range(L)]

    def plan(self, step: StepInput) -> Plan:
        units = self.units[step.layer]
        work = [0.0] * self.num_units
        tasks: list[Task] = []
        for e, toks in sorted(step.routed.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            if e in step.cached:
                tasks.append(self.gpu_task(e, toks))
                continue
            homes = units[e]
            chunks = min(len(homes), len(toks))
            size = -(-len(toks) // chunks)
            for i in range(chunks):
                part = toks[i * size:(i + 1) * size]
                if not part:
                    continue
                u = min(homes, key=lambda x: (work[x], x))
                work[u] += self.cost.ndp_expert_s(len(part))
                tasks.append(Task(u, e, 0, self.d_ff, part))
        return Plan(step.layer, tuple(tasks))

    def observe(self, step: StepInput) -> None:
        load = np.zeros(self.cfg.model.num_experts)
        for e, toks in step.routed.items():
            load[e] = len(toks)
        win = self.windows[step.layer]
        win.append(load)
        self.steps[step.layer] += 1
        if self.redundant and self.steps[step.layer] % self.period == 0:
            self.units[step.layer] = replicate_and_pack(np.sum(win, axis=0), self.num_units,
                                                        self.redundant)
