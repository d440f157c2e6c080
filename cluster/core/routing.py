"""Routing sources: which experts each token picks at each MoE layer. Seeded, deterministic.

A :class:`Routing` holds ``topk_ids[batch, positions, layers, k]`` (int32) and
``topk_weights`` (float32, gate weights of the chosen experts, summing to 1 per token and
layer) for ``positions = prompt_tokens + output_tokens - 1``: the prompt's positions are the
prefill, every later position is one decode step (the first output token comes out of the
prefill).

Sources:

- ``synthetic``: each layer has a Zipf popularity ``p_i ~ 1 / rank_i ** alpha`` (or, with
  ``popularity = "lognormal"``, ``log p_i ~ alpha * normal quantile of rank_i``) over a seeded
  random order of its experts. A token samples k distinct experts from ``p`` (Gumbel top-k,
  i.e. sequential sampling without replacement); with probability ``reuse`` each expert of
  the previous token at that layer is kept (temporal locality). With ``drift_share`` > 0 the
  popular experts move over the tokens (:func:`drifting_log_popularity`): the Zipf shape stays,
  the order of the experts drifts by a stationary random walk per sequence and layer.
- ``qwen15-like``, ``qwen36-like``: ``synthetic`` with the parameters of
  :data:`cluster.core.spec.ROUTING_PRESETS`, calibrated to routing statistics of real models
  (:func:`effective_workload`; :mod:`cluster.core.routing_stats` measures and fits them).
- ``gate``: see :mod:`cluster.core.reference` (a real router matmul on real hidden states).
- ``trace``: an npz file with ``topk_ids`` ``[tokens, layers, k]`` or
  ``[sequences, positions, layers, k]`` and optionally ``topk_weights`` of the same shape.
  :func:`import_vllm_routed_experts` converts vLLM ``routed_experts`` arrays to it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from cluster.core.errors import RoutingError
from cluster.core.reference import gate_routing
from cluster.core.selection import Routing, popularity, ranked_popularity
from cluster.core.spec import ROUTING_PRESETS, Config, ModelSpec, WorkloadSpec


def effective_workload(work: WorkloadSpec) -> WorkloadSpec:
    """``work`` with a routing preset's generator parameters (``qwen15-like`` ...) filled in;
    any other workload unchanged."""
    preset = ROUTING_PRESETS.get(work.routing)
    if preset is None:
        return work
    return dataclasses.replace(work, routing="synthetic", **preset)


def domain_scores(pop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[L, E] standard-normal latent scores ordered like the popularity ``pop`` [L, E]: the
    most popular expert of a layer gets the largest of E sorted draws."""
    L, E = pop.shape
    z = -np.sort(-rng.standard_normal((L, E)), axis=1)  # descending per layer
    order = np.argsort(-pop, axis=1, kind="stable")
    out = np.empty((L, E))
    np.put_along_axis(out, order, z, axis=1)
    return out


