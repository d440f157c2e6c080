"""The host link's service discipline, driven directly on wall-time numbers (no clock, no I/O).

Preemptive priority by class (activations/partials > fetches > prefetches), first come first
served within a class by arrival stamp, arrivals scheduled from their stamps (retroactively),
exact preemption, upgrades that keep what was served, cancels that waste it. Times here are
small integers and halves, exact in binary floating point, so equality is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from actors import wire
from actors.link import HostLink
from actors.link_schedule import CLASS_FETCH, CLASS_PREFETCH, CLASS_STEP, LinkSchedule, Transfer


def tr(xid: int, cls: int, arrive: float, service: float, order: int = 0) -> Transfer:
    kind = {CLASS_STEP: "activation", CLASS_FETCH: "fetch", CLASS_PREFETCH: "prefetch"}[cls]
    return Transfer(xid, kind, cls, arrive, order, 0, service, 1)


def drain(s: LinkSchedule) -> list[tuple[int, float, list]]:
    out = []
    while (t := s.pop_due(1e9)) is not None:
        out.append((t.xid, t.done_s, list(t.served)))
    return out


def test_higher_classes_preempt_exactly_and_the_preempted_resume() -> None:
    s = LinkSchedule(0.0)
    s.add(tr(1, CLASS_PREFETCH, 0.0, 10.0))
    s.add(tr(2, CLASS_FETCH, 1.0, 2.0))
    s.add(tr(3, CLASS_STEP, 1.5, 1.0))
    assert drain(s) == [(3, 2.5, [(1.5, 2.5)]),
                        (2, 4.0, [(1.0, 1.5), (2.5, 4.0)]),
                        (1, 13.0, [(0.0, 1.0), (4.0, 13.0)])]


def test_first_come_first_served_within_a_class_by_stamp_then_order() -> None:
    s = LinkSchedule(0.0)
    s.add(tr(1, CLASS_FETCH, 2.0, 1.0, order=5))
    s.add(tr(2, CLASS_FETCH, 1.0, 1.0, order=9))  # earlier stamp, read later: goes first
    s.add(tr(3, CLASS_FETCH, 2.0, 1.0, order=4))  # same stamp as 1, issued before it
    assert [x for x, _, _ in drain(s)] == [2, 3, 1]


def test_an_arrival_is_scheduled_from_its_stamp_not_from_when_it_was_read() -> None:
    """The link read the activation late (after the prefetch had been running), but it
    preempts from its stamp: the hop latency is absorbed."""
    s = LinkSchedule(0.0)
    s.add(tr(1, CLASS_PREFETCH, 0.0, 4.0))
    assert s.next_due_s() == 4.0
    s.add(tr(2, CLASS_STEP, 1.0, 1.0))  # stamped 1.0, added "now"
    assert drain(s) == [(2, 2.0, [(1.0, 2.0)]), (1, 5.0, [(0.0, 1.0), (2.0, 5.0)])]
    assert s.late_arrivals == 0


def test_a_stamp_older_than_a_delivery_made_is_taken_then_and_counted_late() -> None:
    s = LinkSchedule(0.0)
    s.add(tr(1, CLASS_PREFETCH, 0.0, 2.0))
    assert s.pop_due(2.0).xid == 1  # delivered at 2.0: cannot be undone
    s.add(tr(2, CLASS_STEP, 1.0, 1.0))
    assert drain(s) == [(2, 3.0, [(2.0, 3.0)])]
    assert (s.late_arrivals, s.late_total_s) == (1, 1.0)


def test_an_upgrade_keeps_what_was_served_and_a_cancel_wastes_it() -> None:
    s = LinkSchedule(0.0)
    for i in range(3):
        s.add(tr(10 + i, CLASS_PREFETCH, 0.0, 2.0, order=i))
    assert s.upgrade(12, CLASS_FETCH, 1.0, order=0)  # third in line: jumps ahead at 1.0
    assert s.cancel(11, 1.5) is not None
    got = drain(s)
    assert got[0] == (12, 3.0, [(1.0, 3.0)])
    assert got[1] == (10, 4.0, [(0.0, 1.0), (3.0, 4.0)])
    assert [x for x, _, _ in got] == [12, 10]
    assert not s.upgrade(99, CLASS_FETCH, 0.0)  # unknown: nothing happens


def test_a_long_backlog_is_served_in_order_and_each_event_stays_cheap() -> None:
    """A thousand prefetches queued, step traffic arriving among them: the order and the
    arithmetic are those of the discipline (the cost claim is the module's; here the
    result)."""
    s = LinkSchedule(0.0)
    for i in range(1000):
        s.add(tr(i, CLASS_PREFETCH, 0.0, 1.0, order=i))
    s.add(tr(5000, CLASS_STEP, 10.5, 0.5))
    got = drain(s)
    assert [x for x, _, _ in got[:10]] == list(range(10))
    act = next(g for g in got if g[0] == 5000)
    assert act[1] == 11.0
    assert got[-1] == (999, 1000.5, [(999.5, 1000.5)])


def _data(kind: str, dst: str, at: float, nbytes: int, **extra) -> wire.Message:
    frames = wire.encode("data", {"kind": kind, "dst": dst, "at_s": at, "true_bytes": nbytes,
                                  **extra}, [np.zeros(4, np.float32)])
    return wire.decode(frames), frames


def test_the_link_charges_true_bytes_by_kind_and_restamps_deliveries() -> None:
    link = HostLink()
    link.reset({"dilation": 10.0, "latency_s": 1e-6, "bw_bytes_per_s": 1e9,
                "prefetch_class": CLASS_PREFETCH, "base_s": 0.0})
    for kind, dst, n in (("prefetch", "gpu", 10_000), ("activation", "ndp0", 1000)):
        msg, frames = _data(kind, dst, 0.0, n, pid=7 if kind == "prefetch" else None,
                            windowed=kind == "prefetch")
        link.on_message(b"x", msg, frames)
    out = link.due(1e9)
    # deliveries in order, and a credit back to the unit that handed over the prefetch
    assert [(p, wire.decode(f).type) for p, f in out] == [(b"ndp0", "data"), (b"gpu", "data"),
                                                        (b"x", "cmd")]
    act = wire.decode(out[0][1])
    assert act.fields["at_s"] == pytest.approx(10.0 * (1e-6 + 1000 / 1e9))  # D x (lat + B / bw)
    assert link.stats.bytes == {"activation": 1000, "partial": 0, "fetch": 0, "prefetch": 10_000}


def test_an_upgrade_or_cancel_that_beats_its_transfer_to_the_link_still_applies() -> None:
    link = HostLink()
    link.reset({"dilation": 1.0, "latency_s": 0.0, "bw_bytes_per_s": 1.0,
                "prefetch_class": CLASS_PREFETCH, "base_s": 0.0})
    link.on_message(b"sched", wire.decode(wire.encode("cmd", {"kind": "upgrade", "at_s": 0.0,
                                                              "items": [[1, 0]]})), [])
    link.on_message(b"sched", wire.decode(wire.encode("cmd", {"kind": "cancel", "at_s": 0.0,
                                                              "pids": [2]})), [])
    for pid in (1, 2):
        msg, frames = _data("prefetch", "gpu", 0.0, 5, pid=pid)
        link.on_message(b"ndp0", msg, frames)
    out = link.due(1e9)
    assert len(out) == 1 and wire.decode(out[0][1]).fields["pid"] == 1
    assert link.stats.bytes["fetch"] == 5 and link.stats.bytes["prefetch"] == 0
    assert (link.stats.upgraded, link.stats.cancelled) == (1, 1)


@pytest.mark.parametrize("early", [False, True])
def test_an_upgraded_prefetch_counts_toward_the_step_that_waits_for_it(early) -> None:
    """Its bytes are that step's fetch bytes (steps.csv), as the analytic engine counts them;
    a prefetch never upgraded stays background traffic (no step). The upgrade may reach the
    link after the weights (``early=False``) or before them."""
    link = HostLink()
    link.reset({"dilation": 1.0, "latency_s": 0.0, "bw_bytes_per_s": 1.0,
                "prefetch_class": CLASS_PREFETCH, "base_s": 0.0})
    up = wire.encode("cmd", {"kind": "upgrade", "at_s": 0.0, "items": [[1, 0]], "seq": 42})
    if early:
        link.on_message(b"sched", wire.decode(up), [])
    for pid in (1, 2):
        msg, frames = _data("prefetch", "gpu", 0.0, 5 * pid, pid=pid)
        link.on_message(b"ndp0", msg, frames)
    if not early:
        link.on_message(b"sched", wire.decode(up), [])
    link.due(1e9)
    assert link.stats.step_bytes == {42: {"activation": 0, "partial": 0, "fetch": 5, "prefetch": 0}}
    assert (link.stats.bytes["fetch"], link.stats.bytes["prefetch"]) == (5, 10)
