"""The dispatcher's deadline, heartbeat and retry logic on a virtual clock (issue 12).

The :class:`~actors.dispatcher.Dispatcher` reads time only through its injected ``clock``.
Here that clock is an :class:`~actors.clock.VirtualClock` that moves only when the test's
transport says a receive waited (a receive with nothing due takes its whole timeout, one with
a message due returns at the message's time) or when the test moves it by hand. Nothing
sleeps and there is no Ray, so thresholds of minutes are checked in milliseconds, and each
detection is pinned to the first clock reading past its threshold: no reading at or before
the threshold detects, the first one after does.

Times are exact binary fractions (start 1024 s, poll 1/8 s, deadlines 1 s and 1/2 s) so that
"at the threshold" and "past it" are exact float comparisons, not tolerances.
"""

from __future__ import annotations

import bisect
import itertools
from types import SimpleNamespace

import pytest

from actors import dispatcher as dmod
from actors import wire
from actors.clock import VirtualClock
from actors.dispatcher import Dispatcher
from actors.peers import GPU_PEER, LINK_PEER, heartbeat_peer, unit_peer
from cluster.core.errors import EmulationError

T0 = 1024.0
POLL = 0.125
QUANTUM = 2.0**-20  # the least a receive takes, so a zero-timeout receive still moves time
NDP0 = unit_peer(0)


class Scripted:
    """A transport whose messages arrive at scripted virtual times and whose receives wait on
    the virtual clock (the clock is the test's; the dispatcher only reads it)."""

    def __init__(self, vc: VirtualClock) -> None:
        self.vc = vc
        self.script: list[tuple[float, int, bytes, list]] = []  # (at, order, peer, frames)
        self.order = itertools.count()
        self.sent: list[tuple[float, bytes, wire.Message]] = []

    def at(self, t: float, peer: bytes, msg_type: str, fields: dict) -> None:
        bisect.insort(self.script, (t, next(self.order), peer, wire.encode(msg_type, fields)))

    def send(self, peer: bytes, frames: list) -> None:
        self.sent.append((self.vc.now_s(), peer, wire.decode(frames)))

    def recv(self, timeout_s: float) -> tuple[bytes, list] | None:
        now = self.vc.now_s()
        if self.script and self.script[0][0] <= now + timeout_s:
            t, _, peer, frames = self.script.pop(0)
            self.vc.sleep_until_s(t)  # (a message already due comes at once)
            return peer, frames
        self.vc.advance(max(timeout_s, QUANTUM))
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def rig(monkeypatch):
    monkeypatch.setattr(dmod, "POLL_S", POLL)  # an exact binary fraction (0.1 is not)
    vc = VirtualClock(T0)
    reads: list[float] = []

    def clock() -> float:
        reads.append(vc.now_s())
        return reads[-1]

    tr = Scripted(vc)

    def make(**kw) -> Dispatcher:
        return Dispatcher(tr, kw.pop("timeout_s", 1.0), peers=[GPU_PEER, NDP0, LINK_PEER],
                          clock=clock, **kw)

    return SimpleNamespace(vc=vc, tr=tr, reads=reads, make=make)


def detected_at_first_reading_past(reads: list[float], threshold: float) -> None:
    """The last reading (the one that detected) is past ``threshold``; none before it was."""
    assert reads[-1] > threshold
    assert max(reads[:-1]) <= threshold
    assert threshold in reads  # the clock did stand exactly at the threshold, undetected


def test_a_task_deadline_fires_at_the_first_reading_past_it(rig) -> None:
    tr, reads, make = rig.tr, rig.reads, rig.make
    net = make(timeout_s=1.0)
    with pytest.raises(EmulationError, match=r"no reply from ndp0 within 1 s while awaiting warm"):
        net.call(NDP0, {"kind": "warm"})
    deadline = T0 + 1.0
    detected_at_first_reading_past(reads, deadline)
    assert reads[-1] - deadline <= 2 * QUANTUM  # receives are cut at the deadline
    assert [p for _, p, _ in tr.sent] == [NDP0] and net.pending == {}  # the failed wait forgets


def test_a_reply_just_before_the_deadline_is_taken(rig) -> None:
    vc, tr, make = rig.vc, rig.tr, rig.make
    net = make(timeout_s=1.0)
    tr.at(T0 + 1.0 - QUANTUM, NDP0, "result", {"task_id": 1, "attempt": 1, "unit": 0})
    msg = net.call(NDP0, {"kind": "warm"})
    assert msg.fields["unit"] == 0 and vc.now_s() == T0 + 1.0 - QUANTUM


