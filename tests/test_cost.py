"""The roofline cost model against durations worked out by hand on the paper's system.

Default preset: RTX 5080 (960 GB/s, 112 TFLOPS, 5 us launch), NDP-DIMM (76.8 GB/s,
512 GFLOPS, 1 us launch), PCIe 5.0 link (50 GB/s, 2 us), Qwen3-30B-A3B (d_model 2048,
d_ff 768 per expert, 128 experts, top-8).
"""

from __future__ import annotations

import itertools

import pytest

from cluster.core.config import load_config
from cluster.core.cost import CostModel

D_MODEL, D_FF = 2048, 768
EXPERT_BYTES = 3 * D_MODEL * D_FF * 2  # fp16 gate, up and down
EXPERT_FLOPS_PER_TOKEN = 2 * 3 * D_MODEL * D_FF
ACT_BYTES_PER_TOKEN = D_MODEL * 2


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return CostModel(load_config())


def test_expert_weights_are_fp16_swiglu_matrices(cost: CostModel) -> None:
    assert cost.gpu_expert_bytes == cost.ndp_expert_bytes == EXPERT_BYTES == 9_437_184
    assert cost.cfg.model.routed_expert_bytes == 48 * 128 * EXPERT_BYTES


def test_ndp_expert_at_one_token_is_bound_by_dimm_bandwidth(cost: CostModel) -> None:
    weights_and_acts = EXPERT_BYTES + 2 * 1 * ACT_BYTES_PER_TOKEN
    expected = 1e-6 + weights_and_acts / 76.8e9
    assert cost.ndp_expert_s(1) == pytest.approx(expected, rel=1e-12)
    # the weights dominate: within 0.1% of weights alone (~123.9 us)
    assert cost.ndp_expert_s(1) == pytest.approx(EXPERT_BYTES / 76.8e9 + 1e-6, rel=1e-3)
    assert 120e-6 < cost.ndp_expert_s(1) < 130e-6


def test_ndp_expert_with_many_tokens_is_bound_by_dimm_compute(cost: CostModel) -> None:
    n = 64
    flops = EXPERT_FLOPS_PER_TOKEN * n
    assert flops / 512e9 > (EXPERT_BYTES + 2 * n * ACT_BYTES_PER_TOKEN) / 76.8e9
    assert cost.ndp_expert_s(n) == pytest.approx(1e-6 + flops / 512e9, rel=1e-12)


def test_tensor_parallel_slice_reads_its_share_of_the_weights(cost: CostModel) -> None:
    quarter = 1e-6 + (EXPERT_BYTES / 4 + 2 * ACT_BYTES_PER_TOKEN) / 76.8e9
    assert cost.ndp_expert_s(1, 0.25) == pytest.approx(quarter, rel=1e-12)
    # four quarter slices in parallel beat one whole expert by nearly 4x at batch 1
    assert cost.ndp_expert_s(1) / cost.ndp_expert_s(1, 0.25) == pytest.approx(4, rel=0.05)


def test_fetching_an_expert_is_link_latency_plus_bytes_over_bandwidth(cost: CostModel) -> None:
    assert cost.fetch_s() == pytest.approx(2e-6 + EXPERT_BYTES / 50e9, rel=1e-12)
    assert cost.fetch_s(0.5) == pytest.approx(2e-6 + EXPERT_BYTES / 2 / 50e9, rel=1e-12)
    assert cost.transfer_s(0) == pytest.approx(2e-6)
    assert cost.transfer_s(50e9) == pytest.approx(1.0 + 2e-6)


def test_gpu_expert_at_one_token_is_bound_by_gpu_bandwidth(cost: CostModel) -> None:
    expected = 5e-6 + (EXPERT_BYTES + 2 * ACT_BYTES_PER_TOKEN) / 960e9
    assert cost.gpu_expert_s(1) == pytest.approx(expected, rel=1e-12)


def test_gpu_expert_with_many_tokens_is_compute_bound(cost: CostModel) -> None:
    n = 4096
    flops = EXPERT_FLOPS_PER_TOKEN * n
    mem_s = (EXPERT_BYTES + 2 * n * ACT_BYTES_PER_TOKEN) / 960e9
    assert flops / 112e12 > mem_s
    assert cost.gpu_expert_s(n) == pytest.approx(5e-6 + flops / 112e12, rel=1e-12)
    assert cost.gpu_expert_s(n) == pytest.approx(350.1e-6, rel=1e-3)


