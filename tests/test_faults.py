"""Faults: injection specs, slow units and link delays in the model, dead and silent devices,
recovery, dropped messages, partial results (DESIGN.md section 9, issue 6).

Where Ray is not the point the devices are served on an :class:`InprocHub` with heartbeats
and the scheduler runs on a :class:`VirtualClock`; "dying" there closes the device's endpoints
(as a dead process's sockets close) or just stops it answering (a hung one), and a
"restart" serves a fresh device under the same names with a new incarnation. The Ray tests
kill real actor processes through the injected ``kill`` fault.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import policies
from actors import wire
from actors.clock import RealClock, VirtualClock
from actors.devices import DeviceServer, GpuDevice, NdpUnit
from actors.scheduler import GPU_PEER, SchedulerCore, heartbeat_peer, unit_peer
from actors.transport import InprocHub
from cluster.analytic import run_policy
from cluster.config import load_config
from cluster.cost import CostModel
from cluster.errors import ConfigError, EmulationError
from cluster.faults import GRAMMAR, Faults, Kill, inject_overrides, parse_inject
from cluster.reference import reference_forward
from cluster.routing import Routing, build_routing, group_by_expert
from cluster.spec import Config

SCALE = 1 / 16
TINY = ("workload.prompt_tokens=6", "workload.output_tokens=3", "model.num_layers=4")
REL_TOL = 1e-4


def _cfg(*overrides: str, inject: str = "") -> Config:
    extra = inject_overrides([inject]) if inject else []
    return load_config(model="olmoe-1b-7b", overrides=[*TINY, *overrides, *extra])


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --- fault specs ----------------------------------------------------------------------------

def test_a_spec_of_every_kind_parses_into_faults() -> None:
    f = parse_inject(" kill:ndp2@step40; slow:ndp1x3 ;delay:link+200us;drop:0.01;kill:ndp0@step1")
    assert f == Faults(kills=(Kill(2, 40), Kill(0, 1)), slow=((1, 3.0),), link_delay_us=200.0,
                       drop_p=0.01)
    assert f.unit_factors(4) == (1.0, 3.0, 1.0, 1.0)
    assert parse_inject("") == Faults() and not parse_inject("  ;  ")
    assert parse_inject("slow:ndp0x1.5;delay:link+2.5us").link_delay_us == 2.5


@pytest.mark.parametrize("spec, why", [
    ("kill:ndp2", "not a fault"),
    ("kill:ndp2@step0", "decode step >= 1"),
    ("kill:gpu@step3", "not a fault"),
    ("kill:ndp1@step2;kill:ndp1@step2", "given twice"),
    ("slow:ndp1x0.5", "factor must be in 1..1000"),
    ("slow:ndp1x", "not a fault"),
    ("slow:ndp1x2;slow:ndp1x3", "slowed twice"),
    ("delay:link+200ms", "not a fault"),
    ("delay:link-5us", "not a fault"),
    ("delay:link+1us;delay:link+2us", "given twice"),
    ("drop:0.9", "probability must be in 0..0.5"),
    ("drop:-0.1", "not a fault"),
    ("drop:lots", "not a fault"),
    ("explode:ndp1", "not a fault"),
])
def test_a_bad_spec_fails_at_load_naming_field_value_and_grammar(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(inject=spec)
    msg = str(err.value)
    assert "emulate.inject" in msg and repr(spec) in msg and why in msg, msg
    assert GRAMMAR in msg


@pytest.mark.parametrize("spec, why", [
    ("kill:ndp4@step1", "there is no unit ndp4: the system has ndp0..ndp3"),
    ("slow:ndp7x2", "there is no unit ndp7"),
    ("kill:ndp1@step3", "would never fire: the run has decode steps 1..2"),
])
def test_faults_must_name_units_and_steps_of_this_run(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"emulate\.inject") as err:
        _cfg(inject=spec)
    assert why in str(err.value)


def test_inject_flags_become_one_override_and_recovery_fields_validate() -> None:
    assert inject_overrides([]) == []
    ov = inject_overrides(["kill:ndp1@step2", "drop:0.05"])
    assert ov == ['emulate.inject="kill:ndp1@step2;drop:0.05"']
    cfg = _cfg("emulate.recover=true", *ov)
    assert cfg.emulate.inject == "kill:ndp1@step2;drop:0.05" and cfg.emulate.recover is True
    assert cfg.emulate.heartbeat_timeout_s == 3.0
    for bad, why in [("emulate.heartbeat_timeout_s=1.5", "a number in 2..60"),
                     ("emulate.recover=1", "true or false")]:
        with pytest.raises(ConfigError, match=why):
            _cfg(bad)


# --- slow units and link delay are part of the model ----------------------------------------

def test_a_slow_unit_raises_imbalance_and_shows_in_the_trace() -> None:
    healthy = _cfg()
    slow = _cfg(inject="slow:ndp1x3")
    routing = build_routing(healthy)
    a, b = run_policy(healthy, routing, "tp"), run_policy(slow, routing, "tp")
    from cluster.metrics import summarize

    mom_a, mom_b = summarize(a, 4)["max_over_mean"], summarize(b, 4)["max_over_mean"]
    assert mom_a == pytest.approx(1.0, abs=1e-6)  # tp: equal slices, equal work
    assert mom_b == pytest.approx(3 / ((3 + 3) / 4), rel=1e-6)  # max 3, mean 1.5: 2.0
    assert b.tokens[-1].time_s > a.tokens[-1].time_s
    # unit 1's expert intervals in the trace last three times unit 0's
    def durs(rec, unit: str) -> list[float]:
        return [iv.end_s - iv.start_s for iv in rec.intervals if iv.resource == unit
                and iv.kind == "expert"]
    d0, d1 = durs(b, "ndp0"), durs(b, "ndp1")
    assert d0 and len(d0) == len(d1)
    np.testing.assert_allclose(d1, 3 * np.asarray(d0), rtol=1e-9)
    np.testing.assert_allclose(durs(a, "ndp1"), d0, rtol=1e-9)
    # every step still respects its (slow-aware) lower bound
    assert all(s.makespan_s >= s.lower_bound_s * (1 - 1e-9) for s in b.steps)


def test_a_link_delay_adds_to_every_transfer() -> None:
    base, late = CostModel(_cfg()), CostModel(_cfg(inject="delay:link+200us"))
    assert late.link_latency_s == pytest.approx(base.link_latency_s + 200e-6)
    assert late.fetch_s() - base.fetch_s() == pytest.approx(200e-6)
    routing = build_routing(_cfg())
    t0 = run_policy(_cfg(), routing, "tp").tokens[-1].time_s
    t1 = run_policy(_cfg(inject="delay:link+200us"), routing, "tp").tokens[-1].time_s
    assert t1 > t0 + 200e-6


@pytest.mark.parametrize("units, factors", [(4, (1.0, 3.0, 1.0, 1.0)), (3, (2.5, 1.0, 7.0)),
                                            (5, (1.0, 1.0, 1.0, 1.0, 4.0))])
def test_tp_lb_fast_timing_equals_time_plan_with_slow_units(units: int, factors) -> None:
    cfg = load_config(model="olmoe-1b-7b", overrides=[f"ndp.num_ndp_units={units}", *TINY])
    cost = CostModel(cfg, unit_factor=factors)
    sched = policies.get("scheduler", "tp-lb")(cfg, cost)
    rng = np.random.default_rng(units)
    for trial in range(20):
        ids = np.stack([rng.choice(64, 8, replace=False) for _ in range(int(rng.integers(1, 24)))])
        routed = group_by_expert(ids.astype(np.int32))
        cached = frozenset(int(e) for e in rng.choice(64, int(rng.integers(0, 6)), replace=False))
        step = policies.StepInput(0, "decode", routed, cached)
        cached_tasks = [sched.gpu_task(e, t) for e, t in routed.items() if e in cached]
        order = [e for _, e in sorted((-len(t), e) for e, t in routed.items() if e not in cached)]
        span = sched._span_fn(step, cached_tasks, order)
        for m in range(len(order) + 1):
            plan = sched._build(step, cached_tasks, order, m)
            timing = policies.time_plan(plan, cost, units)
            assert span(m) == pytest.approx(timing.makespan_s, rel=1e-9), (trial, m)
            assert timing.makespan_s >= policies.lower_bound_s(plan, cost, units) * (1 - 1e-9)


# --- in-process cluster with heartbeats -----------------------------------------------------

@dataclass
class Node:
    """One served device: its endpoints and server (replaced when it restarts)."""

    server: DeviceServer
    endpoints: list


@dataclass
class Inproc:
    cfg: Config
    routing: Routing
    hub: InprocHub
    core: SchedulerCore
    nodes: dict[bytes, Node] = field(default_factory=dict)
    restarts: int = 0


class SlowOnceUnit(NdpUnit):
    """Takes ``delay_s`` of wall time over its first expert shards (alive, heartbeating)."""

    delay_s = 0.0

    def handle(self, msg: wire.Message) -> list:
        if msg.fields.get("kind") == "moe" and self.delay_s:
            time.sleep(self.delay_s)
            self.delay_s = 0.0
        return super().handle(msg)


@contextlib.contextmanager
def inproc(cfg: Config, *, death: str = "close", restart_after_s: float | None = None,
           slow_once: dict[int, float] | None = None) -> Iterator[Inproc]:
    """GPU + units on threads, each with a heartbeat every 0.1 s and announced with ``hello``.

    An injected ``die``: ``death="close"`` closes the device's endpoints (a dead process);
    ``"hang"`` only stops it (a hung one, whose queue fills unread). With ``restart_after_s``
    a fresh device comes up under the same names that long after, with a new incarnation.
    """
    routing = build_routing(cfg)
    hub = InprocHub()
    sched_ep = hub.endpoint(b"sched")
    core = SchedulerCore(cfg, routing, sched_ep)
    sys_ = Inproc(cfg, routing, hub, core)

    def serve(peer: bytes, incarnation: int) -> None:
        if peer == GPU_PEER:
            device = GpuDevice(cfg, SCALE)
        else:
            u = int(peer[3:])
            device = SlowOnceUnit(cfg, u, SCALE)
            device.delay_s = (slow_once or {}).get(u, 0.0) if incarnation == 1 else 0.0
        eps = [hub.endpoint(peer), hub.endpoint(heartbeat_peer(peer))]

        def die() -> None:
            if death == "close":
                for ep in eps:
                    ep.close()
            if restart_after_s is not None:
                def later() -> None:
                    time.sleep(restart_after_s)
                    sys_.restarts += 1
                    serve(peer, incarnation + 1)
                threading.Thread(target=later, daemon=True).start()

        server = DeviceServer(device, eps[0], poll_s=0.01, heartbeat=eps[1],
                              heartbeat_interval_s=0.1, incarnation=incarnation,
                              announce_to=b"sched", on_die=die)
        sys_.nodes[peer] = Node(server, eps)
        server.start()

    try:
        for peer in [GPU_PEER, *(unit_peer(u) for u in range(cfg.ndp.num_ndp_units))]:
            serve(peer, 1)
        for peer in sys_.nodes:
            core.ping(peer, 1)
        yield sys_
    finally:
        core.shutdown()
        for node in sys_.nodes.values():
            node.server.stop()
            for ep in node.endpoints:
                ep.close()
        sched_ep.close()


def test_a_slow_unit_in_the_emulation_stamps_as_the_analytic_model_says() -> None:
    cfg = _cfg(inject="slow:ndp2x4;delay:link+50us")
    with inproc(cfg) as sys_:
        rec, st = sys_.core.run_policy("tp-lb", clock=VirtualClock())
        assert rel_error(sys_.core.collect(), reference_forward(cfg, sys_.routing, SCALE)) <= REL_TOL
    ana = run_policy(cfg, sys_.routing, "tp-lb")
    assert st.stamp_mismatches == 0
    assert [t.time_s for t in rec.tokens] == [t.time_s for t in ana.tokens]
    assert rec.steps == ana.steps
    assert max(s.max_over_mean for s in rec.steps if max(s.unit_busy_s) > 0) > 1.5
    assert rec.intervals == ana.intervals  # the emulated run's trace shows the slow unit too
    slow = [iv for iv in rec.intervals if iv.resource == "ndp2" and iv.kind == "expert"]
    assert slow and all(iv.end_s > iv.start_s for iv in slow)


def test_a_repeated_task_id_is_answered_from_the_cache_not_run_again() -> None:
    cfg = _cfg()
    hub = InprocHub()
    me = hub.endpoint(b"sched")
    server = DeviceServer(GpuDevice(cfg, SCALE), hub.endpoint(GPU_PEER), poll_s=0.01)
    server.start()

    def ask(tid: int, kind: str, **fields: Any) -> wire.Message:
        me.send(GPU_PEER, wire.encode("task", {"task_id": tid, "kind": kind, **fields}))
        got = me.recv(5.0)
        assert got is not None
        return wire.decode(got[1])

    def run(attention_ids: list[int]) -> np.ndarray:
        ask(next(ids), "reset")
        ask(next(ids), "begin", phase="prefill", step=0)
        for tid in attention_ids:  # attention changes the hidden state each time it runs
            ask(tid, "attention", layer=0, start_s=0.0, ctx=6)
        ask(next(ids), "end")
        return np.array(ask(next(ids), "collect").arrays[0])

    ids = iter(range(100, 200))
    try:
        once = run([1])
        retried = run([2, 2, 2])  # a task and two retries of it
        assert server.replayed == 2
        twice = run([3, 4])  # two different tasks
        np.testing.assert_array_equal(retried, once)
        assert not np.array_equal(twice, once)
    finally:
        server.stop()
        me.close()


def test_dropped_messages_are_retried_and_the_math_is_unchanged() -> None:
    cfg = _cfg(inject="drop:0.1")
    with inproc(cfg) as sys_:
        rec, st = sys_.core.run_policy("tp", clock=VirtualClock())
        out = sys_.core.collect()
    assert rel_error(out, reference_forward(cfg, sys_.routing, SCALE)) <= REL_TOL
    assert st.dropped > 0 and st.retries >= st.dropped - 1
    assert st.retry_wall_s > 0 and st.stamp_mismatches == 0
    assert [t.time_s for t in rec.tokens] == [t.time_s for t in
                                              run_policy(cfg, sys_.routing, "tp").tokens]


def test_a_silent_unit_is_declared_dead_by_its_missing_heartbeat() -> None:
    """A unit that hangs (no replies, no heartbeats) while a long recv deadline still runs."""
    cfg = _cfg("emulate.recv_timeout_s=30", "emulate.heartbeat_timeout_s=2", inject="kill:ndp3@step1")
    with inproc(cfg, death="hang") as sys_:
        t0 = time.monotonic()
        with pytest.raises(EmulationError) as err:
            sys_.core.run_policy("tp", clock=VirtualClock())
        took = time.monotonic() - t0
        rec, st, where = sys_.core.partial()
    msg = str(err.value)
    assert "ndp3 went silent" in msg and "decode step 1, layer 0 expert shards" in msg, msg
    assert "emulate.heartbeat_timeout_s = 2" in msg and "--recover" in msg, msg
    assert took < 5.0
    assert where == ("decode", 1, 0) and st.kills == ["ndp3@decode step 1, layer 0"]
    assert len(rec.tokens) == 1 and len(rec.steps) == cfg.model.num_layers  # the prefill


def test_a_busy_unit_that_keeps_beating_is_not_declared_dead() -> None:
    cfg = _cfg("emulate.heartbeat_timeout_s=2")
    with inproc(cfg, slow_once={1: 2.6}) as sys_:
        _, st = sys_.core.run_policy("tp", clock=VirtualClock())
        assert rel_error(sys_.core.collect(), reference_forward(cfg, sys_.routing, SCALE)) <= REL_TOL
    assert st.recoveries == 0 and st.stamp_mismatches == 0


def test_a_dead_unit_rejoins_and_the_step_is_redispatched_with_recovery_on() -> None:
    cfg = _cfg("emulate.recover=true", "emulate.heartbeat_timeout_s=2", inject="kill:ndp2@step2")
    with inproc(cfg, restart_after_s=0.3) as sys_:
        sys_.core.warm({u: [(0, 0, 0, 1024)] for u in range(4)})
        rec, st = sys_.core.run_policy("tp", clock=VirtualClock())
        out = sys_.core.collect()
        _, again = sys_.core.run_policy("tp", clock=VirtualClock())  # the kill fired once
        out2 = sys_.core.collect()
    assert sys_.restarts == 1
    assert st.recoveries == 1 and st.recovery_wall_s >= 0.3 and st.stamp_mismatches == 0
    assert again.recoveries == 0 and not again.kills
    np.testing.assert_array_equal(out, out2)
    assert rel_error(out, reference_forward(cfg, sys_.routing, SCALE)) <= REL_TOL
    assert [t.time_s for t in rec.tokens] == [t.time_s for t in run_policy(cfg, sys_.routing, "tp").tokens]
    assert sys_.nodes[unit_peer(2)].server.device.weights  # re-warmed after its restart


def test_a_death_during_a_long_paced_wait_is_noticed_during_the_wait() -> None:
    """Pacing a long step sleeps; the scheduler still watches every device's heartbeat."""
    from actors.scheduler import Dispatcher

    cfg = _cfg()
    hub = InprocHub()
    me = hub.endpoint(b"sched")
    eps = [hub.endpoint(unit_peer(0)), hub.endpoint(heartbeat_peer(unit_peer(0)))]
    server = DeviceServer(NdpUnit(cfg, 0, SCALE), eps[0], poll_s=0.01, heartbeat=eps[1],
                          heartbeat_interval_s=0.1, incarnation=7, announce_to=b"sched")
    server.start()
    net = Dispatcher(me, 30.0, heartbeat_timeout_s=2.0)
    try:
        net.ping(unit_peer(0), 1)
        net.idle_until(time.monotonic() + 0.5, "a short wait")  # beating: nothing happens
        assert net.incarnation == {unit_peer(0): 7}
        server.stop()  # the unit hangs: no replies, no heartbeats
        t0 = time.monotonic()
        with pytest.raises(EmulationError) as err:
            net.idle_until(time.monotonic() + 60.0, "the end of decode step 4, layer 2 (pacing)")
        assert 2.0 <= time.monotonic() - t0 < 4.0
    finally:
        server.stop()
        for ep in [me, *eps]:
            ep.close()
    msg = str(err.value)
    assert "ndp0 went silent" in msg and "decode step 4, layer 2 (pacing)" in msg, msg