def test_silence_fails_next_event_at_the_first_reading_past_the_heartbeat_timeout(rig) -> None:
    tr, reads, make = rig.tr, rig.reads, rig.make
    net = make(timeout_s=600.0, heartbeat_timeout_s=0.5)
    tr.at(T0, NDP0, "hello", {"peer": "ndp0", "seq": 0, "incarnation": 7})  # first sight
    beats = [T0 + k * 0.25 for k in range(1, 5)]  # then a beat every 1/4 s until T0 + 1
    for t in beats:
        tr.at(t, heartbeat_peer(NDP0), "hello", {"peer": "ndp0", "seq": 1, "incarnation": 7})
    with pytest.raises(EmulationError, match=r"ndp0 went silent: no heartbeat for 0\.6 s"):
        net.next_event("the router of decode step 1")
    threshold = beats[-1] + 0.5
    detected_at_first_reading_past(reads, threshold)
    assert reads[-1] - threshold <= POLL  # noticed within one receive slice
    assert net.last_seen[NDP0] == beats[-1]  # heartbeats count for the device they beat for


def test_with_recovery_a_silent_unit_goes_down_then_must_rejoin_in_time(rig) -> None:
    tr, reads, make = rig.tr, rig.reads, rig.make
    net = make(timeout_s=600.0, heartbeat_timeout_s=0.5, recover=True)
    downs: list[tuple[bytes, float]] = []
    net.on_down = lambda peer: downs.append((peer, reads[-1]))
    tr.at(T0, NDP0, "hello", {"peer": "ndp0", "seq": 0, "incarnation": 7})
    with pytest.raises(EmulationError, match=r"not restarted within 120 s"):
        net.next_event("the end of decode step 1, layer 0")
    [(peer, down_at)] = downs
    assert peer == NDP0
    assert max(r for r in reads if r < down_at) <= T0 + 0.5 < down_at  # first reading past
    since, cause = net.down[NDP0]
    assert since == down_at and "went silent" in cause
    detected_at_first_reading_past(reads, since + dmod.REJOIN_TIMEOUT_S)  # 2 min, instantly


def test_a_silent_peer_fails_a_gather_after_the_heartbeat_timeout_not_the_deadline(rig) -> None:
    tr, reads, make = rig.tr, rig.reads, rig.make
    net = make(timeout_s=600.0, heartbeat_timeout_s=0.5)
    tr.at(T0, NDP0, "hello", {"peer": "ndp0", "seq": 0, "incarnation": 7})
    tr.at(T0 + 0.25, heartbeat_peer(NDP0), "hello", {"peer": "ndp0", "seq": 1, "incarnation": 7})
    with pytest.raises(EmulationError, match=r"ndp0 went silent: no heartbeat or reply"):
        net.call(NDP0, {"kind": "warm"})
    detected_at_first_reading_past(reads, T0 + 0.25 + 0.5)


def test_a_lost_command_is_sent_again_exactly_when_its_timeout_is_due(rig) -> None:
    vc, tr, make = rig.vc, rig.tr, rig.make
    draws = iter([0.0, 0.9, 0.9, 0.9])  # the first send is lost, the retries are not

    class Rng:
        def random(self) -> float:
            return next(draws)

    net = make(drop_p=0.5, rng=Rng())
    net.new_run(0.5, sequenced=True)
    dropped, acked = [], []
    net.on_drop, net.on_acked = dropped.append, acked.append
    net.post(NDP0, "moe", {"seq": 0})
    assert dropped == [(NDP0, 1)] and tr.sent == [] and net.dropped == 1
    due = T0 + dmod.RTO_S
    vc.sleep_until_s(due - QUANTUM)
    assert net.retransmit() == pytest.approx(QUANTUM, abs=1e-12)  # float rounding only
    assert tr.sent == [] and net.retries == 0
    vc.sleep_until_s(due)
    net.retransmit()
    assert [(t, p, m.fields["cseq"]) for t, p, m in tr.sent] == [(due, NDP0, 1)]
    assert net.retries == 1
    # unacknowledged, the timeout doubles: the next copy is due 2 x RTO_S later
    due2 = due + 2 * dmod.RTO_S
    vc.sleep_until_s(due2 - QUANTUM)
    net.retransmit()
    assert len(tr.sent) == 1
    vc.sleep_until_s(due2)
    net.retransmit()
    assert len(tr.sent) == 2 and net.retries == 2
    # the acknowledgement ends the retries and releases the pause the drop took
    tr.at(due2, NDP0, "event", {"kind": "ack", "cseq": 1})
    tr.at(due2, GPU_PEER, "event", {"kind": "done"})
    net.next_event("the end of the run")
    assert acked == [(NDP0, 1)] and net.unacked == {}
    vc.advance(10.0)
    assert net.retransmit() == float("inf") and len(tr.sent) == 2
