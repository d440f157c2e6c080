"""Prefetcher ``expertflow`` (a neighbour of the paper, PAPER.md): routing-path prediction from
transition counts learned online, with an adaptive prefetch horizon and an LRU cache. Pure:
no Ray, no zmq, no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cluster.core.knobs import Knobs
from policies.neighbours import propagate, top_scored, transition_counts
from policies.prefetch import Key, PrefetchContext, Prefetcher
from policies.registry import register


@dataclass(frozen=True)
class ExpertFlowKnobs(Knobs):
    """``expertflow``'s bound on its adaptive prefetch horizon (layers)."""

    expertflow_max_horizon: int = 4

    def __post_init__(self) -> None:
        self.integers("expertflow_max_horizon")


@register("prefetcher", "expertflow", knobs=ExpertFlowKnobs)
class ExpertFlow(Prefetcher):
    """ExpertFlow: predict routing paths from learned transitions; adaptive horizon, LRU cache.

    Two transition tables of counts, ``[layers, E, E]`` each, learned online from what the
    system has seen (the prefill's per-token routing, then every decode step; never the
    future): *depth* (expert a at layer l, then b at layer l+1, same token) and *next token*
    (a at layer l, then b at layer l for the next token). After each decode step of layer l
    it predicts every position up to ``h`` layers ahead not yet predicted: deeper layers of
    this token by chaining the depth tables from the experts just routed, layers of the next
    token from this token's experts at that layer through the next-token table; a deeper
    layer of this token takes the better of both sources (max-product scores,
    :func:`propagate`). The ``min(experts, batch * top_k)`` best-scored experts of a
    position are fetched in the background, soonest position first. The horizon ``h``
    starts at 1 and adapts once per token from the recall of that token's predictions:
    + 1 (up to ``policy.expertflow_max_horizon`` and the layer count) at ``GROW_AT`` or more,
    - 1 (down to 1) below ``SHRINK_AT``. The cache is LRU over the whole budget: experts used
    are touched, experts fetched on demand are admitted, and the least recently used key is
    evicted, never one predicted for a position still to come. A key fetched on a guess
    that proves wrong at its position is dropped again (its fetch cancelled if still
    queued): kept, stale guesses would queue ahead of fresh ones on the background link.

    Modelled: path prediction from online statistics, the horizon trade-off (further ahead
    gives transfers more time but predicts worse), LRU reuse. Simplified: a count-based
    Markov predictor stands in for ExpertFlow's learned routing-path predictor; at batch > 1
    decode transitions are learned between the union sets of a step (exact at batch 1); no
    token re-batching (ExpertFlow's token scheduling).
    """

    needs_prefill_routing = True
    GROW_AT = 0.5
    SHRINK_AT = 0.25

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        L, E = self.num_layers, cfg.model.num_experts
        self.E = E
        # transition counts and their source occurrences, per layer
        self.depth = np.zeros((L, E, E))  # depth[l]: layer l -> l + 1 (depth[L-1] unused)
        self.depth_occ = np.zeros((L, E))
        self.next_tok = np.zeros((L, E, E))
        self.next_occ = np.zeros((L, E))
        self.max_h = max(1, min(self.knobs.expertflow_max_horizon, L))
        self.h = 1
        self.m = min(E, cfg.workload.batch_size * cfg.model.top_k)
        self.last_pos = (cfg.workload.output_tokens - 1) * L - 1  # last decode position
        self.sets: list[list[int]] = [[] for _ in range(L)]  # latest token's experts per layer
        self.latest = -1  # position of the latest observed step (-1: the prompt's last token)
        self.frontier = -1  # furthest position predicted
        self.pending: dict[int, set[int]] = {}  # position -> predicted experts
        self.speculative: dict[int, list[Key]] = {}  # position -> keys fetched for it alone
        self.hits = self.seen = 0
        self.horizons: list[int] = []  # h after each token, for inspection

    # learning -------------------------------------------------------------------------------
    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        ctx = self.ctx
        if ctx.prefill_ids is None:
            raise ValueError("the expertflow prefetcher needs the prefill's routing")
        L = self.num_layers
        ids = ctx.prefill_ids  # [B * P, L, k]
        B = ctx.cfg.workload.batch_size
        seqs = ids.reshape(B, -1, L, ids.shape[-1])
        for lay in range(L):
            if lay + 1 < L:
                self._count(self.depth, self.depth_occ, lay, ids[:, lay], ids[:, lay + 1])
            self._count(self.next_tok, self.next_occ, lay,
                        seqs[:, :-1, lay].reshape(-1, ids.shape[-1]),
                        seqs[:, 1:, lay].reshape(-1, ids.shape[-1]))
            self.sets[lay] = sorted({int(e) for e in seqs[:, -1, lay].ravel()})
        return self._predict_ahead(-1)

    def _count(self, counts: np.ndarray, occ: np.ndarray, layer: int, src: np.ndarray,
               dst: np.ndarray) -> None:
        counts[layer] += transition_counts(src, dst, self.E)
        occ[layer] += np.bincount(src.ravel(), minlength=self.E)

    def _learn(self, pos: int, experts: list[int]) -> None:
        L = self.num_layers
        layer = pos % L
        cur = np.asarray(experts, dtype=np.int64)[None, :]
        if layer > 0 and self.latest == pos - 1 and self.sets[layer - 1]:
            prev = np.asarray(self.sets[layer - 1], dtype=np.int64)[None, :]
            self._count(self.depth, self.depth_occ, layer - 1, prev, cur)
        if self.sets[layer]:
            before = np.asarray(self.sets[layer], dtype=np.int64)[None, :]
            self._count(self.next_tok, self.next_occ, layer, before, cur)
        self.sets[layer] = experts
        self.latest = pos

    # prediction -----------------------------------------------------------------------------
    def predict(self, pos: int) -> list[int]:
        """Experts expected at decode position ``pos`` (``step * L + layer``), best first."""
        L = self.num_layers
        step, layer = divmod(pos, L)
        cur_step, cur_layer = divmod(self.latest, L)
        # sets[layer] holds the experts of the latest token that reached ``layer``: the
        # previous token for a deeper layer of this one, this token for the next token's
        p = propagate(self.sets[layer], [(self.next_tok[layer], self.next_occ[layer])], self.E)
        if step == cur_step and layer > cur_layer:  # or the path down from this token
            hops = [(self.depth[j], self.depth_occ[j]) for j in range(cur_layer, layer)]
            p = np.maximum(p, propagate(self.sets[cur_layer], hops, self.E))
        return top_scored(p, self.m)

    def _protected(self, after: int) -> set[Key]:
        L = self.num_layers
        return {(q % L, e) for q, es in self.pending.items() if q > after for e in es}

    def _make_room(self, protect: set[Key]) -> bool:
        if not self.cache.full:
            return True
        for key in self.cache:  # least recently used first
            if key not in protect:
                self.cache.remove(key)
                return True
        return False

    def _predict_ahead(self, pos: int) -> list[Key]:
        out: list[Key] = []
        L = self.num_layers
        first = max(self.frontier + 1, pos + 1)
        for q in range(first, min(pos + self.h, self.last_pos) + 1):
            named = self.predict(q)
            self.pending[q] = set(named)
            protect = self._protected(pos)
            for e in named:
                key = (q % L, e)
                if key in self.cache:
                    self.cache.touch(key)
                elif self.cache.capacity and self._make_room(protect):
                    self.cache.add(key)
                    out.append(key)
                    self.speculative.setdefault(q, []).append(key)
            self.frontier = q
        return out

    def after_step(self, layer: int, step: int, routed: Mapping[int, int],
                   fetched: Iterable[int]) -> list[Key]:
        L = self.num_layers
        pos = step * L + layer
        experts = sorted(routed)
        predicted = self.pending.pop(pos, None)
        if predicted is not None and experts:
            self.hits += len(predicted.intersection(experts))
            self.seen += len(experts)
        self._learn(pos, experts)
        for e in experts:
            if (layer, e) in self.cache:
                self.cache.touch((layer, e))
        protect = self._protected(pos)
        for key in self.speculative.pop(pos, ()):  # wrong guesses go (and stop clogging the link)
            if key[1] not in routed and key in self.cache and key not in protect:
                self.cache.remove(key)
        for e in fetched:  # on demand, already on the GPU: LRU admission
            key = (layer, e)
            if key not in self.cache and self.cache.capacity and self._make_room(protect):
                self.cache.add(key)
        if layer == L - 1:
            if self.seen:
                recall = self.hits / self.seen
                if recall >= self.GROW_AT:
                    self.h = min(self.h + 1, self.max_h)
                elif recall < self.SHRINK_AT:
                    self.h = max(1, self.h - 1)
            self.hits = self.seen = 0
            self.horizons.append(self.h)
        return self._predict_ahead(pos)
