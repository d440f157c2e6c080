"""Prefetcher ``prefill-freq-refresh`` (beyond the paper): ``prefill-freq`` whose cache is
refreshed from decode counts every few tokens; ``paper-refresh`` pairs it with ``tp-lb``. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cluster.core.knobs import Knobs
from policies.prefetch import Key, PrefetchContext, PrefillFrequency
from policies.registry import register


@dataclass(frozen=True)
class RefreshKnobs(Knobs):
    """``prefill-freq-refresh``: at most ``refresh_max_swaps`` experts brought in every
    ``refresh_period_steps`` decode tokens."""

    refresh_period_steps: int = 32
    refresh_max_swaps: int = 16

    def __post_init__(self) -> None:
        self.integers("refresh_period_steps")
        self.integers("refresh_max_swaps", minimum=0)


@register("prefetcher", "prefill-freq-refresh", knobs=RefreshKnobs)
class PrefillFreqRefresh(PrefillFrequency):
    """prefill-freq, refreshed from decode counts every few tokens (beyond the paper).

    Starts exactly like ``prefill-freq``. Every ``policy.refresh_period_steps`` decode tokens
    it compares cumulative decode activation counts: free cache slots take the most used
    uncached experts, then the most used uncached expert replaces the least used cached one
    while it has been used at least ``MARGIN`` times more (ties: prefill counts, then layer
    and expert). At most ``policy.refresh_max_swaps`` experts are brought in per refresh,
    fetched in the background in layer order; an evicted expert stops serving at once.

    Modelled: the prompt's hot set drifting during a long generation, at the cost of extra
    background link traffic. Simplified: counts are cumulative since the first decode token
    (no decay window); the decision ignores when a fetch would arrive.
    """

    MARGIN = 2

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        shape = (cfg.model.num_layers, cfg.model.num_experts)
        self.decode = np.zeros(shape, dtype=np.int64)
        self.prefill = np.zeros(shape, dtype=np.int64)
        self.period = self.knobs.refresh_period_steps
        self.max_swaps = self.knobs.refresh_max_swaps
        self.swaps = 0  # experts brought in by refreshes, over the run

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        self.prefill = np.asarray(counts, dtype=np.int64).copy()
        return super().after_prefill(counts)

    def after_step(self, layer: int, step: int, routed: Mapping[int, int],
                   fetched: Iterable[int]) -> list[Key]:
        for e, n in routed.items():
            self.decode[layer, e] += n
        if layer != self.num_layers - 1 or (step + 1) % self.period:
            return []
        return self.refresh()

    def refresh(self) -> list[Key]:
        """Swaps per the class docstring; returns the keys to fetch, in layer order."""
        dec, pre, cache = self.decode, self.prefill, self.cache
        if self.max_swaps == 0 or cache.capacity == 0:
            return []
        used = np.argwhere(dec > 0)
        cands = sorted((k for k in ((int(a), int(b)) for a, b in used) if k not in cache),
                       key=lambda k: (-dec[k], -pre[k], k))
        victims = sorted(cache, key=lambda k: (dec[k], pre[k], k))
        out: list[Key] = []
        vi = 0
        for key in cands:
            if len(out) >= self.max_swaps:
                break
            if not cache.full:
                cache.add(key)
                out.append(key)
                continue
            if vi >= len(victims) or dec[key] < dec[victims[vi]] + self.MARGIN:
                break  # candidates only get colder and victims hotter from here
            cache.remove(victims[vi])
            vi += 1
            cache.add(key)
            out.append(key)
        self.swaps += len(out)
        return sorted(out)
