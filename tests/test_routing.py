"""Routing sources: the synthetic generator, grouping by expert, and real recorded traces."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policies
from cluster.core.config import load_config
from cluster.core.errors import RoutingError
from cluster.core.metrics import summarize
from cluster.core.routing import build_routing, import_vllm_routed_experts, load_trace, synthetic
from cluster.core.selection import Routing, group_by_expert
from cluster.core.spec import ModelSpec, WorkloadSpec
from cluster.engines.analytic import run_policy

FLAME = ["model.num_layers=8", "model.num_experts=64", "model.top_k=6"]


def top8_share(ids: np.ndarray, num_experts: int) -> float:
    """Mean over layers of the routing share of each layer's 8 most used experts."""
    shares = []
    for lay in range(ids.shape[2]):
        counts = np.bincount(ids[:, :, lay].ravel(), minlength=num_experts)
        shares.append(np.sort(counts)[::-1][:8].sum() / counts.sum())
    return float(np.mean(shares))


def consecutive_overlap(ids: np.ndarray) -> float:
    """Mean fraction of a token's experts that the previous token of its sequence also used."""
    prev, cur = ids[:, :-1], ids[:, 1:]
    shared = (prev[..., :, None] == cur[..., None, :]).any(-1).sum(-1)
    return float(shared.mean() / ids.shape[-1])


def small_synthetic(seed: int, alpha: float = 0.8, reuse: float = 0.2, batch: int = 2,
                    prompt: int = 32, output: int = 32) -> Routing:
    model = ModelSpec(name="m", num_layers=4, num_experts=64, top_k=6)
    work = WorkloadSpec(batch_size=batch, prompt_tokens=prompt, output_tokens=output,
                        alpha=alpha, reuse=reuse, seed=seed)
    return synthetic(model, work, np.random.default_rng(seed))


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_routing_has_the_workload_shape() -> None:
    r = small_synthetic(0, batch=3, prompt=5, output=4)
    assert r.topk_ids.shape == r.topk_weights.shape == (3, 5 + 4 - 1, 4, 6)
    assert r.topk_ids.dtype == np.int32 and r.topk_weights.dtype == np.float32
    assert (r.batch, r.num_layers, r.decode_steps, r.prompt_tokens) == (3, 4, 3, 5)
    assert r.prefill_ids(2).shape == (3 * 5, 6)
    assert r.decode_ids(0, 1).shape == (3, 6)
    counts = r.prefill_counts(64)
    assert counts.shape == (4, 64) and (counts.sum(axis=1) == 3 * 5 * 6).all()


def test_synthetic_routing_is_deterministic_per_seed() -> None:
    a, b, c = small_synthetic(5), small_synthetic(5), small_synthetic(6)
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert np.array_equal(a.topk_weights, b.topk_weights)
    assert not np.array_equal(a.topk_ids, c.topk_ids)


def test_build_routing_follows_the_workload_seed(tiny) -> None:
    a = build_routing(tiny("workload.seed=3"))
    b = build_routing(tiny("workload.seed=3"))
    c = build_routing(tiny("workload.seed=4"))
    assert np.array_equal(a.topk_ids, b.topk_ids)
    assert not np.array_equal(a.topk_ids, c.topk_ids)


@pytest.mark.parametrize("alpha, reuse", [(0.0, 0.0), (0.8, 0.2), (3.0, 0.9)])
def test_synthetic_ids_are_distinct_in_range_and_weights_sorted_to_one(alpha, reuse) -> None:
    r = small_synthetic(1, alpha=alpha, reuse=reuse)
    ids = r.topk_ids
    assert ids.min() >= 0 and ids.max() < 64
    srt = np.sort(ids, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all(), "a token picked one expert twice"
    w = r.topk_weights
    assert (w > 0).all()
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-5)
    assert (np.diff(w, axis=-1) <= 0).all(), "weights not sorted descending"


def test_higher_alpha_concentrates_routing_on_fewer_experts() -> None:
    shares = [top8_share(small_synthetic(2, alpha=a, reuse=0.0, batch=4, prompt=128).topk_ids, 64)
              for a in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(shares)), shares
    assert shares[0] < 0.16  # uniform: 8 of 64 experts take about 12.5%
    assert shares[-1] > 0.6


def test_reuse_makes_consecutive_tokens_share_experts() -> None:
    independent = consecutive_overlap(small_synthetic(3, alpha=0.0, reuse=0.0).topk_ids)
    reusing = consecutive_overlap(small_synthetic(3, alpha=0.0, reuse=0.5).topk_ids)
    assert independent == pytest.approx(6 / 64, abs=0.03)  # chance overlap of 6 of 64
    assert reusing > independent + 0.3


