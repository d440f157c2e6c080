"""The real numpy compute of the emulator: deterministic weights, SwiGLU, norm, router.

Pure numpy (no Ray, no zmq, no I/O, no global state). The GPU and NDP-unit actors and the
single-process reference (:mod:`cluster.core.reference`) call these same functions, so an emulated
run does the reference's math whatever the schedule.

Weights are never shipped: every actor generates the weights it needs from the run's seed.
Element ``(i, j)`` of a routed expert's matrix is a function of ``(seed, layer, expert,
matrix, i, j)`` only: per expert, two small uniform random blocks with coprime shapes are
tiled by index arithmetic and added::

    W[i, j] = (A[i % 64, j % 64] + B[i % 61, j % 59]) * sqrt(3 / (2 * fan_in))

(unit variance / fan_in; two periods so that columns 64 apart still differ). A column slice
costs a tile copy, far cheaper than ``standard_normal`` on the full matrix (DESIGN.md
section 5), and slices generated on different units concatenate exactly to the whole expert.
The attention stand-in, router and embeddings are small and drawn in full.

Shapes: ``n`` tokens, ``d`` = ``d_model_s``, ``f`` = ``d_ff_s``, ``c`` a column slice of
``f``. Everything is float32; weights are ``(K, N)`` C-order and applied as ``x @ W``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from cluster.core.errors import ConfigError
from cluster.core.spec import ModelSpec

ExpertWeights = tuple[np.ndarray, np.ndarray, np.ndarray]  # (w_gate[d, c], w_up[d, c], w_down[c, d])

RMS_EPS = 1e-6
MIN_WIDTH = 8
FP32_BYTES = 4
# Spread of the router's own logits. With it, the gate source's default popularity bias
# (workload.gate_bias = 2) skews about as much as the synthetic default (alpha 0.8); at 1 the
# bias swamps the router and two thirds of Qwen3's 128 experts are never picked.
ROUTER_LOGIT_STD = 2.0

# Tags keep the random streams of different kinds of weight apart.
_TAG_EXPERT, _TAG_ATTN, _TAG_ROUTER, _TAG_SHARED, _TAG_DENSE_ATTN, _TAG_DENSE_FFN = 1, 2, 3, 4, 5, 6
_TAG_EMBED = 7
_BLOCK_A = (64, 64)
_BLOCK_B = (61, 59)
_BLOCK_ELEMS = _BLOCK_A[0] * _BLOCK_A[1] + _BLOCK_B[0] * _BLOCK_B[1]
_SQRT3 = math.sqrt(3.0)


# --- scaled shapes -----------------------------------------------------------------------

def scaled_width(width: int, scale: float) -> int:
    """``max(8, round(width * scale))``: one real dimension of the scaled model."""
    return max(MIN_WIDTH, round(width * scale))


def scaled_dims(model: ModelSpec, scale: float, num_units: int) -> tuple[int, int]:
    """Real ``(d_model_s, d_ff_s)`` of the emulator at ``scale``.

    ``d_ff_s`` is at least ``num_units`` so that a tensor-parallel slice of every unit can be
    non-empty (:func:`column_slice` may still map a narrow fractional slice to zero columns).
    """
    if not 0 < scale <= 1:
        raise ConfigError(f"weights.scale = {scale!r} is not allowed: must be a number in (0, 1]")
    return scaled_width(model.d_model, scale), max(scaled_width(model.d_ff, scale), num_units)


def routed_weight_bytes(model: ModelSpec, scale: float, num_units: int = 1) -> int:
    """fp32 bytes of all routed experts of all MoE layers at ``scale``."""
    d, f = scaled_dims(model, scale, num_units)
    return model.num_layers * model.num_experts * 3 * d * f * FP32_BYTES


def auto_scale(model: ModelSpec, budget_bytes: int, num_units: int = 1) -> float:
    """The largest scale in (0, 1] at which all routed experts fit ``budget_bytes`` at fp32.

    Raises :class:`ConfigError` when even the smallest shapes (8 wide) do not fit.
    """
    if routed_weight_bytes(model, 1.0, num_units) <= budget_bytes:
        return 1.0
    lo = 1e-9
    if routed_weight_bytes(model, lo, num_units) > budget_bytes:
        raise ConfigError(
            f"weights.memory_budget_bytes = {budget_bytes} is not allowed: model "
            f"{model.name!r} needs at least {routed_weight_bytes(model, lo, num_units)} bytes "
            f"of fp32 routed experts at the smallest scale ({MIN_WIDTH}-wide matrices)")
    hi = 1.0
    # The size is a non-decreasing step function of the scale: bisect to its last fitting point.
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if routed_weight_bytes(model, mid, num_units) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def column_slice(lo: int, hi: int, d_ff: int, d_ff_s: int) -> tuple[int, int]:
    """A plan's true ``d_ff`` columns ``[lo, hi)`` -> scaled columns ``[lo_s, hi_s)``.

    Each bound maps by ``floor(b * d_ff_s / d_ff)``, so contiguous ranges that partition
    ``[0, d_ff)`` map to contiguous ranges that partition ``[0, d_ff_s)`` (some possibly empty).
    """
    if not 0 <= lo <= hi <= d_ff:
        raise ValueError(f"column range [{lo}, {hi}) is not inside [0, {d_ff})")
    return lo * d_ff_s // d_ff, hi * d_ff_s // d_ff


# --- deterministic weights ---------------------------------------------------------------

def _uniform(rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    """Uniform on [-sqrt(3), sqrt(3)): zero mean, unit variance, float32."""
    u = rng.random(size, dtype=np.float32)
    u *= np.float32(2 * _SQRT3)
    u -= np.float32(_SQRT3)
    return u


def _tiled(block: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of ``block`` tiled without end (a view)."""
    br, bc = block.shape
    rs, cs = r0 % br, c0 % bc
    nr, nc = r1 - r0, c1 - c0
    reps = (-(-(rs + nr) // br), -(-(cs + nc) // bc))
    return np.tile(block, reps)[rs: rs + nr, cs: cs + nc]


def _matrix(blocks: tuple[np.ndarray, np.ndarray], r0: int, r1: int, c0: int, c1: int,
            fan_in: int) -> np.ndarray:
    a, b = blocks
    out = _tiled(a, r0, r1, c0, c1) + _tiled(b, r0, r1, c0, c1)
    out *= np.float32(1.0 / math.sqrt(2.0 * fan_in))
    return out


def _swiglu_weights(key: Sequence[int], d_model_s: int, d_ff_s: int,
                    col_lo: int, col_hi: int) -> ExpertWeights:
    if not 0 <= col_lo <= col_hi <= d_ff_s:
        raise ValueError(f"column slice [{col_lo}, {col_hi}) is not inside [0, {d_ff_s})")
    rng = np.random.default_rng(list(key))
    raw = _uniform(rng, 3 * _BLOCK_ELEMS)
    blocks = []
    for m in range(3):
        chunk = raw[m * _BLOCK_ELEMS: (m + 1) * _BLOCK_ELEMS]
        na = _BLOCK_A[0] * _BLOCK_A[1]
        blocks.append((chunk[:na].reshape(_BLOCK_A), chunk[na:].reshape(_BLOCK_B)))
    w_gate = _matrix(blocks[0], 0, d_model_s, col_lo, col_hi, d_model_s)
    w_up = _matrix(blocks[1], 0, d_model_s, col_lo, col_hi, d_model_s)
    w_down = _matrix(blocks[2], col_lo, col_hi, 0, d_model_s, d_ff_s)
    return w_gate, w_up, w_down


def expert_slice(seed: int, layer: int, expert: int, d_model_s: int, d_ff_s: int,
                 col_lo: int, col_hi: int) -> ExpertWeights:
    """Columns ``[col_lo, col_hi)`` of routed expert ``expert`` of MoE layer ``layer``.

    Returns ``w_gate[d, c]``, ``w_up[d, c]`` and the matching rows ``w_down[c, d]``, float32,
    C-order. Slices generated separately concatenate exactly (bit for bit) to the whole expert
    (``col_lo = 0, col_hi = d_ff_s``).
    """
    return _swiglu_weights((seed, _TAG_EXPERT, layer, expert), d_model_s, d_ff_s, col_lo, col_hi)


def shared_expert_weights(seed: int, layer: int, index: int, d_model_s: int,
                          shared_d_ff_s: int) -> ExpertWeights:
    """Shared expert ``index`` of MoE layer ``layer`` (runs on the GPU, whole)."""
    return _swiglu_weights((seed, _TAG_SHARED, layer, index), d_model_s, shared_d_ff_s,
                           0, shared_d_ff_s)


def dense_ffn_weights(seed: int, index: int, d_model_s: int, dense_d_ff_s: int) -> ExpertWeights:
    """The dense SwiGLU FFN of leading dense layer ``index`` (runs on the GPU)."""
    return _swiglu_weights((seed, _TAG_DENSE_FFN, index, 0), d_model_s, dense_d_ff_s,
                           0, dense_d_ff_s)


def attention_standin(seed: int, layer: int, d_model_s: int, dense: bool = False) -> np.ndarray:
    """``W_o[d, d]`` of the attention stand-in of MoE layer ``layer`` (leading dense layer if
    ``dense``). Scaled ``0.5 / sqrt(d)`` so that the residual stays bounded over many layers.
    """
    tag = _TAG_DENSE_ATTN if dense else _TAG_ATTN
    w = _uniform(np.random.default_rng([seed, tag, layer]), (d_model_s, d_model_s))
    w *= np.float32(0.5 / math.sqrt(d_model_s))
    return w


def router_weights(seed: int, layer: int, d_model_s: int, num_experts: int) -> np.ndarray:
    """``W_router[d, E]`` of MoE layer ``layer``: logits of ``rms_norm``-ed inputs have
    standard deviation :data:`ROUTER_LOGIT_STD` across experts.
    """
    w = _uniform(np.random.default_rng([seed, _TAG_ROUTER, layer]), (d_model_s, num_experts))
    w *= np.float32(ROUTER_LOGIT_STD / math.sqrt(d_model_s))
    return w


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wraps modulo 2**64 on purpose)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def token_embeddings(seed: int, batch: int, positions: int | Sequence[int] | np.ndarray,
                     d_model_s: int) -> np.ndarray:
    """Deterministic inputs ``[B, S, d]`` (unit RMS) of sequences ``0..batch-1``.

    ``positions`` is a count ``S`` (positions ``0..S-1``) or the positions themselves, so a
    decode step can make just its own: element ``[b, s, i]`` depends only on
    ``(seed, b, positions[s], i)``. There is no vocabulary and no sampling: inputs never
    depend on outputs.
    """
    pos = np.arange(positions) if isinstance(positions, (int, np.integer)) else np.asarray(positions)
    if pos.ndim != 1 or (pos.size and pos.min() < 0) or seed < 0 or batch < 0:
        raise ValueError("token_embeddings needs seed >= 0, batch >= 0 and positions >= 0")
    h = _mix64(np.array([seed, _TAG_EMBED], dtype=np.uint64))
    h = _mix64(h[:1] ^ h[1:])  # [1]
    h = _mix64(h[:, None] ^ np.arange(batch, dtype=np.uint64)[:, None])  # [B, 1]
    h = _mix64(h ^ pos.astype(np.uint64)[None, :])  # [B, S]
    z = _mix64(h[..., None] ^ np.arange(d_model_s, dtype=np.uint64))  # [B, S, d]
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)  # [0, 1), exact
    u *= np.float32(2 * _SQRT3)
    u -= np.float32(_SQRT3)
    return u


