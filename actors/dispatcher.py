"""The scheduler's messaging and its failure detection: task ids, sends, deadlines, heartbeats,
restarts and, under a drop fault, numbered and acknowledged commands (DESIGN.md section 9).

Time is read only through the injected ``clock`` (default :func:`actors.clock.wall_now`, wall
seconds), so the deadline, heartbeat and retry logic also runs on a virtual clock
(``tests/test_dispatcher_clock.py``). The one exception is the transport's own receive
timeout, which is real time (a virtual clock pairs with a transport that advances it).

This module runs a little over 450 lines: :class:`Dispatcher` is one state machine (pending
tasks, sequenced commands, who is down) whose send, receive and wait paths share that state;
splitting it would spread one protocol over several files. What a device may send the
scheduler is checked in :mod:`actors.events`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.events import FROM_PEERS, check_event
from actors.peers import GPU_PEER, LINK_PEER, base_peer, heartbeat_peer
from actors.transport import Refusals, Transport
from cluster.core.errors import EmulationError, ProtocolError

RTO_S = 0.05  # a sequenced command unacknowledged this long is sent again (then doubling)
RTO_MAX_S = 0.4
REJOIN_TIMEOUT_S = 120.0  # a dead unit must be restarted and rejoin within this (recovery)
POLL_S = 0.1  # longest receive slice while waiting, so silence is noticed


@dataclass
class _Pending:
    """A task sent and not yet answered."""

    peer: bytes
    fields: dict[str, Any]
    arrays: list[np.ndarray]
    what: str
    created_s: float  # wall time the task was issued
    sends_s: list[float] = field(default_factory=list)  # wall time of each send (attempt)

    @property
    def tries(self) -> int:
        return len(self.sends_s)

    @property
    def last_s(self) -> float:
        return self.sends_s[-1] if self.sends_s else -math.inf


@dataclass
class _Sequenced:
    """A sequenced command sent and not yet acknowledged."""

    frames: list
    what: str
    last_s: float = -math.inf  # wall time of its latest send
    rto_s: float = RTO_S
    sends: int = 0
    drops: int = 0


class Dispatcher:
    """The scheduler's messaging: task ids, sends, and gathering replies within a deadline.

    Failure handling (DESIGN.md section 9):

    - **deadline**: no reply within ``timeout_s`` fails the wait, naming who and what;
    - **heartbeat**: every message from a device (its heartbeats from ``<name>.hb`` included)
      marks it alive; a device waited on and silent for ``heartbeat_timeout_s`` is dead;
    - **restart**: a ``hello`` with a new ``incarnation`` means the device was restarted;
    - **recovery** (``recover``): a dead NDP unit is waited for (``REJOIN_TIMEOUT_S``) until its
      restarted process greets from its main socket; ``on_down(peer)`` is told when it is
      found dead, ``on_rejoin(peer)`` when it is back (it brings the unit up to date and sends
      it what it had not done), and every task it had not answered is sent again; without
      recovery (and for the GPU, which holds the hidden state) a dead device fails the run
      with :class:`EmulationError`;
    - **drop** (``drop_p``, seeded by ``rng``, with ``sequenced`` on): the one-way commands of
      :meth:`post` to a device carry a per-device number ``cseq`` and are acknowledged by
      their receiver (``event`` ``ack``); each send is lost with probability ``drop_p``
      (``on_drop((peer, cseq))`` is told at once: the scheduler pauses the run) and a command
      unacknowledged for ``RTO_S`` (doubling up to ``RTO_MAX_S``) is sent again;
      ``on_acked((peer, cseq))`` is told when a lost one is acknowledged. A retry whose first
      send did arrive is a duplicate its receiver ignores and counts, so that
      ``retries == dropped + duplicates`` over a run (the commands a unit died before
      acknowledging are counted apart, :meth:`forget`). Commands to the link, tasks, pings
      and the pause itself are never dropped.

    Who is listened to (issue 13): with ``peers`` (the run's devices and the link) a message
    from anyone else is dropped unanswered and recorded in ``refusals``; it can neither end
    nor steer the run. A malformed message from a known peer (bad frames, an ``event`` whose
    fields do not fit its kind, an event other than ``failed`` or ``ack`` from a unit) is
    answered with ``error``, counted in ``malformed`` and otherwise ignored. What still fails
    the run comes from a run's own device: its ``error`` reply, its ``failed`` event, a new
    incarnation in its ``hello`` (it was restarted) without recovery, its silence.
    """

    def __init__(self, transport: Transport, timeout_s: float, *,
                 heartbeat_timeout_s: float | None = None, recover: bool = False,
                 drop_p: float = 0.0, rng: np.random.Generator | None = None,
                 peers: list[bytes] | None = None,
                 clock: Callable[[], float] = wall_now) -> None:
        self.tr, self.timeout_s = transport, timeout_s
        self.clock = clock  # every deadline, heartbeat and retry reads this
        self.known = None if peers is None else frozenset(
            [*peers, *(heartbeat_peer(p) for p in peers if p != LINK_PEER)])
        self.refusals = Refusals()  # unknown peers, dropped
        self.malformed = Refusals()  # known peers' bad messages, answered
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.recover = recover
        self.drop_p = drop_p
        self.sequenced = drop_p > 0  # number and acknowledge the commands to devices
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.ids = itertools.count(1)
        self.ping_seq = itertools.count(1)
        self.sent = 0
        self.pending: dict[int, _Pending] = {}
        self.inbox: dict[int, tuple[wire.Message, _Pending]] = {}
        self.pongs: dict[tuple[bytes, int], float] = {}  # -> the peer's wall clock at the pong
        self.events: deque[tuple[bytes, wire.Message]] = deque()
        self.last_seen: dict[bytes, float] = {}
        self.incarnation: dict[bytes, Any] = {}
        self.down: dict[bytes, tuple[float, str]] = {}  # peer -> (since, cause), awaiting rejoin
        self.cseq: dict[bytes, int] = {}  # peer -> the last command number it was sent
        self.unacked: dict[tuple[bytes, int], _Sequenced] = {}
        self.lost: set[tuple[bytes, int]] = set()  # dropped and not acknowledged since
        self.on_rejoin: Callable[[bytes], None] | None = None
        self.on_down: Callable[[bytes], None] | None = None
        self.on_drop: Callable[[tuple[bytes, int]], None] | None = None
        self.on_acked: Callable[[tuple[bytes, int]], None] | None = None
        self.dropped = self.retries = self.recoveries = self.abandoned = self.abandoned_sends = 0
        self.progress_s = clock()  # the last rejoin or resume (deadlines count from it)

    def counters(self) -> dict[str, float]:
        return {"dropped": self.dropped, "retries": self.retries, "recoveries": self.recoveries,
                "abandoned": self.abandoned, "abandoned_sends": self.abandoned_sends}

    def new_run(self, drop_p: float, sequenced: bool) -> None:
        """Fresh command numbers for a run (devices expect 1 after their ``reset``)."""
        self.drop_p, self.sequenced = drop_p, sequenced
        self.cseq.clear()
        self.unacked.clear()
        self.lost.clear()

    # --- sending ---------------------------------------------------------------------------
    def send(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "") -> int:
        tid = next(self.ids)
        self.pending[tid] = _Pending(peer, fields, list(arrays), what or str(fields.get("kind", "?")),
                                     self.clock())
        self.sent += 1
        if peer not in self.down:  # a dead unit gets its tasks when it rejoins
            try:
                self._transmit(tid)
            except BaseException:
                self.pending.pop(tid, None)
                raise
        return tid

    def _transmit(self, tid: int) -> None:
        p = self.pending[tid]
        p.sends_s.append(self.clock())
        frames = wire.encode("task", {"task_id": tid, "attempt": p.tries, **p.fields}, p.arrays)
        try:
            self.tr.send(p.peer, frames)
        except EmulationError as exc:  # not connected: the device is gone (or restarting)
            self._mark_down(p.peer, f"is unreachable ({exc})", p.what)

    def post(self, peer: bytes, kind: str, fields: dict[str, Any],
             arrays: list[np.ndarray] = ()) -> None:
        """A one-way ``cmd`` (no reply): dispatch is fire-and-forget, the devices listen.
        With ``sequenced``, one to a device is numbered, may be lost (``drop_p``), and is
        sent again until acknowledged (see the class docstring)."""
        self.sent += 1
        if not self.sequenced or peer == LINK_PEER:
            self._send_cmd(peer, wire.encode("cmd", {"kind": kind, **fields}, list(arrays)), kind)
            return
        c = self.cseq[peer] = self.cseq.get(peer, 0) + 1
        cmd = _Sequenced(wire.encode("cmd", {"kind": kind, "cseq": c, **fields}, list(arrays)),
                         f"a {kind} command")
        self.unacked[(peer, c)] = cmd
        self._send_sequenced(peer, c, cmd)

    def _send_cmd(self, peer: bytes, frames: list, kind: str) -> None:
        try:
            self.tr.send(peer, frames)
        except EmulationError as exc:
            self._mark_down(peer, f"is unreachable ({exc})", f"a {kind} command")

    def _send_sequenced(self, peer: bytes, c: int, cmd: _Sequenced) -> None:
        cmd.last_s = self.clock()
        cmd.sends += 1
        if self.drop_p and self.rng.random() < self.drop_p:  # the injected fault: lost
            cmd.drops += 1
            self.dropped += 1
            if (peer, c) not in self.lost:
                self.lost.add((peer, c))
                if self.on_drop is not None:
                    self.on_drop((peer, c))
            return
        self._send_cmd(peer, cmd.frames, cmd.what)

    def retransmit(self, now: float | None = None) -> float:
        """Sends again every sequenced command unacknowledged past its timeout (not to a
        device that is down: it is brought up to date when it rejoins). Returns how long
        until the next one is due (``inf``: none waits)."""
        if not self.unacked:
            return math.inf
        now = self.clock() if now is None else now
        nxt = math.inf
        for (peer, c), cmd in list(self.unacked.items()):
            if peer in self.down:
                continue
            due = cmd.last_s + cmd.rto_s
            if now >= due:
                cmd.rto_s = min(2 * cmd.rto_s, RTO_MAX_S)
                self.retries += 1
                self._send_sequenced(peer, c, cmd)
                due = cmd.last_s + cmd.rto_s
            nxt = min(nxt, due - now)
        return max(0.0, nxt)

    def forget(self, peer: bytes) -> list[tuple[bytes, int]]:
        """Abandons the sequenced commands ``peer``'s previous incarnation never acknowledged
        (a restarted unit is brought up to date instead); returns the lost ones among them.
        Their sends leave ``retries`` and ``dropped`` for ``abandoned`` and
        ``abandoned_sends``: those count commands that reached a live device, so that
        ``retries == dropped + duplicates`` holds with recoveries too."""
        keys = [k for k in self.unacked if k[0] == peer]
        for k in keys:
            cmd = self.unacked.pop(k)
            self.retries -= cmd.sends - 1 if cmd.sends else 0
            self.dropped -= cmd.drops
            self.abandoned += 1
            self.abandoned_sends += cmd.sends
        gone = sorted(k for k in self.lost if k[0] == peer)
        self.lost.difference_update(gone)
        return gone

    def next_cseq(self, peer: bytes) -> int:
        return self.cseq.get(peer, 0) + 1

    # --- receiving -------------------------------------------------------------------------
    def _handle(self, peer: bytes, frames: list, what: str, errors: bool = True) -> None:
        if self.known is not None and peer not in self.known:
            self.refusals.add(peer, "unknown peer")  # not a peer of this run: no answer
            return
        base = base_peer(peer)
        self.last_seen[base] = self.clock()
        try:
            msg = wire.decode(frames)
            if msg.type == "event":
                check_event(base, msg.fields)
            elif msg.type not in FROM_PEERS:
                raise ProtocolError(f"{msg.type!r} is not a message a device sends the scheduler")
        except ProtocolError as exc:  # counted and answered; the run goes on
            self.malformed.add(peer, str(exc)[:120])
            if peer == base:  # a heartbeat socket never reads: answer the device's own
                with contextlib.suppress(EmulationError):
                    self.tr.send(peer, wire.encode("error", {"message": f"scheduler: {exc}"[:2000]}))
            return
        if msg.type == "result":
            p = self.pending.pop(msg.fields["task_id"], None)
            if p is not None and p.peer == base:
                self.inbox[msg.fields["task_id"]] = (msg, p)
            # else: a stale or stray reply (a failed wait's): ignore
        elif msg.type == "hello":
            self._hello(base, peer == base, msg.fields.get("incarnation"), what)
        elif msg.type == "pong":
            self.pongs[(base, msg.fields["seq"])] = float(msg.fields.get("wall_s", math.nan))
        elif msg.type == "event" and msg.fields["kind"] == "ack":
            key = (base, msg.fields["cseq"])
            self.unacked.pop(key, None)
            if key in self.lost:
                self.lost.discard(key)
                if self.on_acked is not None:
                    self.on_acked(key)
        elif msg.type == "event":
            self.events.append((base, msg))
        elif msg.type == "error" and errors:
            p = self.pending.get(msg.fields.get("task_id", -1))
            raise EmulationError(f"{base.decode()} rejected {p.what if p else what}: "
                                 f"{msg.fields['message']}")

    def _hello(self, peer: bytes, main: bool, incarnation: Any, what: str) -> None:
        known = self.incarnation.get(peer)
        if known is None and peer not in self.down:
            self.incarnation[peer] = incarnation  # first sight
            return
        if incarnation == known:
            return  # a heartbeat
        if peer not in self.down:
            self._mark_down(peer, "died and was restarted", what)
        if main:  # the restarted device's own socket is connected: it can take work
            self._rejoin(peer, incarnation)

    def _mark_down(self, peer: bytes, cause: str, what: str) -> None:
        if peer in self.down:
            return
        name = peer.decode(errors="replace")
        if peer == GPU_PEER:
            raise EmulationError(
                f"{name} {cause} while the scheduler awaited {what}; the GPU holds the hidden "
                f"state, so a lost GPU cannot be recovered, even with recovery on")
        if not self.recover:
            raise EmulationError(
                f"{name} {cause} while the scheduler awaited {what}; its process died or hung. "
                f"With recovery on (emulate.recover = true, --recover) a dead NDP unit is "
                f"restarted and the step re-dispatched")
        self.down[peer] = (self.clock(), cause)
        if self.on_down is not None:
            self.on_down(peer)

    def _rejoin(self, peer: bytes, incarnation: Any) -> None:
        """A restarted unit greets: bring it up to date, then send it what it never answered."""
        t0 = self.clock()
        self.down.pop(peer, None)
        self.incarnation[peer] = incarnation
        self.recoveries += 1
        if self.on_rejoin is not None:
            self.on_rejoin(peer)
        for tid in sorted(t for t, p in self.pending.items() if p.peer == peer and p.last_s <= t0):
            self._transmit(tid)
        self.progress_s = self.clock()

    def _check_down(self, now: float, what: str) -> None:
        for peer, (since, cause) in sorted(self.down.items()):
            if now - since > REJOIN_TIMEOUT_S:
                raise EmulationError(
                    f"{peer.decode()} {cause} while the scheduler awaited {what}, and was not "
                    f"restarted within {REJOIN_TIMEOUT_S:g} s (Ray's restarts for it may be "
                    f"used up)")

    def idle_until(self, wall_s: float, what: str) -> None:
        """Waits until wall time ``wall_s`` watching every known device's heartbeat, so that a
        device that dies during a long wait is noticed then. A unit restarted meanwhile
        rejoins at once."""
        hb = self.heartbeat_timeout_s
        start = self.clock()
        while (now := self.clock()) < wall_s:
            if hb:
                for peer in sorted(set(self.incarnation) - set(self.down)):
                    silent = now - max(self.last_seen.get(peer, start), start)
                    if silent > hb:
                        self._mark_down(peer, f"went silent: no heartbeat for {silent:.1f} s "
                                        f"(emulate.heartbeat_timeout_s = {hb:g})", what)
            got = self.tr.recv(min(POLL_S, wall_s - now))
            if got is not None:
                self._handle(got[0], got[1], what)

    def gather(self, waiting: dict[int, bytes], what: str,
               timeout_s: float | None = None) -> dict[bytes, wire.Message]:
        """Replies to every task in ``waiting`` (task id -> peer), within the deadline."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        hb = self.heartbeat_timeout_s
        start = self.clock()
        deadline = start + timeout
        rejoined = self.recoveries
        try:
            while True:
                open_ = [t for t in waiting if t not in self.inbox]
                if not open_:
                    break
                now = self.clock()
                if self.recoveries != rejoined:  # a unit came back: its work starts over
                    rejoined, deadline = self.recoveries, max(deadline, now + timeout)
                poll = min(POLL_S, self.retransmit(now))
                # A peer's silence is counted from this wait's start at the earliest, so nobody
                # can be silent for longer than the wait has lasted: the usual fast reply skips
                # the bookkeeping below altogether.
                if not (hb and now - start > hb) and not self.down:
                    got = self.tr.recv(min(poll, max(0.0, deadline - now)))
                    if got is not None:
                        self._handle(got[0], got[1], what)
                    elif now > deadline:
                        names = ", ".join(sorted({waiting[t].decode() for t in open_}))
                        raise EmulationError(f"no reply from {names} within {timeout:g} s while "
                                             f"awaiting {what}")
                    continue
                peers = {waiting[t] for t in open_}
                if hb and now - start > hb:
                    for peer in sorted(peers - set(self.down)):
                        silent = now - max(self.last_seen.get(peer, start), start)
                        if silent > hb:
                            self._mark_down(peer, f"went silent: no heartbeat or reply for "
                                            f"{silent:.1f} s (emulate.heartbeat_timeout_s = {hb:g})",
                                            what)
                self._check_down(now, what)
                down = peers & set(self.down)
                if not down and now > deadline:
                    names = ", ".join(sorted(p.decode() for p in peers))
                    raise EmulationError(f"no reply from {names} within {timeout:g} s while "
                                         f"awaiting {what}")
                left = deadline - now if not down else poll
                got = self.tr.recv(min(poll, max(0.0, left)))
                if got is not None:
                    self._handle(got[0], got[1], what)
        except BaseException:
            for t in waiting:  # a failed wait forgets its tasks; their late replies are stray
                self.pending.pop(t, None)
                self.inbox.pop(t, None)
            raise
        return {peer: self.inbox.pop(t)[0] for t, peer in waiting.items()}

    def call(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "", timeout_s: float | None = None) -> wire.Message:
        what = what or str(fields.get("kind", "?"))
        tid = self.send(peer, fields, arrays, what)
        return self.gather({tid: peer}, what, timeout_s)[peer]

    def next_event(self, what: str, timeout_s: float | None = None) -> tuple[bytes, wire.Message]:
        """The next ``event`` from a device, watching every known device's heartbeat meanwhile
        (a silent one is dead: the run fails naming it and ``what``, or with recovery on it
        is waited for, within ``REJOIN_TIMEOUT_S``) and sending again the sequenced commands
        whose acknowledgement is late. The progress deadline counts from the later of this
        wait's start and the last rejoin or resume."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        hb = self.heartbeat_timeout_s
        start = self.clock()
        while not self.events:
            now = self.clock()
            poll = min(POLL_S, self.retransmit(now))
            if hb and now - start > min(hb, 0.5):
                for peer in sorted(self.incarnation):
                    silent = now - self.last_seen.get(peer, start)
                    if silent > hb:
                        self._mark_down(peer, f"went silent: no heartbeat for {silent:.1f} s "
                                        f"(emulate.heartbeat_timeout_s = {hb:g})", what)
            if self.down:
                self._check_down(now, what)
            elif now - max(start, self.progress_s) > timeout:
                raise EmulationError(f"no progress from the devices within {timeout:g} s while "
                                     f"the scheduler awaited {what}")
            got = self.tr.recv(poll)
            if got is not None:
                self._handle(got[0], got[1], what)
        return self.events.popleft()

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        """Round trips to ``peer`` in wall seconds (calibration and health)."""
        return [rtt for rtt, _ in self.ping_clock(peer, n)]

    def ping_clock(self, peer: bytes, n: int = 20) -> list[tuple[float, float]]:
        """Round trips to ``peer`` with the clock offset each one implies: ``(rtt, offset)``
        where ``offset`` = this host's wall time at the round trip's middle minus the peer's
        (NTP's estimate; its error is at most half the round trip)."""
        out = []
        for _ in range(n):
            seq = next(self.ping_seq)
            t0 = self.clock()
            self.tr.send(peer, wire.encode("ping", {"seq": seq}))
            deadline = t0 + self.timeout_s
            while (peer, seq) not in self.pongs:
                left = deadline - self.clock()
                got = self.tr.recv(min(POLL_S, left)) if left > 0 else None
                if got is None and left <= 0:
                    raise EmulationError(f"{peer.decode()} did not answer a ping within {self.timeout_s:g} s")
                if got is not None:
                    self._handle(got[0], got[1], "a ping", errors=False)
            t1 = self.clock()
            theirs = self.pongs.pop((peer, seq))
            out.append((t1 - t0, (t0 + t1) / 2 - theirs))
        return out
