"""The host link: one shared, throttled resource that every byte between GPU and units crosses.

The link plays PCIe between the GPU and the NDP-DIMMs. Devices hand it ``data`` messages
(activations to a unit, partial outputs to the GPU, expert weights shipped by the unit that
holds them); it delivers each one to its destination once the modelled transfer is over, in
wall-clock time: a transfer of ``true_bytes`` takes ``D x (latency + true_bytes / bw)`` of
link service. Nothing else computes when a transfer ends.

Its service discipline (priority classes, arrival by stamp, exact preemption) is written out
once, in :mod:`actors.link_schedule`.

:class:`LinkSchedule` (:mod:`actors.link_schedule`) is the pure queueing core (wall seconds
in, completion times out; the tests drive it directly); :class:`HostLink` handles the link's
messages around it and :class:`LinkServer` runs it on a transport and a real clock.
Stamps are wall seconds in the run's reference timebase (the scheduler's clock; devices on
other hosts correct by their measured offset).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.link_schedule import (
    CLASS_FETCH,
    CLASS_OF,
    CLASS_PREFETCH,
    KINDS,
    LinkSchedule,
    Transfer,
)
from actors.peers import GPU_PEER, SCHED_PEER, is_device
from actors.transport import Refusals, Transport
from cluster.core.errors import EmulationError, ProtocolError

MAX_INTERVALS = 100_000  # served segments kept for the trace, per run
BATCH = 16  # messages the link takes in between two looks at what is due


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
        a fault it injected, ``actors.world.World``)."""
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
            cls = self.prefetch_class if kind == "prefetch" else CLASS_OF[kind]
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
                "pending": len(self.sched.pending), "pending_kinds": self._pending_kinds(),
                "intervals": s.intervals}

    def _pending_kinds(self) -> dict[str, int]:
        """Transfers still on the link, by kind (upgraded prefetches count as fetches). At the
        end of a run only prefetches may be left: every other transfer is one the run waited
        for, but a prefetch issued for a token that is never generated need not have landed."""
        out = dict.fromkeys(KINDS, 0)
        for t in self.sched.pending.values():
            out["fetch" if t.upgraded else t.kind] += 1
        return out


def _credit(unit: bytes) -> tuple[bytes, list]:
    return unit, wire.encode("cmd", {"kind": "credit"})


def _restamp(frames: list[Any], at_s: float, decoded: wire.Message | None = None) -> list:
    """The transfer's message with its delivery stamp (the completion time) as ``at_s``: only
    the header frame is rebuilt (from ``decoded``, its header as received), the payload
    frames go out as they came in."""
    return wire.restamp(frames, {"at_s": at_s}, decoded)


# what each kind of peer may send the link; transfers also by kind and destination
_SCHED_SENDS = frozenset({"task", "cmd", "ping", "shutdown", "error"})
_DEVICE_SENDS = frozenset({"data", "error", "ping"})  # ping: a (re)started device's first word
_SENT_BY_GPU = frozenset({"activation"})  # to a unit
_SENT_BY_UNIT = frozenset({"partial", "fetch", "prefetch"})  # to the GPU


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
        return name in self.devices if self.devices is not None else is_device(name)

    def _check(self, peer: bytes, msg: wire.Message) -> None:
        """Raises ProtocolError unless ``peer`` may send ``msg``."""
        if peer == SCHED_PEER:
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
        gpu = peer == GPU_PEER
        if kind not in (_SENT_BY_GPU if gpu else _SENT_BY_UNIT):
            raise ProtocolError(f"{peer.decode()} may not send {kind!r} transfers")
        if not (self._known_device(dst_b) and (dst_b != GPU_PEER) == gpu):
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
        if peer != SCHED_PEER and not self._known_device(peer):
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
