"""Shared tiny fixtures: a small, fast configuration and the real routing recording."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.core.config import load_config
from cluster.core.spec import Config

# shipped inside the repository (tests/data/README.md gives its source and licence), so a
# fresh clone with nothing beside it runs every test
TRACE_PATH = Path(__file__).resolve().parent / "data" / "flame-moe-290m-routing.npz"
TINY = ("workload.prompt_tokens=16", "workload.output_tokens=8")


@pytest.fixture
def tiny() -> Callable[..., Config]:
    """``tiny("link.bw_gbps=32", model=...)``: OLMoE on the paper system, 16 in / 8 out."""

    def make(*overrides: str, model: str = "olmoe-1b-7b", system: str | None = None) -> Config:
        return load_config(system=system, model=model, overrides=[*TINY, *overrides])

    return make


@pytest.fixture
def trace_path() -> Path:
    if not TRACE_PATH.exists():
        pytest.fail(f"routing recording missing at {TRACE_PATH}")
    return TRACE_PATH


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A real local Ray for one test module (2 CPUs, no dashboard), shut down afterwards.

    ``address="local"``: a fresh instance even when some other Ray runs on this machine.
    """
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def cache_spy(monkeypatch) -> Callable[[int], tuple[list, list[int]]]:
    """Wraps every prefetcher the analytic engine makes so that, after each of its hooks, the
    cache holds at most ``capacity`` experts and every key it asks to fetch once, held.

    ``watch(capacity)`` returns ``(made, sizes)``: the prefetchers made and the cache size
    after every hook call, filled in as the run goes.
    """
    import cluster.engines.analytic

    def watch(capacity: int) -> tuple[list, list[int]]:
        made: list = []
        sizes: list[int] = []
        original = cluster.engines.analytic.make_prefetcher

        def spy(cfg_, name, routing_):
            pf = original(cfg_, name, routing_)
            made.append(pf)
            for hook in ("preload", "after_prefill", "after_step"):
                inner = getattr(pf, hook)

                def checked(*args, _inner=inner, **kwargs):
                    out = _inner(*args, **kwargs)
                    sizes.append(len(pf.cache))
                    assert len(pf.cache) <= pf.cache.capacity == capacity
                    assert all(k in pf.cache for k in out), "asked to fetch a key it does not hold"
                    assert len(set(out)) == len(out), "asked to fetch a key twice"
                    return out

                setattr(pf, hook, checked)
            return pf

        monkeypatch.setattr(cluster.engines.analytic, "make_prefetcher", spy)
        return made, sizes

    return watch