def test_a_dead_gpu_is_fatal_even_with_recovery() -> None:
    cfg = _cfg("emulate.recover=true", "emulate.heartbeat_timeout_s=2")
    with inproc(cfg) as sys_:
        for ep in sys_.nodes[GPU_PEER].endpoints:
            ep.close()
        sys_.nodes[GPU_PEER].server.stop()
        with pytest.raises(EmulationError, match=r"gpu .*a lost GPU cannot be recovered"):
            sys_.core.run_policy("tp", clock=VirtualClock())


def test_lost_wall_time_moves_the_real_clock_epoch() -> None:
    clock = RealClock(10.0, epoch_wall_s=100.0)
    clock.shift_epoch(2.5)
    assert clock.epoch_wall_s == 102.5 and clock.to_wall(1.0) == 112.5
    with pytest.raises(ValueError):
        clock.shift_epoch(-1.0)


def test_a_failed_emulated_run_still_writes_its_partial_results(tmp_path, monkeypatch) -> None:
    """The runner's side, without Ray: finished policies, the failed one, then the error."""
    from cluster import emulate, runner

    cfg = _cfg()
    routing = build_routing(cfg)
    done = run_policy(cfg, routing, "tp")
    half = run_policy(cfg, routing, "ep")
    half.tokens, half.steps = half.tokens[:1], half.steps[:4]

    def failing(cfg, routing, names, run_dir, **_: Any):
        summaries = {"tp": {**emulate.summarize(done, 4), "status": "ok"},
                     "ep": emulate.failed_summary("ep", "ndp1 went silent", half, None,
                                                  ("decode", 1, 0), cfg)}
        raise emulate.PartialRunError("ndp1 went silent (policy ep)", summaries,
                                      [done, half],
                                      {"status": "failed", "error": "ndp1 went silent"})

    monkeypatch.setattr(emulate, "run_emulation", failing)
    with pytest.raises(EmulationError, match=r"ndp1 went silent.*partial results in"):
        runner.run(cfg, ["tp", "ep"], engine="emulate", out=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and list(summary["policies"]) == ["tp", "ep"]
    assert summary["policies"]["tp"]["status"] == "ok"
    ep = summary["policies"]["ep"]
    assert ep["status"] == "failed" and ep["error"] == "ndp1 went silent"
    assert ep["failed_at"] == {"phase": "decode", "step": 1, "layer": 0}
    assert ep["tokens_completed"] == 1 and ep["moe_steps_completed"] == 4
    assert (tmp_path / "steps.csv").is_file() and (tmp_path / "trace.json").is_file()


# --- Ray: real processes die ----------------------------------------------------------------

RAY_TINY = ("weights.memory_budget_bytes=67108864", "emulate.dilation=40")


@pytest.mark.ray
def test_a_killed_unit_without_recovery_fails_fast_and_leaves_a_partial_summary(
        ray_local, tmp_path) -> None:
    from cluster import runner

    cfg = _cfg(*RAY_TINY, inject="kill:ndp1@step1")
    t0 = time.monotonic()
    with pytest.raises(EmulationError) as err:
        runner.run(cfg, ["tp", "paper"], engine="emulate", out=tmp_path, progress=False)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert "ndp1" in msg and "decode step 1, layer 0" in msg and "summary.json" in msg, msg
    assert "Traceback" not in msg
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_policy"] == "tp"
    assert summary["not_run"] == ["paper"]
    tp = summary["policies"]["tp"]
    assert tp["status"] == "failed" and "ndp1" in tp["error"]
    assert tp["failed_at"] == {"phase": "decode", "step": 1, "layer": 0}
    assert tp["tokens_completed"] == 1 and tp["injected_kills"] == ["ndp1@decode step 1, layer 0"]
    # detected by the heartbeat, well inside 10 s of the kill (the run's wall time is mostly it)
    assert tp["wall_s"] < 10.0 and took < 30.0, (tp["wall_s"], took)
    assert ray_local.is_initialized()


@pytest.mark.ray
def test_a_killed_unit_with_recovery_rejoins_and_the_outputs_are_unchanged(ray_local) -> None:
    from cluster import launch
    from cluster.emulate import choose_scale, unit_layouts

    cfg = _cfg(*RAY_TINY, "emulate.recover=true", inject="kill:ndp2@step1")
    routing = build_routing(cfg)
    scale = choose_scale(cfg)
    cluster = launch.start(cfg, routing, scale)
    try:
        launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)), timeout=120)
        pid = ray_local.get(cluster.units[2].info.remote())["pid"]
        _, st = launch.get(cluster.scheduler.run_policy.remote("tp", 40.0), timeout=120)
        out = launch.get(cluster.scheduler.collect.remote(), timeout=60)
        _, st2 = launch.get(cluster.scheduler.run_policy.remote("tp", 40.0), timeout=120)
        clean = launch.get(cluster.scheduler.collect.remote(), timeout=60)
        new_pid = ray_local.get(cluster.units[2].info.remote())["pid"]
    finally:
        cluster.close()
    assert new_pid != pid, "the unit was not restarted"
    assert st.recoveries == 1 and st.kills == ["ndp2@decode step 1, layer 0"]
    assert st.recovery_wall_s > 0 and st2.recoveries == 0
    np.testing.assert_array_equal(out, clean)  # bitwise: the same math, re-dispatched
    assert rel_error(out, reference_forward(cfg, routing, scale)) <= REL_TOL
    assert st.stamp_mismatches == 0
    # the wall time lost while recovering is not emulated time: counted, it alone would be
    # more than the whole run; left out, the run keeps its fidelity to the analytic latency
    ana = run_policy(cfg, routing, "tp").tokens[-1].time_s
    assert st.recovery_wall_s / 40.0 > 0.5 * ana
    assert abs(st.emulated_e2e_s - ana) / ana <= 0.05, (st.emulated_e2e_s, ana, st.overruns)
    assert st.wall_s >= st.recovery_wall_s + ana * 40.0 * (1 - 1e-6)


@pytest.mark.ray
def test_dropped_messages_on_the_ray_cluster_are_retried(ray_local, tmp_path) -> None:
    from cluster import runner

    cfg = _cfg(*RAY_TINY, inject="drop:0.05")
    res = runner.run(cfg, ["tp"], engine="emulate", out=tmp_path, progress=False, plots=False)
    s = res.summaries["tp"]
    assert s["status"] == "ok" and s["output_rel_error"] <= REL_TOL
    assert s["retries"] > 0 and s["dropped_messages"] > 0 and s["stamp_mismatches"] == 0
    # waiting out a lost message is not emulated time either
    assert s["retry_wall_s"] / 40.0 > 0.5 * s["analytic_e2e_latency_s"]
    assert s["fidelity_error"] <= 0.05, (s["fidelity_error"], s["overruns"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["faults"]["drop_p"] == 0.05
