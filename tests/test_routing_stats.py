"""Routing statistics, the drifting generator, its fit and the real-like presets (issue 14)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cluster.cli import main
from cluster.core import routing_stats as rs
from cluster.core.config import load_config
from cluster.core.errors import RoutingError
from cluster.core.routing import build_routing, synthetic
from cluster.core.spec import ROUTING_PRESETS, ModelSpec, WorkloadSpec

# The table, per layer averaged: (low, high) of the measured range.
QWEN15 = {"prefill_top10": (0.13, 0.16), "prefill_top25": (0.29, 0.33),
          "prefill_top50": (0.54, 0.61), "decode_top10": (0.22, 0.31),
          "coverage": (0.95, 0.99), "reuse": (0.15, 0.19)}
QWEN36 = {"prefill_top10": (0.38, 0.38), "prefill_top25": (0.64, 0.64),
          "prefill_top50": (0.81, 0.81), "decode_top10": (0.56, 0.56),
          "coverage": (0.52, 0.52), "reuse": (0.33, 0.33)}
TOLERANCE = 0.05  # percentage points, as a fraction


def trace(model: ModelSpec, **work) -> np.ndarray:
    w = WorkloadSpec(**work)
    return synthetic(model, w, np.random.default_rng(w.seed)).topk_ids


# --- the statistics ----------------------------------------------------------------------------

def test_top_share_counts_ties_at_the_cut_fractionally() -> None:
    rank = np.array([3.0, 1, 1, 1, 0, 0, 0, 0, 0, 0])  # 10 experts: top 10% = expert 0
    vals = np.arange(10.0)
    assert rs.top_share(rank, vals, 0.1) == pytest.approx(0 / 45)
    # top 20%: expert 0 and one of three tied experts, on average (1 + 2 + 3) / 3
    assert rs.top_share(rank, vals, 0.2) == pytest.approx((0 + 2) / 45)
    assert rs.top_share(rank, vals, 1.0) == pytest.approx(1.0)


def test_statistics_of_a_trace_built_by_hand() -> None:
    # one sequence, one layer, 10 experts, top-1: prefill uses expert 0 four times, expert 1
    # twice; the decode repeats expert 0 then alternates 2 and 3
    ids = np.array([0, 0, 1, 0, 1, 0, 0, 0, 2, 3, 2, 3]).reshape(1, 12, 1, 1)
    st = rs.measure(ids, prompt_tokens=6, num_experts=10)
    assert st.decode_tokens == 6
    assert st.values["prefill_top10"] == pytest.approx(2 / 6)  # expert 0: 2 of 6 decode picks
    assert st.values["coverage"] == pytest.approx(3 / 10)
    assert st.values["reuse"] == pytest.approx(1 / 5)  # only the 0 -> 0 pair repeats
    assert st.values["decode_top10"] == pytest.approx(2 / 6)
    assert st.uniform_reuse == pytest.approx(0.1)
    assert st.coverage_curve.shape == (1, 6) and st.coverage_curve[0, -1] == pytest.approx(0.3)
    assert st.share_curve.shape == (1, 101)


def test_stationary_routing_has_the_prefill_predict_the_decode_and_drift_does_not() -> None:
    model = ModelSpec(name="m", num_layers=6, num_experts=60, top_k=4)
    base = dict(batch_size=4, prompt_tokens=64, output_tokens=129, alpha=0.8, reuse=0.0, seed=3)
    still = rs.measure(trace(model, **base), 64, 60).values
    moving = rs.measure(trace(model, **base, drift=0.05, drift_jump=0.8, drift_share=1.0), 64, 60).values
    assert still["prefill_top10"] > moving["prefill_top10"] + 0.1
    assert moving["prefill_top10"] < 0.2  # barely above uniform's 10%
    assert still["reuse"] == pytest.approx(moving["reuse"], abs=0.05)  # reuse is separate


def test_routing_stats_on_the_real_flame_trace(trace_path: Path, capsys) -> None:
    assert main(["routing-stats", str(trace_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at its width
    assert "64 sequence(s) x 10 positions" in out and "8 layers, 64 experts, top-6" in out
    for label in ("prefill's top-10%", "own top-10%", "used at least once", "uniform 9.4%"):
        assert label in out
    ids, E = rs.read_ids(trace_path)
    st = rs.measure(ids, 5, E)
    # FLAME-MoE is mildly skewed (tests/data/README.md): reuse near chance, prefill weakly predictive
    assert 0.08 < st.values["reuse"] < 0.14
    assert 0.10 < st.values["prefill_top10"] < 0.2


@pytest.mark.slow
def test_fit_on_the_real_flame_trace_matches_its_statistics_and_draws_the_curves(
        trace_path: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "flame.png"
    assert main(["routing-stats", str(trace_path), "--fit", "--popularity", "zipf",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "fitted generator" in out and "--set workload.alpha=" in out
    assert png.stat().st_size > 10_000
    ids, E = rs.read_ids(trace_path)
    f = rs.fit(rs.measure(ids, 5, E), popularity="zipf")
    assert f.error < 0.02  # within 2 points RMS over the statistics


@pytest.mark.slow
@pytest.mark.parametrize("true", [
    {"alpha": 1.0, "reuse": 0.2, "drift": 0.02, "drift_jump": 0.4},
    {"alpha": 0.5, "reuse": 0.05, "drift": 0.003, "drift_jump": 0.7},
])
def test_fit_recovers_the_parameters_of_a_synthetic_trace(true) -> None:
    """Stated tolerance: alpha +-0.1, reuse +-0.05, drift within a factor 2, drift_jump +-0.25
    (a walk and a jump both move the decode away from the prefill; 8 sequences x 128 decode
    tokens tell them apart only this well). The fit simulates with another seed."""
    shape = rs.Shape(sequences=8, prompt_tokens=64, decode_tokens=128, num_layers=8,
                     num_experts=64, top_k=6)
    target = rs.simulated_stats(shape, {**true, "drift_share": 1.0}, seed=7)
    got = rs.fit(target, seed=0, popularity="zipf").params
    assert got["alpha"] == pytest.approx(true["alpha"], abs=0.1)
    assert got["reuse"] == pytest.approx(true["reuse"], abs=0.05)
    assert abs(math.log2(got["drift"] / true["drift"])) <= 1.0
    assert got["drift_jump"] == pytest.approx(true["drift_jump"], abs=0.25)


def test_routing_stats_refuses_bad_input(tmp_path: Path, trace_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, topk_ids=np.array([[[0, 0]]]))
    assert main(["routing-stats", str(bad)]) == 2
    assert "twice" in capsys.readouterr().err
    assert main(["routing-stats", str(trace_path), "--prompt", "9"]) == 2
    assert "prompt_tokens = 9" in capsys.readouterr().err
    with pytest.raises(RoutingError):
        rs.read_ids(trace_path, num_experts=10)


# --- the generator -----------------------------------------------------------------------------

def test_drift_fields_are_ignored_without_a_drift_share() -> None:
    """Today's generator is the special case drift_share = 0: the same draws, bit for bit."""
    model = ModelSpec(name="m", num_layers=3, num_experts=32, top_k=4)
    a = trace(model, prompt_tokens=8, output_tokens=8, seed=5)
    b = trace(model, prompt_tokens=8, output_tokens=8, seed=5, drift=0.5, drift_jump=0.5)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", ["zipf", "lognormal", "exponential"])