def test_gpu_layer_at_one_token_reads_attention_router_and_kv(cost: CostModel) -> None:
    # attention q, k, v, o of 32 heads x 128 (4 KV heads) and a 2048 x 128 router
    params = 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 32 * 128 * 2048 + 2048 * 128
    assert params == 19_136_512
    kv_bytes = 512 * 2 * 4 * 128 * 2  # 512 tokens of context, K and V, fp16
    flops = 2 * params + 4 * 512 * 32 * 128
    nbytes = 2 * params + kv_bytes + 2 * ACT_BYTES_PER_TOKEN
    assert nbytes / 960e9 > flops / 112e12
    # three kernels: attention, router and norm/residual, each paying a launch
    expected = 3 * 5e-6 + nbytes / 960e9
    assert cost.gpu_layer_s(1, 512, 1) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n_tokens, batch", [(1, 1), (4, 4), (512, 1)])
def test_gpu_layer_grows_with_context(cost: CostModel, n_tokens: int, batch: int) -> None:
    times = [cost.gpu_layer_s(n_tokens, ctx, batch) for ctx in (1, 16, 256, 1024, 8192, 65536)]
    assert all(a < b for a, b in itertools.pairwise(times))


def test_gpu_layer_grows_with_tokens_and_batch(cost: CostModel) -> None:
    by_tokens = [cost.gpu_layer_s(n, 512, 1) for n in (1, 64, 1024, 16384)]
    assert all(a < b for a, b in itertools.pairwise(by_tokens))
    assert cost.gpu_layer_s(8, 512, 8) > cost.gpu_layer_s(8, 512, 1)  # 8 KV caches, not 1


def test_shared_experts_cost_the_gpu_an_extra_kernel_and_their_weights() -> None:
    plain = CostModel(load_config(model="olmoe-1b-7b"))
    shared = CostModel(load_config(model="olmoe-1b-7b", overrides=[
        "model.num_shared_experts=1", "model.shared_d_ff=1024"]))
    extra_bytes = 3 * 2048 * 1024 * 2
    diff = shared.gpu_layer_s(1, 16, 1) - plain.gpu_layer_s(1, 16, 1)
    assert diff == pytest.approx(5e-6 + extra_bytes / 960e9, rel=1e-6)


def test_lm_head_and_combine(cost: CostModel) -> None:
    head_params = 151936 * 2048
    assert cost.gpu_head_s(1) == pytest.approx(5e-6 + head_params * 2 / 960e9, rel=1e-12)
    # summing 4 partials of 1 token: reads 4 partials + the residual (5 x 4 KiB)
    assert cost.gpu_combine_s(1, 4) == pytest.approx(5e-6 + 5 * ACT_BYTES_PER_TOKEN / 960e9,
                                                     rel=1e-12)
    assert cost.activation_bytes(3) == 3 * ACT_BYTES_PER_TOKEN


def test_config_numbers_flow_into_the_cost_model() -> None:
    slow = CostModel(load_config(overrides=["link.bw_gbps=25", "link.latency_us=10",
                                            "ndp.internal_bw_gbps=38.4", "ndp.launch_overhead_us=0"]))
    assert slow.fetch_s() == pytest.approx(10e-6 + EXPERT_BYTES / 25e9, rel=1e-12)
    assert slow.ndp_expert_s(1) == pytest.approx(
        (EXPERT_BYTES + 2 * ACT_BYTES_PER_TOKEN) / 38.4e9, rel=1e-12)


def test_preset_models_have_their_published_parameter_counts() -> None:
    def total_params(name: str) -> float:
        m = load_config(model=name, system="edge-rtx5080-ndp6").model
        return (m.routed_expert_bytes + m.non_expert_bytes) / 2

    assert total_params("qwen3-30b-a3b") == pytest.approx(30.5e9, rel=0.01)
    assert total_params("mixtral-8x7b") == pytest.approx(46.7e9, rel=0.01)
    assert total_params("olmoe-1b-7b") == pytest.approx(6.9e9, rel=0.02)


