"""The host link: one shared, throttled resource that every byte between GPU and units crosses.

The link plays PCIe between the GPU and the NDP-DIMMs. Devices hand it ``data`` messages
(activations to a unit, partial outputs to the GPU, expert weights shipped by the unit that
holds them); it delivers each one to its destination once the modelled transfer is over, in
wall-clock time: a transfer of ``true_bytes`` takes ``D x (latency + true_bytes / bw)`` of
link service. Nothing else computes when a transfer ends.

Service discipline (DESIGN.md section 5), the same one the analytic engine assumes:

- three priority classes, preemptive: activations and partials (0) > on-demand fetches (1) >
  prefetches (2, or 1 with ``link.prefetch_priority = equal``); first come first served
  within a class, by arrival stamp then by the order the scheduler issued the transfer;
- a transfer *arrives* at its stamp (``at_s``, the wall time its sender says it entered the
  link), not when the link process happens to read it: host message latency shorter than the
  modelled time is absorbed. The link reschedules retroactively from the stamp; only a
  delivery it has already made cannot move (a stamp older than the last delivery is taken at
  that delivery and counted in ``late_arrivals``);
- preemption is exact and event-driven: :class:`LinkSchedule` keeps each transfer's remaining
  service and re-plans the queue only when something arrives, is cancelled, or is upgraded.

:class:`LinkSchedule` is the pure queueing core (wall seconds in, completion times out; the
tests drive it directly); :class:`LinkServer` runs it on a transport and a real clock.
Stamps are wall seconds in the run's reference timebase (the scheduler's clock; devices on
other hosts correct by their measured offset).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.transport import Refusals, Transport
from cluster.core.errors import EmulationError, ProtocolError

CLASS_STEP = 0  # activations and partial outputs
CLASS_FETCH = 1  # on-demand expert weights
CLASS_PREFETCH = 2  # background expert weights (lowest) -- or CLASS_FETCH when "equal"
KINDS = ("activation", "partial", "fetch", "prefetch")
_CLASS_OF = {"activation": CLASS_STEP, "partial": CLASS_STEP, "fetch": CLASS_FETCH,
             "prefetch": CLASS_PREFETCH}  # prefetch: see HostLink.prefetch_class
LINK_PEER = b"link"
EPS_S = 1e-9  # wall seconds: a transfer owing less than this is complete
MAX_INTERVALS = 100_000  # served segments kept for the trace, per run
BATCH = 16  # messages the link takes in between two looks at what is due


@dataclass(slots=True)
class Transfer:
    """One message on the link. ``remaining_s`` is wall seconds of service still owed."""

    xid: int
    kind: str
    cls: int
    arrive_s: float
    order: int
    recv_seq: int
    remaining_s: float
    true_bytes: int
    dst: bytes = b""
    frames: list[Any] = field(default_factory=list)
    seq: int = -1  # the MoE step it belongs to (-1: background)
    served: list[tuple[float, float]] = field(default_factory=list)
    src: bytes = b""  # the device that handed it over
    decoded: Any = None  # its header as the link decoded it (re-packed with the new stamp)
    label: str = ""  # its name on the trace's link track (default: its kind)
    windowed: bool = False  # a prefetch under its unit's credit window
    pid: int | None = None  # the scheduler's id for it (prefetches, fetches)
    upgraded: bool = False  # a prefetch turned on-demand fetch
    done_s: float = math.nan  # its completion, once popped

    def key(self) -> tuple:
        return (self.cls, self.arrive_s, self.order, self.recv_seq)


class LinkSchedule:
    """Preemptive-priority single server over wall time, re-planned from stamps.

    ``base_s`` is the time up to which service is committed: every transfer's ``remaining_s``
    is owed from then on. Transfers that have arrived by ``base_s`` wait in a heap by priority
    (lazily cleaned: a cancelled or re-keyed entry is skipped when it surfaces); later ones in
    a list by arrival. The next completion involves only the heap's top and the later
    arrivals that may preempt it -- every other waiting transfer has a lower priority than the
    top and cannot run before it is done -- so a backlog of a thousand prefetches costs each
    event O(log n), not O(n). :meth:`commit` moves ``base_s`` forward (never past the next
    completion), :meth:`pop_due` hands over the next completion.
    """

    def __init__(self, base_s: float = 0.0) -> None:
        self.base_s = base_s
        self.pending: dict[int, Transfer] = {}
        self.late_arrivals = 0
        self.late_total_s = 0.0
        self._recv = itertools.count()
        self._heap: list[tuple[tuple, int]] = []  # (key, xid) of arrived transfers
        self._future: list[tuple[float, tuple, int]] = []  # (arrive, key, xid), sorted
        self._plan: tuple[float, int] | None = None  # the next completion, cached

    # --- filing -----------------------------------------------------------------------------
    def _file(self, t: Transfer) -> None:
        if t.arrive_s <= self.base_s:
            heapq.heappush(self._heap, (t.key(), t.xid))
        else:
            bisect.insort(self._future, (t.arrive_s, t.key(), t.xid))
        self._plan = None

    def _top(self) -> Transfer | None:
        """The arrived transfer first in priority (stale heap entries dropped on the way)."""
        h = self._heap
        while h:
            key, xid = h[0]
            t = self.pending.get(xid)
            if t is not None and t.key() == key and t.arrive_s <= self.base_s:
                return t
            heapq.heappop(h)
        return None

    def _futures(self) -> list[Transfer]:
        out = []
        for arrive, key, xid in self._future:
            t = self.pending.get(xid)
            if t is not None and t.key() == key and t.arrive_s == arrive:
                out.append(t)
        return out

    # --- changes --------------------------------------------------------------------------
    def add(self, t: Transfer) -> None:
        t.recv_seq = next(self._recv)
        if t.arrive_s < self.base_s:  # older than a delivery already made: it cannot go back
            self.late_arrivals += 1
            self.late_total_s += self.base_s - t.arrive_s
            t.arrive_s = self.base_s
        self.pending[t.xid] = t
        self._file(t)

    def cancel(self, xid: int, at_s: float) -> Transfer | None:
        """Drops a transfer from ``at_s`` on (its service so far is wasted)."""
        if xid not in self.pending:
            return None
        self.commit(max(at_s, self.base_s))
        self._plan = None
        return self.pending.pop(xid)  # its heap or list entry is stale from now on

    def upgrade(self, xid: int, cls: int, at_s: float, order: int = -1) -> bool:
        """Moves a queued transfer into class ``cls`` from ``at_s`` on, keeping what it has
        already been served (an on-demand fetch of an expert whose prefetch is in flight)."""
        t = self.pending.get(xid)
        if t is None or t.cls < cls:
            return False
        self.commit(max(at_s, self.base_s))
        t.cls = cls
        t.upgraded = True
        t.arrive_s = max(t.arrive_s, self.base_s if at_s <= self.base_s else at_s)
        t.order = order  # its place among this step's fetches (the plan's order)
        self._file(t)
        return True

    # --- planning ---------------------------------------------------------------------------
    def _sim(self, until: float | None) -> tuple[float, int] | None:
        """Serves from ``base_s``: the heap's top and the later arrivals, by priority.

        Without ``until``: the first completion ``(time, xid)``, changing nothing. With
        ``until`` (no later than that completion): serves up to it for real, recording the
        served segments and what each transfer still owes.
        """
        t = self.base_s
        top = self._top()
        future = self._futures()
        active: list[tuple[tuple, int]] = [] if top is None else [(top.key(), top.xid)]
        rem: dict[int, float] = {}
        fi = 0
        while True:
            if not active:
                if fi >= len(future):
                    break
                nxt = future[fi].arrive_s
                if until is not None and nxt >= until:
                    break
                t = nxt
                while fi < len(future) and future[fi].arrive_s <= t:
                    heapq.heappush(active, (future[fi].key(), future[fi].xid))
                    fi += 1
                continue
            xid = active[0][1]
            r = rem.get(xid, self.pending[xid].remaining_s)
            if r < EPS_S:  # below what t + r can resolve: done
                r = 0.0
            nxt_arr = future[fi].arrive_s if fi < len(future) else math.inf
            finish = t + r
            if until is None and finish <= nxt_arr:
                return finish, xid
            stop = min(finish, nxt_arr) if until is None else min(finish, nxt_arr, until)
            if until is not None and stop > t:
                sv = self.pending[xid].served
                if sv and sv[-1][1] == t:  # a commit boundary, not a preemption: one segment
                    sv[-1] = (sv[-1][0], stop)
                else:
                    sv.append((t, stop))
            rem[xid] = r - (stop - t) if finish > stop else 0.0
            t = stop
            if until is not None and t >= until:
                break
            if rem[xid] <= 0:
                heapq.heappop(active)
            while fi < len(future) and future[fi].arrive_s <= t:
                heapq.heappush(active, (future[fi].key(), future[fi].xid))
                fi += 1
        if until is None:
            return None
        for xid, r in rem.items():
            self.pending[xid].remaining_s = max(0.0, r)
        self.base_s = max(self.base_s, until)
        # arrivals now in the past join the heap
        while self._future and self._future[0][0] <= self.base_s:
            arrive, key, xid = self._future.pop(0)
            tr = self.pending.get(xid)
            if tr is not None and tr.key() == key and tr.arrive_s == arrive:
                heapq.heappush(self._heap, (key, xid))
        return None

    def next_due(self) -> tuple[float, int] | None:
        """(completion wall time, transfer id) of the transfer that completes first."""
        if self._plan is None:
            self._plan = self._sim(None) or (math.inf, -1)
        return None if self._plan[1] < 0 else self._plan

    def next_due_s(self) -> float:
        nd = self.next_due()
        return nd[0] if nd else math.inf

    def commit(self, until_s: float) -> None:
        """Serves the queue up to ``until_s``, or up to the next completion if that is sooner
        (a change stamped later than a completion not yet delivered applies at it)."""
        nd = self.next_due()
        if nd is not None:
            until_s = min(until_s, nd[0])
        if until_s <= self.base_s:
            return
        self._sim(until_s)
        self._plan = None

    def pop_due(self, now_s: float) -> Transfer | None:
        """The transfer that completes first, if that is no later than ``now_s``; its
        completion becomes ``base_s``."""
        if len(self.pending) == 1:
            return self._pop_only(now_s)
        nd = self.next_due()
        if nd is None or nd[0] > now_s:
            return None
        done_s, xid = nd
        self.commit(done_s)
        t = self.pending.pop(xid)
        if t.remaining_s > 1e-12:  # the commit ended exactly at its completion
            a = done_s - t.remaining_s
            if t.served and t.served[-1][1] == a:
                t.served[-1] = (t.served[-1][0], done_s)
            else:
                t.served.append((a, done_s))
        t.remaining_s = 0.0
        self._plan = None
        t.done_s = done_s
        return t

    def _pop_only(self, now_s: float) -> Transfer | None:
        """:meth:`pop_due` when one transfer is pending (the usual case between a step's
        traffic and the next): it is served alone from ``max(base, its arrival)``, so its
        completion is known without simulating -- the same segments, stamps and ``base_s``
        as the general path, for a fraction of its cost per message."""
        ((xid, t),) = self.pending.items()
        start = max(self.base_s, t.arrive_s)
        done = start + (t.remaining_s if t.remaining_s >= EPS_S else 0.0)
        self._plan = (done, xid)
        if done > now_s:
            return None
        if done > start:
            sv = t.served
            if sv and sv[-1][1] == start:
                sv[-1] = (sv[-1][0], done)
            else:
                sv.append((start, done))
        del self.pending[xid]
        self._heap.clear()  # every entry left is stale now
        self._future.clear()
        self.base_s = max(self.base_s, done)
        self._plan = None
        t.remaining_s = 0.0
        t.done_s = done
        return t

    def plan(self) -> list[tuple[float, int]]:
        """Every pending transfer's completion if nothing else arrives (for tests; it
        replays :meth:`pop_due` on a copy)."""
        import copy

        twin = copy.deepcopy(self)
        out = []
        while (t := twin.pop_due(math.inf)) is not None:
            out.append((t.done_s, t.xid))
        return out


@dataclass
class LinkStats:
    """What the link measured: bytes and transfers by kind (true sizes), lateness."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    transfers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    step_bytes: dict[int, dict[str, int]] = field(default_factory=dict)  # MoE step -> kind -> bytes
    cancelled: int = 0
    upgraded: int = 0
    delivery_lag_max_s: float = 0.0  # how late a delivery was sent after its completion
    intervals: list[list] = field(default_factory=list)  # [kind, label, start, end, seq]


