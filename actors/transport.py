"""Transports of the data plane: move lists of frames between named peers, nothing more.

The codec (``actors.wire``) turns messages into frames; a transport moves frames. Both sides
of every exchange use one small interface::

    send(peer, frames)         queue frames for the peer named ``peer`` (bytes)
    recv(timeout_s)            (peer, frames) of the next message, or None after timeout_s
    close()                    idempotent; also via ``with``

A receive timeout returns ``None`` rather than raising: an actor's loop polls with a short
deadline so that it can notice shutdown and send heartbeats, and a quiet interval is normal
there. Where silence *is* a failure, :func:`recv_or_fail` raises
:class:`~cluster.core.errors.EmulationError` naming what was awaited. Every receive has a finite
deadline (DESIGN.md section 9); so has every send (``send_timeout_s``), which otherwise blocks
forever once a dead peer's queue fills.

Implementations:

- :class:`~actors.zmq_transport.ZmqRouter` and :class:`~actors.zmq_transport.ZmqDealer`
  (:mod:`actors.zmq_transport`): the data plane over zmq ROUTER/DEALER sockets;
- :class:`InprocHub` hands out in-process endpoints backed by queues, for tests that are not
  about zmq. Frames are copied to ``bytes`` on send, as on a real wire, so a receiver never
  aliases the sender's arrays.
- :class:`Mux` puts several transports behind one (a device's scheduler and link sockets).

The zmq transports (:class:`~actors.zmq_transport.ZmqRouter`,
:class:`~actors.zmq_transport.ZmqDealer`) live in :mod:`actors.zmq_transport`, their CURVE
security in :mod:`actors.curve`. Every refusal at an endpoint goes into its
:class:`Refusals` (bounded counts by peer and reason), which the run reports in
``summary.json`` (``rejected_peers``).
"""

from __future__ import annotations

import ipaddress
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from cluster.core.errors import EmulationError

Frames = Sequence[Any]
"""A message as frames: ``bytes``, ``memoryview``, ``zmq.Frame`` or any buffer."""


class Transport(Protocol):
    """What actors and the scheduler need from a transport."""

    def send(self, peer: bytes, frames: Frames) -> None:
        """Queue one message for ``peer``; raises EmulationError if it cannot be delivered."""
        ...

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        """The next message and who sent it, or None if none arrives within ``timeout_s``."""
        ...

    def close(self) -> None:
        """Release the endpoint; calling it again does nothing."""
        ...


def recv_or_fail(transport: Transport, timeout_s: float, awaiting: str) -> tuple[bytes, list[Any]]:
    """Like ``transport.recv`` but a timeout raises EmulationError naming what was awaited."""
    got = transport.recv(timeout_s)
    if got is None:
        raise EmulationError(f"no message within {timeout_s:g} s while awaiting {awaiting}")
    return got


def timeout_ms(timeout_s: float) -> int:
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s >= 0):
        raise ValueError(f"timeout_s must be a finite number >= 0, got {timeout_s!r}")
    return math.ceil(timeout_s * 1000)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

def peer_name(peer: Any, limit: int = 100) -> str:
    """A peer identity as printable text for a report (never trusted, never executed)."""
    if isinstance(peer, (bytes, bytearray, memoryview)):
        peer = bytes(peer).decode("ascii", "backslashreplace")
    text = str(peer)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Refusals:
    """What one endpoint refused, counted by (peer, reason); thread-safe and bounded.

    A hostile peer may invent a new identity for every message: past ``MAX_ENTRIES`` distinct
    (peer, reason) pairs the rest are counted under ``(other peers)``.
    """

    MAX_ENTRIES = 64

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.total = 0
        self._lock = threading.Lock()

    def add(self, peer: Any, reason: str) -> None:
        key = (peer_name(peer), reason[:200])
        with self._lock:
            self.total += 1
            if key not in self.counts and len(self.counts) >= self.MAX_ENTRIES:
                key = ("(other peers)", "(not itemised)")
            self.counts[key] = self.counts.get(key, 0) + 1

    def as_list(self, at: str) -> list[dict[str, Any]]:
        """``[{"at", "peer", "reason", "count"}]``, largest count first (plain JSON)."""
        with self._lock:
            items = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [{"at": at, "peer": p, "reason": r, "count": n} for (p, r), n in items]