def test_drifting_routing_is_valid_and_deterministic(shape: str) -> None:
    model = ModelSpec(name="m", num_layers=3, num_experts=32, top_k=4)
    kw = dict(batch_size=2, prompt_tokens=8, output_tokens=8, seed=2, popularity=shape,
              drift=0.1, drift_jump=0.5, drift_share=0.7, alpha=2.0)
    a, b = trace(model, **kw), trace(model, **kw)
    assert np.array_equal(a, b)
    srt = np.sort(a, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all() and a.min() >= 0 and a.max() < 32


def test_a_preset_is_chosen_with_workload_routing_and_differs_from_the_default() -> None:
    cfg = load_config("edge-rtx5080-ndp4", "qwen1.5-moe-a2.7b", None,
                      ["workload.routing=qwen15-like", "workload.prompt_tokens=16",
                       "workload.output_tokens=8"])
    r = build_routing(cfg)
    assert r.topk_ids.shape == (1, 23, 24, 4)
    plain = build_routing(cfg.replace(workload=WorkloadSpec(prompt_tokens=16, output_tokens=8)))
    assert not np.array_equal(r.topk_ids, plain.topk_ids)


@pytest.mark.parametrize("name, table, model, prompt, decode", [
    ("qwen15-like", QWEN15, ModelSpec(name="qwen1.5", num_layers=24, num_experts=60, top_k=4), 54, 128),
    ("qwen36-like", QWEN36, ModelSpec(name="qwen3.6", num_layers=40, num_experts=256, top_k=8), 36, 127),
])
def test_presets_reproduce_the_measured_statistics_within_5_points(name, table, model, prompt,
                                                                   decode) -> None:
    """6 prompts, as measured; each statistic within +-5 percentage points of the table's range."""
    assert name in ROUTING_PRESETS
    ids = trace(model, batch_size=6, prompt_tokens=prompt, output_tokens=decode + 1,
                routing=name, seed=0)
    got = rs.measure(ids, prompt, model.num_experts, decode).values
    for stat, (lo, hi) in table.items():
        assert lo - TOLERANCE <= got[stat] <= hi + TOLERANCE, (name, stat, got[stat], (lo, hi))


def test_a_flat_trace_is_one_sequence(tmp_path: Path, capsys) -> None:
    model = ModelSpec(name="m", num_layers=2, num_experts=16, top_k=2)
    ids = trace(model, prompt_tokens=20, output_tokens=21, seed=1)[0]  # [tokens, layers, k]
    path = tmp_path / "flat.npz"
    np.savez(path, topk_ids=ids)
    assert main(["routing-stats", str(path), "--prompt", "20", "--experts", "16"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps at its width
    assert "1 sequence(s) x 40 positions" in out and "decode 20 measured" in out