# --- the math ----------------------------------------------------------------------------

def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` written with ``tanh`` (no overflow for large ``|x|``)."""
    return x * (np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * x)))


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """``(silu(x @ Wg) * (x @ Wu)) @ Wd``: ``x[n, d]``, ``Wg, Wu[d, c]``, ``Wd[c, d]`` -> ``[n, d]``.

    On a column slice (``c < f``) this is the slice's partial output: the partials of a
    partition of ``f`` sum to the whole expert's output. An empty slice gives zeros.
    """
    h = silu(x @ w_gate)
    h *= x @ w_up
    return h @ w_down


def rms_norm(x: np.ndarray) -> np.ndarray:
    """``x / sqrt(mean(x**2) + 1e-6)`` over the last axis; no learned weight."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (np.float32(1.0) / np.sqrt(ms + np.float32(RMS_EPS)))


def layer_mix(x: np.ndarray, w_o: np.ndarray) -> np.ndarray:
    """``x + rms_norm(x) @ W_o``: the GPU's per-layer non-expert work, ``[n, d] -> [n, d]``.

    A position-wise stand-in for attention: no token sees another (no KV cache, no softmax
    over positions). Attention *time* comes from the cost model; this exists so that the
    data flowing between the actors is real and each layer changes it.
    """
    return x + rms_norm(x) @ w_o


def route(x_normed: np.ndarray, w_router: np.ndarray, bias: np.ndarray | None,
          k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` routing of ``x_normed[n, d]``: logits ``x_normed @ w_router[d, E] + bias[E]``.

    Returns ``ids[n, k]`` int32, sorted by descending logit, and ``weights[n, k]`` float32,
    the softmax over the ``k`` chosen logits (bias included), summing to 1 per token.
    """
    logits = x_normed @ w_router
    if bias is not None:
        logits = logits + np.asarray(bias, dtype=np.float32)
    n, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k {k} is not in 1..{num_experts}")
    top = (np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < num_experts
           else np.broadcast_to(np.arange(num_experts), (n, num_experts)))
    chosen = np.take_along_axis(logits, top, axis=1)
    order = np.argsort(-chosen, axis=1, kind="stable")
    ids = np.take_along_axis(top, order, axis=1).astype(np.int32)
    chosen = np.take_along_axis(chosen, order, axis=1)
    w = np.exp(chosen - chosen[:, :1])
    w /= w.sum(axis=1, keepdims=True)
    return ids, w.astype(np.float32)


def group_tokens(ids: np.ndarray, weights: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``ids[n, k]``, ``weights[n, k]`` -> ``(expert, rows[m], gates[m])`` per active expert.

    Experts ascending, rows ascending and distinct; ``gates`` are each row's weight for that
    expert (summed if a row lists the expert twice, as :func:`gate_weights_for` does).
    """
    k = ids.shape[1]
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")  # stable: rows stay ascending within an expert
    experts = flat[order]
    rows = (order // k).astype(np.intp)
    gates = np.asarray(weights, dtype=np.float32).ravel()[order]
    dup = (np.diff(experts) == 0) & (np.diff(rows) == 0)
    if dup.any():  # a malformed trace may list one expert twice for a token
        keep = np.r_[0, np.flatnonzero(~dup) + 1]
        experts, rows = experts[keep], rows[keep]
        gates = np.add.reduceat(gates, keep).astype(np.float32)
    cuts = np.flatnonzero(np.diff(experts)) + 1
    starts = np.r_[0, cuts]
    ends = np.r_[cuts, experts.size]
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e > s:
            yield int(experts[s]), rows[s:e], gates[s:e]


def gate_weights_for(ids: np.ndarray, weights: np.ndarray, expert: int,
                     rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Gate weight ``[m]`` float32 of ``expert`` for each of ``rows`` of ``ids/weights[n, k]``.

    Raises ``ValueError`` if one of the rows did not pick ``expert``.
    """
    rows = np.asarray(rows, dtype=np.intp)
    hit = ids[rows] == expert  # [m, k]
    if not hit.any(axis=1).all():
        bad = rows[~hit.any(axis=1)].tolist()
        raise ValueError(f"tokens {bad} did not pick expert {expert}")
    return (np.asarray(weights, dtype=np.float32)[rows] * hit).sum(axis=1, dtype=np.float32)


def partial_for_tasks(xn: np.ndarray,
                      tasks: Iterable[tuple[np.ndarray, np.ndarray, ExpertWeights]],
                      out: np.ndarray | None = None) -> np.ndarray:
    """Gate-weighted sum of expert (slice) outputs: what one device sends back, one row a token.

    ``xn[n, d]`` are the normed activations of the tokens this device was sent. Each task is
    ``(rows[m], gates[m], (w_gate, w_up, w_down))``: the rows of ``xn`` routed to one expert
    (each row at most once per task), their gate weights for it, and the device's slice of
    that expert. Returns ``out[n, d]`` (zeros first unless ``out`` is given, then added into)
    with ``out[rows] += gates[:, None] * swiglu(xn[rows], slice)`` for every task.
    """
    xn = np.asarray(xn, dtype=np.float32)
    if out is None:
        out = np.zeros_like(xn)
    n = xn.shape[0]
    for rows, gates, (w_gate, w_up, w_down) in tasks:
        rows = np.asarray(rows, dtype=np.intp)
        g = np.asarray(gates, dtype=np.float32)[:, None]
        if rows.size == n and np.array_equal(rows, np.arange(n)):
            out += g * swiglu(xn, w_gate, w_up, w_down)  # every row, in order: no gather
        else:
            out[rows] += g * swiglu(xn[rows], w_gate, w_up, w_down)
    return out
