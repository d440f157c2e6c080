"""The single-process numpy reference forward pass, and the ``gate`` routing source.

The emulator runs a stand-in of the configured model: the real layer structure, every width
scaled by ``scale`` (:func:`cluster.core.kernels.scaled_dims`) and deterministic weights from the
workload seed (:mod:`cluster.core.kernels`). For ``N = B * S`` positions (token ``b * S + s``)::

    x = token_embeddings(seed, B, S, d)                                    # [N, d]
    for each leading dense layer i:                                        # GPU
        x = layer_mix(x, W_o_dense[i]);  x = x + swiglu(rms_norm(x), dense FFN i)
    for each MoE layer l:
        x, xn = layer_mix(x, W_o[l]), rms_norm(that)                       # GPU
        x = x + sum_j swiglu(xn, shared j)                                 # GPU, weight 1
              + sum_k w[n, l, k] * swiglu(xn, expert ids[n, l, k])         # NDP units / GPU
    return x                                                               # [B, S, d]

There is no cross-token attention and inputs never depend on outputs, so every position is
independent: the reference runs all positions at once, the emulator runs the prefill and
then one decode step at a time, and both must agree to fp32 tolerance for every policy.
The GPU actor calls :func:`dense_layers`, :func:`moe_layer_input` and :func:`shared_output`
with the :class:`GpuWeights` it holds; every routed-expert partial, on either side, comes
from :func:`cluster.core.kernels.partial_for_tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cluster.core import kernels as K
from cluster.core.errors import RoutingError
from cluster.core.selection import Routing, popularity
from cluster.core.spec import Config, ModelSpec

GATE_D_MODEL = 64  # real width of the small forward pass that the gate routing runs


@dataclass(frozen=True)
class ScaledModel:
    """The real shapes the emulator computes with and the seed of every weight."""

    model: ModelSpec
    seed: int
    scale: float
    d_model_s: int
    d_ff_s: int
    shared_d_ff_s: int
    dense_d_ff_s: int


def scaled_model(cfg: Config, scale: float) -> ScaledModel:
    """Shapes of ``cfg.model`` at ``scale`` for ``cfg.ndp.num_ndp_units`` units; seed = workload's."""
    m = cfg.model
    d, f = K.scaled_dims(m, scale, cfg.ndp.num_ndp_units)
    return ScaledModel(
        model=m, seed=cfg.workload.seed, scale=scale, d_model_s=d, d_ff_s=f,
        shared_d_ff_s=K.scaled_width(m.shared_d_ff, scale) if m.num_shared_experts else 0,
        dense_d_ff_s=K.scaled_width(m.dense_d_ff, scale) if m.num_dense_layers else 0,
    )


@dataclass(frozen=True, eq=False)
class GpuWeights:
    """Every weight the GPU holds for good: attention stand-ins, dense FFNs, shared experts."""

    attention: tuple[np.ndarray, ...]  # [L] W_o[d, d]
    shared: tuple[tuple[K.ExpertWeights, ...], ...]  # [L][num_shared_experts]
    dense_attention: tuple[np.ndarray, ...]  # [num_dense_layers] W_o[d, d]
    dense_ffn: tuple[K.ExpertWeights, ...]  # [num_dense_layers]


def gpu_weights(sm: ScaledModel) -> GpuWeights:
    """Generates the GPU's weights (deterministic from ``sm.seed``)."""
    m, s, d = sm.model, sm.seed, sm.d_model_s
    return GpuWeights(
        attention=tuple(K.attention_standin(s, lay, d) for lay in range(m.num_layers)),
        shared=tuple(tuple(K.shared_expert_weights(s, lay, j, d, sm.shared_d_ff_s)
                           for j in range(m.num_shared_experts)) for lay in range(m.num_layers)),
        dense_attention=tuple(K.attention_standin(s, i, d, dense=True)
                              for i in range(m.num_dense_layers)),
        dense_ffn=tuple(K.dense_ffn_weights(s, i, d, sm.dense_d_ff_s)
                        for i in range(m.num_dense_layers)),
    )


def dense_layers(gw: GpuWeights, x: np.ndarray) -> np.ndarray:
    """All leading dense layers, ``x[n, d] -> [n, d]``."""
    for w_o, ffn in zip(gw.dense_attention, gw.dense_ffn):
        x = K.layer_mix(x, w_o)
        x = x + K.swiglu(K.rms_norm(x), *ffn)
    return x


