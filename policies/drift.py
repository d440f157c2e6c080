"""A prefetcher for routing that drifts away from the prompt's (beyond the paper, issue 14).

Registered here: prefetcher ``decayed-freq``; the combination ``paper-drift`` (``tp-lb`` +
``decayed-freq``) is registered in :mod:`policies`.

``prefill-freq`` trusts the prefill's counts for the whole generation. On real models the
decode's popular experts depart from the prompt's (on Qwen1.5-MoE the prefill's 10% most used
experts take only 13-16% of the decode's activations) and tokens repeat their predecessors'
experts. ``decayed-freq`` starts from the prefill's ranking and keeps re-ranking by an
exponentially decayed activation rate, swapping one expert at a time in the link's idle time.
Pure code: no Ray, no zmq, no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cluster.core.knobs import Knobs
from policies.prefetch import Key, PrefetchContext, PrefillFrequency
from policies.registry import register


@dataclass(frozen=True)
class DecayedFreqKnobs(Knobs):
    """``decayed-freq``'s knobs: the half-life of its decayed activation rates (tokens) and
    the margin, in standard errors, a swap must gain."""

    drift_half_life_tokens: float = 32.0
    drift_margin: float = 3.0

    def __post_init__(self) -> None:
        self.positive("drift_half_life_tokens")
        self.non_negative("drift_margin")


@register("prefetcher", "decayed-freq", knobs=DecayedFreqKnobs)
class DecayedFrequency(PrefillFrequency):
    """prefill-freq, then re-ranked by a decayed decode activation rate (beyond the paper).

    Each ``(layer, expert)`` has a score: its activation rate per token, starting at the
    prefill's (count / prompt tokens) and, after every decode step of its layer, moved
    towards what that step routed: ``score <- decay * score + (1 - decay) * tokens routed``,
    with ``decay = 2 ** (-1 / policy.drift_half_life_tokens)``. After the step of layer l, the
    highest-scored uncached expert of layer l replaces the lowest-scored cached expert of any
    layer when its score is higher by more than ``policy.drift_margin`` standard errors (the
    scores are rates over an effective window of ``(1 + decay) / (1 - decay)`` tokens,
    counted as Poisson: the difference's variance is the sum of the rates over the window;
    so the margin adapts to the model, a wide one for a few busy experts, a narrow one for
    many rare ones): at most one swap per MoE step, fetched in the
    background, so it arrives in the link's idle time before the layer's next step (one
    token later). Starts exactly like ``prefill-freq``; on stationary routing the margin keeps
    it from churning.

    Modelled: frequency (prefill) refreshed by recency (decode), an ARC-like trade between the
    two set by the half-life. Simplified: one swap per step whatever the link's load (the
    engine queues prefetches below every other traffic, so a busy link delays them, never
    the steps); the evicted expert stops serving at once, the new one when it lands.
    """

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        L, E = cfg.model.num_layers, cfg.model.num_experts
        self.score = np.zeros((L, E))
        self.cached = np.zeros((L, E), dtype=bool)
        self.decay = 2.0 ** (-1.0 / self.knobs.drift_half_life_tokens)
        # tokens an exponentially decayed average effectively counts: its variance is that of
        # a plain mean over (1 + decay) / (1 - decay) tokens
        self.window = (1.0 + self.decay) / (1.0 - self.decay)
        self.z = self.knobs.drift_margin
        self.swaps = 0
        # lowest-scored cached expert per layer: a layer's scores change only at its own step
        self.low = np.full(L, np.inf)
        self.low_at = np.zeros(L, dtype=np.int64)

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        P = max(1, self.ctx.cfg.workload.prompt_tokens)
        self.score = np.asarray(counts, dtype=np.float64) / P
        keys = super().after_prefill(counts)
        for lay, e in keys:
            self.cached[lay, e] = True
        for lay in range(self.num_layers):
            self._lowest(lay)
        return keys

    def _lowest(self, layer: int) -> None:
        row = np.where(self.cached[layer], self.score[layer], np.inf)
        e = int(np.argmin(row))
        self.low[layer], self.low_at[layer] = row[e], e

    def after_step(self, layer: int, step: int, routed: Mapping[int, int],
                   fetched: Iterable[int]) -> list[Key]:
        row = self.score[layer]
        row *= self.decay
        for e, n in routed.items():
            row[e] += (1.0 - self.decay) * n
        if self.cache.capacity == 0:
            return []
        self._lowest(layer)
        free = ~self.cached[layer]
        if not free.any():
            return []
        cand = int(np.argmax(np.where(free, row, -np.inf)))
        if not self.cache.full:
            return self._admit((layer, cand))
        vl = int(np.argmin(self.low))  # ties: lowest layer, then lowest expert
        worst = self.low[vl]
        gap = row[cand] - worst
        if gap <= 0 or gap * gap <= self.z * self.z * (row[cand] + worst) / self.window:
            return []
        vkey = (vl, int(self.low_at[vl]))
        self.cache.remove(vkey)
        self.cached[vkey] = False
        self._lowest(vl)
        return self._admit((layer, cand))

    def _admit(self, key: Key) -> list[Key]:
        self.cache.add(key)
        self.cached[key] = True
        self._lowest(key[0])
        self.swaps += 1
        return [key]
