"""The recipe of :mod:`policies` ("How to add a policy"), followed literally by a newcomer.

One file (this module stands in for ``policies/my_policy.py``) holds a scheduler and a
prefetcher, each with a small frozen knob dataclass; one registration each puts them in,
knobs included. Then, with no other change anywhere: the knobs are set like every config
field (``--set policy.<knob>=...``, ``[policy]`` in a TOML file), validated with the field,
the value and what is allowed, and the analytic engine runs the policies with the plans and
keys they return. The fixture takes them out again, so nothing leaks into other tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import policies
from cluster.core.config import load_config
from cluster.core.errors import ConfigError
from cluster.core.knobs import PolicySpec, knob_owners
from cluster.core.metrics import summarize
from cluster.core.routing import build_routing
from cluster.engines.analytic import run_policy
from policies import Fetch, Knobs, Plan, Prefetcher, Scheduler, StepInput, Task, unregister

TINY = ["workload.prompt_tokens=16", "workload.output_tokens=8", "workload.batch_size=2"]


# --- step 1 and 2: the policy and its knobs ------------------------------------------------

@dataclass(frozen=True)
class GpuFirstKnobs(Knobs):
    """How many of a step's most-routed uncached experts go to the GPU."""

    toy_gpu_experts: int = 0

    def __post_init__(self) -> None:
        self.integers("toy_gpu_experts", minimum=0)


class GpuFirst(Scheduler):
    """Toy: the ``toy_gpu_experts`` most-routed experts fetched to the GPU, the rest as ``ep``."""

    def plan(self, step: StepInput) -> Plan:
        n_gpu = min(self.knobs.toy_gpu_experts, self.max_fetch)
        ranked = sorted((e for e in step.routed if e not in step.cached),
                        key=lambda e: (-len(step.routed[e]), e))
        to_gpu = ranked[:n_gpu]  # fetched on demand, most tokens first
        tasks = tuple(self.gpu_task(e, toks) if e in step.cached or e in to_gpu
                      else Task(self.ep_unit(e), e, 0, self.d_ff, toks)
                      for e, toks in step.routed.items())
        return Plan(step.layer, tasks, tuple(Fetch(e, 0, self.d_ff) for e in to_gpu))


@dataclass(frozen=True)
class PinLowKnobs(Knobs):
    """How many of each layer's lowest-numbered experts to pin in the GPU cache."""

    toy_pin_per_layer: int = 0

    def __post_init__(self) -> None:
        self.integers("toy_pin_per_layer", minimum=0)


class PinLow(Prefetcher):
    """Toy: preloads experts ``0 .. toy_pin_per_layer - 1`` of every layer, within the cache."""

    def preload(self) -> list[tuple[int, int]]:
        keys = [(lay, e) for lay in range(self.num_layers) for e in range(self.knobs.toy_pin_per_layer)]
        keys = keys[: self.cache.capacity]
        for k in keys:
            self.cache.add(k)
        return keys


# --- step 3: the registration (undone after each test) ------------------------------------

@contextlib.contextmanager
def registered() -> Iterator[None]:
    policies.register("scheduler", "toy-gpu-first", knobs=GpuFirstKnobs)(GpuFirst)
    try:
        policies.register("prefetcher", "toy-pin-low", knobs=PinLowKnobs)(PinLow)
        yield
    finally:
        unregister("scheduler", "toy-gpu-first")
        unregister("prefetcher", "toy-pin-low")


@pytest.fixture()
def toy() -> Iterator[None]:
    with registered():
        yield


def cfg_with(*overrides: str):
    return load_config(model="olmoe-1b-7b", overrides=[*TINY, *overrides])


# --- what the recipe promises -------------------------------------------------------------

def test_the_knob_is_set_by_an_override_and_read_by_the_policy(toy) -> None:
    cfg = cfg_with("policy.toy_gpu_experts=3")
    assert cfg.policy.knobs_of(GpuFirstKnobs) == GpuFirstKnobs(toy_gpu_experts=3)
    assert cfg.policy.knobs_of(PinLowKnobs) == PinLowKnobs()  # not set: its default
    assert cfg.policy.odmoe_recall == 0.85  # the other policies' knobs are untouched
    assert cfg != cfg_with("policy.toy_gpu_experts=4")  # a knob makes another config
    assert hash(cfg) != hash(cfg_with("policy.toy_gpu_experts=4"))
    assert cfg.to_dict()["policy"]["toy_gpu_experts"] == 3  # config.json shows it


