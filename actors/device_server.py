"""The loop that serves one device on a transport (:class:`DeviceServer`): it runs the device's
program, answers its control requests (idempotent by task id), acknowledges and orders the
scheduler's numbered commands, beats its heartbeat and greets when it (re)starts
(DESIGN.md section 9; see :mod:`actors.devices`)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from actors import wire
from actors.clock import wall_now
from actors.devices import Device
from actors.peers import LINK_PEER, SCHED_PEER
from actors.transport import Refusals, Transport
from cluster.core.errors import EmulationError, ProtocolError

HEARTBEAT_INTERVAL_S = 1.0
REPLY_CACHE = 32  # replies kept for retried task ids: retries concern the last few tasks only
SPIN_FREE_S = 1e-3  # a hold closer than this is slept out with time.sleep, not polled


# who may tell a device what: the scheduler commands it, the link delivers transfers (and
# credits them); an ``error`` is a peer's answer to something this device sent: counted,
# never answered
DEVICE_PEERS: dict[bytes, frozenset[str]] = {
    SCHED_PEER: frozenset({"task", "cmd", "ping", "shutdown", "error"}),
    LINK_PEER: frozenset({"data", "cmd", "error"}),  # transfers, and credits for them
}


class DeviceServer:
    """Serves one device (or the link's twin loop) on a transport until ``shutdown``.

    Only ``peers`` (name -> message types it may send; default :data:`DEVICE_PEERS`) are
    listened to: a message from anyone else is dropped unanswered and recorded in
    ``refusals``. A malformed message from a known peer, or one of a type that peer may not
    send, is answered with an ``error`` and counted (``rejected``, ``malformed``); an
    ``error`` itself is counted and never answered (two sides never trade errors forever).
    The server keeps serving (DESIGN.md section 9). Runs in the caller's thread
    (:meth:`serve`) or a background thread (:meth:`start`).

    - Idempotent by task id: a ``task`` whose id was already answered gets the cached reply.
    - ``heartbeat``: a transport of its own (zmq sockets are not thread-safe) on which a thread
      sends ``hello`` every ``heartbeat_interval_s`` with ``peer``, ``seq`` and
      ``incarnation``; the scheduler declares a device dead when these stop.
    - ``announce_to``: the peer to greet with ``hello`` on the main transport when serving
      starts, so that a restarted device's connection is known to be up.
    - ``on_die``: what an injected ``die`` task does (a Ray host exits the process); without
      it ``die`` is rejected like any unknown request.
    """

    def __init__(self, device: Device, transport: Transport, poll_s: float = 0.05,
                 *, name: str = "", heartbeat: Transport | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, incarnation: int = 0,
                 announce_to: bytes | None = None, on_die: Callable[[], None] | None = None,
                 peers: dict[bytes, frozenset[str]] | None = None) -> None:
        self.device = device
        self.peers = DEVICE_PEERS if peers is None else peers
        self.refusals = Refusals()  # unknown peers, dropped
        self.malformed = Refusals()  # known peers' bad messages, answered
        self.transport = transport
        self.poll_s = poll_s
        self.name = name or device.name
        self.heartbeat = heartbeat
        self.heartbeat_interval_s = heartbeat_interval_s
        self.incarnation = incarnation
        self.announce_to = announce_to
        self.on_die = on_die
        self.rejected = 0
        self.handled = 0
        self.replayed = 0
        self.beats = 0
        self._replies: OrderedDict[int, list] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None

    def _hello(self, seq: int) -> list:
        return wire.encode("hello", {"peer": self.name, "seq": seq, "incarnation": self.incarnation})

    def _die(self) -> None:
        self._stop.set()
        if self.on_die is not None:
            self.on_die()

    def _flush(self) -> None:
        dev = self.device
        while dev.out:
            peer, frames = dev.out.pop(0)
            try:
                self.transport.send(peer, frames)
            except EmulationError:
                self.rejected += 1

    def serve(self) -> None:
        if self.announce_to is not None:
            try:
                self.transport.send(self.announce_to, self._hello(0))
            except EmulationError:
                self.rejected += 1
        dev = self.device
        while not self._stop.is_set():
            wait = dev.next_wake_s() - dev.now()
            if wait > SPIN_FREE_S:
                got = self.transport.recv(min(self.poll_s, wait - SPIN_FREE_S))
            else:
                got = self.transport.recv(0.0)
                if got is None and wait > 0:
                    time.sleep(wait)
            while got is not None:  # everything already here, then the program
                self._handle(*got)
                if self._stop.is_set():
                    break
                got = self.transport.recv(0.0)
            dev.advance()
            self._flush()
        self._stop.set()

    def _handle(self, peer: bytes, frames: list) -> None:
        allowed = self.peers.get(peer)
        if allowed is None:  # not a peer of this run: not even an answer
            self.refusals.add(peer, "unknown peer")
            return
        tid = None
        try:
            msg = wire.decode(frames)
            if msg.type not in allowed:
                raise ProtocolError(f"{msg.type!r} is not a message {peer.decode()} sends")
            if msg.type == "error":
                self.malformed.add(peer, f"error from the peer: {msg.fields['message'][:120]}")
                self.rejected += 1
                return
            if msg.type == "shutdown":
                self._stop.set()
                return
            if msg.type == "ping":
                self.transport.send(peer, wire.encode("pong", {"seq": msg.fields["seq"],
                                                               "wall_s": wall_now()}))
                return
            if msg.type == "cmd" and peer == SCHED_PEER:
                self._command(peer, msg)
                self.handled += 1
                return
            if msg.type in ("cmd", "data"):
                self.device.on_message(peer, msg)
                self.handled += 1
                return
            if msg.type != "task":
                raise ProtocolError(f"unexpected message type {msg.type!r}")
            tid = msg.fields["task_id"]
            if msg.fields["kind"] == "die" and self.on_die is not None:
                self._die()
                return
            reply = self._replies.get(tid)
            if reply is not None:
                self.replayed += 1
            else:
                reply = self.device.handle(msg)
                self._replies[tid] = reply
                if len(self._replies) > REPLY_CACHE:
                    self._replies.popitem(last=False)
        except Exception as exc:  # any bad request is answered and counted; the device serves on
            self.rejected += 1
            self.malformed.add(peer, f"{type(exc).__name__}: {exc}"[:120])
            err = {"message": f"{self.name}: {type(exc).__name__}: {exc}"[:2000]}
            if isinstance(tid, int) and not isinstance(tid, bool):
                err["task_id"] = tid
            reply = wire.encode("error", err)
        self.handled += 1
        try:
            self.transport.send(peer, reply)
        except EmulationError:
            self.rejected += 1

    def _command(self, peer: bytes, msg: wire.Message) -> None:
        """A ``cmd`` from the scheduler. ``pause`` and ``resume`` act at once (the run's clock,
        :meth:`Device.pause`). A command with a sequence number ``cseq`` (the scheduler numbers
        its commands when it injects drops) is acknowledged at once with an ``event`` ``ack``
        and applied in number order: one that comes early waits for those before it, a copy of
        one already here (a retry whose first send did arrive) is counted and ignored."""
        dev = self.device
        f = msg.fields
        kind = f["kind"]
        if kind == "pause":
            dev.pause()
            return
        if kind == "resume":
            shift = f.get("shift_s")
            if not isinstance(shift, (int, float)) or isinstance(shift, bool):
                raise ProtocolError("resume needs shift_s, a number")
            dev.resume(float(shift))
            return
        c = f.get("cseq")
        if c is None:
            dev.on_message(peer, msg)
            return
        if type(c) is not int or c < 1:
            raise ProtocolError(f"cseq must be an int >= 1, got {c!r}")
        self.transport.send(peer, wire.encode("event", {"kind": "ack", "cseq": c}))
        if c < dev.cmd_next or c in dev.cmd_held:
            dev.cmd_duplicates += 1
            return
        dev.cmd_held[c] = msg
        error: Exception | None = None
        while dev.cmd_next in dev.cmd_held:
            m = dev.cmd_held.pop(dev.cmd_next)
            dev.cmd_next += 1
            try:
                dev.on_message(peer, m)
            except Exception as exc:  # the rest still apply; the first error is answered
                error = error or exc
        if error is not None:
            raise error

    def _beat(self) -> None:
        seq = 0
        while True:
            seq += 1
            try:
                self.heartbeat.send(self.announce_to or SCHED_PEER, self._hello(seq))
                self.beats += 1
            except EmulationError:
                pass
            if self._stop.wait(self.heartbeat_interval_s):
                return

    def start(self) -> threading.Thread:
        if self.heartbeat is not None:
            self._beat_thread = threading.Thread(target=self._beat, name=f"ndpmoe-hb-{self.name}",
                                                 daemon=True)
            self._beat_thread.start()
        self._thread = threading.Thread(target=self.serve, name=f"ndpmoe-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._beat_thread is not None:
            self._beat_thread.join(timeout_s)
