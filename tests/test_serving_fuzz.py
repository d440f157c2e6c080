"""The serving loops under hostile input: a device, the link and the scheduler (issue 13).

Hypothesis throws generated frames (valid messages of every type, mutated ones, random bytes)
at each loop from peers of the run and from strangers, over the in-process transport:

- from a stranger: nothing happens -- no answer, no state change, the refusal is recorded with
  the stranger's name;
- from a peer of the run: a malformed message (one ``wire.decode`` refuses) is answered with an
  ``error`` and counted, and the loop serves on; the scheduler fails only for what a run's own
  device really says (its ``error``, a new incarnation in its ``hello``).

``tests/test_security.py`` has the same over zmq and a hostile run on Ray.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors import wire
from actors.clock import wall_now
from actors.device_server import DeviceServer
from actors.dispatcher import Dispatcher
from actors.link import LinkServer
from actors.ndp import NdpUnit
from actors.peers import GPU_PEER, LINK_PEER, unit_peer
from actors.transport import InprocEndpoint, InprocHub
from cluster.core.config import load_config
from cluster.core.errors import EmulationError, ProtocolError

SCALE = 1 / 16
T = 5.0
EXAMPLES = 300  # per loop and kind of sender
STRANGERS = [b"evil", b"ndp9", b"gpu.hb.x", b"link2", b"\xff\x00"]

_A = np.arange(6, dtype=np.float32).reshape(2, 3)
# one valid message of each type a peer of the run might send (every loop sees all of them)
_TEMPLATES = [
    wire.encode("hello", {"peer": "ndp1", "seq": 0, "incarnation": 666}),
    wire.encode("task", {"task_id": 3, "kind": "report"}),
    wire.encode("task", {"task_id": 4, "kind": "explode"}),
    wire.encode("result", {"task_id": 1}),
    wire.encode("cmd", {"kind": "moe", "seq": 0, "layer": 0, "at_s": 0.0, "meta": [[0, 0, 8, 1]]},
                [np.zeros(1, np.int32), np.ones(1, np.float32)]),
    wire.encode("cmd", {"kind": "ship", "class": "fetch", "at_s": 0.0, "items": [[0, 0, 0, 8, 1, 1]]}),
    wire.encode("cmd", {"kind": "cancel", "at_s": 0.0, "pids": [1]}),
    wire.encode("data", {"kind": "activation", "dst": "ndp0", "at_s": 0.0, "seq": 0,
                         "true_bytes": 10}, [_A]),
    wire.encode("data", {"kind": "partial", "dst": "gpu", "at_s": 0.0, "seq": 0, "unit": 0,
                         "true_bytes": 10}, [_A]),
    wire.encode("event", {"kind": "failed", "message": "forged"}),
    wire.encode("event", {"kind": "routed", "seq": 0, "layer": 0, "at_s": 0.0, "landed": [[1]]}),
    wire.encode("event", {"kind": "done"}),
    wire.encode("ping", {"seq": 1}),
    wire.encode("pong", {"seq": 1}),
    wire.encode("error", {"message": "forged", "task_id": 1}),
    [msgpack.packb({"v": 1, "t": "explode", "arrays": []})],
]
_TEMPLATES = [[bytes(f) for f in frames] for frames in _TEMPLATES]


@st.composite
def _frames(draw) -> list[bytes]:
    """A valid message, a mutated one (bytes flipped, frames cut or duplicated, header values
    replaced) or random frames."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.lists(st.binary(max_size=48), max_size=3))
    frames = list(draw(st.sampled_from(_TEMPLATES)))
    if kind == 1:
        return frames
    if kind == 2:
        i = draw(st.integers(0, len(frames) - 1))
        buf = bytearray(frames[i])
        for _ in range(draw(st.integers(1, 3))):
            if buf:
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        frames[i] = bytes(buf)
        if draw(st.booleans()):
            frames = frames[: draw(st.integers(0, len(frames)))]
        return frames
    header = msgpack.unpackb(frames[0], raw=False)
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(),
                     st.text(max_size=6), st.lists(st.integers(-2, 9), max_size=3))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["t", "kind", "seq", "dst", "at_s", "true_bytes", "items",
                                    "meta", "task_id", "incarnation", "message", "landed"]))
        header[key] = draw(leaf)
    frames[0] = msgpack.packb(header)
    return frames


