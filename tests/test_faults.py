"""Faults: injection specs, slow units and link delays in the model, dead and silent devices,
recovery, dropped messages, partial results (DESIGN.md section 9, issue 6).

Where Ray is not the point the devices and the link are served on an :class:`InprocHub` with
heartbeats, on threads of the test's process; "dying" there closes the unit's endpoints (as a
dead process's sockets close) and a "restart" serves a fresh unit under the same names with a
new incarnation. The Ray tests kill real actor processes through the injected ``kill`` fault
and drop real commands on the zmq data plane.

What must hold with a fault injected: the outputs equal the reference forward pass, the
counters add up (every lost command sent again: ``retries == dropped + duplicates``; one
recovery per kill), and the wall time spent finding and repairing the fault is paused out of
emulated time, so that the run still measures the analytic latency within the fidelity target
-- where that wall time, counted, would alone exceed the target.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import policies
from actors import wire
from actors.clock import wall_now
from actors.device_server import DeviceServer
from actors.devices import Device, Hold
from actors.gpu import GpuDevice
from actors.link import LinkServer
from actors.ndp import NdpUnit
from actors.peers import GPU_PEER, LINK_PEER, heartbeat_peer, unit_peer
from actors.scheduler import SchedulerCore
from actors.transport import InprocHub
from cluster.core.config import load_config
from cluster.core.cost import CostModel
from cluster.core.errors import ConfigError, EmulationError
from cluster.core.faults import GRAMMAR, Faults, Kill, inject_overrides, parse_inject
from cluster.core.reference import reference_forward
from cluster.core.routing import build_routing
from cluster.core.selection import group_by_expert
from cluster.core.spec import Config
from cluster.engines.analytic import run_policy
from cluster.engines.emulate import records_from_run, unit_layouts

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


def test_the_config_holds_its_faults_split_into_model_and_run_sides() -> None:
    """``cfg.faults`` is the parsed spec; only its model side (slow, delay) reaches the cost
    model, so a kill or a drop leaves every modelled duration as it was."""
    def cfg(spec: str) -> Config:
        return load_config(model="olmoe-1b-7b", overrides=[f'emulate.inject="{spec}"'])

    both = cfg("kill:ndp1@step2;drop:0.1;slow:ndp0x2;delay:link+5us")
    assert both.faults.model == parse_inject("slow:ndp0x2;delay:link+5us").model
    assert both.faults.run == parse_inject("kill:ndp1@step2;drop:0.1").run
    assert both.faults.run.kills == (Kill(1, 2),) and both.faults.model.slow == ((0, 2.0),)
    healthy, run_side = CostModel(cfg("")), CostModel(cfg("kill:ndp1@step2;drop:0.1"))
    model_side = CostModel(cfg("slow:ndp0x2;delay:link+5us"))
    assert run_side.unit_factor == healthy.unit_factor and run_side.link_latency_s == healthy.link_latency_s
    assert model_side.unit_factor[0] == 2.0
    assert model_side.link_latency_s == pytest.approx(healthy.link_latency_s + 5e-6, rel=1e-12)


def test_a_link_delay_does_not_let_auto_dilation_fall_into_the_jitter() -> None:
    """The hop bound of auto D: the modelled hops (D x 2 x link latency) absorb part of the
    control path's wall time, but at most half of it. The figures are two calibrations of the
    default run (summary.json's emulator_floor): plain, and with --inject delay:link+50us."""
    from cluster.engines.emulate import choose_dilation

    # plain: an 836 us path, 2 us latency, a 270 us median MoE step; 2 x 2 us x D absorbs
    # less than half the path, so the cap does not bind and D is what it always was
    plain = choose_dilation([], 836e-6, 2e-6, 270e-6)
    assert plain["hop_bound"] == pytest.approx(836e-6 / (0.025 * 270e-6 + 4e-6), rel=1e-12)
    assert plain["dilation"] == math.ceil(plain["hop_bound"]) == 78
    # delayed: a 683 us path, 52 us latency, a 520 us step; uncapped, the hops would absorb
    # the whole path at D = 6; capped, half of it stays over the budget
    uncapped = 683e-6 / (0.025 * 520e-6 + 104e-6)
    assert uncapped < 6
    delayed = choose_dilation([], 683e-6, 52e-6, 520e-6)
    assert delayed["hop_bound"] == pytest.approx(0.5 * 683e-6 / (0.025 * 520e-6), rel=1e-12)
    assert delayed["dilation"] == 27
    # the compute bound still wins where it is larger
    assert choose_dilation([100.0] * 50, 683e-6, 52e-6, 520e-6)["dilation"] == 150.0


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
    from cluster.core.metrics import summarize

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


# --- the measuring emulation: numbered commands, the run's pause --------------------------

class _Recorder(Device):
    """A device that only records the commands it is given, in order."""

    name = "recorder"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, SCALE)
        self.got: list[int] = []

    def on_message(self, peer: bytes, msg: wire.Message) -> None:
        self.got.append(int(msg.fields["n"]))


