"""Transports: zmq ROUTER/DEALER on loopback and the in-process hub move frames alike."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import zmq

from actors.transport import InprocHub, is_loopback, recv_or_fail
from actors.wire import decode, encode
from actors.zmq_transport import ZmqDealer, ZmqRouter
from cluster.core.errors import EmulationError

T = 5.0  # generous deadline for messages that should arrive


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def zmq_pair():
    router = ZmqRouter()
    endpoint = router.bind()
    dealer = ZmqDealer(b"ndp0")
    dealer.connect(endpoint)
    yield router, dealer
    dealer.close()
    router.close()


@pytest.fixture
def inproc_pair():
    hub = InprocHub()
    router, dealer = hub.endpoint(b"router"), hub.endpoint(b"ndp0")
    yield router, dealer
    dealer.close()
    router.close()


def _exchange(router, dealer) -> None:
    """The story both transports must tell: hello, task with an array, result back."""
    x = np.arange(4096, dtype=np.float32).reshape(64, 64)
    dealer.send(b"router", encode("hello", {"peer": "ndp0"}))
    peer, frames = recv_or_fail(router, T, "hello")
    assert peer == b"ndp0"
    assert decode(frames).fields == {"peer": "ndp0"}

    router.send(peer, encode("task", {"task_id": 1, "kind": "expert", "start_s": 0.5}, [x]))
    got = dealer.recv(T)
    assert got is not None
    src, frames = got
    assert src == b"router"
    task = decode(frames)
    np.testing.assert_array_equal(task.arrays[0], x)

    dealer.send(b"router", encode("result", {"task_id": 1, "finish_s": 0.75}, [task.arrays[0] * 2]))
    peer, frames = recv_or_fail(router, T, "result")
    result = decode(frames)
    assert (peer, result.type, result.fields["finish_s"]) == (b"ndp0", "result", 0.75)
    np.testing.assert_array_equal(result.arrays[0], x * 2)


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_hello_task_result_round_trip(pair, request):
    _exchange(*request.getfixturevalue(pair))


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_receive_deadline_fires_and_returns_none(pair, request):
    router, dealer = request.getfixturevalue(pair)
    t0 = time.monotonic()
    assert router.recv(0.05) is None
    assert dealer.recv(0) is None
    assert 0.04 <= time.monotonic() - t0 < 2.0
    with pytest.raises(EmulationError, match="awaiting the result of task 3"):
        recv_or_fail(router, 0.01, "the result of task 3")


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_a_zero_timeout_receive_takes_every_queued_message_then_none(pair, request):
    """What a serving loop does after each message ("anything else there?"): it must see
    every message already queued, in order, and then nothing, without blocking."""
    router, dealer = request.getfixturevalue(pair)
    for seq in range(5):
        dealer.send(b"router", encode("ping", {"seq": seq}))
    first = recv_or_fail(router, T, "the first ping")  # all five are on their way now
    got = [decode(first[1]).fields["seq"]]
    deadline = time.monotonic() + T
    while len(got) < 5 and time.monotonic() < deadline:
        msg = router.recv(0)
        if msg is not None:
            got.append(decode(msg[1]).fields["seq"])
    assert got == [0, 1, 2, 3, 4]
    assert router.recv(0) is None


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_send_to_unknown_peer_raises(pair, request):
    router, _ = request.getfixturevalue(pair)
    with pytest.raises(EmulationError, match="no connected peer"):
        router.send(b"nobody", encode("ping", {"seq": 1}))


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_receive_needs_a_finite_deadline(pair, request):
    router, _ = request.getfixturevalue(pair)
    for bad in (float("inf"), -1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout_s"):
            router.recv(bad)


@pytest.mark.parametrize("pair", ["zmq_pair", "inproc_pair"])
def test_closed_transport_refuses_work_and_closes_twice(pair, request):
    _, dealer = request.getfixturevalue(pair)
    dealer.close()
    dealer.close()
    with pytest.raises(EmulationError, match="closed"):
        dealer.send(b"router", encode("ping", {"seq": 1}))
    with pytest.raises(EmulationError, match="closed"):
        dealer.recv(0.01)


def test_many_dealers_are_told_apart_by_identity():
    with ZmqRouter() as router:
        endpoint = router.bind("127.0.0.1", 0)
        dealers = [ZmqDealer(f"ndp{i}".encode()) for i in range(4)]
        try:
            for d in dealers:
                d.connect(endpoint)
                d.send(None, encode("hello", {"peer": d.identity.decode()}))
            seen = {}
            for _ in dealers:
                peer, frames = recv_or_fail(router, T, "hello")
                seen[peer] = decode(frames).fields["peer"]
            assert seen == {d.identity: d.identity.decode() for d in dealers}
            for d in dealers:
                router.send(d.identity, encode("ping", {"seq": int(d.identity[3:])}))
            for i, d in enumerate(dealers):
                _, frames = recv_or_fail(d, T, "ping")
                assert decode(frames).fields["seq"] == i
        finally:
            for d in dealers:
                d.close()


def test_a_restarted_dealer_takes_over_its_identity():
    with ZmqRouter() as router:
        endpoint = router.bind()
        with ZmqDealer(b"ndp0") as old:
            old.connect(endpoint)
            old.send(None, encode("hello", {"peer": "old"}))
            recv_or_fail(router, T, "hello")
        with ZmqDealer(b"ndp0") as new:
            new.connect(endpoint)
            new.send(None, encode("hello", {"peer": "new"}))
            _, frames = recv_or_fail(router, T, "hello")
            assert decode(frames).fields["peer"] == "new"
            router.send(b"ndp0", encode("ping", {"seq": 5}))
            _, frames = recv_or_fail(new, T, "ping")
            assert decode(frames).fields["seq"] == 5


def test_bind_returns_the_real_endpoint_on_loopback():
    with ZmqRouter() as router:
        endpoint = router.bind()
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert int(endpoint.rsplit(":", 1)[1]) > 0
        assert router.endpoint == endpoint


def test_local_mode_binds_loopback_only():
    with ZmqRouter() as router:
        for host in ("0.0.0.0", "*", "10.0.0.1", "example.org"):
            with pytest.raises(EmulationError, match="loopback"):
                router.bind(host)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


def test_dealer_reaches_only_its_router():
    with ZmqDealer(b"ndp0") as dealer, pytest.raises(EmulationError, match="only reach"):
        dealer.send(b"ndp1", encode("ping", {"seq": 1}))
    with pytest.raises(ValueError, match="identity"):
        ZmqDealer(b"\x00gen")


def test_zmq_receives_frames_without_copying():
    with ZmqRouter() as router, ZmqDealer(b"ndp0") as dealer:
        dealer.connect(router.bind())
        dealer.send(None, encode("result", {"task_id": 1}, [np.zeros(1 << 16, np.float32)]))
        _, frames = recv_or_fail(router, T, "result")
        assert isinstance(frames[1], zmq.Frame)
        arr = decode(frames).arrays[0]
        assert np.shares_memory(arr, np.frombuffer(frames[1].buffer, np.uint8))


def test_shared_context_is_left_to_its_owner():
    ctx = zmq.Context()
    try:
        router = ZmqRouter(ctx)
        router.bind()
        router.close()
        assert not ctx.closed
    finally:
        ctx.term()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_closing_leaks_no_threads():
    before_py, before_os = threading.active_count(), _os_threads()
    for _ in range(3):
        router = ZmqRouter()
        dealer = ZmqDealer(b"ndp0")
        dealer.connect(router.bind())
        dealer.send(None, encode("ping", {"seq": 1}))
        recv_or_fail(router, T, "ping")
        dealer.close()
        router.close()
    assert threading.active_count() == before_py
    deadline = time.monotonic() + 2.0  # zmq's I/O threads are joined in term(); allow a beat
    while _os_threads() > before_os and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _os_threads() == before_os


def test_inproc_copies_frames_like_a_wire():
    hub = InprocHub()
    with hub.endpoint(b"a") as a, hub.endpoint(b"b") as b:
        x = np.ones(8, np.float32)
        a.send(b"b", encode("result", {"task_id": 1}, [x]))
        _, frames = recv_or_fail(b, T, "result")
        x[:] = 5
        assert decode(frames).arrays[0].tolist() == [1.0] * 8
        with pytest.raises(EmulationError, match="already exists"):
            hub.endpoint(b"a")
    with hub.endpoint(b"a"):  # a closed name can be reused
        pass


def test_inproc_delivers_across_threads():
    hub = InprocHub()
    server, client = hub.endpoint(b"router"), hub.endpoint(b"ndp0")

    def echo() -> None:
        peer, frames = recv_or_fail(server, T, "ping")
        server.send(peer, encode("pong", {"seq": decode(frames).fields["seq"]}))

    th = threading.Thread(target=echo)
    th.start()
    client.send(b"router", encode("ping", {"seq": 11}))
    _, frames = recv_or_fail(client, T, "pong")
    th.join(T)
    assert decode(frames).fields == {"seq": 11}


def test_peer_names_round_trip_and_strangers_do_not_parse() -> None:
    """Every party's name is built and parsed by actors.peers alone (issue 12)."""
    from actors import peers as P

    assert P.device_peers(3) == [b"gpu", b"ndp0", b"ndp1", b"ndp2"]
    assert P.device_names(2) == ["gpu", "ndp0", "ndp1"]
    for u in (0, 7, 123):
        peer = P.unit_peer(u)
        assert P.parse(peer) == ("ndp", u) == P.parse(peer.decode())
        assert P.unit_of(peer) == u and P.unit_peer(P.unit_of(peer)) == peer
        assert P.device_name(*P.parse(peer)).encode() == peer
        hb = P.heartbeat_peer(peer)
        assert hb == peer + b".hb" and P.base_peer(hb) == peer and P.parse(hb) == ("ndp", u)
        assert P.is_device(peer) and not P.is_device(hb)
    assert P.parse(P.GPU_PEER) == ("gpu", -1) and P.device_name(*P.parse(b"gpu")) == "gpu"
    assert P.parse(P.LINK_PEER) == ("link", -1) and P.parse(P.SCHED_PEER) == ("sched", -1)
    assert not P.is_device(P.LINK_PEER) and not P.is_device(P.SCHED_PEER)
    for stranger in (b"ndp", b"ndp-1", b"ndp01", b"ndp1x", b"ndp\xd9\xa1", b"link.hb",
                     b"sched.hb", b"gpu0", b"", b"NDP0"):
        with pytest.raises(ValueError):
            P.parse(stranger)
        assert not P.is_device(stranger)
    with pytest.raises(ValueError):
        P.unit_of(b"gpu")


