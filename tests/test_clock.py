"""The pacing clock: real time paced to a deadline, virtual time that jumps, overruns counted."""

from __future__ import annotations

import statistics

import pytest

from actors.clock import Pacer, RealClock, Slot, VirtualClock, wall_now


def test_real_clock_runs_dilation_times_slower_than_the_wall():
    clock = RealClock(dilation=10.0)
    w0, e0 = clock.wall_now(), clock.now_s()
    clock.sleep_until_s(e0 + 0.002)  # 20 ms of wall
    dw, de = clock.wall_now() - w0, clock.now_s() - e0
    assert de >= 0.002
    assert de == pytest.approx(dw / 10.0, rel=0.05, abs=1e-4)


def test_sleep_until_lands_just_after_the_deadline():
    clock = RealClock(dilation=1.0)
    late = []
    for _ in range(20):
        deadline = clock.now_s() + 0.005
        clock.sleep_until_s(deadline)
        late.append(clock.now_s() - deadline)
    assert min(late) >= 0.0  # never early
    # loose: a 2-core shared machine may preempt us, so judge the median and half the samples
    # (a plain time.sleep overshoot is ~0.1 ms; a broken spin would be late by whole ms)
    assert statistics.median(late) < 0.002
    assert sum(x < 0.002 for x in late) >= 10


def test_sleep_until_the_past_returns_at_once():
    clock = RealClock(dilation=1.0)
    w0 = wall_now()
    clock.sleep_until_s(clock.now_s() - 1.0)
    assert wall_now() - w0 < 0.01


@pytest.mark.parametrize("clock", [RealClock(1.0), VirtualClock()], ids=["real", "virtual"])
def test_sleeping_until_a_non_finite_time_is_refused(clock):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cannot sleep"):
            clock.sleep_until_s(bad)


def test_clocks_sharing_an_epoch_agree():
    a = RealClock(dilation=50.0)
    b = RealClock(dilation=50.0, epoch_wall_s=a.epoch_wall_s)
    assert abs(a.now_s() - b.now_s()) < 1e-4
    assert a.to_wall(2.0) == pytest.approx(a.epoch_wall_s + 100.0)


@pytest.mark.parametrize("dilation", [0.0, -1.0, float("inf"), float("nan")])
def test_dilation_must_be_positive_and_finite(dilation):
    with pytest.raises(ValueError, match="dilation"):
        RealClock(dilation)


def test_virtual_clock_jumps_and_never_goes_back():
    clock = VirtualClock()
    assert clock.now_s() == 0.0
    clock.sleep_until_s(1.5)
    assert clock.now_s() == 1.5
    clock.sleep_until_s(1.0)
    assert clock.now_s() == 1.5
    clock.advance(0.25)
    assert clock.now_s() == 1.75
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_virtual_clock_is_deterministic():
    def run() -> list[float]:
        clock = VirtualClock(start_s=2.0)
        pacer, seen = Pacer(clock), []
        for i in range(50):
            start = max(clock.now_s(), i * 0.01)
            clock.sleep_until_s(start)
            clock.advance(0.003 * (i % 4))  # "real work"
            seen.append(pacer.pace(start, 0.005).finish_s)
            seen.append(clock.now_s())
        return seen

    assert run() == run()


def test_pacer_waits_out_the_slot_when_the_work_fits():
    clock = VirtualClock()
    pacer = Pacer(clock)
    clock.advance(0.002)  # work took 2 ms of a 5 ms slot
    slot = pacer.pace(0.0, 0.005)
    assert slot == Slot(start_s=0.0, modelled_s=0.005, finish_s=0.005, overrun_s=0.0)
    assert not slot.overran
    assert clock.now_s() == 0.005
    assert (pacer.slots, pacer.overruns) == (1, 0)


def test_pacer_counts_an_overrun_instead_of_hiding_it():
    clock = VirtualClock()
    pacer = Pacer(clock)
    clock.advance(0.008)  # work took 8 ms of a 5 ms slot
    slot = pacer.pace(0.0, 0.005)
    assert slot.overran and slot.finish_s == 0.005
    assert slot.overrun_s == pytest.approx(0.003)
    clock.advance(0.001)
    pacer.pace(clock.now_s(), 0.0)  # a zero slot finishing "now" is on time
    assert (pacer.slots, pacer.overruns) == (2, 1)
    assert pacer.overrun_max_s == pytest.approx(0.003)
    assert pacer.overrun_total_s == pytest.approx(0.003)


def test_pacer_with_a_real_clock_flags_work_slower_than_modelled_times_dilation():
    clock = RealClock(dilation=100.0)
    pacer = Pacer(clock)
    start = clock.now_s()
    slot = pacer.pace(start, 0.0002)  # 20 ms of wall: plenty for no work
    assert not slot.overran
    assert clock.now_s() >= slot.finish_s
    start = clock.now_s()
    clock.sleep_until_s(start + 0.0001)  # "work" of 10 ms in a 1 ms-wall slot
    slot = pacer.pace(start, 0.00001)
    assert slot.overran and slot.overrun_s >= 0.00008
    assert pacer.overruns == 1


def test_pacer_rejects_a_negative_duration():
    with pytest.raises(ValueError, match="modelled_s"):
        Pacer(VirtualClock()).pace(0.0, -1.0)
