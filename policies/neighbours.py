"""The paper's neighbours as policies, and one improvement beyond it (PAPER.md, issue 4).

Registered here:

- scheduler ``monde-tp``: MoNDE's per-expert hot/cold rule with cold experts tensor-parallel
  over every NDP unit (how ``context-aware``'s NDP side runs on our DIMMs);
- prefetcher ``context-aware`` (arXiv 2512.04476): pins the prompt's hot experts, scored from
  prefill activation counts and router gate weights, with reduced bit-width NDP experts;
- prefetcher ``od-moe``: cacheless on-demand loading driven by a next-layers predictor of
  configurable recall and look-ahead;
- (:mod:`policies.expertflow`) prefetcher ``expertflow``: routing-path prediction from
  transition counts learned online, with an adaptive prefetch horizon and an LRU cache;
- (:mod:`policies.refresh`) prefetcher ``prefill-freq-refresh``: ``prefill-freq`` whose cache
  is refreshed from decode counts every few tokens (beyond the paper; measured against ``paper``).

The named combinations (``context-aware``, ``od-moe``, ``expertflow``, ``paper-refresh``) are
registered in :mod:`policies`. Pure code: no Ray, no zmq, no clock, no I/O; randomness comes
from a ``numpy.random.Generator`` seeded from the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from cluster.core.knobs import Knobs
from policies.plan import ALL_UNITS, Task, tp_bounds
from policies.prefetch import Key, PrefetchContext, Prefetcher
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
