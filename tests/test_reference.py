"""The reference forward pass, step by step as the emulator runs it, and the gate routing source."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fp32_bounds import assert_within, forward_tolerance

from cluster.core import kernels as K
from cluster.core import reference as R
from cluster.core.config import load_config
from cluster.core.errors import RoutingError
from cluster.core.routing import build_routing
from cluster.core.selection import Routing, popularity
from cluster.core.spec import Config
from policies.base import tp_bounds

SCALE = 1 / 16


def _cfg(model: str = "olmoe-1b-7b", *overrides: str) -> Config:
    return load_config(model=model, overrides=["workload.prompt_tokens=8",
                                               "workload.output_tokens=4", *overrides])


def _emulated(cfg: Config, routing: Routing, scale: float, split: str) -> np.ndarray:
    """What the actors compute: prefill, then one decode step at a time, experts split over
    NDP units (``tp``: every expert's d_ff over all units; ``ep``: whole experts, odd ones on
    the GPU), each device sending one gate-weighted partial per token it was sent."""
    sm = R.scaled_model(cfg, scale)
    gw = R.gpu_weights(sm)
    m, units = cfg.model, cfg.ndp.num_ndp_units
    B, P, S = routing.batch, routing.prompt_tokens, routing.topk_ids.shape[1]
    out = np.empty((B, S, sm.d_model_s), np.float32)
    steps = [list(range(P))] + [[p] for p in range(P, S)]
    for positions in steps:
        x = K.token_embeddings(sm.seed, B, positions, sm.d_model_s).reshape(-1, sm.d_model_s)
        x = R.dense_layers(gw, x)
        for lay in range(m.num_layers):
            x, xn = R.moe_layer_input(gw, lay, x)
            ids = routing.topk_ids[:, positions, lay].reshape(-1, m.top_k)
            weights = routing.topk_weights[:, positions, lay].reshape(-1, m.top_k)
            partials = [R.shared_output(gw, lay, xn)]
            per_device: dict[int, list] = {}
            for e, rows, _ in K.group_tokens(ids, weights):
                if split == "tp":
                    placed = [(u, lo, hi) for u, (lo, hi) in enumerate(tp_bounds(m.d_ff, units))]
                else:
                    placed = [(-1 if e % 2 else e % units, 0, m.d_ff)]
                for dev, lo, hi in placed:
                    lo_s, hi_s = K.column_slice(lo, hi, m.d_ff, sm.d_ff_s)
                    w = K.expert_slice(sm.seed, lay, e, sm.d_model_s, sm.d_ff_s, lo_s, hi_s)
                    per_device.setdefault(dev, []).append((e, rows, w))
            for tasks in per_device.values():
                # a device is sent only the rows its tasks need, and the gate weights for them
                sent = np.unique(np.concatenate([rows for _, rows, _ in tasks]))
                local = [(np.searchsorted(sent, rows),
                          K.gate_weights_for(ids, weights, e, rows), w) for e, rows, w in tasks]
                partial = K.partial_for_tasks(xn[sent], local)
                full = np.zeros_like(xn)
                full[sent] = partial
                partials.append(full)
            for p in partials:
                x = x + p
        out[:, positions] = x.reshape(B, len(positions), sm.d_model_s)
    return out


@pytest.fixture(scope="module")
def olmoe() -> tuple[Config, Routing, np.ndarray]:
    cfg = _cfg("olmoe-1b-7b", "workload.batch_size=2")
    routing = build_routing(cfg)
    return cfg, routing, R.reference_forward(cfg, routing, SCALE)


def test_reference_gives_every_position_of_every_sequence(olmoe) -> None:
    _, _, out = olmoe
    assert out.shape == (2, 11, 128) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[:, 0], out[:, 1])


def test_reference_is_the_same_bytes_on_every_call(olmoe) -> None:
    cfg, routing, out = olmoe
    assert R.reference_forward(cfg, routing, SCALE).tobytes() == out.tobytes()


@pytest.mark.parametrize("split", ["tp", "ep"])
def test_prefill_then_decode_on_split_experts_reproduces_the_reference(olmoe, split) -> None:
    cfg, routing, out = olmoe
    tol = forward_tolerance(cfg, SCALE, out)
    assert_within(_emulated(cfg, routing, SCALE, split), out, tol, split)


def test_dense_layers_and_shared_experts_run_on_the_gpu_side() -> None:
    cfg = _cfg("deepseek-v2-lite", "workload.routing=gate")
    routing = build_routing(cfg)
    sm = R.scaled_model(cfg, SCALE)
    gw = R.gpu_weights(sm)
    assert len(gw.dense_ffn) == 1 and len(gw.shared) == 26 and len(gw.shared[0]) == 2
    assert gw.dense_ffn[0][0].shape == (128, K.scaled_width(10944, SCALE))
    out = R.reference_forward(cfg, routing, SCALE)
    tol = forward_tolerance(cfg, SCALE, out)
    assert_within(_emulated(cfg, routing, SCALE, "tp"), out, tol, "tp")
    # dropping the shared experts must show: they are part of the math, not decoration
    no_shared = dataclasses.replace(gw, shared=tuple(() for _ in gw.shared))
    xn = K.rms_norm(K.token_embeddings(0, 1, 3, sm.d_model_s)[0])
    assert R.shared_output(no_shared, 0, xn).sum() == 0
    assert np.abs(R.shared_output(gw, 0, xn)).max() > 1e-3


def test_reference_stays_finite_and_bounded_over_48_layers() -> None:
    cfg = _cfg("qwen3-30b-a3b")
    out = R.reference_forward(cfg, build_routing(cfg), SCALE)
    assert out.shape == (1, 11, 128) and np.isfinite(out).all()
    rms = np.sqrt((out ** 2).mean(-1))
    assert (rms > 1).all() and (rms < 50).all()


def test_changing_one_tokens_routing_changes_that_token_only(olmoe) -> None:
    cfg, routing, out = olmoe
    ids = routing.topk_ids.copy()
    ids[1, 4, 7] = np.setdiff1d(np.arange(cfg.model.num_experts), ids[1, 4, 7])[:8]
    changed = dataclasses.replace(routing, topk_ids=ids)
    new = R.reference_forward(cfg, changed, SCALE)
    tol = forward_tolerance(cfg, SCALE, out)
    assert np.abs(new[1, 4] - out[1, 4]).max() > max(1e-2, 10 * tol[1, 4].item())
    mask = np.ones(out.shape[:2], bool)
    mask[1, 4] = False
    # the other tokens' math is unchanged, but the experts token (1, 4) left and joined now
    # multiply blocks of other heights: other BLAS kernels, so the fp32 tolerance, not bytes
    assert_within(new[mask], out[mask], tol[mask], "tokens whose routing did not change")
    weights = routing.topk_weights.copy()
    weights[0, 2, 0] = weights[0, 2, 0][::-1]
    other = R.reference_forward(cfg, dataclasses.replace(routing, topk_weights=weights), SCALE)
    assert np.abs(other[0, 2] - out[0, 2]).max() > 1e-3


def test_reference_refuses_a_routing_of_another_shape(olmoe) -> None:
    cfg, routing, _ = olmoe
    short = dataclasses.replace(routing, topk_ids=routing.topk_ids[:, :5],
                                topk_weights=routing.topk_weights[:, :5])
    with pytest.raises(RoutingError, match="shape"):
        R.reference_forward(cfg, short, SCALE)
    bad = routing.topk_ids.copy()
    bad[0, 0, 0, 0] = cfg.model.num_experts
    with pytest.raises(RoutingError, match="num_experts"):
        R.reference_forward(cfg, dataclasses.replace(routing, topk_ids=bad), SCALE)


# --- the gate routing source -----------------------------------------------------------

@pytest.fixture(scope="module")
def gate() -> tuple[Config, Routing]:
    cfg = load_config(model="qwen3-30b-a3b", overrides=[
        "workload.routing=gate", "workload.prompt_tokens=64", "workload.output_tokens=8",
        "workload.batch_size=2"])
    return cfg, build_routing(cfg)


def test_gate_routing_has_the_run_shape_and_valid_choices(gate) -> None:
    _, r = gate
    assert r.source == "gate" and r.prompt_tokens == 64
    assert r.topk_ids.shape == r.topk_weights.shape == (2, 71, 48, 8)
    assert r.topk_ids.dtype == np.int32 and r.topk_weights.dtype == np.float32
    assert r.topk_ids.min() >= 0 and r.topk_ids.max() < 128
    srt = np.sort(r.topk_ids, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all()  # k distinct experts
    np.testing.assert_allclose(r.topk_weights.sum(-1), 1.0, rtol=1e-5)
    assert (np.diff(r.topk_weights, axis=-1) <= 0).all()
    assert (r.topk_weights > 0).all()


def test_gate_routing_favours_the_popular_experts(gate) -> None:
    cfg, r = gate
    m, tokens = cfg.model, 2 * 71
    pop = popularity(m, cfg.workload.alpha, cfg.workload.seed)
    uniform = m.top_k / m.num_experts
    top4, rest = [], []
    for lay in range(m.num_layers):
        freq = np.bincount(r.topk_ids[:, :, lay].ravel(), minlength=m.num_experts) / tokens
        order = np.argsort(-pop[lay])
        top4.append(freq[order[:4]].mean())
        rest.append(freq[order[-64:]].mean())
    assert np.mean(top4) > 5 * uniform
    assert np.mean(rest) < uniform / 2


def test_gate_routing_without_bias_is_spread_over_experts() -> None:
    cfg = _cfg("qwen3-30b-a3b", "workload.routing=gate", "workload.gate_bias=0",
               "workload.prompt_tokens=128")
    r = build_routing(cfg)
    freq = np.bincount(r.topk_ids[0, :, 0].ravel(), minlength=128) / 131
    assert (freq > 0).sum() > 100 and freq.max() < 0.5


def test_gate_routing_is_deterministic_per_seed_and_rng(gate) -> None:
    cfg, r = gate
    again = build_routing(cfg)
    assert np.array_equal(again.topk_ids, r.topk_ids)
    assert again.topk_weights.tobytes() == r.topk_weights.tobytes()
    other_prompt = R.gate_routing(cfg, np.random.default_rng(12345))
    assert not np.array_equal(other_prompt.topk_ids, r.topk_ids)
    other_seed = build_routing(dataclasses.replace(
        cfg, workload=dataclasses.replace(cfg.workload, seed=1)))
    assert not np.array_equal(other_seed.topk_ids, r.topk_ids)


def test_gate_routing_follows_each_tokens_hidden_state(gate) -> None:
    _, r = gate
    for lay in (0, 47):
        assert len({tuple(row) for row in r.topk_ids[0, :, lay]}) > 20
