"""Presets that ship: systems (GPU + NDP units + link) and models.

System presets ``edge-rtx5080-ndp2`` ... ``edge-rtx5080-ndp6`` are the paper's target: an
RTX 5080 (16 GiB, 960 GB/s, 112 TFLOPS fp16 with fp32 accumulate) and 2-6 DDR5-4800
NDP-DIMMs (64 GiB, 76.8 GB/s from two ranks in parallel, 512 GFLOPS) behind PCIe 5.0 x16
(50 GB/s effective). The DIMM figures are our assumptions; PAPER.md says the paper's are not
recovered. Model presets are read off each model's published ``config.json``.
"""

from __future__ import annotations

from typing import Any

from cluster.core.errors import ConfigError
from cluster.core.spec import GpuSpec, LinkSpec, NdpSpec

GIB = 1 << 30

_RTX5080 = {"name": "rtx5080", "mem_bytes": 16 * GIB, "mem_bw_gbps": 960.0,
            "peak_tflops": 112.0, "launch_overhead_us": 5.0}
_NDP_DIMM = {"capacity_bytes": 64 * GIB, "internal_bw_gbps": 76.8, "peak_gflops": 512.0,
             "launch_overhead_us": 1.0}
_PCIE5 = {"bw_gbps": 50.0, "latency_us": 2.0}

SYSTEMS: dict[str, dict[str, dict[str, Any]]] = {
    f"edge-rtx5080-ndp{n}": {
        "gpu": dict(_RTX5080),
        "ndp": {"num_ndp_units": n, **_NDP_DIMM},
        "link": dict(_PCIE5),
    }
    for n in range(2, 7)
}
SYSTEM_DESCRIPTIONS = {
    name: f"RTX 5080 16 GiB + {spec['ndp']['num_ndp_units']} DDR5-4800 NDP-DIMMs (64 GiB, "
          f"76.8 GB/s, 512 GFLOPS each), PCIe 5.0 x16 50 GB/s"
    for name, spec in SYSTEMS.items()
}
DEFAULT_SYSTEM = "edge-rtx5080-ndp4"

MODELS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(num_layers=48, d_model=2048, d_ff=768, num_experts=128, top_k=8,
                          num_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936),
    "mixtral-8x7b": dict(num_layers=32, d_model=4096, d_ff=14336, num_experts=8, top_k=2,
                         num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32000),
    "deepseek-v2-lite": dict(num_layers=26, num_dense_layers=1, dense_d_ff=10944, d_model=2048,
                             d_ff=1408, num_experts=64, top_k=6, num_shared_experts=2,
                             shared_d_ff=1408, num_heads=16, num_kv_heads=16, head_dim=128,
                             kv_dim=576, vocab_size=102400),
    "olmoe-1b-7b": dict(num_layers=16, d_model=2048, d_ff=1024, num_experts=64, top_k=8,
                        num_heads=16, num_kv_heads=16, head_dim=128, vocab_size=50304),
    "qwen1.5-moe-a2.7b": dict(num_layers=24, d_model=2048, d_ff=1408, num_experts=60, top_k=4,
                              num_shared_experts=1, shared_d_ff=5632, num_heads=16,
                              num_kv_heads=16, head_dim=128, vocab_size=151936),
    "mixtral-8x22b": dict(num_layers=56, d_model=6144, d_ff=16384, num_experts=8, top_k=2,
                          num_heads=48, num_kv_heads=8, head_dim=128, vocab_size=32768),
}
for _name, _m in MODELS.items():
    _m["name"] = _name
DEFAULT_MODEL = "qwen3-30b-a3b"


def register_system(name: str, *, gpu: dict[str, Any], ndp: dict[str, Any],
                    link: dict[str, Any], description: str) -> None:
    """Adds a system preset: a device model (the GPU, one NDP unit times ``num_ndp_units``, the
    host link), usable as ``load_config(system=name)`` like the shipped ones.

    Each section is checked now, with the same field / value / allowed messages as a config
    file (:mod:`cluster.core.spec`); a name already taken is refused.
    """
    if not isinstance(name, str) or not name or name in SYSTEMS:
        raise ConfigError(f"system preset {name!r} is not allowed: must be a new, non-empty name "
                          f"(taken: {', '.join(SYSTEMS)})")
    for cls, fields in ((GpuSpec, gpu), (NdpSpec, ndp), (LinkSpec, link)):
        unknown = sorted(set(fields) - {f.name for f in cls.__dataclass_fields__.values()})
        if unknown:
            raise ConfigError(f"system preset {name!r}: {cls.SECTION}.{unknown[0]} is not a field "
                              f"(allowed: {', '.join(cls.__dataclass_fields__)})")
        cls(**fields)  # raises ConfigError naming the field and the value
    SYSTEMS[name] = {"gpu": dict(gpu), "ndp": dict(ndp), "link": dict(link)}
    SYSTEM_DESCRIPTIONS[name] = description


def unregister_system(name: str) -> None:
    """Removes a preset added by :func:`register_system` (the shipped ones stay)."""
    if name in _SHIPPED_SYSTEMS:
        raise ValueError(f"{name!r} ships with ndpmoe and cannot be removed")
    SYSTEMS.pop(name, None)
    SYSTEM_DESCRIPTIONS.pop(name, None)


_SHIPPED_SYSTEMS = frozenset(SYSTEMS)
