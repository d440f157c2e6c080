"""The README's recipe "How to add a device model", followed literally: one set of figures for
the GPU, the NDP unit and the link, registered as a system preset, then run like a shipped one."""

from __future__ import annotations

import pytest

from cluster.core import presets
from cluster.core.config import load_config
from cluster.core.cost import CostModel
from cluster.core.errors import ConfigError
from cluster.core.routing import build_routing
from cluster.engines.base import AnalyticEngine

NAME = "test-orin-pim4"
FAST_NDP = {"num_ndp_units": 4, "capacity_bytes": 64 << 30, "internal_bw_gbps": 2 * 76.8,
            "peak_gflops": 1024.0, "launch_overhead_us": 1.0}
TINY = ["workload.prompt_tokens=8", "workload.output_tokens=4"]


@pytest.fixture
def device():
    # the recipe's step 1 and 2: the figures, registered under a new name
    presets.register_system(NAME, gpu={"name": "orin", "mem_bytes": 32 << 30, "mem_bw_gbps": 204.8,
                                       "peak_tflops": 42.5, "launch_overhead_us": 8.0},
                            ndp=FAST_NDP, link={"bw_gbps": 16.0, "latency_us": 3.0},
                            description="Jetson-class GPU + 4 PIM units at twice the DIMM's rates")
    yield NAME
    presets.unregister_system(NAME)
    assert NAME not in presets.SYSTEMS


def test_a_registered_device_runs_like_a_shipped_one(device) -> None:
    cfg = load_config(system=device, model="olmoe-1b-7b", overrides=TINY)
    assert cfg.system_name == device and cfg.gpu.name == "orin" and cfg.link.bw_gbps == 16.0
    shipped = load_config(model="olmoe-1b-7b", overrides=TINY)  # edge-rtx5080-ndp4
    # its figures reach the cost model: NDP expert time is a roofline at twice the rates
    n = 3
    theirs = CostModel(shipped).ndp_expert_s(n) - shipped.ndp.launch_overhead_us * 1e-6
    mine = CostModel(cfg).ndp_expert_s(n) - cfg.ndp.launch_overhead_us * 1e-6
    assert mine == pytest.approx(theirs / 2, rel=1e-12)  # same bytes and flops, both rates doubled
    # and the engines: the same routing on the slower GPU and link gives a different run
    res = AnalyticEngine(workers=1).run(cfg, build_routing(cfg), ["monde", "tp-lb"])
    base = AnalyticEngine(workers=1).run(shipped, build_routing(shipped), ["monde", "tp-lb"])
    assert res.policies["tp-lb"].e2e_latency_s > 0
    assert res.policies["tp-lb"].e2e_latency_s != base.policies["tp-lb"].e2e_latency_s
    assert res.policies["tp-lb"].speedup_vs_monde == pytest.approx(
        res.policies["monde"].e2e_latency_s / res.policies["tp-lb"].e2e_latency_s, rel=1e-12)


def test_a_device_with_a_bad_figure_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="internal_bw_gbps"):
        presets.register_system("bad-dev", gpu={}, ndp={**FAST_NDP, "internal_bw_gbps": -1.0},
                                link={}, description="")
    with pytest.raises(ConfigError, match=r"ndp\.bandwidth is not a field"):
        presets.register_system("bad-dev", gpu={}, ndp={"bandwidth": 1.0}, link={}, description="")
    with pytest.raises(ConfigError, match="new, non-empty name"):
        presets.register_system(presets.DEFAULT_SYSTEM, gpu={}, ndp={}, link={}, description="")
    assert "bad-dev" not in presets.SYSTEMS
    with pytest.raises(ValueError):
        presets.unregister_system(presets.DEFAULT_SYSTEM)