def _decodes(frames: list[bytes]) -> wire.Message | None:
    try:
        return wire.decode(frames)
    except ProtocolError:
        return None


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _drain(ep: InprocEndpoint, within_s: float = 0.0) -> list[tuple[bytes, wire.Message | None]]:
    out = []
    while (got := ep.recv(within_s)) is not None:
        out.append((got[0], _decodes(got[1])))
        within_s = 0.0
    return out


_SEQS = iter(range(1000, 1 << 30))  # above any fuzzed ping's: a pong is told apart by it


def _round_trip(me: InprocEndpoint, peer: bytes) -> list[tuple[bytes, wire.Message | None]]:
    """Pings ``peer`` from ``me`` and returns what came before the pong (the loop's answers to
    what was sent earlier); fails if the loop went silent."""
    seq = next(_SEQS)
    me.send(peer, wire.encode("ping", {"seq": seq}))
    before = []
    while True:
        got = me.recv(T)
        assert got is not None, f"{peer!r} stopped serving"
        msg = _decodes(got[1])
        if msg is not None and msg.type == "pong" and msg.fields["seq"] == seq:
            return before
        before.append((got[0], msg))


# --- a device -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> Iterator[tuple[InprocHub, DeviceServer, dict[bytes, InprocEndpoint]]]:
    cfg = load_config(model="olmoe-1b-7b", overrides=["workload.prompt_tokens=6",
                                                      "workload.output_tokens=3"])
    hub = InprocHub()
    server = DeviceServer(NdpUnit(cfg, 0, SCALE), hub.endpoint(unit_peer(0)), poll_s=0.01)
    eps = {p: hub.endpoint(p) for p in [b"sched", LINK_PEER, *STRANGERS]}
    server.start()
    try:
        yield hub, server, eps
    finally:
        server.stop()
        for ep in eps.values():
            ep.close()


@FUZZ
@given(sender=st.sampled_from([b"sched", LINK_PEER, *STRANGERS]), frames=_frames())
def test_a_device_answers_its_peers_malformed_messages_and_ignores_strangers(unit, sender,
                                                                             frames) -> None:
    _hub, server, eps = unit
    msg = _decodes(frames)
    assume(not (msg is not None and msg.type == "shutdown"))
    refused, malformed, handled = server.refusals.total, server.malformed.total, server.handled
    eps[sender].send(unit_peer(0), frames)
    before = _round_trip(eps[b"sched"], unit_peer(0))  # the device still serves
    assert server._thread.is_alive()
    if sender in STRANGERS:
        assert server.refusals.total == refused + 1
        assert (server.malformed.total, server.handled) == (malformed, handled)
        assert before == [] and _drain(eps[sender]) == []  # not even an error
        assert any(e["peer"] == sender.decode("ascii", "backslashreplace")
                   and e["reason"] == "unknown peer" for e in server.refusals.as_list("ndp0"))
        return
    assert server.refusals.total == refused
    replies = before if sender == b"sched" else _drain(eps[sender])
    if msg is None:  # counted and answered
        assert server.malformed.total == malformed + 1
        assert [m.type for _, m in replies if m is not None] == ["error"]
    _drain(eps[LINK_PEER])  # what the unit shipped or answered


# --- the link -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def link() -> Iterator[tuple[LinkServer, dict[bytes, InprocEndpoint]]]:
    hub = InprocHub()
    peers = [b"sched", GPU_PEER, *(unit_peer(u) for u in range(4))]
    server = LinkServer(hub.endpoint(LINK_PEER), poll_s=0.01, devices=peers[1:])
    eps = {p: hub.endpoint(p) for p in [*peers, *STRANGERS]}
    server.start()
    eps[b"sched"].send(LINK_PEER, wire.encode("task", {
        "task_id": 1, "kind": "reset", "dilation": 1.0, "latency_s": 0.0,
        "bw_bytes_per_s": 1e12, "prefetch_class": 2, "base_s": wall_now()}))
    assert _drain(eps[b"sched"], T)[0][1].type == "result"
    try:
        yield server, eps
    finally:
        server.stop()
        for ep in eps.values():
            ep.close()


@FUZZ
@given(sender=st.sampled_from([b"sched", GPU_PEER, b"ndp0", *STRANGERS]), frames=_frames())
def test_the_link_carries_only_its_peers_transfers(link, sender, frames) -> None:
    server, eps = link
    msg = _decodes(frames)
    assume(not (msg is not None and msg.type in ("shutdown", "task")))
    refused, malformed = server.refusals.total, server.malformed.total
    pending = len(server.link.sched.pending)
    eps[sender].send(LINK_PEER, frames)
    _round_trip(eps[b"sched"], LINK_PEER)
    assert server._thread.is_alive()
    if sender in STRANGERS:
        assert server.refusals.total == refused + 1 and server.malformed.total == malformed
        assert len(server.link.sched.pending) == pending
        assert all(_drain(ep) == [] for ep in eps.values())  # nothing sent, nothing delivered
        return
    assert server.refusals.total == refused
    if msg is None:
        assert server.malformed.total == malformed + 1
        if sender != b"sched":
            assert [m.type for _, m in _drain(eps[sender]) if m is not None][:1] == ["error"]
    for ep in eps.values():
        _drain(ep, 0.01)