def test_a_device_applies_numbered_commands_once_in_order_and_acknowledges_each() -> None:
    """A lost command's successors wait for it; a retry of one already here is ignored."""
    hub = InprocHub()
    me = hub.endpoint(b"sched")
    dev = _Recorder(_cfg())
    server = DeviceServer(dev, hub.endpoint(b"recorder"), poll_s=0.01)
    server.start()
    try:
        for c in (2, 1, 1, 4, 3, 2):  # 1 arrives late, then twice; 3 after 4; 2 again
            me.send(b"recorder", wire.encode("cmd", {"kind": "x", "cseq": c, "n": c}))
        acks = []
        while len(acks) < 6:
            got = me.recv(5.0)
            assert got is not None, acks
            msg = wire.decode(got[1])
            assert msg.type == "event" and msg.fields["kind"] == "ack"
            acks.append(msg.fields["cseq"])
    finally:
        server.stop()
        me.close()
    assert acks == [2, 1, 1, 4, 3, 2]  # every receipt acknowledged, copies too
    assert dev.got == [1, 2, 3, 4]  # each applied once, in number order
    assert dev.cmd_duplicates == 2 and dev.cmd_next == 5


def test_a_paused_device_keeps_its_clock_and_program_still_until_it_resumes() -> None:
    dev = _Recorder(_cfg())
    ran: list[float] = []

    def prog():
        yield Hold(dev.now() + 0.05)
        ran.append(dev.now())

    dev.start_program(prog())
    dev.pause()
    frozen = dev.now()
    time.sleep(0.1)
    dev.advance()
    assert ran == [] and dev.now() == frozen and dev.next_wake_s() == np.inf
    # resume: the clock is the wall clock less the run's total pause, the same for everyone
    dev.resume(0.1)
    assert dev.now() == pytest.approx(wall_now() - 0.1, abs=0.02)
    assert dev.now() >= frozen - 0.02  # it goes on from (about) where it stopped
    deadline = time.monotonic() + 2.0
    while not ran and time.monotonic() < deadline:
        dev.advance()
        time.sleep(0.005)
    assert ran and ran[0] >= frozen


@dataclass
class Served:
    """An in-process emulated system with heartbeats whose NDP units can die and restart."""

    cfg: Config
    routing: Any
    core: SchedulerCore
    servers: dict[bytes, DeviceServer] = field(default_factory=dict)
    restarts: list[bytes] = field(default_factory=list)
    crash: dict[bytes, Any] = field(default_factory=dict)  # peer -> end its "process" now


@contextlib.contextmanager
def served(cfg: Config, restart_after_s: float = 0.3) -> Iterator[Served]:
    """GPU, units and the link on threads of this process (heartbeats every 0.1 s, declared
    dead after 0.5 s). An injected ``die`` closes the unit's endpoints, as a dead process's
    sockets close, and a fresh unit comes up under the same names ``restart_after_s`` later
    with a new incarnation, as Ray restarts an actor. Always torn down."""
    routing = build_routing(cfg)
    hub = InprocHub()
    sched_ep = hub.endpoint(b"sched")
    core = SchedulerCore(cfg, routing, sched_ep)
    core.net.heartbeat_timeout_s = 0.5
    sys_ = Served(cfg, routing, core)
    link = None

    def serve(peer: bytes, incarnation: int) -> None:
        dev = GpuDevice(cfg, SCALE) if peer == GPU_PEER else NdpUnit(cfg, int(peer[3:]), SCALE)
        eps = [hub.endpoint(peer), hub.endpoint(heartbeat_peer(peer))]

        def die() -> None:
            for ep in eps:
                ep.close()

            def later() -> None:
                time.sleep(restart_after_s)
                sys_.restarts.append(peer)
                serve(peer, incarnation + 1)
            threading.Thread(target=later, daemon=True).start()

        srv = sys_.servers[peer] = DeviceServer(dev, eps[0], poll_s=0.01, heartbeat=eps[1],
                                                heartbeat_interval_s=0.1, incarnation=incarnation,
                                                announce_to=b"sched", on_die=die)

        def crash() -> None:  # a death nobody injected (say, the OOM killer)
            srv.stop()
            die()
        sys_.crash[peer] = crash
        srv.start()

    try:
        for peer in core.peers():
            serve(peer, 1)
        link = LinkServer(hub.endpoint(LINK_PEER), poll_s=0.01)
        link.start()
        for peer in [*core.peers(), LINK_PEER]:
            core.ping(peer, 1)
        core.warm(unit_layouts(cfg, SCALE))
        core.sync_clocks()
        yield sys_
    finally:
        core.shutdown()
        for srv in list(sys_.servers.values()):
            srv.stop()
        if link is not None:
            link.stop()
        sched_ep.close()