# a dealer and a CURVE router dropped without close() inside reference cycles (as a traceback's
# frames hold them), a message still queued on the dealer: the garbage collector must release
# them. Left to pyzmq alone the collector hangs for good in the context's term(): the socket's
# weak entry in its context is cleared before the context is finalised, so destroy() closes
# nothing and term() waits for a socket that is itself waiting to be finalised.
_DROPPED_IN_A_CYCLE = """
import gc, sys, zmq
from actors.curve import CurveKeys
from actors.wire import encode
from actors.zmq_transport import ZmqDealer, ZmqRouter

d = ZmqDealer(b"ndp0", router_id=b"sched", send_timeout_s=0.0)
d.connect("tcp://127.0.0.1:9")  # nobody listens: the hello stays queued
d.send(None, encode("ping", {"seq": 1}))
kept = d.socket, d._ctx  # to look at afterwards (these keep only them alive)
lost = ZmqDealer(b"ndp1", router_id=b"sched", send_timeout_s=0.0)  # nothing kept: the hang
lost.connect("tcp://127.0.0.1:9")
lost.send(None, encode("ping", {"seq": 1}))
cycle = [d, lost]
cycle.append(cycle)
del d, lost, cycle
r = None
if zmq.has("curve"):
    r = ZmqRouter(curve=CurveKeys.generate(), clients={CurveKeys.generate().public: [b"ndp0"]})
    r.bind("127.0.0.1", 0)
    loop = {"router": r}
    loop["self"] = loop
    del r, loop
gc.collect()
assert kept[0].closed and kept[1].closed, kept
print("released")
"""


def test_a_transport_dropped_in_a_reference_cycle_is_released_by_the_collector() -> None:
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", _DROPPED_IN_A_CYCLE],
                             cwd=root, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the garbage collector hung on a transport that was not closed")
    assert out.returncode == 0 and out.stdout.strip() == "released", out.stderr[-2000:]