def test_the_link_refuses_a_transfer_a_peer_may_not_send(link) -> None:
    """Known peers, wrong roles: a unit sending activations, the GPU sending to itself or to a
    unit of another run, a unit claiming a fetch to another unit."""
    server, eps = link
    bad = [(b"ndp0", "activation", "ndp1"), (GPU_PEER, "activation", "gpu"),
           (GPU_PEER, "activation", "ndp9"), (b"ndp0", "fetch", "ndp1"), (GPU_PEER, "partial", "gpu")]
    for sender, kind, dst in bad:
        before = server.malformed.total
        eps[sender].send(LINK_PEER, wire.encode("data", {"kind": kind, "dst": dst, "at_s": 0.0,
                                                         "true_bytes": 4}, [_A]))
        got = _drain(eps[sender], T)
        assert got and got[0][1].type == "error", (sender, kind, dst)
        assert server.malformed.total == before + 1
    assert len(server.link.sched.pending) == 0
    eps[GPU_PEER].send(LINK_PEER, wire.encode("data", {"kind": "activation", "dst": "ndp1",
                                                       "at_s": 0.0, "true_bytes": 4}, [_A]))
    peer, msg = _drain(eps[b"ndp1"], T)[0]  # the right role is carried, header restamped
    assert peer == LINK_PEER and msg.type == "data" and msg.fields["at_s"] >= 0.0
    np.testing.assert_array_equal(msg.arrays[0], _A)


# --- the scheduler ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sched() -> Iterator[tuple[Dispatcher, dict[bytes, InprocEndpoint]]]:
    hub = InprocHub()
    peers = [GPU_PEER, unit_peer(0), unit_peer(1), LINK_PEER]
    net = Dispatcher(hub.endpoint(b"sched"), T, peers=peers)
    eps = {p: hub.endpoint(p) for p in [*peers, b"ndp1.hb", *STRANGERS]}
    try:
        yield net, eps
    finally:
        for ep in eps.values():
            ep.close()


@FUZZ
@given(sender=st.sampled_from([GPU_PEER, b"ndp1", b"ndp1.hb", LINK_PEER, *STRANGERS]),
       frames=_frames())
def test_the_scheduler_fails_only_on_what_its_own_devices_say(sched, sender, frames) -> None:
    net, eps = sched
    for p in (GPU_PEER, b"ndp1", b"ndp0", LINK_PEER):
        net.incarnation[p] = 1  # peers seen at start-up, as in a run
    net.down.clear()
    net.events.clear()
    marker = next(_MARKERS)
    msg = _decodes(frames)
    refused, malformed = net.refusals.total, net.malformed.total
    eps[sender].send(b"sched", frames)
    eps[GPU_PEER].send(b"sched", wire.encode("event", {"kind": "done", "marker": marker}))
    failed = None
    try:
        while True:
            peer, ev = net.next_event("the fuzz", timeout_s=T)
            if peer == GPU_PEER and ev.fields.get("marker") == marker:
                break
    except EmulationError as exc:
        failed = str(exc)
    if sender in STRANGERS:
        assert failed is None
        assert net.refusals.total == refused + 1 and net.malformed.total == malformed
        assert _drain(eps[sender]) == []
        return
    assert net.refusals.total == refused
    base = sender.removesuffix(b".hb")
    if failed is not None:  # only a run's own device saying so ends a run
        assert msg is not None, failed
        assert msg.type == "error" or (msg.type == "hello"
                                       and msg.fields.get("incarnation") != 1), (msg, failed)
        assert base.decode() in failed
        return
    answered = [m.type for _, m in _drain(eps[sender]) if m is not None]
    assert net.malformed.total - malformed in (0, 1)
    if msg is None:
        assert net.malformed.total == malformed + 1
    if net.malformed.total > malformed and sender != b"ndp1.hb":  # a heartbeat never reads
        assert answered == ["error"]
    else:
        assert answered == []
    for ep in eps.values():
        _drain(ep)


_MARKERS = iter(range(1, 1 << 30))
