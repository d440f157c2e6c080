"""The paper's neighbours as policies, and one improvement beyond it (PAPER.md, issue 4).

Registered here:

- scheduler ``monde-tp``: MoNDE's per-expert hot/cold rule with cold experts tensor-parallel
  over every NDP unit (how ``context-aware``'s NDP side runs on our DIMMs);
- prefetcher ``context-aware`` (arXiv 2512.04476): pins the prompt's hot experts, scored from
  prefill activation counts and router gate weights, with reduced bit-width NDP experts;
- prefetcher ``od-moe``: cacheless on-demand loading driven by a next-layers predictor of
  configurable recall and look-ahead;
- prefetcher ``expertflow``: routing-path prediction from transition counts learned online,
  with an adaptive prefetch horizon and an LRU cache;
- prefetcher ``prefill-freq-refresh``: ``prefill-freq`` whose cache is refreshed from decode
  counts every few tokens (beyond the paper; measured against ``paper``).

The named combinations (``context-aware``, ``od-moe``, ``expertflow``, ``paper-refresh``) are
registered in :mod:`policies`. Pure code: no Ray, no zmq, no clock, no I/O; randomness comes
from a ``numpy.random.Generator`` seeded from the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cluster.core.spec import Knobs
from policies.plan import ALL_UNITS, Task, tp_bounds
from policies.prefetch import Key, PrefetchContext, Prefetcher, PrefillFrequency
from policies.registry import register
from policies.schedulers import MoNDE

# --- pure helpers -----------------------------------------------------------------------------

def gate_sums(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """Summed router gate weight per expert and layer.

    ``ids``, ``weights``: ``[tokens, layers, k]``. Returns ``[layers, experts]`` float64.
    """
    L = ids.shape[1]
    flat = (np.arange(L)[None, :, None] * num_experts + ids).ravel()
    out = np.bincount(flat, weights=weights.ravel().astype(np.float64), minlength=L * num_experts)
    return out.reshape(L, num_experts)


def context_scores(counts: np.ndarray, gates: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * count share + (1 - alpha) * gate-weight share`` per layer.

    ``counts``, ``gates``: ``[layers, experts]``. Each term is normalised to sum to 1 over a
    layer's experts (counts sum to ``tokens * k``, gate weights to ``tokens``), so the two are
    on one scale and scores of different layers compare: a score is the share of its layer's
    expert traffic an expert is expected to take. Returns ``[layers, experts]``.
    """
    def share(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        tot = x.sum(axis=1, keepdims=True)
        return np.divide(x, tot, out=np.zeros_like(x), where=tot > 0)

    return alpha * share(counts) + (1 - alpha) * share(gates)


def transition_counts(src: np.ndarray, dst: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-occurrence counts of ``src`` experts followed by ``dst`` experts.

    ``src``: ``[n, k]``, ``dst``: ``[n, k2]`` (row i of one precedes row i of the other: the
    same token one layer deeper, or the next token at the same layer). Returns ``[E, E]``:
    ``out[a, b]`` = rows with ``a`` in ``src`` and ``b`` in ``dst``.
    """
    E = num_experts
    if src.size == 0 or dst.size == 0:
        return np.zeros((E, E))
    flat = (src[:, :, None] * E + dst[:, None, :]).ravel()
    return np.bincount(flat, minlength=E * E).reshape(E, E).astype(np.float64)


def propagate(experts: Iterable[int], hops: list[tuple[np.ndarray, np.ndarray]],
              num_experts: int) -> np.ndarray:
    """Score of each expert after following ``hops`` from ``experts``: its likeliest path.

    Each hop is ``(counts [E, E], occurrences [E])`` from :func:`transition_counts` and the
    source occurrences, so ``counts[a, b] / occurrences[a]`` estimates P(b next | a now). The
    score of b is ``max_a score(a) * P(b | a)`` (max-product, like Viterbi): one strong link
    (an expert a token keeps) is neither diluted by the other k - 1 sources, as an average
    would, nor outvoted by experts that are merely popular under all of them, as a noisy OR
    would. Rows never seen contribute nothing. Returns ``[E]`` in 0..1.
    """
    v = np.zeros(num_experts)
    v[list(experts)] = 1.0
    for counts, occ in hops:
        nz = np.flatnonzero((v > 0) & (occ > 0))
        if nz.size == 0:
            return np.zeros(num_experts)
        v = (v[nz, None] * np.minimum(counts[nz] / occ[nz, None], 1.0)).max(axis=0)
    return v


def top_scored(scores: np.ndarray, m: int) -> list[int]:
    """The ``m`` highest-scoring experts with a score > 0 (ties: lower id first)."""
    order = np.lexsort((np.arange(scores.size), -scores))[:m]
    return [int(e) for e in order if scores[e] > 0]


# --- schedulers -------------------------------------------------------------------------------

@register("scheduler", "monde-tp")
class MondeTensorParallel(MoNDE):
    """MoNDE's hot/cold rule with cold experts tensor-parallel over all NDP units.

    Cached (pinned) experts run on the GPU. Per other expert, with its routed token count n:
    hot iff ``fetch_s + gpu_expert_s(n)`` beats its NDP time, its widest ``d_ff`` slice on one
    unit ``ndp_expert_s(n, widest / d_ff)``; hot experts are fetched on demand (at most
    ``fetch_buffer_experts``, most tokens first) and run on the GPU, cold ones run split over
    every unit, GPU and NDP overlapping. Modelled: the step rule of ``context-aware``, whose
    single CXL-NDP device runs each cold expert with all its internal bandwidth, which on
    DIMMs is a tensor-parallel split. Simplified: like ``monde``, the rule is per expert and
    ignores link contention between hot experts and the load already on the NDP side (the
    makespan-minimising version of this split is ``tp-lb``).
    """

    def __init__(self, cfg, cost) -> None:
        super().__init__(cfg, cost)
        self.bounds = [b for b in tp_bounds(self.d_ff, self.num_units) if b[1] > b[0]]
        self.widest = max(hi - lo for lo, hi in self.bounds) / self.d_ff

    def ndp_time_s(self, n: int) -> float:
        return self.cost.ndp_expert_s(n, self.widest)

    def cold_tasks(self, e: int, toks: tuple[int, ...]) -> list[Task]:
        return [Task(ALL_UNITS, e, 0, self.d_ff, toks)]


# --- prefetchers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContextAwareKnobs(Knobs):
    """``context-aware``'s knobs: ``context_alpha`` weighs prefill activation counts against
    summed router gate weights; ``ndp_weight_bits`` is the bit-width of its NDP-side expert
    weights (16: fp16, no change)."""

    context_alpha: float = 0.5
    ndp_weight_bits: int = 16

    def __post_init__(self) -> None:
        self.fractions("context_alpha")
        b = self.ndp_weight_bits
        self.check("ndp_weight_bits", isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 16,
                   "an integer in 1..16 (16: fp16)")


@register("prefetcher", "context-aware", knobs=ContextAwareKnobs)
class ContextAware(Prefetcher):
    """Context-aware (arXiv 2512.04476): pin the prompt's hot experts by count and gate score.

    After prefill every ``(layer, expert)`` gets ``policy.context_alpha * count share +
    (1 - context_alpha) * gate-weight share`` of its layer over the prompt's tokens
    (:func:`context_scores`); the highest scores are pinned in the GPU cache up to its budget,
    fetched in layer order in the background, and stay pinned for the whole request. The
    budget is spread over layers by **global rank** of those per-layer shares: a layer whose
    traffic concentrates on few experts gets more slots, which maximises the expected share
    of decode traffic served from the GPU if prefill shares predict decode shares. The
    experts left on the NDP side are stored at ``policy.ndp_weight_bits`` (the engines build
    this policy's cost model with their weight bytes scaled by ``bits / 16``; see
    :func:`policies.build.policy_cost_config`).

    Modelled: prefill statistics (activation counts and router scores) pin hot experts in
    GPU memory; cold experts run in place on the NDP side at reduced bit-width; GPU and NDP
    overlap. Simplified: one bit-width for every NDP expert (the paper allocates 1-4 bits per
    expert from prefill statistics, under a precision budget); quantisation changes no
    numbers of the emulated forward pass (only bytes, hence time); no dequantisation cost on
    the NDP unit; pinning is static per request (no re-pinning during decode); the GPU's
    copies of pinned experts are fp16.
    """

    needs_prefill_routing = True
    uses_ndp_weight_bits = True

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        ctx = self.ctx
        if ctx.prefill_ids is None or ctx.prefill_weights is None:
            raise ValueError("the context-aware prefetcher needs the prefill's routing")
        gates = gate_sums(ctx.prefill_ids, ctx.prefill_weights, counts.shape[1])
        return self._fill_by_rank(context_scores(counts, gates, self.knobs.context_alpha))


@dataclass(frozen=True)
class OdMoeKnobs(Knobs):
    """``od-moe``'s predictor: the share ``odmoe_recall`` of truly active experts it names,
    ``odmoe_lookahead`` layers ahead."""

    odmoe_recall: float = 0.85
    odmoe_lookahead: int = 1

    def __post_init__(self) -> None:
        self.fractions("odmoe_recall")
        self.integers("odmoe_lookahead")


@register("prefetcher", "od-moe", knobs=OdMoeKnobs)
class OdMoe(Prefetcher):
    """OD-MoE: cacheless on-demand loading of the experts a predictor expects a few layers ahead.

    After the prefill, and after each decode step of layer l, the predictor names the
    experts of the position ``policy.odmoe_lookahead`` layers ahead (wrapping into the next
    token past the last layer; the look-ahead is capped at the number of layers) and they are
    fetched in the background, soonest first. The cache holds only such predictions, at most
    look-ahead x ``min(experts, batch * top_k)`` of them within the cache budget; a layer's
    keys are evicted as soon as its step has run (fetches still queued for it are cancelled).
    Experts that were mispredicted or arrive late are handled by the scheduler (``tp-lb``:
    fetched on demand or run on the NDP units, whichever gives the smaller makespan).

    Modelled: the predictor's accuracy as a knob. It reads the true future routing (as
    ``oracle`` does) and names each truly active expert with probability ``policy.odmoe_recall``,
    replacing each miss with a wrongly guessed expert, so it always names as many experts as
    will be active (precision = recall in expectation) and mispredictions cost link
    bandwidth. Draws come from a generator seeded from ``workload.seed``: deterministic.
    Simplified: no real predictor (OD-MoE's shadow model is not run); misses are independent
    per expert; wrong guesses are uniform over the inactive experts.
    """

    needs_future = True

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        if ctx.future is None:
            raise ValueError("the od-moe prefetcher needs the future routing (its predictor's truth)")
        cfg = ctx.cfg
        self.E = cfg.model.num_experts
        self.recall = self.knobs.odmoe_recall
        self.lookahead = min(self.knobs.odmoe_lookahead, self.num_layers)
        per_layer = min(self.E, cfg.workload.batch_size * cfg.model.top_k)
        self.budget = min(self.cache.capacity, self.lookahead * per_layer)
        self.rng = np.random.default_rng([cfg.workload.seed, 0x0D3E])

    def predict(self, step: int, layer: int) -> list[int]:
        """The predictor's experts for decode ``step`` at ``layer`` (ascending ids)."""
        true = sorted(self.ctx.future[step][layer])  # type: ignore[index]
        keep = self.rng.random(len(true)) < self.recall
        named = [e for e, k in zip(true, keep) if k]
        misses = len(true) - len(named)
        if misses:
            idle = np.ones(self.E, dtype=bool)
            idle[true] = False
            wrong = np.flatnonzero(idle)
            named += self.rng.choice(wrong, size=min(misses, wrong.size), replace=False).tolist()
        return sorted(int(e) for e in named)

    def _issue(self, pos: int) -> list[Key]:
        step, layer = divmod(pos, self.num_layers)
        if step >= len(self.ctx.future):  # type: ignore[arg-type]
            return []
        out: list[Key] = []
        for e in self.predict(step, layer):
            key = (layer, e)
            if key in self.cache or len(self.cache) >= self.budget:
                continue
            self.cache.add(key)
            out.append(key)
        return out

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        return [k for pos in range(self.lookahead) for k in self._issue(pos)]

    def after_step(self, layer: int, step: int, routed: Mapping[int, int],
                   fetched: Iterable[int]) -> list[Key]:
        for key in [k for k in self.cache if k[0] == layer]:  # this layer has passed
            self.cache.remove(key)
        return self._issue(step * self.num_layers + layer + self.lookahead)


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