def _fidelity(sys_: Served, name: str, st, meta) -> float:
    from cluster.core.metrics import summarize

    got = summarize(records_from_run(sys_.cfg, name, st, meta), 4)["e2e_latency_s"]
    want = summarize(run_policy(sys_.cfg, sys_.routing, name), 4)["e2e_latency_s"]
    return abs(got - want) / want


# In one process the devices, the link and the scheduler share the GIL: at D = 100 the
# fault-free run measures within 0.1% of the analytic latency here, so the fidelity target
# (5%) tests the pauses, not the host.
INPROC_D = 100.0


def test_dropped_commands_are_sent_again_and_the_paused_time_is_not_emulated() -> None:
    cfg = _cfg("model.num_layers=16", inject="drop:0.1")
    with served(cfg) as sys_:
        st, meta = sys_.core.run_policy("tp", INPROC_D)
        out = sys_.core.collect()
        ref = reference_forward(cfg, sys_.routing, SCALE)
    assert rel_error(out, ref) <= REL_TOL
    # each lost send was found missing and sent again: every retry replaced a lost send or
    # (an acknowledgement later than the timeout) reached the device twice
    assert st.dropped > 0 and st.retries == st.dropped + st.duplicates
    assert st.pauses > 0 and st.retry_wall_s > 0 and st.recoveries == 0
    ana = run_policy(cfg, sys_.routing, "tp").tokens[-1].time_s
    # counted as emulated time, the paused wall time alone would break the target...
    assert st.retry_wall_s / INPROC_D > cfg.emulate.target_fidelity * ana
    # ...left out, the run keeps it
    assert _fidelity(sys_, "tp", st, meta) <= cfg.emulate.target_fidelity


@pytest.mark.parametrize("name", ["tp", "paper"])
def test_a_killed_unit_restarts_rejoins_and_the_run_ends_as_without_the_fault(name) -> None:
    """paper: the unit also held prefetch orders when it died; they are sent again."""
    cfg = _cfg("model.num_layers=16", "emulate.recover=true", inject="kill:ndp2@step1")
    with served(cfg) as sys_:
        st, meta = sys_.core.run_policy(name, INPROC_D)
        out = sys_.core.collect()
        again, _ = sys_.core.run_policy(name, INPROC_D)  # the kill fires once per cluster
        out2 = sys_.core.collect()
        ref = reference_forward(cfg, sys_.routing, SCALE)
    assert sys_.restarts == [unit_peer(2)]
    assert st.kills == ["ndp2@decode step 1, layer 0"] and st.recoveries == 1
    assert again.recoveries == 0 and not again.kills
    if name == "tp":  # its plans do not depend on timing: the same math, re-dispatched
        np.testing.assert_array_equal(out, out2)
    # (paper's plans depend on which prefetches have landed: the order of the sums may vary)
    assert rel_error(out, ref) <= REL_TOL and rel_error(out2, ref) <= REL_TOL
    # the unit was found dead (0.5 s of silence) and restarted (0.3 s) while paused
    assert st.recovery_wall_s >= 0.3 and st.pauses == 1
    ana = run_policy(cfg, sys_.routing, name).tokens[-1].time_s
    assert st.recovery_wall_s / INPROC_D > cfg.emulate.target_fidelity * ana  # (see above)
    assert _fidelity(sys_, name, st, meta) <= cfg.emulate.target_fidelity


def test_a_failed_emulated_run_still_writes_its_partial_results(tmp_path, monkeypatch) -> None:
    """The runner's side, without Ray: finished policies, the failed one, then the error."""
    from cluster.engines import emulate
    from cluster.studies import runner

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


