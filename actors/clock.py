"""The pacing clock: the only module of ndpmoe that reads the time (STYLE.md rule 5).

Everything else asks an injected :class:`Clock` for *emulated* seconds since the start of the
run. Emulated time runs ``dilation`` times slower than the wall clock (DESIGN.md section 5):
with ``D = 100`` a modelled 40 us GEMV occupies 4 ms of wall-clock, enough for the real numpy
matmul to fit inside it.

- :class:`RealClock` maps ``time.monotonic`` to emulated time. ``sleep_until_s`` sleeps until
  ``spin_s`` (200 us) of wall time before the deadline, then spins, because ``time.sleep``
  overshoots by ~90 us on the development machine; it never returns early. ``monotonic`` is one
  system-wide clock on a Linux host, so actors in several processes of one host share an epoch
  by passing ``epoch_wall_s`` to each other; hosts do not share it, so emulated timestamps, not
  wall times, are what travel on the wire. Its time source (``monotonic``, ``sleep``) can be
  injected, so that tests check the sleep-then-spin logic on a scripted clock, where machine
  load cannot change what they see.
- :class:`VirtualClock` jumps: ``sleep_until_s`` sets the time and returns at once, as trio's
  ``MockClock`` with autojump or a SimPy environment do. Deterministic; for tests and the
  analytic engine.
- :class:`Pacer` makes real work occupy its modelled slot and counts the slots it overran, so
  that overruns are reported, never hidden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SPIN_S = 200e-6


def wall_now() -> float:
    """Seconds of the host's monotonic wall clock (arbitrary origin, shared by its processes)."""
    return time.monotonic()


class Clock(Protocol):
    """Emulated time: seconds since the start of the run."""

    def now_s(self) -> float:
        """The current emulated time."""
        ...

    def sleep_until_s(self, t_s: float) -> None:
        """Return once the emulated time is at least ``t_s`` (at once if it already is)."""
        ...


class RealClock:
    """Emulated time = (monotonic wall time - epoch) / dilation."""

    def __init__(
        self,
        dilation: float,
        *,
        epoch_wall_s: float | None = None,
        spin_s: float = DEFAULT_SPIN_S,
        monotonic: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        """``epoch_wall_s`` (a :func:`wall_now` value) defaults to now; pass the scheduler's
        epoch to every actor on the same host so that they agree on emulated time.

        ``monotonic`` and ``sleep`` default to :func:`time.monotonic` and :func:`time.sleep`;
        a replacement must keep their contract (seconds that never go back; sleep at least
        about the time asked)."""
        if not (math.isfinite(dilation) and dilation > 0):
            raise ValueError(f"dilation must be a finite number > 0, got {dilation!r}")
        if not (math.isfinite(spin_s) and spin_s >= 0):
            raise ValueError(f"spin_s must be a finite number >= 0, got {spin_s!r}")
        self.dilation = float(dilation)
        self._monotonic = time.monotonic if monotonic is None else monotonic
        self._sleep = time.sleep if sleep is None else sleep
        self.epoch_wall_s = self._monotonic() if epoch_wall_s is None else float(epoch_wall_s)
        self.spin_s = float(spin_s)

    def wall_now(self) -> float:
        """The host's monotonic wall time, the base of this clock."""
        return self._monotonic()

    def now_s(self) -> float:
        return (self._monotonic() - self.epoch_wall_s) / self.dilation

    def to_wall(self, t_s: float) -> float:
        """The wall time at which emulated time reaches ``t_s``."""
        return self.epoch_wall_s + t_s * self.dilation

    def shift_epoch(self, wall_s: float) -> None:
        """Moves the epoch ``wall_s`` wall seconds later, so that wall time lost outside the
        model (restarting a dead actor, waiting out a lost message) is not emulated time."""
        if not (math.isfinite(wall_s) and wall_s >= 0):
            raise ValueError(f"wall_s must be a finite number >= 0, got {wall_s!r}")
        self.epoch_wall_s += wall_s

    def sleep_until_s(self, t_s: float) -> None:
        if not math.isfinite(t_s):
            raise ValueError(f"cannot sleep until {t_s!r}")
        deadline = self.epoch_wall_s + t_s * self.dilation
        remaining = deadline - self._monotonic()
        if remaining > self.spin_s:
            self._sleep(remaining - self.spin_s)
        while self._monotonic() < deadline:
            pass  # spin: sleep's wake-up is too late by ~90 us, a spin is not


class VirtualClock:
    """Emulated time that only moves when asked to; sleeping jumps to the deadline."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = float(start_s)

    def now_s(self) -> float:
        return self._now_s

    def sleep_until_s(self, t_s: float) -> None:
        if not math.isfinite(t_s):
            raise ValueError(f"cannot sleep until {t_s!r}")
        if t_s > self._now_s:  # never backwards
            self._now_s = float(t_s)

    def advance(self, dt_s: float) -> None:
        """Move time forward by ``dt_s`` (>= 0), as if work took that long."""
        if not dt_s >= 0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s!r}")
        self._now_s += dt_s


@dataclass(frozen=True, slots=True)
class Slot:
    """One paced piece of work, in emulated seconds.

    ``finish_s`` is the modelled finish (``start_s + modelled_s``), the time to put in the
    result message. ``overrun_s`` is how far past it the real work ran (0 if it fit): the real
    work is measured from ``start_s``, so a late start counts as overrun too.
    """

    start_s: float
    modelled_s: float
    finish_s: float
    overrun_s: float

    @property
    def overran(self) -> bool:
        return self.overrun_s > 0.0


class Pacer:
    """Stretches real work to its modelled slot and counts overruns.

    Usage in an actor::

        clock.sleep_until_s(start_s)        # the slot opens (queueing is exact)
        out = x @ w                         # the real work
        slot = pacer.pace(start_s, modelled_s)   # waits out the rest of the slot
        reply(finish_s=slot.finish_s, overrun_s=slot.overrun_s)

    With a real clock, ``overran`` means real elapsed > ``modelled_s * dilation``.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.slots = 0
        self.overruns = 0
        self.overrun_total_s = 0.0
        self.overrun_max_s = 0.0

    def pace(self, start_s: float, modelled_s: float, *, wait: bool = True) -> Slot:
        """Close a slot opened at emulated ``start_s`` for work modelled to take ``modelled_s``.

        Call right after the real work. Sleeps until the modelled finish unless ``wait`` is
        false (for work whose completion something else waits on) and records any overrun.
        """
        if not (math.isfinite(modelled_s) and modelled_s >= 0):
            raise ValueError(f"modelled_s must be a finite number >= 0, got {modelled_s!r}")
        finish_s = start_s + modelled_s
        overrun_s = max(0.0, self.clock.now_s() - finish_s)
        self.slots += 1
        if overrun_s > 0.0:
            self.overruns += 1
            self.overrun_total_s += overrun_s
            self.overrun_max_s = max(self.overrun_max_s, overrun_s)
        elif wait:
            self.clock.sleep_until_s(finish_s)
        return Slot(start_s, modelled_s, finish_s, overrun_s)
