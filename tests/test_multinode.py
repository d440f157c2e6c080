"""The multi-node path: a Ray cluster of two nodes on this machine, NDP units on both.

Two raylets (``ray.cluster_utils.Cluster``), each offering two ``ndp_slot`` resources; the
emulation attaches by address, spreads its four NDP-unit actors with a placement group,
binds zmq on the node's address and must compute exactly what a single-process run does.
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster.core.config import load_config
from cluster.core.reference import reference_forward
from cluster.core.routing import build_routing
from cluster.engines import launch
from cluster.engines.emulate import choose_scale, unit_layouts

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"ndp_slot": 2}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"ndp_slot": 2})
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_units_spread_over_two_nodes_compute_the_reference(two_nodes):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = load_config(model="olmoe-1b-7b", overrides=[
        "workload.prompt_tokens=6", "workload.output_tokens=3",
        "weights.memory_budget_bytes=67108864", "emulate.placement_strategy=SPREAD"])
    routing = build_routing(cfg)
    scale = choose_scale(cfg)
    em = launch.start(cfg, routing, scale, address=two_nodes.address)
    try:
        nodes = em.node_ids()
        unit_nodes = {nodes[f"ndp{u}"] for u in range(cfg.ndp.num_ndp_units)}
        assert len(unit_nodes) == 2, nodes  # NDP units landed on both nodes
        endpoint = ray.get(em.scheduler.endpoint.remote())
        assert endpoint.startswith("tcp://") and "127.0.0.1" not in endpoint  # node address
        launch.get(em.scheduler.warm.remote(unit_layouts(cfg, scale)))
        # clock offsets estimated by ping exchange; one host here, so they are tiny
        residual = launch.get(em.scheduler.sync_clocks.remote())
        assert set(residual) == {"gpu", "link", *(f"ndp{u}" for u in range(4))}
        assert all(0 <= r < 0.05 for r in residual.values()), residual
        ref = reference_forward(cfg, routing, scale)
        for name in ("tp", "paper"):
            stats, _meta = launch.get(em.scheduler.run_policy.remote(name, 1.0, True))
            out = launch.get(em.scheduler.collect.remote())
            assert stats.reports["link"]["pending"] == 0
            # fp32: the partials of a token are summed in another order than the reference's
            assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4, name
    finally:
        em.close()
    assert ray.is_initialized()  # close() leaves a Ray it did not start running