class HostLink:
    """The link's message handling around a :class:`LinkSchedule` (transport-agnostic).

    ``on_message`` takes a decoded message, ``due`` returns the deliveries whose time has come
    as ``(peer, frames)``. Configured per run by a ``link`` command of kind ``reset`` with
    ``dilation``, ``latency_s``, ``bw_bytes_per_s``, ``prefetch_class``, ``trace_seqs``.
    """

    def __init__(self) -> None:
        self.sched = LinkSchedule()
        self.stats = LinkStats()
        self.dilation = 1.0
        self.latency_s = 0.0
        self.bw = 1.0
        self.prefetch_class = CLASS_PREFETCH
        self.trace_seqs: tuple[int, int] = (0, -1)
        self.bypass = False  # before a run (preload): deliver at once, unthrottled
        self.lookahead_s = 0.0  # deliveries leave this early, stamped with their completion
        self.offset_s = 0.0
        self.shift_s = 0.0  # wall seconds the run was paused for (fault injection)
        self.frozen_s: float | None = None  # the clock's reading while paused, else None
        self.by_pid: dict[int, int] = {}  # the scheduler's transfer id -> the link's
        self.early_upgrades: dict[int, tuple[int, float, int]] = {}  # pid -> (order, at_s, seq)
        self.early_cancels: set[int] = set()
        self._xids = itertools.count(1)

    def reset(self, f: dict[str, Any]) -> None:
        self.sched = LinkSchedule(float(f.get("base_s", wall_now())))
        self.stats = LinkStats()
        self.dilation = float(f["dilation"])
        self.latency_s = float(f["latency_s"])
        self.bw = float(f["bw_bytes_per_s"])
        self.prefetch_class = int(f["prefetch_class"])
        lo, hi = f.get("trace_seqs", [0, -1])
        self.trace_seqs = (int(lo), int(hi))
        self.bypass = bool(f.get("bypass", False))
        self.lookahead_s = float(f.get("lookahead_s", 0.0))
        self.offset_s = float(f.get("offset_s", 0.0))  # this host's clock to the run's timebase
        self.shift_s, self.frozen_s = 0.0, None
        self.by_pid.clear()
        self.early_upgrades.clear()
        self.early_cancels.clear()

    def now(self) -> float:
        """The run's clock: wall time in the run's timebase less the time the run was paused
        (frozen while it is: the scheduler pauses the link with every device while it repairs
        a fault it injected, ``actors.scheduler.World``)."""
        if self.frozen_s is not None:
            return self.frozen_s
        return wall_now() + self.offset_s - self.shift_s

    def next_due_s(self) -> float:
        """When the next delivery is due (``inf`` while paused: none is)."""
        return math.inf if self.frozen_s is not None else self.sched.next_due_s()

    def holdings(self) -> list[list[Any]]:
        """Every transfer on the link: ``[kind, src, dst, seq, pid, windowed]`` (recovery:
        what a restarted unit's predecessor had handed over, what waits to reach it)."""
        return [[t.kind, t.src.decode(), t.dst.decode(), t.seq, t.pid, t.windowed]
                for t in self.sched.pending.values()]

    def service_s(self, true_bytes: int) -> float:
        return self.dilation * (self.latency_s + true_bytes / self.bw)

    def on_message(self, sender: bytes, msg: wire.Message, frames: list[Any]) -> list:
        """Returns immediate replies (``(peer, frames)``); deliveries come from :meth:`due`."""
        f = msg.fields
        if msg.type == "data":
            kind = f["kind"]
            if kind not in KINDS:
                raise ProtocolError(f"link: unknown transfer kind {kind!r}")
            cls = self.prefetch_class if kind == "prefetch" else _CLASS_OF[kind]
            nbytes = int(f["true_bytes"])
            tr = Transfer(next(self._xids), kind, cls, float(f["at_s"]), int(f.get("order", 0)), 0,
                          0.0 if self.bypass else self.service_s(nbytes), nbytes,
                          f["dst"].encode(), list(frames), int(f.get("seq", -1)), src=sender,
                          decoded=msg)
            tr.label = f.get("label", kind)
            tr.windowed = bool(f.get("windowed", False))
            pid = f.get("pid")
            if pid is not None:
                pid = int(pid)
                if pid in self.early_cancels:  # cancelled before it reached the link
                    self.early_cancels.discard(pid)
                    self.stats.cancelled += 1
                    return [_credit(sender)] if f.get("windowed") else []
                tr.pid = pid
                self.by_pid[pid] = tr.xid
                up = self.early_upgrades.pop(pid, None)
                if up is not None:  # upgraded before it reached the link
                    tr.cls, tr.order, tr.seq = CLASS_FETCH, up[0], up[2]
                    tr.upgraded = True
                    tr.arrive_s = max(tr.arrive_s, up[1])
                    self.stats.upgraded += 1
            if self.bypass:
                tr.arrive_s = max(tr.arrive_s, self.sched.base_s)
            self.sched.add(tr)
            return []
        if msg.type == "cmd":
            kind = f["kind"]
            if kind == "pause":  # nothing is served until resume
                if self.frozen_s is None:
                    self.frozen_s = self.now()
                return []
            if kind == "resume":  # the run's total pause, the same for every clock
                self.shift_s, self.frozen_s = float(f["shift_s"]), None
                return []
            at = min(float(f.get("at_s", self.sched.base_s)), self.now())
            if kind == "cancel":
                out = []
                for pid in f["pids"]:
                    x = self.by_pid.pop(int(pid), None)
                    if x is None:
                        self.early_cancels.add(int(pid))
                    elif (t := self.sched.cancel(x, at)) is not None:
                        self.stats.cancelled += 1
                        if t.windowed:
                            out.append(_credit(t.src))
                return out
            if kind == "upgrade":
                seq = int(f.get("seq", -1))  # the step that now waits for it
                for pid, order in f["items"]:
                    x = self.by_pid.get(int(pid))
                    if x is None:  # its weights have not reached the link yet
                        self.early_upgrades[int(pid)] = (int(order), float(f["at_s"]), seq)
                    elif self.sched.upgrade(x, CLASS_FETCH, at, int(order)):
                        self.stats.upgraded += 1
                        self.sched.pending[x].seq = seq
                return []
        raise ProtocolError(f"link: unexpected message {msg.type!r}/{f.get('kind')!r}")

    def due(self, now_s: float) -> list[tuple[bytes, list]]:
        out = []
        while (t := self.sched.pop_due(now_s)) is not None:
            done = t.done_s
            self.stats.delivery_lag_max_s = max(self.stats.delivery_lag_max_s, now_s - done)
            kind = "fetch" if t.upgraded else t.kind
            self.stats.bytes[kind] += t.true_bytes
            self.stats.transfers[kind] += 1
            if t.seq >= 0:
                sb = self.stats.step_bytes.get(t.seq)
                if sb is None:
                    sb = self.stats.step_bytes[t.seq] = dict.fromkeys(KINDS, 0)
                sb[kind] += t.true_bytes
            pid = t.pid
            if pid is not None and self.by_pid.get(pid) == t.xid:
                del self.by_pid[pid]
            if not self.bypass and len(self.stats.intervals) < MAX_INTERVALS:
                for a, b in t.served:  # the run's engine keeps those of the traced steps
                    self.stats.intervals.append([kind, t.label or kind, a, b, t.seq])
            out.append((t.dst, _restamp(t.frames, done, t.decoded)))
            if t.windowed and t.src:
                out.append(_credit(t.src))  # its unit may hand over the next one
        return out

    def report(self) -> dict[str, Any]:
        s = self.stats
        return {"bytes": dict(s.bytes), "transfers": dict(s.transfers),
                "step_bytes": {str(k): v for k, v in s.step_bytes.items()},
                "cancelled": s.cancelled, "upgraded": s.upgraded,
                "late_arrivals": self.sched.late_arrivals,
                "late_total_s": self.sched.late_total_s,
                "delivery_lag_max_s": s.delivery_lag_max_s,
                "pending": len(self.sched.pending), "intervals": s.intervals}