class DriftingPopularity:
    """Per-token log-popularity ``[B, L, E]`` whose expert order drifts (issue 14).

    Latent score ``u = sqrt(1 - share) * domain + sqrt(share) * v``: ``domain`` is fixed
    (:func:`domain_scores`, ordered like the stationary Zipf popularity), ``v`` is each
    sequence's own, standard normal at the first position and an Ornstein-Uhlenbeck walk
    after it, ``v <- sqrt(1 - drift) * v + sqrt(drift) * noise`` per token (stationary:
    ``v`` stays standard normal, its correlation after ``n`` tokens is ``(1 - drift) **
    (n / 2)``), plus a one-off renewal of a share ``drift_jump`` of it at the first decode
    token. The expert of rank ``r`` by ``u`` gets the Zipf log-probability of rank
    ``r``, so the skew (``alpha``) never changes, only which experts carry it.
    """

    def __init__(self, logzipf: np.ndarray, domain: np.ndarray, batch: int, drift: float,
                 share: float, rng: np.random.Generator) -> None:
        self.logzipf = logzipf  # [E] by rank, descending
        self.domain = np.sqrt(1 - share) * domain[None]  # [1, L, E]
        self.rho, self.kick, self.w = np.sqrt(1 - drift), np.sqrt(drift), np.sqrt(share)
        self.rng = rng
        self.v = rng.standard_normal((batch, *domain.shape))
        self.ranks = np.broadcast_to(np.arange(domain.shape[1]), self.v.shape)

    def step(self, first: bool, jump: float = 0.0) -> np.ndarray:
        """Log-popularity of the next position ``[B, L, E]`` (``first``: the sequence's first).

        ``jump``: a further share of ``v``'s variance renewed at this position (the decode's
        first, where the generated text departs from the prompt)."""
        if not first and self.kick > 0:
            self.v = self.rho * self.v + self.kick * self.rng.standard_normal(self.v.shape)
        if jump > 0:
            self.v = np.sqrt(1 - jump) * self.v + np.sqrt(jump) * self.rng.standard_normal(self.v.shape)
        order = np.argsort(-(self.domain + self.w * self.v), axis=-1)
        rank = np.empty(self.v.shape, dtype=np.intp)
        np.put_along_axis(rank, order, self.ranks, axis=-1)
        return self.logzipf[rank]


def synthetic(model: ModelSpec, work: WorkloadSpec, rng: np.random.Generator,
              alpha: float | None = None, positions: int | None = None,
              domain_seed: int | None = None) -> Routing:
    """Per-layer Zipf popularity plus temporal reuse; see the module docstring.

    The popularity (which experts are hot) comes from ``domain_seed`` (default: the workload
    seed); the token-by-token draws from ``rng``. Two traces with one domain seed and two
    ``rng`` seeds are two samples of one distribution. With ``work.drift_share`` > 0 the
    order of the experts drifts (:class:`DriftingPopularity`, its walk drawn from a generator
    seeded from ``rng``); ``drift_share = 0`` draws exactly what the stationary generator
    always drew.
    """
    work = effective_workload(work)
    B, L, k = work.batch_size, model.num_layers, model.top_k
    S = positions if positions is not None else work.prompt_tokens + work.output_tokens - 1
    a = work.alpha if alpha is None else alpha
    dom = work.seed if domain_seed is None else domain_seed
    pop = popularity(model, a, dom, work.popularity)  # [L, E]
    logp = np.log(pop)
    E = model.num_experts
    walk = None
    if work.drift_share > 0:
        logzipf = np.log(ranked_popularity(E, a, work.popularity))
        domain = domain_scores(pop, np.random.default_rng([dom, 0xD0E5]))
        walk = DriftingPopularity(logzipf, domain, B, work.drift, work.drift_share,
                                  np.random.default_rng(rng.integers(1 << 62)))
    ids = np.empty((B, S, L, k), dtype=np.int32)
    prev = np.zeros((B, L, E), dtype=bool)
    rows = np.arange(B)[:, None, None]
    cols = np.arange(L)[None, :, None]
    for s in range(S):
        base = logp[None] if walk is None else walk.step(
            first=s == 0, jump=work.drift_jump if s == work.prompt_tokens else 0.0)
        keys = base + rng.gumbel(size=(B, L, E))
        if s and work.reuse > 0:
            keep = prev & (rng.random((B, L, E)) < work.reuse)
            keys = np.where(keep, keys + 1e3, keys)  # kept experts outrank any fresh draw
        top = np.argpartition(-keys, k - 1, axis=-1)[..., :k]
        sel = np.take_along_axis(keys, top, axis=-1)
        top = np.take_along_axis(top, np.argsort(-sel, axis=-1), axis=-1)
        ids[:, s] = top
        prev[:] = False
        prev[rows, cols, top] = True
    logits = rng.standard_normal((B, S, L, k)).astype(np.float32)
    w = np.sort(np.exp(logits), axis=-1)[..., ::-1]
    w = (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)
    return Routing(ids, np.ascontiguousarray(w), work.prompt_tokens, "synthetic")