def moe_layer_input(gw: GpuWeights, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GPU's work before MoE layer ``layer``'s experts: ``(x, xn)`` both ``[n, d]``.

    ``x`` is the residual after the attention stand-in, ``xn = rms_norm(x)`` the experts' input.
    """
    x = K.layer_mix(x, gw.attention[layer])
    return x, K.rms_norm(x)


def shared_output(gw: GpuWeights, layer: int, xn: np.ndarray) -> np.ndarray:
    """``[n, d]`` sum of layer ``layer``'s shared experts on ``xn`` (zeros if it has none)."""
    out = np.zeros_like(xn)
    for w in gw.shared[layer]:
        out += K.swiglu(xn, *w)
    return out


def routed_output(sm: ScaledModel, layer: int, xn: np.ndarray, ids: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """``[n, d]`` gate-weighted routed experts of ``xn[n, d]`` for ``ids/weights[n, k]``, whole.

    Tokens are grouped by expert and each active expert is generated once.
    """

    def tasks() -> Iterator[tuple[np.ndarray, np.ndarray, K.ExpertWeights]]:
        for e, rows, gates in K.group_tokens(ids, weights):
            w = K.expert_slice(sm.seed, layer, e, sm.d_model_s, sm.d_ff_s, 0, sm.d_ff_s)
            yield rows, gates, w

    return K.partial_for_tasks(xn, tasks())


RouteFn = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _forward(sm: ScaledModel, gw: GpuWeights, x: np.ndarray, route_fn: RouteFn) -> np.ndarray:
    x = dense_layers(gw, x)
    for lay in range(sm.model.num_layers):
        x, xn = moe_layer_input(gw, lay, x)
        ids, weights = route_fn(lay, xn)
        x = x + (shared_output(gw, lay, xn) + routed_output(sm, lay, xn, ids, weights))
    return x


def _check_routing(cfg: Config, routing: Routing) -> None:
    m, w = cfg.model, cfg.workload
    want = (w.batch_size, w.prompt_tokens + w.output_tokens - 1, m.num_layers, m.top_k)
    ids = routing.topk_ids
    if ids.shape != want or routing.topk_weights.shape != want:
        raise RoutingError(f"routing has shape {ids.shape} (weights {routing.topk_weights.shape}) "
                           f"but the config needs [batch, positions, layers, k] = {list(want)}")
    if ids.size and (ids.min() < 0 or ids.max() >= m.num_experts):
        raise RoutingError(f"routing has expert ids in {ids.min()}..{ids.max()} but "
                           f"model.num_experts = {m.num_experts}")


def reference_forward(cfg: Config, routing: Routing, scale: float) -> np.ndarray:
    """Final hidden states ``[B, S, d_model_s]`` of every position under ``routing``.

    ``scale`` in (0, 1] as in :func:`cluster.core.kernels.scaled_dims`; weights from
    ``cfg.workload.seed``; ``routing`` must match the config's batch, positions, layers, k.
    """
    _check_routing(cfg, routing)
    sm = scaled_model(cfg, scale)
    B, S = routing.topk_ids.shape[:2]
    k = cfg.model.top_k
    x = K.token_embeddings(sm.seed, B, S, sm.d_model_s).reshape(B * S, sm.d_model_s)
    ids = routing.topk_ids.transpose(2, 0, 1, 3).reshape(cfg.model.num_layers, B * S, k)
    weights = routing.topk_weights.astype(np.float32).transpose(2, 0, 1, 3).reshape(ids.shape)
    out = _forward(sm, gpu_weights(sm), x, lambda lay, _xn: (ids[lay], weights[lay]))
    return out.reshape(B, S, sm.d_model_s)


def gate_routing(cfg: Config, rng: np.random.Generator) -> Routing:
    """The ``gate`` routing source: a real router on the hidden states of a small forward pass.

    The forward pass is this module's, at ``d_model_s = 64``, with weights from
    ``cfg.workload.seed``. At each MoE layer the logits are ``xn @ W_router[l] + bias[l]``
    with ``bias[l] = gate_bias * log(popularity[l])`` (the per-layer Zipf popularity of
    :func:`cluster.core.selection.popularity` with the workload's ``alpha`` and seed as domain), the
    top-k of them are taken (:func:`cluster.core.kernels.route`) and the forward goes on with those
    choices. ``rng`` draws the inputs (the prompt), as the token draws of ``synthetic`` do:
    one seed fixes which experts are hot, ``rng`` samples tokens.
    """
    m, w = cfg.model, cfg.workload
    B, S = w.batch_size, w.prompt_tokens + w.output_tokens - 1
    scale = min(1.0, GATE_D_MODEL / m.d_model)
    sm = scaled_model(cfg, scale)
    bias = (w.gate_bias * np.log(popularity(m, w.alpha, w.seed))).astype(np.float32)  # [L, E]
    routers = [K.router_weights(sm.seed, lay, sm.d_model_s, m.num_experts)
               for lay in range(m.num_layers)]
    ids = np.empty((m.num_layers, B * S, m.top_k), dtype=np.int32)
    weights = np.empty((m.num_layers, B * S, m.top_k), dtype=np.float32)

    def route_fn(lay: int, xn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids[lay], weights[lay] = K.route(xn, routers[lay], bias[lay], m.top_k)
        return ids[lay], weights[lay]

    prompt_seed = int(rng.integers(0, 2**62))
    x = K.token_embeddings(prompt_seed, B, S, sm.d_model_s).reshape(B * S, sm.d_model_s)
    _forward(sm, gpu_weights(sm), x, route_fn)
    shape = (m.num_layers, B, S, m.top_k)
    return Routing(np.ascontiguousarray(ids.reshape(shape).transpose(1, 2, 0, 3)),
                   np.ascontiguousarray(weights.reshape(shape).transpose(1, 2, 0, 3)),
                   w.prompt_tokens, "gate")
