"""The numpy kernels: weights made where they are used, slices that add up, routing that is exact."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from fp32_bounds import (
    U,
    assert_within,
    gamma,
    layer_mix_error_bound,
    magnitude,
    swiglu_magnitude,
    swiglu_rtol,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.core import kernels as K
from cluster.core.config import load_config
from cluster.core.errors import ConfigError
from policies.base import tp_bounds

SEED, LAYER, D, F = 7, 3, 48, 40  # small and not multiples of the 64-wide blocks


def _cuts(draw_points: list[int], width: int) -> list[tuple[int, int]]:
    bounds = sorted({0, width, *[p % (width + 1) for p in draw_points]})
    return list(itertools.pairwise(bounds))


def _full(expert: int = 5, layer: int = LAYER, seed: int = SEED) -> K.ExpertWeights:
    return K.expert_slice(seed, layer, expert, D, F, 0, F)


# --- shapes and budget -----------------------------------------------------------------

def test_scaled_dims_shrink_each_width_and_keep_a_floor() -> None:
    qwen = load_config(model="qwen3-30b-a3b").model
    assert K.scaled_dims(qwen, 1 / 16, 4) == (128, 48)
    assert K.scaled_dims(qwen, 1.0, 4) == (2048, 768)
    assert K.scaled_dims(qwen, 1e-6, 4) == (8, 8)
    assert K.scaled_dims(qwen, 1e-6, 12) == (8, 12)  # every TP unit gets a column


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_scaled_dims_refuse_a_scale_outside_unit_interval(scale: float) -> None:
    qwen = load_config().model
    with pytest.raises(ConfigError, match=r"weights\.scale"):
        K.scaled_dims(qwen, scale, 4)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"])
@pytest.mark.parametrize("budget_bytes", [64 << 20, 1 << 30, 3 << 30])
def test_auto_scale_is_the_largest_scale_that_fits(model: str, budget_bytes: int) -> None:
    m = load_config(model=model).model
    scale = K.auto_scale(m, budget_bytes, num_units=4)
    assert 0 < scale < 1
    assert K.routed_weight_bytes(m, scale, 4) <= budget_bytes
    assert K.routed_weight_bytes(m, min(1.0, scale * 1.001), 4) > budget_bytes
    d, f = K.scaled_dims(m, scale, 4)
    assert m.num_layers * m.num_experts * 3 * d * f * 4 <= budget_bytes


def test_auto_scale_is_one_when_everything_fits_and_refuses_a_tiny_budget() -> None:
    m = load_config(model="olmoe-1b-7b").model
    assert K.auto_scale(m, m.routed_expert_bytes * 2) == 1.0  # fp32 is twice the fp16 size
    assert K.auto_scale(m, m.routed_expert_bytes * 2 - 1) < 1.0
    with pytest.raises(ConfigError, match="memory_budget_bytes"):
        K.auto_scale(m, 1000)


@given(d_ff=st.integers(1, 20000), d_ff_s=st.integers(1, 4000),
       points=st.lists(st.integers(0, 1 << 30), max_size=12))
@settings(max_examples=200, deadline=None)
def test_column_slice_maps_a_partition_to_a_partition(d_ff: int, d_ff_s: int,
                                                      points: list[int]) -> None:
    ranges = [K.column_slice(lo, hi, d_ff, d_ff_s) for lo, hi in _cuts(points, d_ff)]
    assert ranges[0][0] == 0 and ranges[-1][1] == d_ff_s
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo
    assert all(lo <= hi for lo, hi in ranges)


def test_column_slice_of_tp_bounds_gives_every_unit_columns() -> None:
    for d_ff, units in [(768, 4), (1408, 6), (14336, 2), (1024, 5)]:
        d_ff_s = max(K.scaled_width(d_ff, 1 / 16), units)
        widths = [hi - lo for lo, hi in (K.column_slice(a, b, d_ff, d_ff_s)
                                         for a, b in tp_bounds(d_ff, units))]
        assert sum(widths) == d_ff_s and min(widths) > 0


def test_column_slice_refuses_a_range_outside_d_ff() -> None:
    with pytest.raises(ValueError):
        K.column_slice(10, 5, 768, 48)
    with pytest.raises(ValueError):
        K.column_slice(0, 769, 768, 48)


# --- deterministic weights -------------------------------------------------------------

@given(points=st.lists(st.integers(0, 1000), max_size=6), expert=st.integers(0, 200))
@settings(max_examples=40, deadline=None)
def test_slices_made_separately_concatenate_to_the_whole_expert(points: list[int],
                                                                expert: int) -> None:
    w_gate, w_up, w_down = _full(expert)
    parts = [K.expert_slice(SEED, LAYER, expert, D, F, lo, hi) for lo, hi in _cuts(points, F)]
    # bytes, not a tolerance: weights are drawn and tiled, no arithmetic that BLAS reorders
    assert np.array_equal(np.concatenate([p[0] for p in parts], axis=1), w_gate)
    assert np.array_equal(np.concatenate([p[1] for p in parts], axis=1), w_up)
    assert np.array_equal(np.concatenate([p[2] for p in parts], axis=0), w_down)


def test_expert_weights_are_float32_c_order_with_the_asked_shapes() -> None:
    w_gate, w_up, w_down = K.expert_slice(SEED, LAYER, 1, D, F, 9, 30)
    assert w_gate.shape == w_up.shape == (D, 21) and w_down.shape == (21, D)
    for w in (w_gate, w_up, w_down):
        assert w.dtype == np.float32 and w.flags.c_contiguous


def test_weights_are_the_same_bytes_on_every_call() -> None:
    a, b = _full(), _full()
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert K.attention_standin(SEED, 2, D).tobytes() == K.attention_standin(SEED, 2, D).tobytes()
    assert K.router_weights(SEED, 2, D, 16).tobytes() == K.router_weights(SEED, 2, D, 16).tobytes()
    assert (K.token_embeddings(SEED, 2, 5, D).tobytes()
            == K.token_embeddings(SEED, 2, 5, D).tobytes())


def test_other_experts_layers_seeds_and_matrices_get_other_weights() -> None:
    base = _full(expert=5)
    for other in (_full(expert=6), _full(layer=LAYER + 1), _full(seed=SEED + 1)):
        assert all(not np.allclose(x, y) for x, y in zip(base, other))
    assert not np.allclose(base[0], base[1])  # gate != up
    assert not np.allclose(K.attention_standin(SEED, 0, D), K.attention_standin(SEED, 1, D))
    assert not np.allclose(K.attention_standin(SEED, 0, D),
                           K.attention_standin(SEED, 0, D, dense=True))
    assert not np.allclose(K.router_weights(SEED, 0, D, 8), K.router_weights(SEED, 1, D, 8))
    assert not np.allclose(K.shared_expert_weights(SEED, 0, 0, D, F)[0],
                           K.expert_slice(SEED, 0, 0, D, F, 0, F)[0])


def test_tiling_does_not_repeat_columns_or_rows_of_a_wide_expert() -> None:
    w_gate, _, w_down = K.expert_slice(SEED, 0, 0, 256, 200, 0, 200)
    for lag in (59, 61, 64, 128):
        assert not np.allclose(w_gate[:, :-lag], w_gate[:, lag:])
        assert not np.allclose(w_down[:-lag], w_down[lag:])


def test_weights_have_variance_one_over_fan_in() -> None:
    d, f = 256, 192
    w_gate, w_up, w_down = K.expert_slice(SEED, 0, 0, d, f, 0, f)
    assert w_gate.var() * d == pytest.approx(1.0, rel=0.15)
    assert w_up.var() * d == pytest.approx(1.0, rel=0.15)
    assert w_down.var() * f == pytest.approx(1.0, rel=0.15)
    assert abs(w_gate.mean()) < 0.1 / np.sqrt(d)


def test_token_embeddings_of_some_positions_are_those_of_all_positions() -> None:
    full = K.token_embeddings(SEED, 3, 10, D)
    assert full.shape == (3, 10, D) and full.dtype == np.float32
    # bytes: integer hashing and exactly rounded elementwise float ops, the same on any CPU
    assert np.array_equal(K.token_embeddings(SEED, 3, [7], D), full[:, 7:8])
    assert np.array_equal(K.token_embeddings(SEED, 3, np.array([2, 9]), D), full[:, [2, 9]])
    assert np.sqrt((full ** 2).mean()) == pytest.approx(1.0, rel=0.1)
    assert not np.allclose(full[0], full[1]) and not np.allclose(full[:, 0], full[:, 1])
    assert not np.allclose(full, K.token_embeddings(SEED + 1, 3, 10, D))


# --- the math --------------------------------------------------------------------------

def _x(n: int = 6, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_swiglu_is_silu_gate_times_up_then_down() -> None:
    x = _x()
    w_gate, w_up, w_down = _full()
    g, u = x.astype(np.float64) @ w_gate, x.astype(np.float64) @ w_up
    want = (g / (1 + np.exp(-g)) * u) @ w_down
    got = K.swiglu(x, w_gate, w_up, w_down)
    assert got.dtype == np.float32 and got.shape == x.shape
    # float64 from the same fp32 inputs is exact to ~1e-16; fp32's own error is bounded by
    # the operands' magnitude, not by the result's, which may cancel (fp32_bounds)
    assert_within(got, want, swiglu_rtol(D, F) * swiglu_magnitude(x, w_gate, w_up, w_down),
                  "swiglu vs float64")


def test_silu_does_not_overflow() -> None:
    x = np.array([-1e4, -50, 0, 50, 1e4], dtype=np.float32)
    with np.errstate(all="raise"):
        y = K.silu(x)
    np.testing.assert_allclose(y, [0, 0, 0, 50, 1e4], atol=1e-6)


@given(points=st.lists(st.integers(0, 1000), max_size=7))
@settings(max_examples=40, deadline=None)
def test_tp_partials_over_any_partition_sum_to_the_whole_expert(points: list[int]) -> None:
    x, expert = _x(), 11
    gates = np.linspace(0.1, 0.9, x.shape[0], dtype=np.float32)
    rows = np.arange(x.shape[0])
    whole = K.partial_for_tasks(x, [(rows, gates, _full(expert))])
    parts = [K.partial_for_tasks(x, [(rows, gates, K.expert_slice(SEED, LAYER, expert, D, F,
                                                                  lo, hi))])
             for lo, hi in _cuts(points, F)]
    # both sides are fp32 SwiGLUs whose down projections sum the d_ff columns in another
    # grouping (and BLAS kernels): each is within swiglu_rtol * S of the exact value, with S
    # additive over the partition; adding up to 8 partials costs gamma_8 of S more
    s = gates[:, None] * swiglu_magnitude(x, *_full(expert))
    assert_within(np.sum(parts, axis=0), whole, (2 * swiglu_rtol(D, F) + gamma(8) + 2 * U) * s,
                  f"partials over {_cuts(points, F)}")


def test_an_empty_slice_contributes_nothing() -> None:
    w = K.expert_slice(SEED, LAYER, 0, D, F, 17, 17)
    assert w[0].shape == (D, 0) and w[2].shape == (0, D)
    assert not K.partial_for_tasks(_x(), [(np.arange(6), np.ones(6, np.float32), w)]).any()


def test_partial_for_tasks_is_the_per_token_gate_weighted_sum() -> None:
    x = _x(5)
    tasks = [(np.array([0, 2, 3]), np.array([0.5, 0.25, 1.0], np.float32), _full(1)),
             (np.array([2, 4]), np.array([0.75, 0.3], np.float32), _full(2)),
             (np.arange(5), np.full(5, 0.1, np.float32), _full(3))]
    want = np.zeros((5, D))
    s = np.zeros((5, D))  # sum over tasks of |gate| * SwiGLU operand magnitude, per token
    for rows, gates, w in tasks:
        for r, g in zip(rows, gates):
            want[r] += g * K.swiglu(x[r: r + 1], *w)[0]
            s[r] += abs(g) * swiglu_magnitude(x[r: r + 1], *w)[0]
    # one row at a time against a gathered block: other BLAS kernels, so each side is within
    # swiglu_rtol * S of the exact value; gating and adding three tasks round a few times more
    bound = (2 * swiglu_rtol(D, F) + 6 * U) * s
    got = K.partial_for_tasks(x, tasks)
    assert got.dtype == np.float32
    assert_within(got, want, bound, "partial_for_tasks")
    assert not K.partial_for_tasks(x, tasks[:2])[1].any()  # no task for token 1
    again = K.partial_for_tasks(x, tasks[:1], out=K.partial_for_tasks(x, tasks[1:]))
    assert_within(again, want, bound, "partial_for_tasks into out")


def test_rms_norm_gives_unit_rms_rows_and_layer_mix_is_position_wise() -> None:
    x = _x(4) * np.array([[0.5], [1], [10], [1000]], dtype=np.float32)
    np.testing.assert_allclose(np.sqrt((K.rms_norm(x) ** 2).mean(-1)), 1.0, rtol=1e-5)
    assert not K.rms_norm(np.zeros((1, D), np.float32)).any()  # eps: zeros stay zeros
    w_o = K.attention_standin(SEED, 0, D)
    whole = K.layer_mix(x, w_o)
    # a 1-row and a 4-row product take different BLAS kernels (on an AVX2 EPYC 2 of 48
    # elements differed by 9.5e-6 relative): equal up to twice the fp32 bound of one
    # evaluation, which scales with |rms_norm(x)| @ |W_o| and |x|, not with the result
    bound = 2 * layer_mix_error_bound(x, w_o)
    for i in range(4):
        assert_within(K.layer_mix(x[i: i + 1], w_o)[0], whole[i], bound[i], f"row {i}")
    step = whole - x  # bounded by the 0.5 / sqrt(d) scale whatever the input's size
    assert np.sqrt((step ** 2).mean()) < 1.0


def test_route_picks_the_top_k_logits_in_order_with_softmax_weights() -> None:
    x = K.rms_norm(_x(20))
    w_r = K.router_weights(SEED, 0, D, 16)
    bias = np.linspace(-1, 1, 16, dtype=np.float32)
    ids, weights = K.route(x, w_r, bias, 4)
    assert ids.dtype == np.int32 and weights.dtype == np.float32 and ids.shape == (20, 4)
    logits = x.astype(np.float64) @ w_r + bias
    # fp32 logits are within delta of these (D-term dot product, then the bias added), so
    # experts closer than 2 * delta may swap places on another CPU; no row here is that close
    delta = gamma(D) * magnitude(x, w_r) + U * np.abs(logits)
    slack = 2 * delta.max(axis=1)
    ranked = -np.sort(-logits, axis=1)
    assert (np.diff(-ranked[:, :5], axis=1) > slack[:, None]).all(), "a near-tie: pick another seed"
    want = np.argsort(-logits, axis=1)[:, :4]
    assert np.array_equal(ids, want)
    # softmax over the chosen: d log w_j = dl_j - sum_i w_i dl_i, so |dw/w| <= 2 max delta,
    # plus a few roundings (exp, the 4-term sum, the division)
    chosen = np.take_along_axis(logits, want, axis=1)
    soft = np.exp(chosen) / np.exp(chosen).sum(1, keepdims=True)
    assert_within(weights, soft, (slack[:, None] + 16 * U) * soft, "router weights")
    # four positive terms summed and each divided by that sum: a handful of roundings
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=8 * U)
    assert (np.diff(weights, axis=1) <= 0).all()


def test_route_bias_moves_the_choice_and_k_equal_e_takes_all() -> None:
    x = K.rms_norm(_x(30))
    w_r = K.router_weights(SEED, 0, D, 8)
    bias = np.zeros(8, np.float32)
    bias[5] = 100.0
    ids, _ = K.route(x, w_r, bias, 2)
    assert (ids[:, 0] == 5).all()
    ids, _ = K.route(x, w_r, None, 8)
    assert (np.sort(ids, axis=1) == np.arange(8)).all()
    with pytest.raises(ValueError):
        K.route(x, w_r, None, 9)


def test_group_tokens_and_gate_weights_for_recover_the_routing() -> None:
    ids = np.array([[3, 1], [1, 0], [3, 2], [0, 3]], dtype=np.int32)
    weights = np.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.55, 0.45]], dtype=np.float32)
    groups = {e: (rows.tolist(), gates.tolist()) for e, rows, gates in K.group_tokens(ids, weights)}
    assert groups == {0: ([1, 3], pytest.approx([0.3, 0.55])),
                      1: ([0, 1], pytest.approx([0.4, 0.7])),
                      2: ([2], pytest.approx([0.1])),
                      3: ([0, 2, 3], pytest.approx([0.6, 0.9, 0.45]))}
    np.testing.assert_allclose(K.gate_weights_for(ids, weights, 3, [0, 3]), [0.6, 0.45])
    with pytest.raises(ValueError, match="did not pick expert 2"):
        K.gate_weights_for(ids, weights, 2, [0, 2])


def test_kernels_and_reference_import_neither_ray_nor_zmq() -> None:
    code = ("import sys, cluster.core.kernels, cluster.core.reference; "
            "bad = [m for m in ('ray', 'zmq') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_token_listing_an_expert_twice_gets_it_once_with_both_weights() -> None:
    ids = np.array([[2, 2], [0, 2]], dtype=np.int32)
    weights = np.array([[0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
    groups = {e: (rows.tolist(), gates.tolist()) for e, rows, gates in K.group_tokens(ids, weights)}
    assert groups == {0: ([1], pytest.approx([0.3])), 2: ([0, 1], pytest.approx([1.0, 0.7]))}
    np.testing.assert_allclose(K.gate_weights_for(ids, weights, 2, [0, 1]), [1.0, 0.7])