def _read_npz(p: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The routing arrays of an npz file, read now, and the names of all its arrays; any
    failure is a RoutingError naming the file."""
    if p.is_dir():
        raise RoutingError(f"routing trace {str(p)!r} is a directory, not an npz file")
    try:
        data = np.load(p, allow_pickle=False)
    except FileNotFoundError as exc:
        raise RoutingError(f"routing trace {str(p)!r} does not exist") from exc
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, zipfile errors ...
        raise RoutingError(f"routing trace {str(p)!r} is not an npz file: {exc}") from exc
    if isinstance(data, np.ndarray):
        raise RoutingError(f"routing trace {str(p)!r} is a single .npy array, not an npz archive; "
                           "save it with numpy.savez(path, topk_ids=ids[, topk_weights=w])")
    try:
        with data:
            wanted = [name for name in data.files if name in ("topk_ids", "topk_weights")]
            return {name: data[name] for name in wanted}, list(data.files)
    except Exception as exc:  # a corrupt member, an object array (pickles are refused)
        raise RoutingError(f"routing trace {str(p)!r} cannot be read: {exc}") from exc


def _check_ids(p: Path, ids: np.ndarray) -> np.ndarray:
    """Expert ids must be integers: an integer dtype, or floats that are all whole numbers."""
    where = f"routing trace {str(p)!r}: topk_ids"
    if ids.dtype.kind in "iu":
        return ids
    if ids.dtype.kind != "f":
        raise RoutingError(f"{where} has dtype {ids.dtype}; expected integer expert ids")
    bad = ~np.isfinite(ids) | (ids != np.round(ids))
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise RoutingError(f"{where} holds {ids[at].item()!r} at index {list(at)}; expected integer "
                           "expert ids (no NaN, no fractions)")
    return ids.astype(np.int64)


def _check_weights(p: Path, weights: np.ndarray, ids_shape: tuple[int, ...]) -> np.ndarray:
    """Gate weights: real, finite, >= 0, one per id, with a positive sum per token."""
    where = f"routing trace {str(p)!r}: topk_weights"
    if weights.shape != ids_shape:
        raise RoutingError(f"{where} has shape {list(weights.shape)}; expected the shape of "
                           f"topk_ids, {list(ids_shape)}")
    if weights.dtype.kind not in "iuf":
        raise RoutingError(f"{where} has dtype {weights.dtype}; expected real numbers")
    w = weights.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise RoutingError(f"{where} holds {w[at].item()!r} at index {list(at)}; expected finite "
                           "weights >= 0")
    if w.size and (w.sum(axis=-1) <= 0).any():
        at = tuple(int(i) for i in np.argwhere(w.sum(axis=-1) <= 0)[0])
        raise RoutingError(f"{where} sum to 0 for the token at index {list(at)}; each token's "
                           "weights must have a positive sum")
    return w


def read_topk_ids(p: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A trace file's arrays and its checked ``topk_ids`` (integers, no NaN; shape unchecked)."""
    data, files = _read_npz(p)
    if "topk_ids" not in data:
        raise RoutingError(f"routing trace {str(p)!r} has no 'topk_ids' array (it has "
                           f"{', '.join(files) or 'no arrays'})")
    return data, _check_ids(p, np.asarray(data["topk_ids"]))


def load_trace(path: str | Path, model: ModelSpec, work: WorkloadSpec) -> Routing:
    """Reads a canonical npz trace and cuts it to the workload's batch and positions.

    Everything is checked before use: ids are integers in ``0..num_experts-1``, distinct per
    token; weights (optional) have the ids' shape and are finite and >= 0.
    """
    p = Path(path)
    data, ids = read_topk_ids(p)
    if ids.ndim not in (3, 4) or 0 in ids.shape:
        raise RoutingError(f"routing trace {str(p)!r}: topk_ids has shape {list(ids.shape)}; "
                           "expected [tokens, layers, k] or [sequences, positions, layers, k], "
                           "none of them 0")
    weights = None
    if "topk_weights" in data:
        weights = _check_weights(p, np.asarray(data["topk_weights"]), ids.shape)
    B, S = work.batch_size, work.prompt_tokens + work.output_tokens - 1
    if ids.ndim == 4 and ids.shape[0] >= B and ids.shape[1] >= S:
        ids, weights = ids[:B, :S], None if weights is None else weights[:B, :S]
    else:
        if ids.ndim == 4:  # too few positions per sequence: use the sequences one after another
            ids = ids.reshape(-1, *ids.shape[2:])
            weights = None if weights is None else weights.reshape(-1, *weights.shape[2:])
        if ids.shape[0] < B * S:
            raise RoutingError(
                f"routing trace {str(p)!r} has {ids.shape[0]} tokens but the workload needs "
                f"batch_size x (prompt_tokens + output_tokens - 1) = {B} x {S} = {B * S}")
        ids = ids[: B * S].reshape(B, S, *ids.shape[1:])
        weights = None if weights is None else weights[: B * S].reshape(B, S, *weights.shape[1:])
    L, k = ids.shape[2], ids.shape[3]
    if model.num_layers != L or k != model.top_k:
        raise RoutingError(
            f"routing trace {str(p)!r} has {L} layers and top-{k}, but model {model.name!r} has "
            f"num_layers = {model.num_layers} and top_k = {model.top_k}; set them to match "
            f"(--set model.num_layers={L} --set model.top_k={k})")
    if ids.min() < 0 or ids.max() >= model.num_experts:
        raise RoutingError(f"routing trace {str(p)!r} has expert ids in {ids.min()}..{ids.max()} "
                           f"but model.num_experts = {model.num_experts}: ids must be in "
                           f"0..{model.num_experts - 1}")
    srt = np.sort(ids, axis=-1)
    if k > 1 and (srt[..., 1:] == srt[..., :-1]).any():
        b, pos, lay, _ = np.argwhere(srt[..., 1:] == srt[..., :-1])[0]
        raise RoutingError(f"routing trace {str(p)!r} lists one expert twice for a token "
                           f"(sequence {b}, position {pos}, layer {lay}: {ids[b, pos, lay].tolist()}); "
                           "each token's top-k experts must be distinct")
    if weights is None:
        weights = np.full(ids.shape, 1.0 / k, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    weights = weights / np.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
    return Routing(ids.astype(np.int32), weights.astype(np.float32), work.prompt_tokens, "trace")


def import_vllm_routed_experts(routed_experts: np.ndarray, out: str | Path,
                               weights: np.ndarray | None = None) -> Path:
    """Writes vLLM ``routed_experts`` ``[tokens, layers, k]`` as a canonical npz trace."""
    ids = np.asarray(routed_experts)
    if ids.ndim != 3:
        raise RoutingError(f"vLLM routed_experts must be [tokens, layers, k], got shape {ids.shape}")
    arrays = {"topk_ids": ids.astype(np.int32)}
    if weights is not None:
        arrays["topk_weights"] = np.asarray(weights, dtype=np.float32)
    out = Path(out)
    np.savez_compressed(out, **arrays)
    return out


ROUTING_BYTES_PER_CHOICE = 16  # int32 id + float32 weight, and the generator's temporaries


def check_routing_size(cfg: Config) -> None:
    """Refuses a workload whose routing arrays alone would not fit in half the machine's
    memory (``batch_size x positions x layers x top_k`` choices), before allocating them."""
    w, m = cfg.workload, cfg.model
    positions = w.prompt_tokens + w.output_tokens - 1
    need = w.batch_size * positions * m.num_layers * m.top_k * ROUTING_BYTES_PER_CHOICE
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return
    if need > half:
        raise RoutingError(
            f"the routing of workload.batch_size = {w.batch_size} x (workload.prompt_tokens + "
            f"workload.output_tokens - 1) = {positions} positions x {m.num_layers} layers x top-"
            f"{m.top_k} would take about {need / 1e9:.1f} GB, above half this machine's memory "
            f"({half / 1e9:.1f} GB); use fewer tokens or a smaller batch")


def build_routing(cfg: Config, rng: np.random.Generator | None = None) -> Routing:
    """The run's routing from ``cfg.workload.routing`` (refused first if it cannot fit)."""
    w = cfg.workload
    check_routing_size(cfg)
    rng = rng if rng is not None else np.random.default_rng(w.seed)
    if w.routing == "synthetic" or w.routing in ROUTING_PRESETS:
        return synthetic(cfg.model, w, rng)
    if w.routing == "trace":
        return load_trace(w.trace_path, cfg.model, w)
    return gate_routing(cfg, rng)


_KEPT: dict[tuple[ModelSpec, WorkloadSpec], Routing] = {}
KEPT_BYTES = 256 << 20  # what the kept routings may take in all, per process


def kept_routing(cfg: Config) -> Routing:
    """:func:`build_routing`, kept in this process for the runs that follow.

    A generated routing (``synthetic`` and the presets) depends on the model and the
    workload alone, and the configurations of a sweep or a reproduction share few of them
    (the stress grid's 270 configurations have 54: NDP units change the hardware, not the
    routing), so a worker process builds each once. Kept routings are read-only, the
    oldest dropped beyond :data:`KEPT_BYTES`; other sources (a trace file, gate routing)
    are built every time.
    """
    w = cfg.workload
    if w.routing != "synthetic" and w.routing not in ROUTING_PRESETS:
        return build_routing(cfg)
    key = (cfg.model, w)
    routing = _KEPT.get(key)
    if routing is None:
        routing = build_routing(cfg)
        routing.topk_ids.flags.writeable = False
        routing.topk_weights.flags.writeable = False
        size = _nbytes(routing)
        while _KEPT and sum(map(_nbytes, _KEPT.values())) + size > KEPT_BYTES:
            del _KEPT[next(iter(_KEPT))]  # the oldest
        if size <= KEPT_BYTES:
            _KEPT[key] = routing
    return routing


def _nbytes(routing: Routing) -> int:
    return routing.topk_ids.nbytes + routing.topk_weights.nbytes


def calibration_counts(cfg: Config, tokens: int, seed: int, alpha: float = -1.0,
                       domain_seed: int = -1) -> np.ndarray:
    """[L, E] counts of a separate calibration trace (the ``profiled`` prefetcher's, with its
    knobs ``profile_tokens``, ``profile_seed``, ``profile_alpha``, ``profile_domain_seed``).

    ``tokens`` tokens drawn from the synthetic generator with its own sampling seed ``seed``.
    By default from the same distribution as the run (same domain: the workload's seed and
    alpha); ``domain_seed`` >= 0 and ``alpha`` >= 0 make the calibration data come from a
    different distribution than the served prompts.
    """
    w = effective_workload(cfg.workload)
    rng = np.random.default_rng([seed, 0xCA1])
    alpha = w.alpha if alpha < 0 else alpha
    dom = w.seed if domain_seed < 0 else domain_seed
    work = WorkloadSpec(batch_size=1, prompt_tokens=1, output_tokens=tokens,
                        alpha=alpha, reuse=w.reuse, drift=w.drift, drift_share=w.drift_share,
                        seed=w.seed)
    r = synthetic(cfg.model, work, rng, alpha=alpha, positions=tokens, domain_seed=dom)
    L, E = cfg.model.num_layers, cfg.model.num_experts
    out = np.zeros((L, E), dtype=np.int64)
    for lay in range(L):
        out[lay] = np.bincount(r.topk_ids[:, :, lay].ravel(), minlength=E)
    return out
