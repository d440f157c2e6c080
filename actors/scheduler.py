"""The scheduler actor: dispatches plans and prefetch commands, and listens. Never paces.

The scheduler plays the host CPU's MoE runtime. The GPU runs the model forward by itself and,
after each router, tells the scheduler which experts its tokens chose (``event`` ``routed``,
with the expert weights that have landed in its cache since). The scheduler then asks the
policy for the step's plan (pure code, :mod:`policies`) and sends, all stamped with the time
they take effect at their receivers (``at_s``):

1. each NDP unit its shards (``cmd`` ``moe``: experts, column slices, gate weights);
2. the GPU its own tasks, which cached transfer or in-flight fetch each one uses, which units
   to send activations to and expect partials from, evictions and fetches to keep;
3. the unit that holds an expert whole the order to ship it to the GPU over the link
   (``cmd`` ``ship``: on-demand fetches, and the prefetcher's background moves), or the link
   the order to upgrade a prefetch already in flight to the fetch class, or to cancel one.

It then waits for the next event. Nothing here times a plan: the devices throttle themselves
(:mod:`actors.devices`), the link throttles every transfer (:mod:`actors.link`), and the run's
latency is read off the wall clock where the GPU finishes each token. The scheduler's own
hop is modelled as one link latency each way (router -> scheduler, scheduler -> devices);
with ``emulate.charge_decision_time`` each plan also holds the step for the real time the
policy took to decide (host speed, undilated).

Faults (DESIGN.md section 9) are the :class:`Dispatcher`'s business: deadlines on every
wait, heartbeats (a device silent for ``emulate.heartbeat_timeout_s`` is dead, and the run
fails naming it and the step it was given, or with ``emulate.recover`` waits for Ray to
restart it and brings it up to date: :meth:`SchedulerCore._on_rejoin`), and with a drop fault
numbered, acknowledged commands that are sent again when lost. While a fault the scheduler
injected is found and repaired the whole emulated system is paused (:class:`World`), so the
wall time that takes is not emulated time. A failed run leaves what it recorded with
:meth:`SchedulerCore.partial`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import policies
from actors import wire
from actors.clock import wall_now
from actors.devices import SHIP_WINDOW
from actors.link import CLASS_FETCH, CLASS_PREFETCH, LINK_PEER
from actors.transport import Refusals, Transport
from cluster.core import kernels as K
from cluster.core.cost import CostModel
from cluster.core.errors import EmulationError, ProtocolError
from cluster.core.faults import Kill
from cluster.core.selection import Routing, group_by_expert
from cluster.core.spec import Config
from policies.build import make_prefetcher, policy_cost_config

GPU_PEER = b"gpu"
HEARTBEAT_SUFFIX = b".hb"  # a device's heartbeat socket is its name plus this

RTO_S = 0.05  # a sequenced command unacknowledged this long is sent again (then doubling)
RTO_MAX_S = 0.4
REJOIN_TIMEOUT_S = 120.0  # a dead unit must be restarted and rejoin within this (recovery)
POLL_S = 0.1  # longest receive slice while waiting, so silence is noticed
RESUME_MARGIN_S = 2e-3  # a paused run's clocks restart this long after the resume is sent


def unit_peer(u: int) -> bytes:
    return f"ndp{u}".encode()


def heartbeat_peer(peer: bytes) -> bytes:
    """The identity of ``peer``'s heartbeat socket."""
    return peer + HEARTBEAT_SUFFIX