# --- grouping tokens by expert -----------------------------------------------------------

def brute_force_groups(ids: np.ndarray) -> dict[int, tuple[int, ...]]:
    out: dict[int, list[int]] = {}
    for token, row in enumerate(ids.tolist()):
        for e in row:
            out.setdefault(e, []).append(token)
    return {e: tuple(sorted(t)) for e, t in sorted(out.items())}


@st.composite
def routed_tokens(draw) -> np.ndarray:
    experts = draw(st.integers(1, 40))
    k = draw(st.integers(1, min(8, experts)))
    tokens = draw(st.integers(1, 24))
    rows = [draw(st.lists(st.integers(0, experts - 1), min_size=k, max_size=k, unique=True))
            for _ in range(tokens)]
    return np.array(rows, dtype=np.int32)


@settings(deadline=None, max_examples=150)
@given(routed_tokens())
def test_group_by_expert_matches_brute_force(ids: np.ndarray) -> None:
    groups = group_by_expert(ids)
    assert groups == brute_force_groups(ids)
    assert list(groups) == sorted(groups)
    assert sum(len(t) for t in groups.values()) == ids.size


# --- recorded traces ---------------------------------------------------------------------

def flame_config(trace: Path, batch: int = 4, prompt: int = 6, output: int = 5, extra=()):
    return load_config(model="olmoe-1b-7b", overrides=[
        *FLAME, f"workload.batch_size={batch}", f"workload.prompt_tokens={prompt}",
        f"workload.output_tokens={output}", "workload.routing=trace",
        f"workload.trace_path={trace}", *extra])


def test_real_trace_loads_into_the_workload_shape(trace_path: Path) -> None:
    cfg = flame_config(trace_path)
    r = build_routing(cfg)
    raw = np.load(trace_path)
    assert r.source == "trace"
    assert r.topk_ids.shape == (4, 10, 8, 6)  # 6 prompt + 5 output - 1 positions
    assert np.array_equal(r.topk_ids, raw["topk_ids"][:4, :10])
    assert r.decode_steps == 4
    assert r.topk_ids.min() >= 0 and r.topk_ids.max() < 64
    assert (np.diff(np.sort(r.topk_ids, axis=-1), axis=-1) > 0).all()
    # recorded probabilities are renormalised over the chosen experts, order kept
    np.testing.assert_allclose(r.topk_weights.sum(axis=-1), 1.0, rtol=1e-5)
    raw_w = raw["topk_weights"][:4, :10]
    np.testing.assert_allclose(r.topk_weights, raw_w / raw_w.sum(-1, keepdims=True), rtol=1e-5)
    assert (np.diff(r.topk_weights, axis=-1) <= 0).all()


def test_real_trace_is_mildly_skewed_and_less_so_than_default_synthetic(trace_path) -> None:
    cfg = flame_config(trace_path, batch=64)  # the whole recording: 64 x 10 tokens
    real = build_routing(cfg)
    real_share = top8_share(real.topk_ids, 64)
    assert 0.145 < real_share < 0.17  # README: ~15-16%; uniform would be 12.5%
    assert 0.09 < consecutive_overlap(real.topk_ids) < 0.12  # README: ~10.5%
    syn_default = synthetic(cfg.model, WorkloadSpec(batch_size=64, prompt_tokens=6,
                                                    output_tokens=5), np.random.default_rng(0))
    assert top8_share(syn_default.topk_ids, 64) > real_share + 0.15  # alpha 0.8 is far steeper
    syn_uniform = synthetic(cfg.model, WorkloadSpec(batch_size=64, prompt_tokens=6,
                                                    output_tokens=5, alpha=0.0, reuse=0.0),
                            np.random.default_rng(0))
    assert top8_share(syn_uniform.topk_ids, 64) < 0.16


def test_short_sequences_are_used_one_after_another(trace_path: Path) -> None:
    cfg = flame_config(trace_path, batch=1, prompt=20, output=5)  # 24 positions > 10 per sequence
    r = build_routing(cfg)
    raw = np.load(trace_path)["topk_ids"]
    assert r.topk_ids.shape == (1, 24, 8, 6)
    assert np.array_equal(r.topk_ids[0, :10], raw[0])
    assert np.array_equal(r.topk_ids[0, 10:20], raw[1])


def test_a_trace_too_short_for_the_workload_says_by_how_much(trace_path: Path) -> None:
    cfg = flame_config(trace_path, batch=8, prompt=80, output=2)
    with pytest.raises(RoutingError) as info:
        build_routing(cfg)
    msg = str(info.value)
    assert "640 tokens" in msg and "8 x 81 = 648" in msg and str(trace_path) in msg


