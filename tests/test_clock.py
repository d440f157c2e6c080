"""The pacing clock: real time paced to a deadline, virtual time that jumps, overruns counted."""

from __future__ import annotations

import pytest

from actors.clock import Pacer, RealClock, Slot, VirtualClock


class ScriptedTime:
    """A monotonic clock and a sleep that load cannot disturb: every reading advances time by
    ``tick_s`` (one spin iteration costs that much), every sleep lasts what was asked plus
    ``overshoot_s`` (``time.sleep`` wakes late; a negative value plays an early wake-up)."""

    def __init__(self, start_s: float = 1000.0, tick_s: float = 1e-6,
                 overshoot_s: float = 0.0) -> None:
        self.t_s, self.tick_s, self.overshoot_s = start_s, tick_s, overshoot_s
        self.reads = 0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        self.reads += 1
        self.t_s += self.tick_s
        return self.t_s

    def sleep(self, dt_s: float) -> None:
        self.sleeps.append(dt_s)
        self.t_s += max(0.0, dt_s + self.overshoot_s)

    def clock(self, dilation: float = 1.0, **kwargs) -> RealClock:
        return RealClock(dilation, monotonic=self.monotonic, sleep=self.sleep, **kwargs)


def sleep_until(ts: ScriptedTime, clock: RealClock, wait_s: float) -> tuple[float, int]:
    """Sleeps ``wait_s`` of emulated time from now; returns (how late, spin-loop readings)."""
    deadline = clock.now_s() + wait_s
    ts.sleeps.clear()
    reads = ts.reads
    clock.sleep_until_s(deadline)
    spins = ts.reads - reads - 1  # the first reading computes what remains
    return clock.now_s() - ts.tick_s / clock.dilation - deadline, spins


def test_real_clock_runs_dilation_times_slower_than_its_time_source():
    ts = ScriptedTime(tick_s=0.0)
    clock = ts.clock(dilation=10.0)
    assert clock.now_s() == 0.0 and clock.wall_now() == clock.epoch_wall_s == 1000.0
    ts.t_s += 0.02
    assert clock.now_s() == pytest.approx(0.002, rel=1e-9)
    assert clock.to_wall(0.002) == pytest.approx(1000.02, rel=1e-12)
    clock.shift_epoch(0.01)
    assert clock.now_s() == pytest.approx(0.001, rel=1e-9)


def test_sleep_until_sleeps_then_spins_the_last_spin_s():
    # time.sleep wakes ~90 us late, so the clock sleeps until spin_s (200 us) before the
    # deadline and spins the rest: with a sleep that is punctual here, the spin loop polls
    # for 200 us, one reading a microsecond
    ts = ScriptedTime(tick_s=1e-6)
    clock = ts.clock(spin_s=200e-6)
    late, spins = sleep_until(ts, clock, 0.005)
    assert ts.sleeps == [pytest.approx(0.005 - 200e-6 - 1e-6, abs=1e-9)]
    assert 0.0 <= late < 1e-6  # on the first reading at or past the deadline
    assert spins == pytest.approx(200, abs=2)


def test_a_late_wake_up_leaves_less_to_spin_and_never_more_sleep():
    ts = ScriptedTime(tick_s=1e-6, overshoot_s=90e-6)
    late, spins = sleep_until(ts, ts.clock(spin_s=200e-6), 0.005)
    assert len(ts.sleeps) == 1 and 0.0 <= late < 1e-6
    assert spins == pytest.approx(110, abs=2)  # the spin absorbs the 90 us overshoot
    ts.overshoot_s = 300e-6  # woke past the deadline: nothing left to spin
    late, spins = sleep_until(ts, ts.clock(spin_s=200e-6), 0.005)
    assert spins == 1 and late == pytest.approx(100e-6, abs=2e-6)