@dataclass
class EmulationStats:
    """What the scheduler observed while one policy ran (device and link reports added)."""

    messages: int = 0
    wall_s: float = 0.0
    epoch_s: float = 0.0
    decisions_s: list[float] = field(default_factory=list)  # real plan time per MoE step
    recoveries: int = 0
    recovery_wall_s: float = 0.0  # wall time the run was paused for recoveries
    retries: int = 0  # sequenced commands sent again (a lost send, or a late acknowledgement)
    retry_wall_s: float = 0.0  # wall time the run was paused for lost commands
    dropped: int = 0  # sends lost by the injected drop fault
    duplicates: int = 0  # copies of commands the devices already had (retries sent too early)
    abandoned: int = 0  # commands a unit died before acknowledging (recovery re-issues them)
    abandoned_sends: int = 0  # ...and their sends (not in retries, dropped)
    pauses: int = 0  # times the run's clock was paused
    kills: list[str] = field(default_factory=list)  # injected kills fired
    reports: dict[str, Any] = field(default_factory=dict)  # device/link name -> its report
    steps: list[dict[str, Any]] = field(default_factory=list)  # per MoE step, what was decided
    plans: list[Any] = field(default_factory=list)  # the plans, in step order
    ratios: list[float] = field(default_factory=list)  # real compute / modelled, every slot
    tokens_completed: int = 0
    routed_late_s: list[float] = field(default_factory=list)  # router event receipt - its stamp
    dispatch_s: list[float] = field(default_factory=list)  # receipt to last command sent

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "wall_s": self.wall_s, "recoveries": self.recoveries,
                "recovery_wall_s": self.recovery_wall_s, "retries": self.retries,
                "retry_wall_s": self.retry_wall_s, "dropped_messages": self.dropped,
                "duplicate_commands": self.duplicates, "abandoned_commands": self.abandoned,
                "abandoned_sends": self.abandoned_sends, "pauses": self.pauses,
                "injected_kills": list(self.kills)}


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
                 peers: list[bytes] | None = None) -> None:
        self.tr, self.timeout_s = transport, timeout_s
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
        self.progress_s = wall_now()  # the last rejoin or resume (deadlines count from it)

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
                                     wall_now())
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
        p.sends_s.append(wall_now())
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
        cmd.last_s = wall_now()
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
        now = wall_now() if now is None else now
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
        base = peer[:-len(HEARTBEAT_SUFFIX)] if peer.endswith(HEARTBEAT_SUFFIX) else peer
        self.last_seen[base] = wall_now()
        try:
            msg = wire.decode(frames)
            if msg.type == "event":
                _check_event(base, msg.fields)
            elif msg.type not in _FROM_PEERS:
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
        self.down[peer] = (wall_now(), cause)
        if self.on_down is not None:
            self.on_down(peer)

    def _rejoin(self, peer: bytes, incarnation: Any) -> None:
        """A restarted unit greets: bring it up to date, then send it what it never answered."""
        t0 = wall_now()
        self.down.pop(peer, None)
        self.incarnation[peer] = incarnation
        self.recoveries += 1
        if self.on_rejoin is not None:
            self.on_rejoin(peer)
        for tid in sorted(t for t, p in self.pending.items() if p.peer == peer and p.last_s <= t0):
            self._transmit(tid)
        self.progress_s = wall_now()

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
        start = wall_now()
        while (now := wall_now()) < wall_s:
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
        start = wall_now()
        deadline = start + timeout
        rejoined = self.recoveries
        try:
            while True:
                open_ = [t for t in waiting if t not in self.inbox]
                if not open_:
                    break
                now = wall_now()
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
        start = wall_now()
        while not self.events:
            now = wall_now()
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
            t0 = wall_now()
            self.tr.send(peer, wire.encode("ping", {"seq": seq}))
            deadline = t0 + self.timeout_s
            while (peer, seq) not in self.pongs:
                left = deadline - wall_now()
                got = self.tr.recv(min(POLL_S, left)) if left > 0 else None
                if got is None and left <= 0:
                    raise EmulationError(f"{peer.decode()} did not answer a ping within {self.timeout_s:g} s")
                if got is not None:
                    self._handle(got[0], got[1], "a ping", errors=False)
            t1 = wall_now()
            theirs = self.pongs.pop((peer, seq))
            out.append((t1 - t0, (t0 + t1) / 2 - theirs))
        return out


_FROM_PEERS = frozenset({"result", "hello", "pong", "event", "error"})
# event kind -> required fields and their types (the GPU's events; ``failed`` and ``ack`` from
# any device)
_EVENTS: dict[str, dict[str, Any]] = {
    "routed": {"seq": int, "layer": int, "at_s": (int, float), "landed": list},
    "token": {"step": int, "at_s": (int, float), "wall_s": (int, float)},
    "done": {},
    "failed": {"message": str},
    "ack": {"cseq": int},
}
_FROM_ANY_DEVICE = frozenset({"failed", "ack"})


def _check_event(peer: bytes, f: dict[str, Any]) -> None:
    """Raises ProtocolError unless an ``event`` from ``peer`` has its kind's fields."""
    kind = f["kind"]
    need = _EVENTS.get(kind)
    if need is None or (kind not in _FROM_ANY_DEVICE and peer != GPU_PEER):
        raise ProtocolError(f"event {kind!r} is not one {peer.decode(errors='replace')} sends")
    for name, typ in need.items():
        v = f.get(name)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ProtocolError(f"event {kind!r} needs {name!r} of type {typ}, got {v!r}"[:200])
    if kind == "routed" and not all(
            isinstance(x, list) and len(x) == 3 and all(type(v) is int for v in x)
            for x in f["landed"]):
        raise ProtocolError("event 'routed' needs landed as [[layer, expert, transfer id], ...]")


def step_order(cfg: Config, decode_steps: int) -> list[tuple[str, int, int]]:
    """(phase, step, layer) of every MoE step of a run, in the order the GPU reaches them."""
    L = cfg.model.num_layers
    out = [("prefill", 0, layer) for layer in range(L)]
    for s in range(1, decode_steps + 1):
        out += [("decode", s, layer) for layer in range(L)]
    return out


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
        return (self.since if self.since is not None else wall_now()) - self.shift_s

    def hold(self, key: Any, why: str) -> None:
        if not self.armed:
            return
        if self.since is None:
            self.since = wall_now()
            self.pauses += 1
            self._why = set()
            self._broadcast({"kind": "pause"})
        self.holds[key] = why
        self._why.add(why)

    def release(self, key: Any) -> None:
        if self.holds.pop(key, None) is not None and not self.holds and self.since is not None:
            self._resume()

    def _resume(self) -> None:
        paused = wall_now() + self.margin_s - self.since
        self.shift_s += paused
        self.paused_wall_s["recovery" if "recovery" in self._why else "retry"] += paused
        self.since = None
        self._broadcast({"kind": "resume", "shift_s": self.shift_s})
        self.net.progress_s = wall_now()

    def _broadcast(self, fields: dict[str, Any]) -> None:
        """To every live device and the link, never dropped (it is the emulator's, not the
        emulated system's, message); a dead unit is told its state when it rejoins."""
        frames = wire.encode("cmd", fields)
        for peer in [*self.peers(), LINK_PEER]:
            if peer in self.net.down:
                continue
            with contextlib.suppress(EmulationError):
                self.net.tr.send(peer, frames)