def _credit(unit: bytes) -> tuple[bytes, list]:
    return unit, wire.encode("cmd", {"kind": "credit"})


def _restamp(frames: list[Any], at_s: float, decoded: wire.Message | None = None) -> list:
    """The transfer's message with its delivery stamp (the completion time) as ``at_s``: only
    the header frame is rebuilt (from ``decoded``, its header as received), the payload
    frames go out as they came in."""
    return wire.restamp(frames, {"at_s": at_s}, decoded)


SCHED_NAME = b"sched"
# what each kind of peer may send the link; transfers also by kind and destination
_SCHED_SENDS = frozenset({"task", "cmd", "ping", "shutdown", "error"})
_DEVICE_SENDS = frozenset({"data", "error", "ping"})  # ping: a (re)started device's first word
_SENT_BY_GPU = frozenset({"activation"})  # to a unit
_SENT_BY_UNIT = frozenset({"partial", "fetch", "prefetch"})  # to the GPU


def _is_device(name: bytes) -> bool:
    return name == b"gpu" or (name.startswith(b"ndp") and name[3:].isdigit())


class LinkServer:
    """Serves a :class:`HostLink` on ``transport`` until ``shutdown``.

    Control requests from the scheduler (``task`` of kind ``reset``, ``report``, ``bypass``,
    ``pending``) are answered with a ``result``; the scheduler's ``cmd`` ``pause`` and
    ``resume`` freeze and thaw the link's clock (:meth:`HostLink.now`); a device's ``ping`` is
    answered with a ``pong``; ``data`` and ``cmd`` messages are queued and delivered at
    their completion.

    Only the run's peers are listened to: the scheduler (``sched``: control, commands), the
    GPU (activations to a unit) and the units (partials and weights to the GPU); ``devices``
    names them (default: any ``gpu`` or ``ndp<k>``). A message from anyone else is dropped
    unanswered and recorded in ``refusals``; so nobody else can put a transfer on the link
    or make it deliver one. A malformed message from a known peer (or one that peer may not
    send) is answered with ``error`` and counted (``rejected``, ``malformed``); an ``error``
    is counted and never answered.
    """

    def __init__(self, transport: Transport, *, poll_s: float = 0.05,
                 devices: Any = None) -> None:
        self.tr = transport
        self.link = HostLink()
        self.poll_s = poll_s
        self.devices = None if devices is None else frozenset(devices)
        self.rejected = 0
        self.refusals = Refusals()  # unknown peers, dropped
        self.malformed = Refusals()  # known peers' bad messages, answered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _known_device(self, name: bytes) -> bool:
        return name in self.devices if self.devices is not None else _is_device(name)

    def _check(self, peer: bytes, msg: wire.Message) -> None:
        """Raises ProtocolError unless ``peer`` may send ``msg``."""
        if peer == SCHED_NAME:
            if msg.type not in _SCHED_SENDS:
                raise ProtocolError(f"{msg.type!r} is not a message the scheduler sends the link")
            return
        if msg.type not in _DEVICE_SENDS:
            raise ProtocolError(f"{msg.type!r} is not a message a device sends the link")
        if msg.type != "data":
            return
        f = msg.fields
        kind, dst = f["kind"], f.get("dst")
        dst_b = dst.encode() if isinstance(dst, str) else b""
        gpu = peer == b"gpu"
        if kind not in (_SENT_BY_GPU if gpu else _SENT_BY_UNIT):
            raise ProtocolError(f"{peer.decode()} may not send {kind!r} transfers")
        if not (self._known_device(dst_b) and (dst_b != b"gpu") == gpu):
            raise ProtocolError(f"{peer.decode()} may not send a {kind!r} to {dst!r}")
        nbytes = f.get("true_bytes")
        if type(nbytes) is not int or nbytes < 0:
            raise ProtocolError(f"a transfer needs true_bytes, an int >= 0, got {nbytes!r}")

    def _control(self, peer: bytes, msg: wire.Message) -> None:
        f = msg.fields
        kind = f["kind"]
        arrays: list[np.ndarray] = []
        if kind == "reset":
            self.link.reset(f)
            out: dict[str, Any] = {}
        elif kind == "report":
            out, arrays = {}, [wire.json_array(self.link.report())]
        elif kind == "bypass":
            self.link.bypass = bool(f["on"])
            out = {}
        elif kind == "pending":
            out, arrays = {}, [wire.json_array(self.link.holdings())]
        else:
            raise ProtocolError(f"link: unknown task kind {kind!r}")
        self.tr.send(peer, wire.encode("result", {"task_id": f["task_id"],
                                                  "attempt": f.get("attempt", 1), **out}, arrays))

    def _handle(self, peer: bytes, frames: list) -> bool:
        """One message; True for ``shutdown``."""
        if peer != SCHED_NAME and not self._known_device(peer):
            self.refusals.add(peer, "unknown peer")  # not a peer of this run: no answer
            return False
        try:
            msg = wire.decode(frames, views=False)  # the frames travel on as they are
            self._check(peer, msg)
            if msg.type == "error":
                self.rejected += 1
                self.malformed.add(peer, f"error from the peer: {msg.fields['message'][:120]}")
                return False
            if msg.type == "shutdown":
                return True
            if msg.type == "ping":
                self.tr.send(peer, wire.encode("pong", {"seq": msg.fields["seq"],
                                                        "wall_s": wall_now()}))
            elif msg.type == "task":
                self._control(peer, msg)
            else:
                for p, fr in self.link.on_message(peer, msg, frames):
                    self.tr.send(p, fr)
        except Exception as exc:  # bad input is answered and counted; the link serves on
            self.rejected += 1
            self.malformed.add(peer, f"{type(exc).__name__}: {exc}"[:120])
            err: dict[str, Any] = {"message": f"link: {type(exc).__name__}: {exc}"[:2000]}
            with contextlib.suppress(EmulationError):
                self.tr.send(peer, wire.encode("error", err))
        return False

    def serve(self) -> None:
        while not self._stop.is_set():
            now = self.link.now()
            # a delivery leaves ``lookahead_s`` before its completion, stamped with it: the
            # receiver holds it until then, so the hop to it is absorbed; an arrival inside
            # that window that would have preempted it is counted late instead
            for peer, frames in self.link.due(now + self.link.lookahead_s):
                try:
                    self.tr.send(peer, frames)
                except EmulationError:
                    self.rejected += 1
            nxt = self.link.next_due_s() - self.link.lookahead_s
            wait = min(self.poll_s, max(0.0, nxt - self.link.now()))
            got = self.tr.recv(wait) if wait > 1e-3 else self.tr.recv(0.0)
            if got is None:
                left = nxt - self.link.now()
                if 0 < left <= 1e-3:
                    time.sleep(left)
                continue
            # take what is already here before re-planning, but a bounded batch: a burst of
            # a thousand prefetches must not hold up a delivery that is due
            for _ in range(BATCH):
                if self._handle(*got):
                    self._stop.set()
                    break
                got = self.tr.recv(0.0)
                if got is None:
                    break
            else:
                if got is not None:
                    self._handle(*got)
        self._stop.set()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name="ndpmoe-link", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

