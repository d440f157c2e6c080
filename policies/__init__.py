"""Scheduling policies: pure code over plain data (no Ray, no zmq, no clock, no I/O).

Importing this package registers every scheduler, prefetcher and named combination:

- schedulers: ``ep``, ``monde``, ``tp``, ``tp-lb``, ``eplb``, ``monde-tp``
- prefetchers: ``none``, ``lru``, ``lfu``, ``profiled``, ``oracle``, ``prefill-freq``, and
  (:mod:`policies.neighbours`) ``context-aware``, ``od-moe``, (:mod:`policies.expertflow`)
  ``expertflow``, (:mod:`policies.refresh`) ``prefill-freq-refresh``, (:mod:`policies.drift`)
  ``decayed-freq``
- combinations: ``paper`` = ``tp-lb`` + ``prefill-freq``; the neighbours ``context-aware``,
  ``od-moe``, ``expertflow``; ``paper-refresh`` and ``paper-drift`` (beyond the paper)

How to add a policy (one file plus a registration; ``tests/test_add_a_policy.py`` follows
this recipe):

1. In ``policies/my_policy.py`` subclass :class:`Scheduler` (implement ``plan(step) ->
   Plan``) or :class:`Prefetcher` (``preload`` / ``after_prefill`` / ``after_step`` return
   the keys to fetch).
2. Its settings, if any: a frozen dataclass subclassing :class:`Knobs` (from
   ``cluster.core.knobs``), fields with defaults and names no other policy uses (prefix
   them: ``my_``), checked in ``__post_init__`` with ``self.integers`` /
   ``self.fractions`` / ``self.check`` (errors name the field, the value, what is allowed).
3. Register both: ``@register("scheduler", "my-policy", knobs=MyKnobs)``. The policy reads
   ``self.knobs.my_field``; users set ``--set policy.my_field=3`` or ``[policy] my_field = 3``.
4. Import the module here, after the others (registration runs on import; the order is
   the knobs' order in ``config.json``); optionally name a pair with :func:`register_combo`.
   Run it: ``ndpmoe run --engine analytic --policies my-policy``.
"""

# Registration side effects, in this order: it is the order of the policies' knobs in the
# config's policy section (Config.to_dict(), config.json).
# isort: off
from policies import schedulers  # noqa: F401
from policies import eplb  # noqa: F401
from policies import prefetch  # noqa: F401
from policies import neighbours  # noqa: F401
from policies import expertflow  # noqa: F401
from policies import refresh  # noqa: F401
from policies import drift  # noqa: F401
# isort: on
from cluster.core.knobs import Knobs
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
    unregister,
)

register_combo("paper", "tp-lb", "prefill-freq",
               "The paper's framework: tp-lb scheduling + prefill-freq dataset-free prefetch")
register_combo("context-aware", "monde-tp", "context-aware",
               "Context-aware GPU-NDP (arXiv 2512.04476): prefill-scored hot experts pinned on "
               "the GPU, cold ones on NDP at policy.ndp_weight_bits")
register_combo("od-moe", "tp-lb", "od-moe",
               "OD-MoE: cacheless on-demand loading of the experts predicted a few layers ahead")
register_combo("expertflow", "tp-lb", "expertflow",
               "ExpertFlow: routing-path prediction, adaptive prefetch horizon, LRU cache")
register_combo("paper-refresh", "tp-lb", "prefill-freq-refresh",
               "Beyond the paper: paper with its prefetch set refreshed from decode counts")
register_combo("paper-drift", "tp-lb", "decayed-freq",
               "Beyond the paper: paper re-ranked by a decayed decode activation rate, one swap "
               "per step in the link's idle time (for routing that drifts)")

__all__ = [
    "ALL_UNITS", "GPU", "ExpertCache", "Fetch", "Knobs", "Plan", "PolicyChoice", "PrefetchContext",
    "Prefetcher", "Scheduler", "StepInput", "StepTiming", "Task", "all_policy_names", "combos",
    "describe", "get", "lower_bound_s", "names", "register", "register_combo", "resolve",
    "time_plan", "tp_bounds", "unregister",
]
