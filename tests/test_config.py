"""Loading a run's config: defaults, presets, TOML files, HF config.json and --set overrides.

Bad input must fail before any work with a ConfigError naming the field, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import policies  # noqa: F401  (registers the policies' own knobs: part of the policy section)
from cluster.core import presets
from cluster.core.config import load_config, model_from_hf_config, parse_override
from cluster.core.errors import ConfigError, NdpmoeError
from cluster.core.spec import GIB, Config, ModelSpec


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


# --- defaults and presets ----------------------------------------------------------------

def test_defaults_are_the_paper_system_and_workload() -> None:
    cfg = load_config()
    assert cfg.system_name == "edge-rtx5080-ndp4"
    assert (cfg.gpu.mem_bytes, cfg.gpu.mem_bw_gbps, cfg.gpu.peak_tflops) == (16 * GIB, 960.0, 112.0)
    assert cfg.gpu.launch_overhead_us == 5.0
    assert cfg.ndp.num_ndp_units == 4
    assert (cfg.ndp.capacity_bytes, cfg.ndp.internal_bw_gbps, cfg.ndp.peak_gflops) == (
        64 * GIB, 76.8, 512.0)
    assert (cfg.link.bw_gbps, cfg.link.latency_us) == (50.0, 2.0)
    m = cfg.model
    assert m.name == "qwen3-30b-a3b"
    assert (m.num_layers, m.d_model, m.d_ff, m.num_experts, m.top_k) == (48, 2048, 768, 128, 8)
    assert m.num_shared_experts == 0
    w = cfg.workload
    assert (w.batch_size, w.prompt_tokens, w.output_tokens) == (1, 512, 512)


@pytest.mark.parametrize("units", [2, 3, 4, 5, 6])
def test_system_presets_sweep_the_ndp_unit_count(units: int) -> None:
    cfg = load_config(system=f"edge-rtx5080-ndp{units}")
    assert cfg.ndp.num_ndp_units == units
    assert cfg.system_name == f"edge-rtx5080-ndp{units}"


@pytest.mark.parametrize("name, layers, dense, d_ff, experts, top_k, shared", [
    ("qwen3-30b-a3b", 48, 0, 768, 128, 8, 0),
    ("mixtral-8x7b", 32, 0, 14336, 8, 2, 0),
    ("deepseek-v2-lite", 26, 1, 1408, 64, 6, 2),
    ("olmoe-1b-7b", 16, 0, 1024, 64, 8, 0),
    ("qwen1.5-moe-a2.7b", 24, 0, 1408, 60, 4, 1),
    ("mixtral-8x22b", 56, 0, 16384, 8, 2, 0),
])
def test_model_presets_match_the_design_table(name, layers, dense, d_ff, experts, top_k,
                                              shared) -> None:
    m = load_config(model=name, system="edge-rtx5080-ndp6").model
    assert m.name == name
    assert (m.num_layers, m.num_dense_layers, m.d_ff, m.num_experts, m.top_k,
            m.num_shared_experts) == (layers, dense, d_ff, experts, top_k, shared)


def test_config_is_frozen_after_load() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.link.bw_gbps = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = ModelSpec()  # type: ignore[misc]


# --- --set overrides ---------------------------------------------------------------------

def test_overrides_set_ints_floats_strings_and_bools() -> None:
    cfg = load_config(overrides=[
        "workload.prompt_tokens=16", "workload.output_tokens=8", "link.bw_gbps=32",
        "ndp.internal_bw_gbps=38.4", "workload.routing=trace", "workload.trace_path=/x/y.npz",
        'model.name="my model"', "model.tie_embeddings=true", "workload.seed=7",
    ])
    assert cfg.workload.prompt_tokens == 16 and isinstance(cfg.workload.prompt_tokens, int)
    assert cfg.workload.output_tokens == 8
    assert cfg.link.bw_gbps == 32.0 and isinstance(cfg.link.bw_gbps, float)
    assert cfg.ndp.internal_bw_gbps == 38.4
    assert cfg.workload.routing == "trace"
    assert cfg.workload.trace_path == "/x/y.npz"
    assert cfg.model.name == "my model"
    assert cfg.model.tie_embeddings is True
    assert cfg.workload.seed == 7


def test_later_overrides_win_and_whole_floats_become_ints() -> None:
    cfg = load_config(overrides=["link.bw_gbps=10", "link.bw_gbps=20", "workload.batch_size=4.0"])
    assert cfg.link.bw_gbps == 20.0
    assert cfg.workload.batch_size == 4 and isinstance(cfg.workload.batch_size, int)


def test_parse_override_reads_toml_literals_and_bare_words() -> None:
    assert parse_override("link.bw_gbps=32") == ("link", "bw_gbps", 32)
    assert parse_override(" ndp.peak_gflops = 1.5e3 ") == ("ndp", "peak_gflops", 1500.0)
    assert parse_override("workload.routing=synthetic") == ("workload", "routing", "synthetic")
    assert parse_override("model.tie_embeddings=false") == ("model", "tie_embeddings", False)
    assert parse_override("workload.trace_path=a=b.npz") == ("workload", "trace_path", "a=b.npz")


def test_model_override_applies_on_top_of_the_model_preset() -> None:
    cfg = load_config(model="olmoe-1b-7b", overrides=["model.num_layers=8", "model.top_k=6"])
    assert (cfg.model.name, cfg.model.num_layers, cfg.model.top_k) == ("olmoe-1b-7b", 8, 6)
    assert cfg.model.num_experts == 64


# --- bad input: the message names the field, the value and what is allowed ---------------

def test_unknown_field_suggests_the_closest_name() -> None:
    msg = config_error(overrides=["link.bw_gbp=32"])
    assert "link.bw_gbp" in msg
    assert "did you mean 'bw_gbps'" in msg
    assert "latency_us" in msg  # lists what link has


def test_unknown_section_lists_the_sections() -> None:
    msg = config_error(overrides=["lnik.bw_gbps=32"])
    assert "'lnik'" in msg
    assert "did you mean 'link'" in msg
    for section in ("gpu", "ndp", "link", "model", "workload", "policy"):
        assert section in msg


def test_negative_bandwidth_is_refused() -> None:
    msg = config_error(overrides=["link.bw_gbps=-5"])
    assert "link.bw_gbps" in msg and "-5" in msg and "> 0" in msg


def test_zero_ndp_units_is_refused() -> None:
    msg = config_error(overrides=["ndp.num_ndp_units=0"])
    assert "ndp.num_ndp_units = 0" in msg and "integer >= 1" in msg


def test_top_k_above_the_expert_count_is_refused() -> None:
    msg = config_error(overrides=["model.top_k=200"])
    assert "model.top_k = 200" in msg
    assert "1..num_experts (128)" in msg


def test_a_model_too_big_for_the_ndp_units_gives_the_numbers() -> None:
    msg = config_error(system="edge-rtx5080-ndp2", model="mixtral-8x22b")
    assert "mixtral-8x22b" in msg and "NDP" in msg
    # 56 layers x 8 experts x 3 x 6144 x 16384 x 2 bytes = 270.58 GB, half per unit
    assert "270.58 GB" in msg
    assert "135.29 GB per unit over 2 units" in msg
    assert "ndp.capacity_bytes = 68719476736 (68.72 GB)" in msg
    assert "ndp.num_ndp_units >= 4" in msg
    # the suggestion is right: four units hold it
    assert load_config(system="edge-rtx5080-ndp4", model="mixtral-8x22b").ndp.num_ndp_units == 4


def test_a_model_too_big_for_the_gpu_gives_the_numbers() -> None:
    msg = config_error(overrides=["gpu.mem_bytes=1000000000"])
    assert "does not fit the GPU" in msg
    assert "non-expert weights 3.08 GB" in msg
    assert "gpu.mem_bytes = 1000000000 (1.00 GB)" in msg


def test_an_expert_cache_larger_than_the_gpu_is_refused() -> None:
    msg = config_error(overrides=["policy.expert_cache_bytes=20000000000"])
    assert "policy.expert_cache_bytes = 20000000000" in msg
    assert f"at most gpu.mem_bytes ({16 * GIB})" in msg


@pytest.mark.parametrize("override, field, allowed", [
    ("ndp.num_ndp_units=2.5", "ndp.num_ndp_units = 2.5", "must be an integer"),
    ("ndp.num_ndp_units=true", "ndp.num_ndp_units = True", "must be an integer"),
    ("link.bw_gbps=fast", "link.bw_gbps = 'fast'", "must be a number"),
    ("link.bw_gbps=true", "link.bw_gbps = True", "must be a number"),
    ("model.name=5", "model.name = 5", "must be a string"),
    ("model.tie_embeddings=1", "model.tie_embeddings = 1", "must be true or false"),
])
def test_values_of_the_wrong_type_are_refused(override: str, field: str, allowed: str) -> None:
    msg = config_error(overrides=[override])
    assert field in msg and allowed in msg


@pytest.mark.parametrize("override, field, allowed", [
    ("workload.routing=zipf", "workload.routing = 'zipf'", "synthetic, gate, trace"),
    ("policy.cache_fraction=1.5", "policy.cache_fraction = 1.5", "a number in 0..1"),
    ("policy.lb_split=half", "policy.lb_split = 'half'", "expert, fractional"),
    ("workload.reuse=2", "workload.reuse = 2.0", "a number in 0..1"),
    ("workload.alpha=-1", "workload.alpha = -1.0", "a finite number >= 0"),
    ("workload.routing=trace", "workload.trace_path = ''", "path to an npz routing file"),
    ("policy.expert_cache_bytes=-2", "policy.expert_cache_bytes = -2", "-1 (auto)"),
])
def test_out_of_range_values_are_refused(override: str, field: str, allowed: str) -> None:
    msg = config_error(overrides=[override])
    assert field in msg and allowed in msg


@pytest.mark.parametrize("text", ["link_bw=3", "link.bw_gbps", "linkbw_gbps=4", "=3"])
def test_malformed_set_text_is_refused_with_an_example(text: str) -> None:
    msg = config_error(overrides=[text])
    assert repr(text) in msg
    assert "section.field=value" in msg and "link.bw_gbps=32" in msg


def test_unknown_system_preset_lists_the_presets() -> None:
    msg = config_error(system="edge-rtx5080-ndp9")
    assert "'edge-rtx5080-ndp9'" in msg
    for name in presets.SYSTEMS:
        assert name in msg


def test_unknown_model_preset_suggests_the_closest() -> None:
    msg = config_error(model="qwen3-30b")
    assert "'qwen3-30b'" in msg and "did you mean 'qwen3-30b-a3b'" in msg
    for name in presets.MODELS:
        assert name in msg


def test_missing_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    msg = config_error(system=str(path))
    assert str(path) in msg and "does not exist" in msg


def test_invalid_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[link\nbw_gbps = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(system=str(path))
    assert str(path) in str(info.value) and "not valid TOML" in str(info.value)
    assert info.value.__cause__ is not None  # translated at the boundary, cause kept


def test_toml_file_with_an_unknown_field_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sys.toml"
    path.write_text("[ndp]\nnum_units = 3\n")
    msg = config_error(system=str(path))
    assert "ndp.num_units" in msg and str(path) in msg and "num_ndp_units" in msg


def test_model_and_model_config_together_are_refused(tmp_path: Path) -> None:
    msg = config_error(model="olmoe-1b-7b", model_config=tmp_path / "config.json")
    assert "--model" in msg and "--model-config" in msg


def test_config_errors_belong_to_the_project_tree() -> None:
    assert issubclass(ConfigError, NdpmoeError) and issubclass(ConfigError, ValueError)


# --- TOML system files -------------------------------------------------------------------

def test_toml_system_file_with_several_sections(tmp_path: Path) -> None:
    path = tmp_path / "jetson-ndp3.toml"
    path.write_text(
        "[gpu]\nname = \"orin\"\nmem_bytes = 34359738368\nmem_bw_gbps = 204.8\n"
        "peak_tflops = 42.5\n\n"
        "[ndp]\nnum_ndp_units = 3\ninternal_bw_gbps = 51.2\npeak_gflops = 256\n\n"
        "[link]\nbw_gbps = 16\nlatency_us = 3.5\n\n"
        "[workload]\nbatch_size = 2\nprompt_tokens = 64\noutput_tokens = 32\nalpha = 1.2\n\n"
        "[policy]\ncache_fraction = 0.5\nlb_split = \"fractional\"\n")
    cfg = load_config(system=str(path), model="olmoe-1b-7b", overrides=["link.bw_gbps=20"])
    assert cfg.system_name == "jetson-ndp3"
    assert (cfg.gpu.name, cfg.gpu.mem_bytes, cfg.gpu.mem_bw_gbps, cfg.gpu.peak_tflops) == (
        "orin", 32 * GIB, 204.8, 42.5)
    assert cfg.gpu.launch_overhead_us == 5.0  # not in the file: the default
    assert (cfg.ndp.num_ndp_units, cfg.ndp.internal_bw_gbps, cfg.ndp.peak_gflops) == (3, 51.2, 256.0)
    assert isinstance(cfg.ndp.peak_gflops, float)
    assert cfg.link.bw_gbps == 20.0  # --set beats the file
    assert cfg.link.latency_us == 3.5
    assert (cfg.workload.batch_size, cfg.workload.prompt_tokens, cfg.workload.output_tokens) == (
        2, 64, 32)
    assert cfg.workload.alpha == 1.2
    assert cfg.policy.cache_fraction == 0.5 and cfg.policy.lb_split == "fractional"
    assert cfg.model.name == "olmoe-1b-7b"


def test_toml_file_may_describe_the_model(tmp_path: Path) -> None:
    path = tmp_path / "small.toml"
    path.write_text("system_name = \"lab-box\"\n[model]\nname = \"toy\"\nnum_layers = 4\n"
                    "num_experts = 16\ntop_k = 2\n")
    cfg = load_config(system=str(path))
    assert cfg.system_name == "lab-box"
    assert (cfg.model.name, cfg.model.num_layers, cfg.model.num_experts, cfg.model.top_k) == (
        "toy", 4, 16, 2)


# --- Hugging Face config.json ------------------------------------------------------------

HF_CONFIGS = {
    "Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "vocab_size": 32000, "tie_word_embeddings": False, "rope_theta": 1e6,
        "router_aux_loss_coef": 0.02, "max_position_embeddings": 32768,
    },
    "Qwen1.5-MoE-A2.7B": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": False, "tie_word_embeddings": False,
    },
    "Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "tie_word_embeddings": False,
    },
    "DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 102400, "tie_word_embeddings": False,
    },
    "DeepSeek-V3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "vocab_size": 129280, "n_group": 8, "topk_group": 4,
        "tie_word_embeddings": False,
    },
    "OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 2048,
        "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 50304, "clip_qkv": None, "norm_topk_prob": False,
        "tie_word_embeddings": False,
    },
    "Phi-3.5-MoE-instruct": {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "hidden_size": 4096,
        "intermediate_size": 6400, "num_local_experts": 16, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32064, "tie_word_embeddings": False,
    },
}

# name -> (MoE layers, dense layers, experts, top-k, d_ff, shared experts, shared d_ff, dense d_ff)
HF_EXPECTED = {
    "Mixtral-8x7B-v0.1": (32, 0, 8, 2, 14336, 0, 0, 0),
    "Qwen1.5-MoE-A2.7B": (24, 0, 60, 4, 1408, 1, 5632, 0),
    "Qwen3-30B-A3B": (48, 0, 128, 8, 768, 0, 0, 0),
    "DeepSeek-V2-Lite": (26, 1, 64, 6, 1408, 2, 1408, 10944),
    "DeepSeek-V3": (58, 3, 256, 8, 2048, 1, 2048, 18432),
    "OLMoE-1B-7B-0924": (16, 0, 64, 8, 1024, 0, 0, 0),
    "Phi-3.5-MoE-instruct": (32, 0, 16, 2, 6400, 0, 0, 0),
}
# DeepSeek-V3 (1.3 TB of experts, ~70 GB on the GPU) needs a bigger emulated system
BIG_SYSTEM = ["ndp.num_ndp_units=32", "gpu.mem_bytes=274877906944"]


def write_hf(tmp_path: Path, name: str, fields: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_config_json_of_each_family(tmp_path: Path, name: str) -> None:
    path = write_hf(tmp_path, name, HF_CONFIGS[name])
    cfg = load_config(model_config=path, overrides=BIG_SYSTEM if name == "DeepSeek-V3" else ())
    m = cfg.model
    # named from the file's own fields, never after the folder it sits in (a downloaded
    # snapshot's folder is a commit hash)
    assert m.name == HF_CONFIGS[name]["model_type"]
    assert (m.num_layers, m.num_dense_layers, m.num_experts, m.top_k, m.d_ff,
            m.num_shared_experts, m.shared_d_ff, m.dense_d_ff) == HF_EXPECTED[name]
    hf = HF_CONFIGS[name]
    assert m.d_model == hf["hidden_size"]
    assert (m.num_heads, m.num_kv_heads, m.vocab_size) == (
        hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"])


@pytest.mark.parametrize("name, preset", [
    ("Qwen3-30B-A3B", "qwen3-30b-a3b"), ("Mixtral-8x7B-v0.1", "mixtral-8x7b"),
    ("DeepSeek-V2-Lite", "deepseek-v2-lite"), ("OLMoE-1B-7B-0924", "olmoe-1b-7b"),
    ("Qwen1.5-MoE-A2.7B", "qwen1.5-moe-a2.7b"),
])
def test_hf_config_json_agrees_with_the_preset_read_off_it(tmp_path: Path, name: str,
                                                           preset: str) -> None:
    from_hf = load_config(model_config=write_hf(tmp_path, name, HF_CONFIGS[name])).model
    from_preset = load_config(model=preset).model
    assert dataclasses.replace(from_hf, name=preset) == from_preset


def test_deepseek_mla_caches_the_compressed_latent(tmp_path: Path) -> None:
    path = write_hf(tmp_path, "DeepSeek-V3", HF_CONFIGS["DeepSeek-V3"])
    fields = model_from_hf_config(path)
    assert fields["kv_dim"] == 512 + 64
    assert ModelSpec(**fields).kv_elems_per_token_layer == 576


def test_hf_name_or_path_names_the_model(tmp_path: Path) -> None:
    path = write_hf(tmp_path, "snapshot", {**HF_CONFIGS["OLMoE-1B-7B-0924"],
                                           "_name_or_path": "allenai/OLMoE-1B-7B-0924"})
    assert load_config(model_config=path).model.name == "allenai/OLMoE-1B-7B-0924"


def test_hf_model_without_a_name_is_named_after_the_file_not_its_folder(tmp_path: Path) -> None:
    fields = {k: v for k, v in HF_CONFIGS["OLMoE-1B-7B-0924"].items() if k != "model_type"}
    path = write_hf(tmp_path, "tmp", fields)
    assert load_config(model_config=path).model.name == "config"


def test_hf_multimodal_wrapper_uses_its_text_config(tmp_path: Path) -> None:
    path = write_hf(tmp_path, "vlm", {"model_type": "some_vlm",
                                      "text_config": HF_CONFIGS["Qwen3-30B-A3B"]})
    m = load_config(model_config=path).model
    assert (m.num_layers, m.num_experts, m.top_k, m.d_ff) == (48, 128, 8, 768)


def test_hf_config_of_a_dense_model_is_refused(tmp_path: Path) -> None:
    dense = {k: v for k, v in HF_CONFIGS["Mixtral-8x7B-v0.1"].items()
             if k not in ("num_local_experts",)}
    path = write_hf(tmp_path, "llama", dense)
    msg = config_error(model_config=path)
    assert str(path) in msg
    assert "num_experts, num_local_experts, n_routed_experts" in msg
    assert "Mixture-of-Experts" in msg


def test_hf_config_without_layers_or_width_is_refused(tmp_path: Path) -> None:
    no_layers = {k: v for k, v in HF_CONFIGS["OLMoE-1B-7B-0924"].items()
                 if k != "num_hidden_layers"}
    msg = config_error(model_config=write_hf(tmp_path, "a", no_layers))
    assert "num_hidden_layers" in msg
    no_width = {k: v for k, v in HF_CONFIGS["OLMoE-1B-7B-0924"].items()
                if k != "intermediate_size"}
    msg = config_error(model_config=write_hf(tmp_path, "b", no_width))
    assert "moe_intermediate_size or intermediate_size" in msg


def test_missing_and_invalid_hf_config_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "config.json"
    msg = config_error(model_config=missing)
    assert str(missing) in msg and "does not exist" in msg
    broken = tmp_path / "broken.json"
    broken.write_text("{\"hidden_size\": 2048,")
    msg = config_error(model_config=broken)
    assert str(broken) in msg and "not valid JSON" in msg


def test_hf_model_too_big_for_the_default_system_says_so(tmp_path: Path) -> None:
    path = write_hf(tmp_path, "DeepSeek-V3", HF_CONFIGS["DeepSeek-V3"])
    msg = config_error(model_config=path)
    assert "does not fit" in msg and "GB" in msg


def test_config_round_trips_through_its_dict() -> None:
    cfg = load_config(model="olmoe-1b-7b", overrides=["link.bw_gbps=32"])
    d = cfg.to_dict()
    assert d["link"]["bw_gbps"] == 32.0 and d["model"]["name"] == "olmoe-1b-7b"
    from cluster.core.spec import SECTIONS
    rebuilt = Config(**{s: SECTIONS[s](**d[s]) for s in SECTIONS}, system_name=d["system_name"])
    assert rebuilt == cfg


# --- policy knobs: each policy owns its own (issue 12) -------------------------------------

LEGACY_POLICY_KEYS = [  # the policy section of config.json before the knobs moved out
    "expert_cache_bytes", "cache_fraction", "fetch_buffer_experts", "lb_split",
    "eplb_redundant_per_unit", "eplb_window_steps", "eplb_period_steps", "profile_alpha",
    "profile_seed", "profile_domain_seed", "profile_tokens", "context_alpha", "ndp_weight_bits",
    "odmoe_recall", "odmoe_lookahead", "expertflow_max_horizon", "refresh_period_steps",
    "refresh_max_swaps", "drift_half_life_tokens", "drift_margin"]


def test_each_policy_owns_its_knobs_and_the_section_keeps_its_keys_in_order() -> None:
    from cluster.core.knobs import PolicySpec, knob_owners

    owners = {owner: [f.name for f in dataclasses.fields(cls)] for owner, cls in knob_owners().items()}
    assert owners == {
        "scheduler tp-lb": ["lb_split"],
        "scheduler eplb": ["eplb_redundant_per_unit", "eplb_window_steps", "eplb_period_steps"],
        "prefetcher profiled": ["profile_alpha", "profile_seed", "profile_domain_seed", "profile_tokens"],
        "prefetcher context-aware": ["context_alpha", "ndp_weight_bits"],
        "prefetcher od-moe": ["odmoe_recall", "odmoe_lookahead"],
        "prefetcher expertflow": ["expertflow_max_horizon"],
        "prefetcher prefill-freq-refresh": ["refresh_period_steps", "refresh_max_swaps"],
        "prefetcher decayed-freq": ["drift_half_life_tokens", "drift_margin"],
    }
    # PolicySpec itself holds only what every policy shares, and the knobs
    assert [f.name for f in dataclasses.fields(PolicySpec)] == [
        "expert_cache_bytes", "cache_fraction", "fetch_buffer_experts", "knobs"]
    assert list(load_config().to_dict()["policy"]) == LEGACY_POLICY_KEYS
    assert list(PolicySpec().to_dict()) == LEGACY_POLICY_KEYS


def test_a_knob_override_reaches_its_owner_and_survives_pickling() -> None:
    import pickle

    from policies.expertflow import ExpertFlowKnobs
    from policies.neighbours import OdMoeKnobs
    from policies.schedulers import TpLbKnobs

    cfg = load_config(overrides=["policy.odmoe_recall=0.5", "policy.lb_split=fractional"])
    p = cfg.policy
    assert p.knobs_of(OdMoeKnobs) == OdMoeKnobs(odmoe_recall=0.5)
    assert p.knobs_of(TpLbKnobs) == TpLbKnobs(lb_split="fractional")
    assert p.knobs_of(ExpertFlowKnobs) == ExpertFlowKnobs()
    assert (p.odmoe_recall, p.lb_split) == (0.5, "fractional")  # the flat read-only view
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.odmoe_recall = 0.1  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(cfg))  # as sent to spawn workers
    assert back == cfg and hash(back) == hash(cfg) and back.policy.odmoe_recall == 0.5
    other = load_config(overrides=["policy.odmoe_recall=0.6", "policy.lb_split=fractional"])
    assert other != cfg and len({cfg: 1, other: 2}) == 2  # a dict key per knob value
    moved = cfg.replace(policy=dataclasses.replace(p, odmoe_recall=0.6))
    assert moved == other and hash(moved) == hash(other)
    assert dataclasses.replace(p, cache_fraction=0.5).knobs == p.knobs


def test_a_knob_set_where_no_policy_is_registered_is_refused_naming_the_fix() -> None:
    """Knobs are registered by importing the policies package; a process that sets one
    without it gets one sentence saying so (not a silent default, not a list of three)."""
    import subprocess
    import sys

    code = ("from cluster.core.config import load_config\n"
            "from cluster.core.errors import ConfigError\n"
            "load_config(overrides=['policy.cache_fraction=0.5'])  # a shared field: fine\n"
            "try:\n"
            "    load_config(overrides=['policy.odmoe_recall=0.5'])\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "policy.odmoe_recall" in out.stdout and "import the policies package" in out.stdout


def test_an_unknown_policy_field_lists_the_shared_fields_and_every_knob() -> None:

    msg = config_error(overrides=["policy.odmoe_recal=0.5"])
    assert "unknown field policy.odmoe_recal" in msg and "did you mean 'odmoe_recall'" in msg
    listed = msg.split(": policy has ", 1)[1].split(" (did you mean")[0].split(", ")
    assert sorted(listed) == sorted(LEGACY_POLICY_KEYS)  # knobs is not settable
    msg = config_error(overrides=["policy.knobs=1"])
    assert "unknown field policy.knobs" in msg


@pytest.mark.parametrize(("override", "message"), [
    ("policy.eplb_window_steps=0", "policy.eplb_window_steps = 0 is not allowed: must be an integer >= 1"),
    ("policy.eplb_redundant_per_unit=-1",
     "policy.eplb_redundant_per_unit = -1 is not allowed: must be an integer >= 0"),
    ("policy.profile_alpha=11", "policy.profile_alpha = 11.0 is not allowed: must be -1 (same as "
     "workload.alpha) or a number in 0..10"),
    ("policy.profile_domain_seed=-2", "policy.profile_domain_seed = -2 is not allowed: must be an "
     "integer >= -1"),
    ("policy.drift_half_life_tokens=0", "policy.drift_half_life_tokens = 0.0 is not allowed: must "
     "be a finite number > 0"),
    ("policy.odmoe_recall=true", "policy.odmoe_recall = True is not allowed: must be a number"),
    ("policy.lb_split=3", "policy.lb_split = 3 is not allowed: must be a string"),
])
def test_bad_knobs_fail_like_every_field(override: str, message: str) -> None:

    assert message in config_error(overrides=[override])