class PolicyRun:
    """One policy's run on the devices, from the scheduler's side: plan, dispatch, record.

    Keeps the scheduler's books: which experts have landed on the GPU (as it reported), which
    transfers are in flight (prefetches, kept fetches), which transfer id each key has.
    """

    def __init__(self, core: SchedulerCore, name: str, routing: Routing, dilation: float,
                 decode_steps: int) -> None:
        self.core, self.cfg, self.name, self.routing = core, core.cfg, name, routing
        cfg = self.cfg
        choice = policies.resolve(name)
        sched_cls = policies.get("scheduler", choice.scheduler)
        self.cost_cfg = policy_cost_config(cfg, sched_cls, policies.get("prefetcher", choice.prefetcher))
        self.cost = CostModel(self.cost_cfg)
        self.sched = sched_cls(cfg, self.cost)
        self.pf = make_prefetcher(cfg, choice.prefetcher, routing)
        self.choice = choice
        self.D = dilation
        self.lat_s = self.cost.link_latency_s
        self.N = cfg.ndp.num_ndp_units
        self.d_ff = cfg.model.d_ff
        self.order = step_order(cfg, decode_steps)
        self.landed: dict[tuple[int, int], int] = {}  # key -> transfer id, on the GPU
        self.inflight: dict[tuple[int, int], int] = {}  # key -> transfer id, prefetch in flight
        self.pids = itertools.count(1)
        self.orders = itertools.count(1)
        self.stats = EmulationStats()
        self.where: tuple[str, int, int] = ("prefill", 0, -1)
        self.tokens_done = 0
        # books for recovery (what a restarted unit must be sent again)
        self.unit_cmds: dict[int, tuple[int, dict[str, Any], list[np.ndarray]]] = {}  # last step
        self.ships: dict[int, dict[int, tuple[str, list[int], float, int]]] = {}  # unit -> pid ->
        self.cancelled: set[int] = set()  # transfer ids cancelled at the link
        self.upgraded: set[int] = set()  # prefetches upgraded to on-demand fetches

    # --- one MoE step ---------------------------------------------------------------------
    def _step_routing(self, phase: str, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.routing
        if phase == "prefill":
            w = r.topk_weights[:, : r.prompt_tokens, layer]
            return r.prefill_ids(layer), w.reshape(-1, w.shape[-1])
        return r.decode_ids(step - 1, layer), r.topk_weights[:, r.prompt_tokens + step - 1, layer]

    def on_routed(self, f: dict[str, Any]) -> None:
        seq, layer = int(f["seq"]), int(f["layer"])
        phase, step, lay = self.order[seq]
        if lay != layer:
            raise EmulationError(f"gpu reached layer {layer} where the scheduler expected {lay} "
                                 f"(MoE step {seq})")
        self.where = (phase, step, layer)
        self.stats.routed_late_s.append(self.core.world.now() - float(f["at_s"]))  # receipt vs effect
        for lay_, e, pid in f["landed"]:
            key = (int(lay_), int(e))
            if self.inflight.get(key) == int(pid):
                del self.inflight[key]
                self.landed[key] = int(pid)
        t0 = wall_now()
        ids, weights = self._step_routing(phase, step, layer)
        routed = group_by_expert(ids)
        pf = self.pf
        resident = frozenset(e for e in pf.cache.layer(layer) if (layer, e) in self.landed)
        inp = policies.StepInput(layer, phase, routed, resident)
        plan = self.sched.plan(inp)
        more: list[tuple[int, int]] = []
        fetched_whole = [fe.expert for fe in plan.fetches if fe.col_start == 0 and fe.col_end == self.d_ff]
        if phase == "decode":
            more = pf.after_step(layer, step - 1, {e: len(v) for e, v in routed.items()}, fetched_whole)
        evicted = self._drain_evicted()
        self.sched.observe(inp)
        decision = wall_now() - t0
        self.stats.decisions_s.append(decision)
        charge = decision if self.cfg.emulate.charge_decision_time else 0.0
        at = float(f["at_s"]) + self.D * (charge + self.lat_s)  # the commands take effect then
        self._dispatch(seq, phase, step, layer, plan, ids, weights, more, evicted, at)
        self.stats.dispatch_s.append(wall_now() - t0)
        self.stats.steps.append({"seq": seq, "phase": phase, "step": step, "layer": layer,
                                 "active": len(routed), "hits": sum(1 for e in routed if e in resident),
                                 "fetched": len(plan.fetches), "decision_s": decision,
                                 "gpu_experts": sum(1 for t in plan.tasks if t.device == policies.GPU)})
        self.stats.plans.append(plan)

    def _prefetch_orders(self, keys: list[tuple[int, int]]) -> dict[int, list[list[int]]]:
        """Ship orders, by holding unit, for the prefetcher's keys not already on the GPU or
        on their way (each gets a transfer id and its place in the link's issue order)."""
        pre: dict[int, list[list[int]]] = {}
        for key in keys:
            if key in self.landed or key in self.inflight or key not in self.pf.cache:
                continue
            pid = next(self.pids)
            self.inflight[key] = pid
            pre.setdefault(key[1] % self.N, []).append([key[0], key[1], 0, self.d_ff, pid,
                                                        next(self.orders)])
        return pre

    def _drain_evicted(self) -> list[tuple[int, int]]:
        cache = self.pf.cache
        out = [k for k in cache.evicted if k not in cache]
        cache.evicted.clear()
        return out

    def _dispatch(self, seq: int, phase: str, step: int, layer: int, plan: policies.Plan,
                  ids: np.ndarray, weights: np.ndarray, more: list[tuple[int, int]],
                  evicted: list[tuple[int, int]], at: float) -> None:
        net, N, d_ff = self.core.net, self.N, self.d_ff
        memo: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}

        def gates_of(t: policies.Task) -> np.ndarray:
            """Gate weights of a task's tokens: the slices of one expert share them."""
            key = (t.expert, t.tokens)
            g = memo.get(key)
            if g is None:
                g = memo[key] = K.gate_weights_for(ids, weights, t.expert, t.tokens)
            return g

        per_unit: dict[int, list[policies.Task]] = {}
        gpu_tasks: list[policies.Task] = []
        for t in plan.expand(N):
            (gpu_tasks if t.device == policies.GPU else per_unit.setdefault(t.device, [])).append(t)
        cached_pid = dict(self.landed)  # as the plan saw it, before this step's evictions
        # evictions: landed ones leave the GPU's cache, in-flight ones are cancelled
        evict_pids, cancel = [], []
        for key in evicted:
            if key in self.landed:
                evict_pids.append(self.landed.pop(key))
            elif key in self.inflight:
                pid = self.inflight.pop(key)
                evict_pids.append(pid)
                cancel.append(pid)
        # on-demand fetches: upgrade a prefetch in flight, else ship from the unit holding it
        ships: dict[int, list[list[int]]] = {}
        upgrades: list[list[int]] = []
        fetch_pid: dict[tuple[int, int, int], int] = {}
        keep: list[int] = []
        for fe in plan.fetches:
            key = (layer, fe.expert)
            whole = fe.col_start == 0 and fe.col_end == d_ff
            order = next(self.orders)
            if whole and key in self.inflight:
                pid = self.inflight[key]
                upgrades.append([pid, order])
            else:
                pid = next(self.pids)
                ships.setdefault(fe.expert % N, []).append(
                    [layer, fe.expert, fe.col_start, fe.col_end, pid, order])
                if whole and key in self.pf.cache:  # admitted: the GPU keeps it when it lands
                    keep.append(pid)
                    self.inflight[key] = pid
            fetch_pid[(fe.expert, fe.col_start, fe.col_end)] = pid
        pre = self._prefetch_orders(more)  # background prefetches after this step's fetches
        if cancel:
            self.cancelled.update(cancel)
            net.post(LINK_PEER, "cancel", {"pids": cancel, "at_s": at})
        if upgrades:
            self.upgraded.update(p for p, _ in upgrades)
            net.post(LINK_PEER, "upgrade", {"items": upgrades, "at_s": at, "seq": seq})
            by_unit: dict[int, list[int]] = {}
            for (lay, e), pid in self.inflight.items():
                if lay == layer and any(pid == p for p, _ in upgrades):
                    by_unit.setdefault(e % N, []).append(pid)
            for u, pids in sorted(by_unit.items()):  # still queued at the unit: send them next
                net.post(unit_peer(u), "expedite", {"pids": pids})
        for u, items in sorted(ships.items()):
            self._ship(u, "fetch", items, at, seq)
        for u, items in sorted(pre.items()):
            self._ship(u, "prefetch", items, at)
        if self.core.kills and phase == "decode" and self.inject:
            self._inject_kills(step, layer, per_unit)
        # the units' shards (units of a tensor-parallel step share tokens and gates: built once)
        unit_rows: dict[int, np.ndarray] = {}
        built: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.unit_cmds = {}
        for u, tasks in sorted(per_unit.items()):
            key = tuple((t.expert, t.tokens) for t in tasks)
            got = built.get(key)
            if got is None:
                toks = np.unique(np.fromiter((x for t in tasks for x in t.tokens), dtype=np.int64))
                rows = np.searchsorted(toks, np.fromiter((x for t in tasks for x in t.tokens),
                                                         dtype=np.int64)).astype(np.int32)
                gates = np.concatenate([gates_of(t) for t in tasks]).astype(np.float32)
                got = built[key] = (toks.astype(np.int32), rows, gates)
            unit_rows[u] = got[0]
            meta = [[t.expert, t.col_start, t.col_end, len(t.tokens)] for t in tasks]
            cmd = {"seq": seq, "layer": layer, "at_s": at, "meta": meta}
            self.unit_cmds[u] = (seq, cmd, [got[1], got[2]])
            net.post(unit_peer(u), "moe", cmd, [got[1], got[2]])
        # the GPU: its experts (cached transfer or fetch to wait for), units, evictions
        meta, rows, gates = [], [], []
        for t in gpu_tasks:
            tok = np.asarray(t.tokens, dtype=np.int64)
            pid = fetch_pid.get((t.expert, t.col_start, t.col_end))
            if pid is None:  # a fetch may cover a wider slice than this task (fractional split)
                pid = next((p for (e, lo, hi), p in fetch_pid.items()
                            if e == t.expert and lo <= t.col_start and t.col_end <= hi), None)
            fetched = pid is not None
            if not fetched:
                pid = cached_pid.get((layer, t.expert))
                if pid is None:
                    raise EmulationError(f"plan of {self.name} runs L{layer} e{t.expert} on the GPU "
                                         f"but it is neither cached nor fetched")
            meta.append([t.expert, t.col_start, t.col_end, len(tok), pid, int(fetched)])
            rows.append(tok.astype(np.int32))
            gates.append(gates_of(t))
        units = sorted(per_unit)
        arrays = [np.concatenate(rows) if rows else np.zeros(0, np.int32),
                  np.concatenate(gates).astype(np.float32) if gates else np.zeros(0, np.float32),
                  *(unit_rows[u] for u in units)]
        net.post(GPU_PEER, "moe", {"seq": seq, "layer": layer, "at_s": at, "meta": meta,
                                   "units": units, "evict": evict_pids, "keep": keep}, arrays)
        self.stats.messages += 1 + len(per_unit) + len(ships) + len(pre)

    def on_token(self, f: dict[str, Any]) -> None:
        self.tokens_done += 1
        self.stats.tokens_completed = self.tokens_done
        if int(f["step"]) != 0:
            return
        counts = self.routing.prefill_counts(self.cfg.model.num_experts)
        more = self.pf.after_prefill(counts)
        evicted = self._drain_evicted()
        at = float(f["at_s"]) + self.D * self.lat_s
        pre = self._prefetch_orders(more)
        for key in evicted:  # (a prefetcher that evicts at the end of prefill)
            self.landed.pop(key, None)
            self.inflight.pop(key, None)
        for u, items in sorted(pre.items()):
            self._ship(u, "prefetch", items, at)

    def _ship(self, u: int, cls: str, items: list[list[int]], at: float, seq: int | None = None) -> None:
        """Orders unit ``u`` to ship weights to the GPU, and keeps the order in the books."""
        book = self.ships.setdefault(u, {})
        for it in items:
            book[it[4]] = (cls, it, at, -1 if seq is None else seq)
        fields = {"class": cls, "items": items, "at_s": at}
        if seq is not None:
            fields["seq"] = seq
        self.core.net.post(unit_peer(u), "ship", fields)

    def resend_ships(self, u: int, done: set[int]) -> int:
        """Sends restarted unit ``u`` again the ship orders whose weights are not ``done``
        (reached the GPU, held by the link, cancelled), in their first order; prefetches
        upgraded since go out at once (``expedite``). Returns how many."""
        book = self.ships.get(u, {})
        for pid in [p for p in book if p in done or p in self.cancelled]:
            del book[pid]
        groups: list[tuple[tuple[str, float, int], list[list[int]]]] = []
        for _pid, (cls, it, at, seq) in book.items():
            key = (cls, at, seq)
            if groups and groups[-1][0] == key:
                groups[-1][1].append(it)
            else:
                groups.append((key, [it]))
        for (cls, at, seq), items in groups:
            fields = {"class": cls, "items": items, "at_s": at}
            if seq >= 0:
                fields["seq"] = seq
            self.core.net.post(unit_peer(u), "ship", fields)
        up = sorted(p for p in book if p in self.upgraded and book[p][0] == "prefetch")
        if up:
            self.core.net.post(unit_peer(u), "expedite", {"pids": up})
        return len(book)

    def _inject_kills(self, step: int, layer: int, per_unit: dict[int, list]) -> None:
        """Tells each unit due to die now to ``die``, just before its shards of this step."""
        for k in list(self.core.kills):
            if step >= k.step and k.unit in per_unit:
                self.core.kills.remove(k)
                # the fault strikes now: with recovery on, the run pauses here until the unit
                # is back (World); without, the run fails when the unit is found dead
                if self.core.net.recover:
                    self.core.world.hold(("down", unit_peer(k.unit)), "recovery")
                self.core.tr.send(unit_peer(k.unit), wire.encode("task", {
                    "task_id": next(self.core.net.ids), "kind": "die"}))
                self.stats.kills.append(f"ndp{k.unit}@decode step {step}, layer {layer}")

    inject = True