class InprocHub:
    """Connects in-process endpoints by name through queues; thread-safe."""

    def __init__(self) -> None:
        self._queues: dict[bytes, queue.SimpleQueue] = {}
        self._lock = threading.Lock()

    def endpoint(self, name: bytes) -> InprocEndpoint:
        """A new endpoint that other endpoints of this hub reach as ``name``."""
        if not isinstance(name, bytes) or not name:
            raise ValueError(f"endpoint name must be non-empty bytes, got {name!r}")
        with self._lock:
            if name in self._queues:
                raise EmulationError(f"endpoint {name!r} already exists on this hub")
            self._queues[name] = queue.SimpleQueue()
        return InprocEndpoint(self, name)

    def _deliver(self, sender: bytes, peer: bytes, frames: list[bytes]) -> None:
        with self._lock:
            q = self._queues.get(peer)
        if q is None:
            raise EmulationError(f"no connected peer named {peer!r}")
        q.put((sender, frames))

    def _queue(self, name: bytes) -> queue.SimpleQueue:
        with self._lock:
            return self._queues[name]

    def _remove(self, name: bytes) -> None:
        with self._lock:
            self._queues.pop(name, None)


class InprocEndpoint:
    """One named endpoint of an :class:`InprocHub`; same interface as the zmq transports."""

    def __init__(self, hub: InprocHub, name: bytes) -> None:
        self._hub = hub
        self.name = name
        self._queue = hub._queue(name)
        self._closed = False

    def send(self, peer: bytes, frames: Frames) -> None:
        if self._closed:
            raise EmulationError(f"send to {peer!r} on a closed transport")
        # copy, as a wire does: the receiver must not alias the sender's buffers
        self._hub._deliver(self.name, peer, [bytes(f) for f in frames])

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        if self._closed:
            raise EmulationError("receive on a closed transport")
        timeout_ms(timeout_s)  # same argument check as the zmq transports
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub._remove(self.name)

    def __enter__(self) -> InprocEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Mux:
    """Several transports behind one: ``send`` goes by peer, ``recv`` takes from whichever
    has a message (zmq sockets are polled together; anything else in turn).

    A device talks to the scheduler on one socket and to the link on another; ``routes``
    maps a peer to the transport that reaches it, and ``default`` takes every other peer. A
    message that arrives on one member under the name of a peer routed to another (a dealer
    calling itself ``link`` on the scheduler's router) is dropped and recorded in
    ``refusals``: names are only believed on the socket they belong to.
    """

    def __init__(self, default: Transport, routes: dict[bytes, Transport]) -> None:
        self.default, self.routes = default, dict(routes)
        self.members = [default, *(t for t in self.routes.values() if t is not default)]
        self.refusals = Refusals()
        socks = [getattr(t, "socket", None) for t in self.members]
        self._poller = None
        if all(s is not None for s in socks):
            self._poller = zmq.Poller()
            for s in socks:
                self._poller.register(s, zmq.POLLIN)
            self._by_sock = dict(zip(socks, self.members))

    def send(self, peer: bytes, frames: Frames) -> None:
        self.routes.get(peer, self.default).send(peer, frames)

    def _take(self, t: Transport) -> tuple[bytes, list[Any]] | bool | None:
        """The next message waiting on member ``t``; False if it was a spoof (dropped)."""
        got = t.recv(0.0)
        if got is not None and self.routes.get(got[0], self.default) is not t:
            self.refusals.add(got[0], "the name of a peer that speaks on another socket")
            return False
        return got

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for t in self.members:  # whatever is already there, without waiting
                while (got := self._take(t)) is False:
                    pass
                if got is not None:
                    return got
            left = deadline - time.monotonic()
            if timeout_s <= 0 or left <= 0:
                return None
            if self._poller is not None:
                self._poller.poll(timeout_ms(left))
            else:
                time.sleep(min(1e-4, left))

    def close(self) -> None:
        for t in self.members:
            t.close()