def test_the_engine_runs_the_policys_plans_as_its_knob_says(toy) -> None:
    none_cfg = cfg_with("policy.toy_gpu_experts=0")
    all_cfg = cfg_with(f"policy.toy_gpu_experts={none_cfg.model.num_experts}")
    routing = build_routing(none_cfg)
    units = none_cfg.ndp.num_ndp_units

    # 0 experts on the GPU: exactly the ep scheduler's plans, so exactly its run
    none = run_policy(none_cfg, routing, "toy-gpu-first")
    ep = run_policy(none_cfg, routing, "ep")
    assert summarize(none, units)["e2e_latency_s"] == summarize(ep, units)["e2e_latency_s"]
    assert all(s.gpu_experts == 0 and s.fetched == 0 for s in none.steps)

    # every expert on the GPU: every active expert fetched and run there, no NDP work
    every = run_policy(all_cfg, routing, "toy-gpu-first")
    assert all(s.gpu_experts == s.active == s.fetched > 0 for s in every.steps)
    assert all(max(s.unit_busy_s) == 0.0 for s in every.steps)
    s_none, s_all = summarize(none, units), summarize(every, units)
    assert s_all["fetched_experts"] > 0 == s_none["fetched_experts"]
    assert s_all["e2e_latency_s"] != s_none["e2e_latency_s"]
    assert s_all["scheduler"] == "toy-gpu-first"


def test_a_prefetchers_knob_fills_the_cache_it_preloads(toy) -> None:
    cfg0 = cfg_with("policy.toy_pin_per_layer=0")
    cfg8 = cfg_with("policy.toy_pin_per_layer=8")
    routing = build_routing(cfg0)
    units = cfg0.ndp.num_ndp_units
    r0 = run_policy(cfg0, routing, "tp+toy-pin-low")
    r8 = run_policy(cfg8, routing, "tp+toy-pin-low")
    assert sum(s.gpu_hits for s in r0.steps) == 0
    # the hits are exactly the routed experts among 0..7 of each layer
    ids = routing.topk_ids  # [batch, tokens, layers, k]
    P = routing.prompt_tokens
    want = sum(len({int(e) for e in np.unique(ids[:, P + s, lay]) if e < 8})
               for s in range(routing.decode_steps) for lay in range(routing.num_layers))
    got = sum(s.gpu_hits for s in r8.steps if s.phase == "decode")
    assert got == want > 0
    assert summarize(r8, units)["prefetch_hit_rate"] > 0 == summarize(r0, units)["prefetch_hit_rate"]


def test_a_toml_policy_section_sets_the_knob(toy, tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text("[policy]\ncache_fraction = 0.5\ntoy_gpu_experts = 2\nodmoe_recall = 0.5\n")
    cfg = load_config(system=str(path), model="olmoe-1b-7b", overrides=TINY)
    assert cfg.policy.knobs_of(GpuFirstKnobs).toy_gpu_experts == 2
    assert (cfg.policy.cache_fraction, cfg.policy.odmoe_recall) == (0.5, 0.5)


@pytest.mark.parametrize(("override", "message"), [
    ("policy.toy_gpu_experts=-1",
     "policy.toy_gpu_experts = -1 is not allowed: must be an integer >= 0"),
    ("policy.toy_gpu_experts=1.5", "policy.toy_gpu_experts = 1.5 is not allowed: must be an integer"),
    ("policy.toy_gpu_experts=true", "policy.toy_gpu_experts = True is not allowed: must be an integer"),
    ("policy.toy_gpu_expert=2", "did you mean 'toy_gpu_experts'?"),
])
def test_a_bad_knob_fails_with_field_value_and_what_is_allowed(toy, override, message) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg_with(override)
    assert message in str(exc.value)


def test_a_knob_name_taken_by_another_policy_is_refused_at_registration(toy) -> None:
    @dataclass(frozen=True)
    class Clash(Knobs):
        odmoe_recall: float = 0.5

    with pytest.raises(ValueError, match=r"policy\.odmoe_recall .* already a field of prefetcher od-moe"):
        policies.register("scheduler", "toy-clash", knobs=Clash)(type("ToyClash", (GpuFirst,), {}))
    with pytest.raises(ConfigError, match="unknown scheduler 'toy-clash'"):
        policies.get("scheduler", "toy-clash")
    assert "scheduler toy-clash" not in knob_owners()


def test_nothing_leaks_once_the_policy_is_unregistered() -> None:
    with registered():
        assert "toy_gpu_experts" in PolicySpec().to_dict()
        cfg_with("policy.toy_gpu_experts=1")
    assert "toy_gpu_experts" not in PolicySpec().to_dict()
    assert "toy-gpu-first" not in policies.names("scheduler")
    with pytest.raises(ConfigError, match=r"unknown field policy\.toy_gpu_experts"):
        cfg_with("policy.toy_gpu_experts=1")
    with pytest.raises(ConfigError, match="unknown policy 'toy-gpu-first'"):
        policies.resolve("toy-gpu-first")