def test_sleep_until_is_never_early_even_if_sleep_is():
    ts = ScriptedTime(tick_s=1e-6, overshoot_s=-1e-3)  # a sleep that returns 1 ms early
    late, spins = sleep_until(ts, ts.clock(spin_s=200e-6), 0.005)
    assert 0.0 <= late < 1e-6 and spins == pytest.approx(1200, abs=2)
    ts.overshoot_s = 0.0
    late, spins = sleep_until(ts, ts.clock(spin_s=0.0), 0.005)  # no spin phase at all
    assert 0.0 <= late < 1e-6 and spins <= 2


def test_a_deadline_within_spin_s_only_spins_and_a_past_one_returns_at_once():
    ts = ScriptedTime(tick_s=1e-6)
    clock = ts.clock(dilation=2.0, spin_s=200e-6)
    late, spins = sleep_until(ts, clock, 50e-6)  # 100 us of wall
    assert ts.sleeps == [] and 0.0 <= late < 1e-6 and spins == pytest.approx(100, abs=2)
    reads = ts.reads
    clock.sleep_until_s(clock.now_s() - 1.0)
    assert ts.sleeps == [] and ts.reads - reads == 3  # now_s, what remains, one loop test


def test_sleep_until_on_the_host_clock_is_never_early():
    # the real time source: load may make it late by any amount, never early
    clock = RealClock(dilation=1.0)
    for _ in range(5):
        deadline = clock.now_s() + 0.002
        clock.sleep_until_s(deadline)
        assert clock.now_s() >= deadline


@pytest.mark.parametrize("clock", [RealClock(1.0), VirtualClock()], ids=["real", "virtual"])
def test_sleeping_until_a_non_finite_time_is_refused(clock):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cannot sleep"):
            clock.sleep_until_s(bad)


def test_clocks_sharing_an_epoch_agree():
    ts = ScriptedTime(tick_s=0.0)
    a = ts.clock(dilation=50.0)
    ts.t_s += 3.0
    b = ts.clock(dilation=50.0, epoch_wall_s=a.epoch_wall_s)
    assert a.now_s() == b.now_s() == pytest.approx(0.06)
    assert a.to_wall(2.0) == pytest.approx(a.epoch_wall_s + 100.0)
    host_a = RealClock(dilation=50.0)
    assert RealClock(dilation=50.0, epoch_wall_s=host_a.epoch_wall_s).epoch_wall_s == \
        host_a.epoch_wall_s


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
    ts = ScriptedTime(tick_s=1e-6)
    clock = ts.clock(dilation=100.0)
    pacer = Pacer(clock)
    start = clock.now_s()
    ts.t_s += 0.015  # 15 ms of real work in a 20 ms-wall slot
    slot = pacer.pace(start, 0.0002)
    assert not slot.overran and clock.now_s() >= slot.finish_s
    assert ts.sleeps == [pytest.approx(0.005 - 200e-6, abs=1e-5)]  # waited out the rest
    start = clock.now_s()
    ts.t_s += 0.010  # 10 ms of real work in a 1 ms-wall slot
    slot = pacer.pace(start, 0.00001)
    assert slot.overran and slot.overrun_s == pytest.approx(0.00009, rel=1e-3)
    assert pacer.overruns == 1 and len(ts.sleeps) == 1  # no waiting after an overrun


def test_pacer_on_the_host_clock_flags_an_overrun():
    # load can only make the work slower: the overrun is certain, its size only bounded below
    clock = RealClock(dilation=100.0)
    pacer = Pacer(clock)
    start = clock.now_s()
    clock.sleep_until_s(start + 0.0001)  # "work" of 10 ms in a 1 ms-wall slot
    slot = pacer.pace(start, 0.00001)
    assert slot.overran and slot.overrun_s >= 0.00009 - 1e-12
    assert pacer.overruns == 1


def test_pacer_rejects_a_negative_duration():
    with pytest.raises(ValueError, match="modelled_s"):
        Pacer(VirtualClock()).pace(0.0, -1.0)