def test_a_death_nobody_injected_is_recovered_and_only_its_detection_time_counts() -> None:
    """The scheduler pauses the run only once it finds the unit dead: at its next command to
    it (the send fails) or, if the step waits on the unit, when its heartbeat has been
    silent for 0.5 s. Up to that much lateness is emulated time (README); the restart after
    it (1.5 s here) is not."""
    cfg = _cfg("model.num_layers=16", "emulate.recover=true")
    with served(cfg, restart_after_s=1.5) as sys_:
        timer = threading.Timer(1.0, sys_.crash[unit_peer(1)])  # mid-run (the run takes ~3 s)
        timer.start()
        try:
            st, meta = sys_.core.run_policy("tp", INPROC_D)
        finally:
            timer.cancel()
        out = sys_.core.collect()
        ref = reference_forward(cfg, sys_.routing, SCALE)
    assert sys_.restarts == [unit_peer(1)] and not st.kills
    assert st.recoveries == 1 and st.pauses == 1 and st.recovery_wall_s >= 1.5
    assert rel_error(out, ref) <= REL_TOL
    from cluster.core.metrics import summarize

    got = summarize(records_from_run(cfg, "tp", st, meta), 4)["e2e_latency_s"]
    ana = run_policy(cfg, sys_.routing, "tp").tokens[-1].time_s
    # counted, the restart alone would add 15 ms to a 33 ms run; the detection adds <= 5 ms
    assert st.recovery_wall_s / INPROC_D > 0.5 / INPROC_D + cfg.emulate.target_fidelity * ana
    assert got - ana <= 0.5 / INPROC_D + cfg.emulate.target_fidelity * ana, (got, ana)


# --- Ray: real processes die ----------------------------------------------------------------

RAY_TINY = ("weights.memory_budget_bytes=67108864", "emulate.dilation=40")


@pytest.mark.ray
def test_a_killed_unit_without_recovery_fails_fast_and_leaves_a_partial_summary(
        ray_local, tmp_path) -> None:
    from cluster.studies import runner

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


def _assert_paused_time_left_out(s: dict, paused_wall_s: float) -> None:
    """The wall time a run was paused for (``paused_wall_s``) is left out of its latency.

    Counted, the pause would add ``share = paused_wall_s / D / analytic e2e`` to the measured
    error; left out, the measured latency is closer to the prediction than to the prediction
    plus the pause (error < share / 2; TPOT is held to the same bound).
    The bound is not the fidelity target: the error is a measurement and load moves it (with a
    second suite on the same 2 cores one run measured 4.7% e2e / 7.6% TPOT, at a share of 0.6),
    and load moves auto D as well (two busy loops beside it calibrated D ~1000 instead of ~70,
    a share of 0.05, and an error of 0.03%); bench_faults measures fidelity under faults on a
    quiet machine, and README quotes it.
    """
    share = paused_wall_s / s["dilation"] / s["analytic_e2e_latency_s"]
    assert share > 0
    assert s["fidelity"]["e2e"] < share / 2 and s["fidelity"]["tpot"] < share / 2, \
        (s["fidelity"], share)


@pytest.mark.ray
def test_dropped_commands_on_the_ray_cluster_are_sent_again_at_auto_dilation(
        ray_local, tmp_path) -> None:
    from cluster.studies import runner

    cfg = _cfg("weights.memory_budget_bytes=67108864", inject="drop:0.15")
    res = runner.run(cfg, ["tp"], engine="emulate", out=tmp_path, progress=False, plots=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    s = res.summaries["tp"]
    assert s["status"] == "ok" and s["output_rel_error"] <= REL_TOL
    assert s["dropped_messages"] > 0 and s["pauses"] > 0
    assert s["retries"] == s["dropped_messages"] + s["duplicate_commands"]
    assert summary["faults"]["drop_p"] == 0.15 and summary["emulation"]["calibrated"] is True
    # waiting out a lost command is not emulated time: the measured latency is nearer the
    # prediction than the prediction plus the wait
    _assert_paused_time_left_out(s, s["retry_wall_s"])


@pytest.mark.ray
def test_a_killed_unit_with_recovery_is_restarted_by_ray_and_the_run_keeps_its_fidelity(
        ray_local, tmp_path) -> None:
    from cluster.studies import runner

    cfg = _cfg("weights.memory_budget_bytes=67108864", "emulate.recover=true",
               "emulate.heartbeat_timeout_s=2", inject="kill:ndp2@step1")
    res = runner.run(cfg, ["tp"], engine="emulate", out=tmp_path, progress=False, plots=False)
    s = json.loads((tmp_path / "summary.json").read_text())["policies"]["tp"]
    assert s["recovery_wall_s"] == res.summaries["tp"]["recovery_wall_s"]
    assert s["status"] == "ok" and s["output_rel_error"] <= REL_TOL
    assert s["injected_kills"] == ["ndp2@decode step 1, layer 0"]
    assert s["recoveries"] == 1 and s["pauses"] == 1  # a new process greeted: Ray restarted it
    # found silent (2 s) or greeted by its successor, restarted, re-warmed: all while paused
    _assert_paused_time_left_out(s, s["recovery_wall_s"])