def test_fetch_then_gpu_beats_ndp_only_when_many_tokens_share_the_expert(cost: CostModel) -> None:
    # the MoNDE hot-expert criterion: at one token the NDP unit wins, at many the GPU does
    assert cost.fetch_s() + cost.gpu_expert_s(1) > cost.ndp_expert_s(1)
    assert cost.fetch_s() + cost.gpu_expert_s(512) < cost.ndp_expert_s(512)


# --- weight precision per device ---------------------------------------------------------------

def test_a_quantised_model_reads_and_moves_fewer_weight_bytes_on_every_device(cost: CostModel) -> None:
    """gpu.weight_bits = ndp.weight_bits = 4: every weight byte count is a quarter (exact:
    3 * 2048 * 768 is a multiple of 2); flops, activations, the KV cache and rates do not move."""
    q = CostModel(load_config(overrides=["gpu.weight_bits=4", "ndp.weight_bits=4"]))
    assert q.gpu_expert_bytes == q.ndp_expert_bytes == EXPERT_BYTES // 4
    assert q.ndp_expert_s(1) == pytest.approx(1e-6 + (EXPERT_BYTES / 4 + 2 * ACT_BYTES_PER_TOKEN) / 76.8e9,
                                              rel=1e-12)
    assert q.fetch_s() == pytest.approx(2e-6 + EXPERT_BYTES / 4 / 50e9, rel=1e-12)
    assert q.gpu_expert_roofline_s(1) == pytest.approx((EXPERT_BYTES / 4 + 2 * ACT_BYTES_PER_TOKEN) / 960e9,
                                                       rel=1e-12)
    # compute-bound work is unchanged: 512 tokens on the GPU are flops-bound at both precisions
    assert q.gpu_expert_roofline_s(512) == cost.gpu_expert_roofline_s(512)
    # the GPU's own layers read a quarter of their weights, the KV cache as before
    kv = 1 * 1024 * q.cfg.model.kv_elems_per_token_layer * 2
    w16 = cost.gpu_layer_s(1, 1024, 1) - 2 * 5e-6
    w4 = q.gpu_layer_s(1, 1024, 1) - 2 * 5e-6
    params = q.cfg.model.gpu_layer_params
    assert w16 - w4 == pytest.approx((params * 2 - params // 2) / 960e9, rel=1e-9)
    assert w4 > (kv / 960e9)


def test_reduced_bit_ndp_experts_change_only_the_ndp_side_and_the_link() -> None:
    base = load_config()
    c = load_config(overrides=["ndp.weight_bits=4"])
    assert c.gpu_expert_bytes == base.gpu_expert_bytes == EXPERT_BYTES
    assert c.ndp_expert_bytes == EXPERT_BYTES // 4
    assert c.cache_capacity_experts == base.cache_capacity_experts  # the GPU holds fp16 experts
    q = load_config(overrides=["gpu.weight_bits=8"])  # the GPU's weights and cache at 8 bits
    assert q.gpu_resident_bytes == q.model.non_expert_params  # one byte per weight
    # half-size experts in a budget that grew (the resident weights halved): over twice as many
    assert q.cache_capacity_experts >= 2 * base.cache_capacity_experts


@pytest.mark.parametrize("section, value", [("gpu", 0), ("ndp", 17), ("ndp", 4.5), ("gpu", True)])
def test_weight_bits_outside_1_to_16_are_refused_naming_field_and_value(section: str, value) -> None:
    from cluster.core.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{section}\.weight_bits = "):
        load_config(overrides=[f"{section}.weight_bits={str(value).lower()}"])


def test_ndp_capacity_is_checked_at_the_ndp_side_bits() -> None:
    """Mixtral-8x22B's routed experts (~270 GB fp16) overflow 2 x 64 GiB DIMMs at 16 bits and
    fit at 4 bits (a quarter)."""
    from cluster.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit the NDP units"):
        load_config("edge-rtx5080-ndp2", "mixtral-8x22b")
    cfg = load_config("edge-rtx5080-ndp2", "mixtral-8x22b", overrides=["ndp.weight_bits=4"])
    assert cfg.ndp_expert_bytes * cfg.model.num_layers * cfg.model.num_experts < 2 * cfg.ndp.capacity_bytes
