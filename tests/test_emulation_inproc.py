"""The emulation scheduler and devices over the in-process transport with a virtual clock.

No Ray and no zmq here: the GPU and NDP devices are served by :class:`DeviceServer` threads on
an :class:`InprocHub`, and the scheduler runs in the test's thread. These tests pin what the
emulation must never get wrong whatever the transport: the math equals the reference forward
pass for every policy, the emulated timeline equals the analytic engine's, a silent or faulty
device ends the run with an error that names it, and pacing accounts for every overrun.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from actors import wire
from actors.clock import VirtualClock
from actors.devices import DeviceServer, GpuDevice, NdpUnit
from actors.scheduler import GPU_PEER, EmulationExecutor, SchedulerCore, unit_peer
from actors.transport import InprocEndpoint, InprocHub
from cluster.analytic import run_policy
from cluster.config import load_config
from cluster.errors import EmulationError, ProtocolError
from cluster.reference import reference_forward
from cluster.routing import Routing, build_routing
from cluster.spec import Config

SCALE = 1 / 16  # real widths: olmoe d_model 128, d_ff 64
TINY = ("workload.prompt_tokens=6", "workload.output_tokens=3")
REL_TOL = 1e-4
POLICIES = ["ep", "monde", "tp", "tp-lb", "paper", "eplb", "tp-lb+lru", "tp-lb+oracle"]


def _cfg(*overrides: str, model: str = "olmoe-1b-7b") -> Config:
    return load_config(model=model, overrides=[*TINY, *overrides])


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@dataclass
class Inproc:
    """A whole emulated system in one process: scheduler core plus served devices."""

    cfg: Config
    routing: Routing
    hub: InprocHub
    core: SchedulerCore
    servers: dict[bytes, DeviceServer]


@contextlib.contextmanager
def inproc_system(cfg: Config, scale: float = SCALE,
                  devices: dict[bytes, Callable[[], NdpUnit | GpuDevice] | None] | None = None,
                  ) -> Iterator[Inproc]:
    """Serves the GPU and every NDP unit on threads; ``devices`` replaces some of them
    (``None``: the peer's endpoint exists but nobody serves it). Always torn down."""
    routing = build_routing(cfg)
    hub = InprocHub()
    makers: dict[bytes, Callable[[], NdpUnit | GpuDevice] | None] = {
        GPU_PEER: lambda: GpuDevice(cfg, scale)}
    for u in range(cfg.ndp.num_ndp_units):
        makers[unit_peer(u)] = lambda u=u: NdpUnit(cfg, u, scale)
    makers.update(devices or {})
    endpoints: list[InprocEndpoint] = []
    servers: dict[bytes, DeviceServer] = {}
    core = None
    try:
        for peer, make in makers.items():
            ep = hub.endpoint(peer)
            endpoints.append(ep)
            if make is not None:
                servers[peer] = DeviceServer(make(), ep, poll_s=0.01)
                servers[peer].start()
        sched_ep = hub.endpoint(b"sched")
        endpoints.append(sched_ep)
        core = SchedulerCore(cfg, routing, sched_ep)
        yield Inproc(cfg, routing, hub, core, servers)
    finally:
        if core is not None:
            core.shutdown()
        for s in servers.values():
            s.stop()
        for ep in endpoints:
            ep.close()
    # reached only when the body passed: a device that did not stop is a bug of its own
    assert not any(s._thread.is_alive() for s in servers.values()), "a device thread hung"


@pytest.fixture(scope="module")
def olmoe() -> Iterator[tuple[Inproc, np.ndarray]]:
    """OLMoE (16 MoE layers, 64 experts, top-8), 6 in / 3 out, batch 1, 4 NDP units."""
    cfg = _cfg()
    with inproc_system(cfg) as sys_:
        yield sys_, reference_forward(cfg, sys_.routing, SCALE)


def _assert_matches_reference_and_analytic(sys_: Inproc, ref: np.ndarray, name: str) -> None:
    clock = VirtualClock()
    rec, st = sys_.core.run_policy(name, clock=clock)
    out = sys_.core.collect()
    assert rel_error(out, ref) <= REL_TOL, name
    assert st.stamp_mismatches == 0, (name, st.stamp_mismatch_max_s)
    ana = run_policy(sys_.cfg, sys_.routing, name)
    # one episode, two executors: the emulated timeline is the analytic one, to the bit
    assert [t.time_s for t in rec.tokens] == [t.time_s for t in ana.tokens], name
    assert [t.latency_s for t in rec.tokens] == [t.latency_s for t in ana.tokens], name
    assert rec.steps == ana.steps, name
    # a virtual clock is never late: every segment paced, none overran
    assert st.segments > 0
    assert (st.overruns, st.lag_total_s, st.lag_max_s) == (0, 0.0, 0.0), name
    assert st.emulated_e2e_s == rec.tokens[-1].time_s == clock.now_s()
    assert st.messages > 0


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_computes_the_reference_math_on_the_analytic_timeline(olmoe, name) -> None:
    sys_, ref = olmoe
    _assert_matches_reference_and_analytic(sys_, ref, name)


def test_fractional_lb_split_computes_the_reference_math_on_the_analytic_timeline() -> None:
    cfg = _cfg("policy.lb_split=fractional")
    with inproc_system(cfg) as sys_:
        ref = reference_forward(cfg, sys_.routing, SCALE)
        _assert_matches_reference_and_analytic(sys_, ref, "tp-lb")
        # the option really changes the plans (else this test would repeat the plain one)
        plain = run_policy(_cfg(), build_routing(_cfg()), "tp-lb")
        frac = run_policy(cfg, sys_.routing, "tp-lb")
        assert [s.end_s for s in frac.steps] != [s.end_s for s in plain.steps]


@pytest.mark.parametrize("name", ["ep", "tp-lb"])
def test_batch_two_with_dense_layer_and_shared_experts(name) -> None:
    """DeepSeek-V2-Lite: a leading dense layer and two shared experts on the GPU, batch 2."""
    cfg = _cfg("workload.batch_size=2", "workload.prompt_tokens=4", model="deepseek-v2-lite")
    assert cfg.model.num_dense_layers == 1 and cfg.model.num_shared_experts == 2
    with inproc_system(cfg) as sys_:
        ref = reference_forward(cfg, sys_.routing, SCALE)
        assert ref.shape[0] == 2
        _assert_matches_reference_and_analytic(sys_, ref, name)


def test_policies_run_back_to_back_reset_the_devices(olmoe) -> None:
    """A second run of a policy reproduces the first: outputs and stamps start over at 0."""
    sys_, _ = olmoe
    rec1, _ = sys_.core.run_policy("tp", clock=VirtualClock())
    out1 = sys_.core.collect()
    sys_.core.run_policy("ep", clock=VirtualClock())
    rec2, st2 = sys_.core.run_policy("tp", clock=VirtualClock())
    out2 = sys_.core.collect()
    np.testing.assert_array_equal(out1, out2)
    assert [t.time_s for t in rec1.tokens] == [t.time_s for t in rec2.tokens]
    assert st2.stamp_mismatches == 0


# --- calibration and pacing -----------------------------------------------------------------

class NoSleepClock:
    """A clock that fails the test if anyone sleeps on it."""

    def __init__(self) -> None:
        self.reads = 0

    def now_s(self) -> float:
        self.reads += 1
        return 0.0

    def sleep_until_s(self, t_s: float) -> None:
        raise AssertionError(f"calibration slept (until emulated {t_s})")


def test_calibration_records_ratios_and_never_sleeps(olmoe) -> None:
    sys_, ref = olmoe
    t0 = time.monotonic()
    rec, st = sys_.core.run_policy("tp", clock=NoSleepClock(), calibrate=True)
    wall = time.monotonic() - t0
    # one ratio per paced segment with a modelled duration: every GPU layer, MoE step, head
    L, steps = sys_.cfg.model.num_layers, sys_.routing.decode_steps + 1
    assert st.segments == steps * (2 * L + 1)
    assert len(st.ratios) == st.segments
    assert all(np.isfinite(r) and r > 0 for r in st.ratios)
    assert st.overruns == 0 and st.emulated_e2e_s == 0.0
    assert 0 < st.wall_s <= wall
    # the math is unchanged by calibrating
    assert rel_error(sys_.core.collect(), ref) <= REL_TOL
    assert len(rec.tokens) == steps


def test_calibration_can_stop_after_a_few_decode_steps(olmoe) -> None:
    sys_, _ = olmoe
    rec, st = sys_.core.run_policy("paper", clock=NoSleepClock(), calibrate=True,
                                   max_decode_steps=1)
    assert [t.index for t in rec.tokens] == [0, 1]
    assert st.segments == 2 * (2 * sys_.cfg.model.num_layers + 1)


class LateClock:
    """Emulated time that is ``now`` whatever happens; records every sleep."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def now_s(self) -> float:
        return self.now

    def sleep_until_s(self, t_s: float) -> None:
        self.sleeps.append(t_s)


def _executor(clock, tolerance_s: float = 0.0, calibrate: bool = False) -> EmulationExecutor:
    cfg = _cfg()
    return EmulationExecutor(cfg, build_routing(cfg), transport=None, clock=clock, timeout_s=1.0,
                             calibrate=calibrate, tolerance_s=tolerance_s)


def test_pace_counts_a_late_segment_as_an_overrun_and_does_not_sleep() -> None:
    clock = LateClock(now=1.25)
    ex = _executor(clock)
    ex._pace(1.0)
    assert clock.sleeps == []
    st = ex.stats
    assert (st.segments, st.overruns) == (1, 1)
    assert st.lag_total_s == pytest.approx(0.25) and st.lag_max_s == pytest.approx(0.25)
    clock.now = 2.5
    ex._pace(2.0)  # lag 0.5: the max moves, the total adds up
    assert clock.sleeps == []
    assert (st.segments, st.overruns) == (2, 2)
    assert st.lag_total_s == pytest.approx(0.75) and st.lag_max_s == pytest.approx(0.5)
    # an early segment sleeps to its target and is no overrun
    ex._pace(3.0)
    assert clock.sleeps == [3.0]
    assert (st.segments, st.overruns) == (3, 2)
    assert st.lag_total_s == pytest.approx(0.75)


def test_pace_tolerates_lag_within_the_tolerance() -> None:
    clock = LateClock(now=1.0 + 1e-4)
    ex = _executor(clock, tolerance_s=1e-3)
    ex._pace(1.0)
    assert ex.stats.overruns == 0 and ex.stats.lag_total_s == 0.0
    assert clock.sleeps == [1.0]


def test_pace_in_calibration_records_the_ratio_and_neither_sleeps_nor_overruns() -> None:
    clock = LateClock(now=100.0)
    ex = _executor(clock, calibrate=True)
    ex._pace(1e-3)
    ex._pace(2e-3)
    assert clock.sleeps == []
    assert ex.stats.overruns == 0
    assert len(ex.stats.ratios) == 2 and all(r >= 0 for r in ex.stats.ratios)


# --- faults -------------------------------------------------------------------------------

def test_a_device_that_never_answers_fails_the_run_naming_it_within_the_deadline() -> None:
    cfg = _cfg("emulate.recv_timeout_s=0.5")
    with inproc_system(cfg, devices={unit_peer(2): None}) as sys_:
        t0 = time.monotonic()
        with pytest.raises(EmulationError) as err:
            sys_.core.run_policy("tp", clock=VirtualClock())
        took = time.monotonic() - t0
    msg = str(err.value)
    assert "ndp2" in msg and "0.5 s" in msg, msg
    assert not any(p in msg for p in ("ndp0", "ndp1", "ndp3", "gpu")), msg
    assert 0.5 <= took < 2.0


class HangingUnit(NdpUnit):
    """Answers everything but its expert shards, on which it hangs until released."""

    def __init__(self, cfg: Config, unit: int, scale: float, release: threading.Event) -> None:
        super().__init__(cfg, unit, scale)
        self.release = release

    def handle(self, msg: wire.Message) -> list:
        if msg.fields.get("kind") == "moe":
            self.release.wait(10.0)
        return super().handle(msg)


def test_a_device_that_hangs_mid_run_fails_the_run_naming_it_and_the_work() -> None:
    cfg = _cfg("emulate.recv_timeout_s=0.5")
    release = threading.Event()
    hang = {unit_peer(1): lambda: HangingUnit(cfg, 1, SCALE, release)}
    try:
        with inproc_system(cfg, devices=hang) as sys_:
            t0 = time.monotonic()
            with pytest.raises(EmulationError) as err:
                sys_.core.run_policy("tp", clock=VirtualClock())
            took = time.monotonic() - t0
            msg = str(err.value)
            assert "ndp1" in msg and "expert shards" in msg and "layer 0" in msg, msg
            assert "ndp0" not in msg and "ndp2" not in msg
            assert took < 2.0
            # the unit recovers; its late reply to the failed run must not leak into the next
            release.set()
            sys_.servers[unit_peer(1)].device.release = threading.Event()
            sys_.servers[unit_peer(1)].device.release.set()
            rec, st = sys_.core.run_policy("tp", clock=VirtualClock())
            ref = reference_forward(cfg, sys_.routing, SCALE)
            assert rel_error(sys_.core.collect(), ref) <= REL_TOL
            assert st.stamp_mismatches == 0
            assert rec.tokens[-1].time_s == run_policy(cfg, sys_.routing, "tp").tokens[-1].time_s
    finally:
        release.set()


class RejectingUnit(NdpUnit):
    def handle(self, msg: wire.Message) -> list:
        if msg.fields.get("kind") == "moe":
            raise ProtocolError("this unit rejects shards")
        return super().handle(msg)


def test_a_device_that_rejects_its_work_fails_the_run_naming_it_and_why() -> None:
    cfg = _cfg("emulate.recv_timeout_s=0.5")
    with inproc_system(cfg, devices={unit_peer(3): lambda: RejectingUnit(cfg, 3, SCALE)}) as sys_:
        with pytest.raises(EmulationError) as err:
            sys_.core.run_policy("tp", clock=VirtualClock())
        assert sys_.servers[unit_peer(3)].rejected == 1
    msg = str(err.value)
    assert "ndp3" in msg and "rejects shards" in msg, msg


@pytest.fixture
def lone_unit() -> Iterator[tuple[InprocEndpoint, DeviceServer]]:
    """One NDP unit served on a hub, and the endpoint the test talks to it from."""
    cfg = _cfg()
    hub = InprocHub()
    me = hub.endpoint(b"sched")
    server = DeviceServer(NdpUnit(cfg, 0, SCALE), hub.endpoint(unit_peer(0)), poll_s=0.01)
    server.start()
    try:
        yield me, server
    finally:
        server.stop()
        me.close()


def _ask(me: InprocEndpoint, frames: list) -> wire.Message:
    me.send(unit_peer(0), frames)
    got = me.recv(5.0)
    assert got is not None, "the device went silent"
    peer, reply = got
    assert peer == unit_peer(0)
    return wire.decode(reply)


def _task(fields: dict, arrays: list[np.ndarray] = ()) -> list:
    return wire.encode("task", {"task_id": 7, **fields}, list(arrays))


XN = np.ones((2, 128), np.float32)
MALFORMED = {
    "not msgpack": [b"\x00garbage"],
    "no frames": [],
    "bad version": [msgpack.packb({"v": 99, "t": "ping", "seq": 1, "arrays": []})],
    "unknown type": wire.encode("pong", {"seq": 1}),
    "unknown kind": _task({"kind": "explode"}),
    "missing field": _task({"kind": "moe", "arrival_s": 0.0, "meta": [[0, 0, 1024, 1]]},
                           [XN, np.zeros(1, np.int32), np.ones(1, np.float32)]),
    "missing arrays": _task({"kind": "moe", "layer": 0, "arrival_s": 0.0, "meta": []}),
    "columns out of range": _task({"kind": "moe", "layer": 0, "arrival_s": 0.0,
                                   "meta": [[0, 512, 0, 1]]},
                                  [XN, np.zeros(1, np.int32), np.ones(1, np.float32)]),
    "row out of range": _task({"kind": "moe", "layer": 0, "arrival_s": 0.0,
                               "meta": [[0, 0, 1024, 1]]},
                              [XN, np.array([9], np.int32), np.ones(1, np.float32)]),
    "wrong width": _task({"kind": "moe", "layer": 0, "arrival_s": 0.0, "meta": [[0, 0, 1024, 1]]},
                         [np.ones((2, 3), np.float32), np.zeros(1, np.int32),
                          np.ones(1, np.float32)]),
    "meta not a list": _task({"kind": "moe", "layer": 0, "arrival_s": 0.0, "meta": None},
                             [XN, XN, XN]),
    "warm slice out of range": _task({"kind": "warm"}, [np.array([[0, 0, 0, 9999]], np.int32)]),
}


def test_malformed_messages_get_an_error_reply_and_the_device_keeps_serving(lone_unit) -> None:
    me, server = lone_unit
    for i, (what, frames) in enumerate(MALFORMED.items(), start=1):
        reply = _ask(me, frames)
        assert reply.type == "error", what
        assert reply.fields["message"], what
        assert server.rejected == i, what
        # still serving: a ping is answered with a pong
        pong = _ask(me, wire.encode("ping", {"seq": i}))
        assert (pong.type, pong.fields["seq"]) == ("pong", i), what
    assert server._thread.is_alive()
    # and real work still computes
    ok = _ask(me, _task({"kind": "moe", "layer": 0, "arrival_s": 0.0, "meta": [[0, 0, 1024, 1]]},
                        [XN, np.zeros(1, np.int32), np.ones(1, np.float32)]))
    assert ok.type == "result" and ok.fields["task_id"] == 7
    assert ok.arrays[0].shape == XN.shape and np.isfinite(ok.arrays[0]).all()
    assert server.rejected == len(MALFORMED)


@pytest.mark.parametrize("request_frames", [
    wire.encode("task", {"task_id": 1, "kind": "reset"}),
    wire.encode("ping", {"seq": 1}),
], ids=["task", "ping"])
def test_a_reply_that_cannot_be_delivered_is_counted_not_fatal(lone_unit, request_frames) -> None:
    """The asker disappears before the device answers: the device counts it and serves on."""
    me, server = lone_unit
    ghost = me._hub.endpoint(b"ghost")
    with ghost:
        ghost.send(unit_peer(0), request_frames)
    deadline = time.monotonic() + 5.0
    while server.rejected == 0 and server._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._thread.is_alive(), "the device died on an undeliverable reply"
    assert server.rejected >= 1
    pong = _ask(me, wire.encode("ping", {"seq": 2}))
    assert (pong.type, pong.fields["seq"]) == ("pong", 2)