class SchedulerCore:
    """The scheduler actor's body: run policies, collect outputs. Plain class (Ray-free).

    Keeps the running policy's records (:meth:`partial`) so that a driver can fetch what a
    failed run produced.
    """

    def __init__(self, cfg: Config, routing: Routing, transport: Transport) -> None:
        self.cfg, self.routing, self.tr = cfg, routing, transport
        self.timeout_s = cfg.emulate.recv_timeout_s
        self.faults = cfg.faults
        rng = np.random.default_rng([cfg.workload.seed, 0xD809])
        self.net = Dispatcher(transport, self.timeout_s,
                              heartbeat_timeout_s=cfg.emulate.heartbeat_timeout_s,
                              recover=cfg.emulate.recover, rng=rng,
                              peers=[*self.peers(), LINK_PEER])
        self.world = World(self.net, self.peers)
        self.net.on_down = lambda peer: self.world.hold(("down", peer), "recovery")
        self.net.on_rejoin = self._on_rejoin
        self.net.on_drop = lambda key: self.world.hold(("drop", *key), "retry")
        self.net.on_acked = lambda key: self.world.release(("drop", *key))
        self.kills: list[Kill] = list(self.faults.kills)  # each fires once per cluster
        self.layouts: dict[int, np.ndarray] = {}  # unit -> the slices it generates (warm)
        self._run: PolicyRun | None = None  # the policy running now (recovery's books)
        self._reset_fields: dict[str, Any] = {}  # the running policy's device reset
        self.offsets: dict[bytes, float] = {}  # peer -> wall offset to this host's clock
        self.offset_residual_s: dict[str, float] = {}
        self.device_overrides: dict[str, Any] = {}  # tests: reset fields every device gets
        self._last: tuple[Any, EmulationStats, tuple[str, int, int]] | None = None
        self.progress_tokens = 0
        self.hop_s = 0.0  # one-way hop, 90th percentile (sync_clocks): the link's lookahead

    def peers(self) -> list[bytes]:
        return [GPU_PEER, *(unit_peer(u) for u in range(self.cfg.ndp.num_ndp_units))]

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        return self.net.ping(peer, n)

    def sync_clocks(self, n: int = 8) -> dict[str, float]:
        """Estimates each device's (and the link's) wall-clock offset to this host by ping
        exchange (the round trip with the smallest time wins); returns the residual
        uncertainty per peer (half that round trip), in seconds."""
        rtts = []
        for peer in [*self.peers(), LINK_PEER]:
            got = self.net.ping_clock(peer, n)
            rtts += [r for r, _ in got]
            best = min(got)
            self.offsets[peer] = best[1]
            self.offset_residual_s[peer.decode()] = best[0] / 2
        self.hop_s = float(np.quantile(rtts, 0.9)) / 2
        self.world.margin_s = max(RESUME_MARGIN_S, 4 * self.hop_s)
        return dict(self.offset_residual_s)

    def _all(self, fields: dict[str, Any], what: str, peers: list[bytes] | None = None,
             arrays: dict[bytes, list[np.ndarray]] | None = None,
             per_peer: dict[bytes, dict[str, Any]] | None = None,
             timeout_s: float | None = None) -> dict[bytes, wire.Message]:
        peers = self.peers() if peers is None else peers
        waiting = {self.net.send(p, {**fields, **(per_peer or {}).get(p, {})},
                                 (arrays or {}).get(p, []), what): p for p in peers}
        return self.net.gather(waiting, what, timeout_s)

    def warm(self, layouts: dict[int, list[tuple[int, int, int, int]]]) -> dict[int, int]:
        """Has each unit generate its weight slices before any timed work."""
        self.layouts = {u: np.asarray(lay, dtype=np.int32).reshape(-1, 4) for u, lay in layouts.items()}
        arrays = {unit_peer(u): [self.layouts[u]] for u in layouts}
        got = self._all({"kind": "warm"}, "weight generation", peers=list(arrays), arrays=arrays,
                        timeout_s=max(self.timeout_s, 600.0))
        return {int(m.fields["unit"]): int(m.fields["bytes"]) for m in got.values()}

    def run_policy(self, name: str, dilation: float = 1.0, calibrate: bool = False,
                   max_decode_steps: int | None = None, progress=None,
                   trace_steps: range = range(1, 3), inject: bool | None = None
                   ) -> tuple[EmulationStats, dict[str, Any]]:
        """Runs one policy through the workload on the devices at dilation D.

        Returns the scheduler's stats (with every device's and the link's report) and the
        run's meta (epoch, dilation, step order). ``calibrate`` only shortens the run to
        ``max_decode_steps`` and skips injected faults: at D = 1 every slot overruns and the
        devices' reports carry real compute / modelled time for each slot.
        """
        routing = self.routing
        if max_decode_steps is not None and max_decode_steps < routing.decode_steps:
            keep = routing.prompt_tokens + max_decode_steps
            routing = Routing(routing.topk_ids[:, :keep], routing.topk_weights[:, :keep],
                              routing.prompt_tokens, routing.source)
        run = PolicyRun(self, name, routing, dilation, routing.decode_steps)
        run.inject = not calibrate if inject is None else inject
        self._last = (None, run.stats, run.where)
        L = self.cfg.model.num_layers
        trace_seqs = [trace_steps.start * L, trace_steps.stop * L - 1] if len(trace_steps) else [0, -1]
        cost_cfg = run.cost_cfg
        bw_factor = cost_cfg.ndp.internal_bw_gbps / self.cfg.ndp.internal_bw_gbps
        base = {"kind": "reset", "dilation": float(dilation), "trace_seqs": trace_seqs,
                "ndp_bw_factor": bw_factor, **self.device_overrides}
        per_peer = {p: {"offset_s": self.offsets.get(p, 0.0)} for p in self.peers()}
        w0 = wall_now()
        self.progress_tokens = 0
        # drop faults (injected runs only): commands to devices are numbered and acknowledged
        # for the whole run, and lost from the run's epoch on (not in the preload before it)
        drop_p = self.faults.drop_p if run.inject else 0.0
        self.net.new_run(0.0, sequenced=drop_p > 0)
        before = self.net.counters()
        self._run, self._reset_fields = run, base
        try:
            self._all(base, "reset", per_peer=per_peer)
            pf_class = CLASS_FETCH if self.cfg.link.prefetch_priority == "equal" else CLASS_PREFETCH
            self.net.call(LINK_PEER, {"kind": "reset", "dilation": float(dilation),
                                      "latency_s": run.lat_s, "bw_bytes_per_s": run.cost.link_bw_bytes_per_s,
                                      "prefetch_class": pf_class, "trace_seqs": trace_seqs,
                                      "bypass": True, "base_s": wall_now()}, what="link reset")
            self._preload(run)
            epoch = wall_now() + PREPARE_S
            run.stats.epoch_s = epoch
            self.net.call(LINK_PEER, {"kind": "reset", "dilation": float(dilation),
                                      "latency_s": run.lat_s, "bw_bytes_per_s": run.cost.link_bw_bytes_per_s,
                                      "prefetch_class": pf_class, "trace_seqs": trace_seqs,
                                      "bypass": False, "base_s": epoch,
                                      "lookahead_s": self.hop_s,
                                      "offset_s": self.offsets.get(LINK_PEER, 0.0)},
                          what="link reset")
            self.world.arm()
            self.net.drop_p = drop_p
            self.net.call(GPU_PEER, {"kind": "run", "epoch_s": epoch,
                                     "decode_steps": routing.decode_steps}, what="gpu run")
            total = len(run.order)
            while True:
                at = run.order[min(len(run.stats.steps), total - 1)]
                what = (f"the end of {self.step_name(*run.where)}" if run.stats.steps else
                        f"the router of {self.step_name(*at)}")
                peer, ev = self.net.next_event(what)
                f = ev.fields
                kind = f["kind"]
                if kind == "routed":
                    run.on_routed(f)
                elif kind == "token":
                    run.on_token(f)
                    self.progress_tokens = run.tokens_done
                    if progress is not None:
                        progress(1)
                elif kind == "done":
                    break
                elif kind == "failed":
                    raise EmulationError(f"{peer.decode()} failed at {self.step_name(*run.where)}: "
                                         f"{f.get('message', '')}")
            self.net.drop_p = 0.0
            self.world.disarm()
            run.stats.wall_s = wall_now() - w0
            got = self._all({"kind": "report"}, "run reports")
            for p, m in got.items():
                run.stats.reports[p.decode()] = wire.from_json_array(m.arrays[0])
            run.stats.reports["link"] = wire.from_json_array(self.net.call(
                LINK_PEER, {"kind": "report"}, what="link report").arrays[0])
            run.stats.duplicates = sum(int(r.get("cmd_duplicates", 0))
                                       for d, r in run.stats.reports.items() if d != "link")
        finally:
            self.net.drop_p = 0.0
            self.world.disarm()
            self._run = None
            after = self.net.counters()
            st = run.stats
            st.dropped = after["dropped"] - before["dropped"]
            st.retries = after["retries"] - before["retries"]
            st.recoveries = after["recoveries"] - before["recoveries"]
            st.abandoned = after["abandoned"] - before["abandoned"]
            st.abandoned_sends = after["abandoned_sends"] - before["abandoned_sends"]
            st.pauses = self.world.pauses
            st.retry_wall_s = self.world.paused_wall_s["retry"]
            st.recovery_wall_s = self.world.paused_wall_s["recovery"]
            st.wall_s = st.wall_s or wall_now() - w0
            self._last = (None, st, run.where)
        meta = {"epoch_s": run.stats.epoch_s, "dilation": dilation, "order": run.order,
                "cost_cfg": cost_cfg, "offsets": {p.decode(): o for p, o in self.offsets.items()}}
        return run.stats, meta

    def _on_rejoin(self, peer: bytes) -> None:
        """A restarted NDP unit is back (recovery): measure its clock, reset it to the running
        policy (paused if the run is), have it generate its weight slices again, then send it
        what its predecessor had not done -- its shards of the step in progress unless its
        partial reached the GPU or is on the link, the GPU's activations for them unless they
        are on the link, and every ship order whose weights neither reached the GPU nor are
        on the link (nor were cancelled) -- and let the run go on (:class:`World`)."""
        u = int(peer[3:])
        lost = self.net.forget(peer)  # commands to the dead process
        self.offsets[peer] = min(self.net.ping_clock(peer, 4))[1]
        run = self._run
        try:
            if run is not None:
                pend = wire.from_json_array(self.net.call(
                    LINK_PEER, {"kind": "pending"}, what=f"the link's transfers of {peer.decode()}"
                ).arrays[0])
                name = peer.decode()
                to_it = {(k, q) for k, src, dst, q, _pid, _w in pend if dst == name}
                from_it = [(k, q, pid, w) for k, src, dst, q, pid, w in pend if src == name]
                window = SHIP_WINDOW - sum(1 for *_, w in from_it if w)
                self.net.call(peer, {**self._reset_fields, "offset_s": self.offsets[peer],
                                     "shift_s": self.world.shift_s,
                                     "paused": self.world.since is not None,
                                     "cseq_next": self.net.next_cseq(peer), "window": window},
                              what=f"the reset of restarted {name}")
            if u in self.layouts:
                self.net.call(peer, {"kind": "warm"}, [self.layouts[u]],
                              what=f"weight generation on restarted {peer.decode()}",
                              timeout_s=max(self.timeout_s, 600.0))
            if run is None:
                return
            st = self.net.call(GPU_PEER, {"kind": "status"}, what="the GPU's state (recovery)")
            seen = set(np.asarray(st.arrays[0]).tolist())
            cur, combined = int(st.fields["seq"]), int(st.fields["combined"])
            step = run.unit_cmds.get(u)
            if step is not None and step[0] > combined:
                seq = step[0]
                has_partial = seq == cur and u in st.fields["partials"]
                if not has_partial and ("partial", seq) not in {(k, q) for k, q, _, _ in from_it}:
                    self.net.post(peer, "moe", step[1], step[2])
                    if seq == cur and ("activation", seq) not in to_it:
                        self.net.call(GPU_PEER, {"kind": "resend", "unit": u, "seq": seq},
                                      what="the GPU's activations again (recovery)")
            run.resend_ships(u, seen | {pid for _, _, pid, _ in from_it if pid is not None})
        finally:
            for key in lost:  # lost commands of the dead process: replaced by the above
                self.world.release(("drop", *key))
            self.world.release(("down", peer))

    def _preload(self, run: PolicyRun) -> None:
        """Keys the prefetcher holds from the start (model load time): shipped for real over
        the link with throttling off, before the run's clock starts."""
        keys = run.pf.preload()
        if not keys:
            return
        pre: dict[int, list[list[int]]] = {}
        pids = {}
        for key in keys:
            pid = next(run.pids)
            pids[pid] = key
            pre.setdefault(key[1] % run.N, []).append([key[0], key[1], 0, run.d_ff, pid, 0])
        now = wall_now()
        for u, items in sorted(pre.items()):
            self.net.post(unit_peer(u), "ship", {"class": "prefetch", "items": items, "at_s": now})
        deadline = now + max(self.timeout_s, 60.0)
        while True:
            got = self.net.call(GPU_PEER, {"kind": "preload", "pids": list(pids)},
                                what="preload of the GPU cache").fields["landed"]
            if len(got) == len(pids):
                break
            if wall_now() > deadline:
                raise EmulationError(f"only {len(got)} of {len(pids)} preloaded experts reached "
                                     f"the GPU within {self.timeout_s:g} s")
            time.sleep(0.01)
        for pid, key in pids.items():
            run.landed[key] = pid
        self.net.call(GPU_PEER, {"kind": "report"}, what="gpu preload report")

    @staticmethod
    def step_name(phase: str, step: int, layer: int | None = None) -> str:
        at = f"{phase} step {step}"
        return at if layer is None or layer < 0 else f"{at}, layer {layer}"

    def partial(self) -> tuple[Any, EmulationStats | None, tuple[str, int, int] | None]:
        """(None, stats, (phase, step, layer)) of the last run, finished or not."""
        return self._last if self._last is not None else (None, None, None)

    def collect(self) -> np.ndarray:
        return np.array(self.net.call(GPU_PEER, {"kind": "collect"}).arrays[0])

    def shutdown(self) -> None:
        for peer in [*self.peers(), LINK_PEER]:
            with contextlib.suppress(EmulationError):
                self.tr.send(peer, wire.encode("shutdown"))


PREPARE_S = 0.05  # the run's epoch is this far after the start command, so every actor is ready