def test_a_trace_with_other_layer_counts_names_both(trace_path: Path) -> None:
    cfg = flame_config(trace_path, extra=["model.num_layers=6"])
    with pytest.raises(RoutingError) as info:
        build_routing(cfg)
    msg = str(info.value)
    assert "8 layers and top-6" in msg and "num_layers = 6" in msg
    assert "--set model.num_layers=8" in msg
    cfg = flame_config(trace_path, extra=["model.top_k=4"])
    with pytest.raises(RoutingError, match="top_k = 4"):
        build_routing(cfg)


def test_a_trace_with_experts_beyond_the_model_is_refused(trace_path: Path) -> None:
    cfg = flame_config(trace_path, extra=["model.num_experts=32"])
    with pytest.raises(RoutingError) as info:
        build_routing(cfg)
    assert "0..63" in str(info.value) and "model.num_experts = 32" in str(info.value)


def test_a_trace_listing_one_expert_twice_for_a_token_is_refused(tmp_path: Path) -> None:
    ids = np.array([[[0, 1]], [[2, 3]], [[4, 4]], [[5, 6]]], dtype=np.int32)  # token 2: 4, 4
    path = import_vllm_routed_experts(ids, tmp_path / "dup.npz")
    model = ModelSpec(name="m", num_layers=1, num_experts=8, top_k=2)
    with pytest.raises(RoutingError) as info:
        load_trace(path, model, WorkloadSpec(batch_size=1, prompt_tokens=3, output_tokens=2))
    msg = str(info.value)
    assert "position 2" in msg and "layer 0" in msg and "[4, 4]" in msg and "distinct" in msg


def test_missing_or_foreign_trace_files_raise_routing_errors(tmp_path: Path) -> None:
    model = ModelSpec(name="m", num_layers=2, num_experts=8, top_k=2)
    work = WorkloadSpec(prompt_tokens=2, output_tokens=2)
    with pytest.raises(RoutingError, match="does not exist"):
        load_trace(tmp_path / "absent.npz", model, work)
    np.savez(tmp_path / "other.npz", experts=np.zeros((3, 2, 2)))
    with pytest.raises(RoutingError, match=r"no 'topk_ids'.*experts"):
        load_trace(tmp_path / "other.npz", model, work)
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(RoutingError, match="not an npz file"):
        load_trace(tmp_path / "text.npz", model, work)


def test_vllm_routed_experts_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens, layers, k, experts = 12, 2, 2, 8
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)])
                    for _ in range(tokens)])
    weights = rng.random((tokens, layers, k)).astype(np.float32) + 0.1
    path = import_vllm_routed_experts(ids, tmp_path / "vllm.npz", weights)
    assert path.exists()
    model = ModelSpec(name="m", num_layers=layers, num_experts=experts, top_k=k)
    work = WorkloadSpec(batch_size=2, prompt_tokens=4, output_tokens=3)  # 2 x 6 = 12 tokens
    r = load_trace(path, model, work)
    assert np.array_equal(r.topk_ids, ids.reshape(2, 6, layers, k))
    expected_w = weights / weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.topk_weights, expected_w.reshape(2, 6, layers, k), rtol=1e-6)
    # without weights every chosen expert weighs 1/k
    path = import_vllm_routed_experts(ids, tmp_path / "ids_only.npz")
    r = load_trace(path, model, work)
    np.testing.assert_allclose(r.topk_weights, 0.5)


def test_vllm_import_refuses_other_shapes(tmp_path: Path) -> None:
    with pytest.raises(RoutingError, match=r"\[tokens, layers, k\].*\(4, 2\)"):
        import_vllm_routed_experts(np.zeros((4, 2), dtype=np.int32), tmp_path / "x.npz")


def test_the_real_trace_drives_every_policy_to_the_end(trace_path: Path) -> None:
    cfg = flame_config(trace_path)
    routing = build_routing(cfg)
    summaries = {}
    for name in [*policies.names("scheduler"), "paper"]:
        rec = run_policy(cfg, routing, name)
        assert len(rec.tokens) == cfg.workload.output_tokens
        assert len(rec.steps) == 8 * (1 + routing.decode_steps)
        summaries[name] = summarize(rec, cfg.ndp.num_ndp_units)
    for name, s in summaries.items():
        assert 0 < s["ttft_s"] < s["e2e_latency_s"], name
        assert s["max_over_mean"] >= 1.0 and 0 < s["balancedness"] <= 1.0
    assert summaries["tp-lb"]["e2e_latency_s"] <= summaries["tp"]["e2e_latency_s"]
