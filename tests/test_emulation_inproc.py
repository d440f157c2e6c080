"""The emulation's devices, link and scheduler over the in-process transport (no Ray, no zmq).

The GPU, the NDP units and the host link are served on threads of one process, the scheduler
runs in the test's thread. What must hold whatever the transport:

- scheduling never changes the math: every policy's final hidden states equal the numpy
  reference forward pass (fp32 tolerance: the emulation sums the partials of a token in
  another order than the reference, a sum of at most N + 2 terms per element; its reordering
  error is a few ulps of the largest term, far below ``REL_TOL`` of the output's magnitude);
- the timing emerges from the devices: devices built with a cost model the scheduler does not
  know move the measured latency to what the analytic engine predicts for *that* hardware;
- a prefetch still in flight when its expert is needed makes the GPU wait, and the wait is
  measured and traced;
- a device that never answers, or whose work fails, ends the run with an error naming it.

Timing checks run at a dilation large enough for one Python process's threads (they share
the GIL) and compare against the analytic engine with the fidelity target, 5%.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from actors import wire
from actors.device_server import DeviceServer
from actors.gpu import GpuDevice
from actors.link import LinkServer
from actors.ndp import NdpUnit
from actors.peers import GPU_PEER, unit_peer
from actors.scheduler import SchedulerCore
from actors.transport import InprocEndpoint, InprocHub
from cluster.core.config import load_config
from cluster.core.errors import EmulationError
from cluster.core.metrics import summarize
from cluster.core.reference import reference_forward
from cluster.core.routing import build_routing
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines.analytic import run_policy
from cluster.engines.emulate import records_from_run, unit_layouts

SCALE = 1 / 16  # real widths: olmoe d_model 128, d_ff 64
TINY = ("workload.prompt_tokens=6", "workload.output_tokens=3")
REL_TOL = 1e-4
TARGET = 0.05
POLICIES = ["ep", "monde", "tp", "tp-lb", "paper", "eplb", "tp-lb+lru", "tp-lb+oracle", "od-moe"]


def _cfg(*overrides: str, model: str = "olmoe-1b-7b") -> Config:
    return load_config(model=model, overrides=[*TINY, *overrides])


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@dataclass
class Inproc:
    """A whole emulated system in one process: scheduler core, served devices, the link."""

    cfg: Config
    routing: Routing
    hub: InprocHub
    core: SchedulerCore
    servers: dict[bytes, DeviceServer]
    link: LinkServer


@contextlib.contextmanager
def inproc_system(cfg: Config, scale: float = SCALE, device_cfg: Config | None = None,
                  devices: dict[bytes, Callable[[], NdpUnit | GpuDevice] | None] | None = None,
                  warm: bool = True) -> Iterator[Inproc]:
    """Serves the GPU, every NDP unit and the link on threads; ``device_cfg`` builds the
    devices from another config than the scheduler's; ``devices`` replaces some of them
    (``None``: the endpoint exists but nobody serves it). Always torn down."""
    routing = build_routing(cfg)
    dc = device_cfg or cfg
    hub = InprocHub()
    makers: dict[bytes, Callable[[], NdpUnit | GpuDevice] | None] = {
        GPU_PEER: lambda: GpuDevice(dc, scale)}
    for u in range(cfg.ndp.num_ndp_units):
        makers[unit_peer(u)] = lambda u=u: NdpUnit(dc, u, scale)
    makers.update(devices or {})
    endpoints: list[InprocEndpoint] = []
    servers: dict[bytes, DeviceServer] = {}
    core = link = None
    try:
        for peer, make in makers.items():
            ep = hub.endpoint(peer)
            endpoints.append(ep)
            if make is not None:
                servers[peer] = DeviceServer(make(), ep, poll_s=0.01)
                servers[peer].start()
        link_ep = hub.endpoint(b"link")
        endpoints.append(link_ep)
        link = LinkServer(link_ep, poll_s=0.01)
        link.start()
        sched_ep = hub.endpoint(b"sched")
        endpoints.append(sched_ep)
        core = SchedulerCore(cfg, routing, sched_ep)
        core.net.heartbeat_timeout_s = None  # no heartbeat threads here: deadlines only
        if warm:
            core.warm(unit_layouts(cfg, scale))
            core.sync_clocks()
        yield Inproc(cfg, routing, hub, core, servers, link)
    finally:
        if core is not None:
            core.shutdown()
        for s in servers.values():
            s.stop()
        if link is not None:
            link.stop()
        for ep in endpoints:
            ep.close()
    assert not any(s._thread.is_alive() for s in servers.values()), "a device thread hung"


@pytest.fixture(scope="module")
def olmoe() -> Iterator[tuple[Inproc, np.ndarray]]:
    """OLMoE (16 MoE layers, 64 experts, top-8), 6 in / 3 out, batch 1, 4 NDP units."""
    cfg = _cfg()
    with inproc_system(cfg) as sys_:
        yield sys_, reference_forward(cfg, sys_.routing, SCALE)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_computes_the_reference_math(olmoe, name) -> None:
    sys_, ref = olmoe
    st, meta = sys_.core.run_policy(name, 1.0)
    assert rel_error(sys_.core.collect(), ref) <= REL_TOL, name
    rec = records_from_run(sys_.cfg, name, st, meta)
    # every token and every MoE step was measured
    assert [t.index for t in rec.tokens] == list(range(sys_.routing.decode_steps + 1))
    assert len(rec.steps) == sys_.cfg.model.num_layers * (sys_.routing.decode_steps + 1)
    assert all(s.end_s >= s.start_s for s in rec.steps)
    link = st.reports["link"]
    assert link["bytes"]["activation"] > 0 or name == "tp-lb+oracle"
    # everything the run waited for left the link; only a prefetch may still be on it (one
    # issued late in the last token, for a step that never comes, need not have landed)
    left = link["pending_kinds"]
    assert sum(left.values()) == link["pending"]
    assert {k: n for k, n in left.items() if k != "prefetch"} == {
        "activation": 0, "partial": 0, "fetch": 0}, left


def test_fractional_split_and_batch_two_with_dense_and_shared_experts() -> None:
    for cfg in (_cfg("policy.lb_split=fractional"),
                _cfg("workload.batch_size=2", model="deepseek-v2-lite")):
        with inproc_system(cfg) as sys_:
            ref = reference_forward(cfg, sys_.routing, SCALE)
            for name in ("tp-lb", "paper"):
                sys_.core.run_policy(name, 1.0)
                assert rel_error(sys_.core.collect(), ref) <= REL_TOL, (cfg.model.name, name)


def _measured(sys_: Inproc, name: str, dilation: float) -> dict:
    st, meta = sys_.core.run_policy(name, dilation)
    return summarize(records_from_run(sys_.cfg, name, st, meta), sys_.cfg.ndp.num_ndp_units)


def test_latency_emerges_from_the_devices_own_cost_model() -> None:
    """Devices built with half the NDP bandwidth; the scheduler is told nothing. The
    measured TPOT moves to the analytic prediction for the slower hardware."""
    cfg = _cfg("workload.output_tokens=4")
    half = cfg.replace(ndp=dataclasses.replace(cfg.ndp, internal_bw_gbps=cfg.ndp.internal_bw_gbps / 2))
    routing = build_routing(cfg)
    want_half = summarize(run_policy(half, routing, "ep"), cfg.ndp.num_ndp_units)["tpot_s"]
    want_full = summarize(run_policy(cfg, routing, "ep"), cfg.ndp.num_ndp_units)["tpot_s"]
    assert want_half > 1.5 * want_full  # ep at batch 1 is bound by the units' bandwidth
    with inproc_system(cfg, device_cfg=half) as sys_:
        got = _measured(sys_, "ep", 200.0)["tpot_s"]
    assert abs(got - want_half) / want_half <= TARGET, (got, want_half, want_full)


def test_devices_time_a_policy_with_its_whole_cost_configuration() -> None:
    """context-aware stores NDP-side experts at policy.ndp_weight_bits = 4: the scheduler sends
    the devices that cost configuration (ndp.weight_bits = 4), nothing else, and the measured
    TPOT is the analytic one for 4 bits, far from the fp16 one."""
    cfg = _cfg("workload.output_tokens=4", "policy.ndp_weight_bits=4")
    routing = build_routing(cfg)
    want4 = summarize(run_policy(cfg, routing, "context-aware"), cfg.ndp.num_ndp_units)["tpot_s"]
    fp16 = _cfg("workload.output_tokens=4")
    want16 = summarize(run_policy(fp16, routing, "context-aware"), cfg.ndp.num_ndp_units)["tpot_s"]
    assert want16 > 1.3 * want4  # NDP-bound at batch 1: the weights dominate what units read
    with inproc_system(cfg) as sys_:
        got = _measured(sys_, "context-aware", 200.0)["tpot_s"]
    assert abs(got - want4) / want4 <= TARGET, (got, want4, want16)


def test_a_prefetch_still_in_flight_makes_the_gpu_wait_and_the_trace_shows_it() -> None:
    """After the prefill the link is busy with the prefetches of the whole cache when decode
    starts: the plan fetches some of them on demand, which upgrades the prefetch in flight;
    the GPU waits for the weights to land, and the wait is measured, not assumed."""
    cfg = _cfg("workload.output_tokens=3")
    with inproc_system(cfg) as sys_:
        st, meta = sys_.core.run_policy("paper", 20.0, trace_steps=range(1, 2))
    gpu, link = st.reports["gpu"], st.reports["link"]
    assert link["upgraded"] > 0
    assert link["bytes"]["prefetch"] > 0 and link["bytes"]["fetch"] > 0
    assert len(gpu["waits"]) > 0 and max(gpu["waits"]) > 0
    rec = records_from_run(cfg, "paper", st, meta, trace_steps=range(1, 2))
    waits = [iv for iv in rec.intervals if iv.resource == "gpu" and iv.kind == "wait"]
    assert waits and all(iv.end_s > iv.start_s for iv in waits)
    fetches = [iv for iv in rec.intervals if iv.resource == "link" and iv.kind == "fetch"]
    assert fetches  # the upgraded transfer is on the link track as a fetch
    assert _preempted(link["intervals"]) > 0


def _preempted(intervals: list) -> int:
    """Prefetch transfers the link track shows cut by step traffic: a prefetch segment that
    ends where an activation or partial starts, and the same transfer resumes later."""
    segs = sorted(intervals, key=lambda x: x[2])
    n = 0
    for i, (kind, label, _a, b, _seq) in enumerate(segs):
        if kind != "prefetch" or i + 1 >= len(segs):
            continue
        nxt = segs[i + 1]
        if nxt[0] in ("activation", "partial") and abs(nxt[2] - b) < 1e-9 and any(
                k == "prefetch" and lab == label and a2 >= nxt[3] - 1e-9
                for k, lab, a2, _b2, _s in segs[i + 2:]):
            n += 1
    return n


def test_a_device_that_never_answers_fails_the_run_naming_it_within_the_deadline() -> None:
    cfg = _cfg("emulate.recv_timeout_s=2")
    with inproc_system(cfg, devices={unit_peer(2): None}, warm=False) as sys_:
        t0 = time.monotonic()
        with pytest.raises(EmulationError, match="ndp2"):
            sys_.core.run_policy("tp", 1.0)
        assert time.monotonic() - t0 < 10


class BrokenUnit(NdpUnit):
    """Fails on its first shard: a bug on the device."""

    def slice(self, layer, expert, lo, hi):
        if getattr(self, "_armed", False):
            raise RuntimeError("DIMM on fire")
        return super().slice(layer, expert, lo, hi)

    def reset(self, f):
        super().reset(f)
        self._armed = True


def test_a_device_whose_work_fails_ends_the_run_naming_it_and_why() -> None:
    cfg = _cfg("emulate.recv_timeout_s=5")
    with (inproc_system(cfg, devices={unit_peer(1): lambda: BrokenUnit(cfg, 1, SCALE)}) as sys_,
          pytest.raises(EmulationError, match=r"ndp1.*DIMM on fire")):
        sys_.core.run_policy("tp", 1.0)


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


def _cmd(fields: dict, arrays: list[np.ndarray] = ()) -> list:
    return wire.encode("cmd", fields, list(arrays))


ROWS, GATES = np.zeros(1, np.int32), np.ones(1, np.float32)
MALFORMED = {
    "not msgpack": [b"\x00garbage"],
    "no frames": [],
    "bad version": [msgpack.packb({"v": 99, "t": "ping", "seq": 1, "arrays": []})],
    "unknown type": wire.encode("pong", {"seq": 1}),
    "unknown kind": _task({"kind": "explode"}),
    "unknown command": _cmd({"kind": "explode"}),
    "moe without seq": _cmd({"kind": "moe", "layer": 0, "at_s": 0.0, "meta": [[0, 0, 1024, 1]]},
                            [ROWS, GATES]),
    "moe missing arrays": _cmd({"kind": "moe", "seq": 1, "layer": 0, "at_s": 0.0, "meta": []}),
    "columns out of range": _cmd({"kind": "moe", "seq": 1, "layer": 0, "at_s": 0.0,
                                  "meta": [[0, 512, 0, 1]]}, [ROWS, GATES]),
    "meta not a list": _cmd({"kind": "moe", "seq": 1, "layer": 0, "at_s": 0.0, "meta": None},
                            [ROWS, GATES]),
    "rows and meta disagree": _cmd({"kind": "moe", "seq": 1, "layer": 0, "at_s": 0.0,
                                    "meta": [[0, 0, 1024, 5]]}, [ROWS, GATES]),
    "ship of a slice out of range": _cmd({"kind": "ship", "class": "fetch", "at_s": 0.0,
                                          "items": [[0, 0, 0, 9999, 1, 1]]}),
    "ship of an unknown class": _cmd({"kind": "ship", "class": "gold", "at_s": 0.0,
                                      "items": [[0, 0, 0, 1024, 1, 1]]}),
    "activation of the wrong width": wire.encode("data", {"kind": "activation", "seq": 1,
                                                          "at_s": 0.0}, [np.ones((2, 3), np.float32)]),
    "warm slice out of range": _task({"kind": "warm"}, [np.array([[0, 0, 0, 9999]], np.int32)]),
}


def test_malformed_messages_get_an_error_reply_and_the_device_keeps_serving(lone_unit) -> None:
    me, server = lone_unit
    for i, (what, frames) in enumerate(MALFORMED.items(), start=1):
        reply = _ask(me, frames)
        assert reply.type == "error", what
        assert reply.fields["message"], what
        assert server.rejected == i, what
        pong = _ask(me, wire.encode("ping", {"seq": i}))
        assert (pong.type, pong.fields["seq"]) == ("pong", i), what
    assert server._thread.is_alive()
    ok = _ask(me, _task({"kind": "report"}))
    assert ok.type == "result" and ok.fields["task_id"] == 7
    assert server.rejected == len(MALFORMED)


@pytest.mark.parametrize("request_frames", [
    wire.encode("task", {"task_id": 1, "kind": "report"}),
    wire.encode("ping", {"seq": 1}),
], ids=["task", "ping"])
def test_a_reply_that_cannot_be_delivered_is_counted_not_fatal(lone_unit, request_frames) -> None:
    """The asker disappears before the device answers: the device counts it and serves on."""
    me, server = lone_unit
    server.peers = {**server.peers, b"ghost": server.peers[b"sched"]}  # a peer it listens to
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


def test_a_slow_unit_really_computes_slower_in_the_emulation() -> None:
    """``slow:ndp1x3`` is in the devices' own cost model: ndp1 holds each shard three times as
    long, which the measured busy times show (a ratio of holds: D x modelled each, whatever
    the load, as long as the real work fits the slot)."""
    cfg = _cfg("emulate.inject=slow:ndp1x3")
    with inproc_system(cfg) as sys_:
        st, meta = sys_.core.run_policy("tp", 50.0)
    rec = records_from_run(cfg, "tp", st, meta)
    busy = np.sum([s.unit_busy_s for s in rec.steps if s.phase == "decode"], axis=0)
    assert busy[1] / busy[0] == pytest.approx(3.0, rel=0.1), busy
    assert summarize(rec, 4)["max_over_mean"] > 1.5


def test_charged_decision_time_holds_each_step_in_both_engines() -> None:
    cfg = _cfg("emulate.charge_decision_time=true")
    routing = build_routing(cfg)
    off = run_policy(_cfg(), routing, "tp-lb").tokens[-1].time_s
    on = run_policy(cfg, routing, "tp-lb").tokens[-1].time_s
    assert on > off  # every step waited for its measured decision
    with inproc_system(cfg) as sys_:
        st, _meta = sys_.core.run_policy("tp-lb", 20.0)
    assert len(st.decisions_s) == len(st.steps) and min(st.decisions_s) > 0
