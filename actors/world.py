"""The run's pause switch (:class:`World`): the emulated clock stops while a fault is found and
repaired. It reads time through the dispatcher's clock."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from actors import wire
from actors.dispatcher import Dispatcher
from actors.peers import LINK_PEER
from cluster.core.errors import EmulationError

RESUME_MARGIN_S = 2e-3  # a paused run's clocks restart this long after the resume is sent


class World:
    """The run's pause switch: the emulated clock stops while a fault is found and repaired.

    When the scheduler injects a fault (a lost command, a killed unit) it pauses the whole
    emulated system at once, before the fault can delay anything: every device and the link
    get ``cmd`` ``pause`` and freeze their clocks (no hold ends, no transfer is served, no
    program runs; messages are still taken in, acknowledged and queued). Detecting the fault
    (a missing acknowledgement, a silent heartbeat), sending the lost command again, waiting
    for Ray to restart the unit, re-warming it and sending it what it had not done all
    happen for real, in wall time, while the system is paused. When nothing holds the pause
    any more every device and the link get ``cmd`` ``resume`` with the run's total paused
    wall time ``shift_s``; each clock then reads ``wall - shift_s`` (run timebase), the same
    mapping everywhere, so emulated time = (wall - epoch - paused wall time) / D
    (DESIGN.md section 5) and the stamps made before the pause stay valid. The pause is taken
    to end ``margin_s`` after the resume leaves (a few one-way hops): a receiver that gets it
    within that margin resumes with a clock that reads a little *before* the moment of the
    pause, when nothing is due (everything due then had happened before it froze), so all
    clocks continue from the moment of the pause together. A death the scheduler did not
    inject is paused from when it is found: at the next command sent to the unit, or after
    its heartbeat timeout if a step waits on it (that lateness is emulated time).

    Residual error (README, "Clusters, faults and security"): a device or the link freezes
    when the pause *reaches* it, one scheduler -> device hop (O(100 us) wall, a few ms when
    the machine is loaded) after the scheduler paused; what it did inside that hop (a
    transfer served, a hold ended) is kept, and a message that should have pre-empted it there
    (a transfer of the faulty step on the link) is taken late instead (the link counts it in
    ``late_arrivals``). A resume that arrives after its margin shifts that receiver's clock
    by the excess. Both are bounded by a hop per pause: O(100 us) / D of emulated time. Real
    work in progress when the pause arrives completes, inside its (emulated) slot.

    ``hold(key, why)`` pauses (if not paused yet) until ``release(key)`` of every key held;
    ``why`` (``"retry"`` or ``"recovery"``) names which wall-time counter the pause adds to
    (recovery, when both). Only an armed world (the timed part of a run) pauses.
    """

    def __init__(self, net: Dispatcher, peers: Callable[[], list[bytes]]) -> None:
        self.net, self.peers = net, peers
        self.margin_s = RESUME_MARGIN_S  # raised to a few measured hops (sync_clocks)
        self.armed = False
        self.shift_s = 0.0  # wall seconds paused so far in this run
        self.since: float | None = None  # wall time of the pause in force
        self.holds: dict[Any, str] = {}
        self.pauses = 0
        self.paused_wall_s = {"retry": 0.0, "recovery": 0.0}
        self._why: set[str] = set()

    def arm(self) -> None:
        self.armed, self.shift_s, self.since, self.pauses = True, 0.0, None, 0
        self.holds.clear()
        self.paused_wall_s = {"retry": 0.0, "recovery": 0.0}

    def disarm(self) -> None:
        self.holds.clear()
        if self.since is not None:
            self._resume()
        self.armed = False

    def now(self) -> float:
        """The run's clock as the devices read it (the scheduler's wall time less pauses)."""
        return (self.since if self.since is not None else self.net.clock()) - self.shift_s

    def hold(self, key: Any, why: str) -> None:
        if not self.armed:
            return
        if self.since is None:
            self.since = self.net.clock()
            self.pauses += 1
            self._why = set()
            self._broadcast({"kind": "pause"})
        self.holds[key] = why
        self._why.add(why)

    def release(self, key: Any) -> None:
        if self.holds.pop(key, None) is not None and not self.holds and self.since is not None:
            self._resume()

    def _resume(self) -> None:
        paused = self.net.clock() + self.margin_s - self.since
        self.shift_s += paused
        self.paused_wall_s["recovery" if "recovery" in self._why else "retry"] += paused
        self.since = None
        self._broadcast({"kind": "resume", "shift_s": self.shift_s})
        self.net.progress_s = self.net.clock()

    def _broadcast(self, fields: dict[str, Any]) -> None:
        """To every live device and the link, never dropped (it is the emulator's, not the
        emulated system's, message); a dead unit is told its state when it rejoins."""
        frames = wire.encode("cmd", fields)
        for peer in [*self.peers(), LINK_PEER]:
            if peer in self.net.down:
                continue
            with contextlib.suppress(EmulationError):
                self.net.tr.send(peer, frames)
