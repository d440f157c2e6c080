"""Which experts tokens chose: the :class:`Routing` record of a run, grouping a step's tokens by
expert, and the expert-popularity laws the synthetic sources draw from. Pure numpy.

Where a routing comes from (synthetic, presets, a trace, a real gate) is
:mod:`cluster.core.routing`; this module sits below it and below :mod:`cluster.core.reference`,
which both build :class:`Routing` records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cluster.core.spec import ModelSpec


@dataclass(frozen=True)
class Routing:
    """Routing of a whole run. Token ids inside a step: prefill ``b * P + p``, decode ``b``."""

    topk_ids: np.ndarray  # int32 [B, S, L, k]
    topk_weights: np.ndarray  # float32 [B, S, L, k]
    prompt_tokens: int
    source: str = "synthetic"

    @property
    def batch(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk_ids.shape[2]

    @property
    def decode_steps(self) -> int:
        return self.topk_ids.shape[1] - self.prompt_tokens

    def prefill_ids(self, layer: int) -> np.ndarray:
        """[B * P, k] experts of every prompt token at ``layer``."""
        ids = self.topk_ids[:, : self.prompt_tokens, layer]
        return ids.reshape(-1, ids.shape[-1])

    def decode_ids(self, step: int, layer: int) -> np.ndarray:
        """[B, k] experts of decode step ``step`` (0-based) at ``layer``."""
        return self.topk_ids[:, self.prompt_tokens + step, layer]

    def prefill_counts(self, num_experts: int) -> np.ndarray:
        """[L, E] activation counts of the prefill."""
        L = self.num_layers
        out = np.zeros((L, num_experts), dtype=np.int64)
        for lay in range(L):
            out[lay] = np.bincount(self.prefill_ids(lay).ravel(), minlength=num_experts)
        return out


def group_by_expert(ids: np.ndarray) -> dict[int, tuple[int, ...]]:
    """``ids[tokens, k]`` -> ``{expert: (token ids ascending)}`` for the active experts."""
    if ids.shape[0] == 1:  # the batch-1 decode fast path
        return {int(e): (0,) for e in sorted(ids[0].tolist())}
    tokens = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    flat = ids.ravel()
    order = np.lexsort((tokens, flat))
    flat, toks = flat[order], tokens[order].tolist()
    cuts = (np.flatnonzero(np.diff(flat)) + 1).tolist()
    experts = flat[[0, *cuts]].tolist() if toks else []
    ends = [*cuts, len(toks)]
    return {e: tuple(toks[a:b]) for e, a, b in zip(experts, [0, *cuts], ends)}


def decode_groups(routing: Routing) -> Callable[[int, int], dict[int, tuple[int, ...]]]:
    """``groups(step, layer)``: :func:`group_by_expert` of ``routing.decode_ids(step, layer)``.

    At batch 1 the whole decode is sorted once and each step's dict built from plain lists
    (the same dict, without numpy calls per step); otherwise it is :func:`group_by_expert`.
    """
    if routing.batch != 1:
        return lambda step, layer: group_by_expert(routing.decode_ids(step, layer))
    rows = np.sort(routing.topk_ids[0, routing.prompt_tokens:], axis=-1).tolist()
    return lambda step, layer: dict.fromkeys(rows[step][layer], (0,))


def ranked_popularity(num_experts: int, alpha: float, shape: str = "zipf") -> np.ndarray:
    """Probabilities by rank, most popular first. ``zipf``: ``p_r ~ 1 / r ** alpha``;
    ``lognormal``: ``log p_r ~ alpha * z_r`` with ``z_r`` the standard normal quantile of rank
    ``r`` (a lighter head and a thinner tail than Zipf: a limited set of experts shares
    the traffic more evenly and the rest are almost never chosen)."""
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    if shape == "zipf":
        p = ranks ** -alpha
    elif shape == "exponential":
        p = np.exp(-alpha * (ranks - 1) / num_experts)
    else:
        from statistics import NormalDist

        nd = NormalDist()
        z = np.array([nd.inv_cdf((num_experts - r + 0.5) / num_experts) for r in ranks])
        p = np.exp(alpha * (z - z.max()))
    return p / p.sum()


def zipf_popularity(num_experts: int, alpha: float, rng: np.random.Generator,
                    shape: str = "zipf") -> np.ndarray:
    """Zipf probabilities over a random order of experts: ``p[perm[r]] ~ 1 / (r + 1) ** alpha``
    (or another ``shape`` of :func:`ranked_popularity`)."""
    p = ranked_popularity(num_experts, alpha, shape)
    out = np.empty(num_experts)
    out[rng.permutation(num_experts)] = p
    return out


def popularity(model: ModelSpec, alpha: float, domain_seed: int, shape: str = "zipf") -> np.ndarray:
    """[L, E] per-layer Zipf popularity; ``domain_seed`` fixes which experts are popular."""
    rng = np.random.default_rng([domain_seed, 0x5EED])
    return np.stack([zipf_popularity(model.num_experts, alpha, rng, shape)
                     for _ in range(model.num_layers)])
