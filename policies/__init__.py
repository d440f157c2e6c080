"""Scheduling policies: pure code over plain data (no Ray, no zmq, no clock, no I/O).

Importing this package registers every scheduler, prefetcher and named combination:

- schedulers: ``ep``, ``monde``, ``tp``, ``tp-lb``, ``eplb``
- prefetchers: ``none``, ``lru``, ``lfu``, ``profiled``, ``oracle``, ``prefill-freq``
- combinations: ``paper`` = ``tp-lb`` + ``prefill-freq``
"""

from policies import eplb, prefetch, schedulers  # noqa: F401  (registration side effects)
from policies.base import Scheduler, StepInput, tp_bounds
from policies.plan import ALL_UNITS, GPU, Fetch, Plan, StepTiming, Task, lower_bound_s, time_plan
from policies.prefetch import ExpertCache, PrefetchContext, Prefetcher
from policies.registry import (
    PolicyChoice,
    all_policy_names,
    combos,
    describe,
    get,
    names,
    register,
    register_combo,
    resolve,
)

register_combo("paper", "tp-lb", "prefill-freq",
               "The paper's framework: tp-lb scheduling + prefill-freq dataset-free prefetch")

__all__ = [
    "ALL_UNITS", "GPU", "ExpertCache", "Fetch", "Plan", "PolicyChoice", "PrefetchContext", "Prefetcher",
    "Scheduler", "StepInput", "StepTiming", "Task", "all_policy_names", "combos", "describe",
    "get", "lower_bound_s", "names", "register", "register_combo", "resolve", "time_plan",
    "tp_bounds",
]
