"""Transports of the data plane: move lists of frames between named peers, nothing more.

The codec (``actors.wire``) turns messages into frames; a transport moves frames. Both sides
of every exchange use one small interface::

    send(peer, frames)         queue frames for the peer named ``peer`` (bytes)
    recv(timeout_s)            (peer, frames) of the next message, or None after timeout_s
    close()                    idempotent; also via ``with``

A receive timeout returns ``None`` rather than raising: an actor's loop polls with a short
deadline so that it can notice shutdown and send heartbeats, and a quiet interval is normal
there. Where silence *is* a failure, :func:`recv_or_fail` raises
:class:`~cluster.errors.EmulationError` naming what was awaited. Every receive has a finite
deadline (DESIGN.md section 9); so has every send (``send_timeout_s``), which otherwise blocks
forever once a dead peer's queue fills.

Implementations:

- :class:`ZmqRouter` binds a ROUTER socket; peers are the identities of the dealers that
  connected to it. An unknown peer raises (``ROUTER_MANDATORY``) instead of the silent drop
  zmq does by default, and a restarted actor that reconnects with its old identity takes it
  over (``ROUTER_HANDOVER``). A router learns a dealer's identity only once its connection is
  up, so a dealer speaks first (a ``hello``) and the router sends to it after hearing it.
- :class:`ZmqDealer` connects a DEALER with an identity to one router; its only peer is that
  router, named ``router_id`` (default ``b"router"``) on both ``send`` and ``recv``.
- :class:`InprocHub` hands out in-process endpoints backed by queues, for tests that are not
  about zmq. Frames are copied to ``bytes`` on send, as on a real wire, so a receiver never
  aliases the sender's arrays.

zmq sockets are sent from with ``copy=False`` (pyzmq copies frames under
``zmq.COPY_THRESHOLD`` itself, where that is cheaper) and received with ``copy=False``, so
``recv`` returns ``zmq.Frame`` objects that ``wire.decode`` views without copying. A zmq
transport must be used from one thread only. Sockets close with linger 0; a context the
transport created is terminated on close, which ends its I/O threads.
"""

from __future__ import annotations

import ipaddress
import math
import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from cluster.errors import EmulationError

Frames = Sequence[Any]
"""A message as frames: ``bytes``, ``memoryview``, ``zmq.Frame`` or any buffer."""

DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_HWM = 1000


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


def _timeout_ms(timeout_s: float) -> int:
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


class _ZmqSocket:
    """Shared plumbing of the two zmq transports: options, timeouts, errors, close."""

    def __init__(
        self,
        kind: int,
        context: zmq.Context | None,
        send_timeout_s: float,
        hwm: int,
    ) -> None:
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        try:
            self._sock = self._ctx.socket(kind)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SNDHWM, hwm)
            self._sock.setsockopt(zmq.RCVHWM, hwm)
            self._sock.setsockopt(zmq.SNDTIMEO, _timeout_ms(send_timeout_s))
        except BaseException:
            if self._own_context:
                self._ctx.destroy(linger=0)
            raise
        self._rcvtimeo = -2  # not yet set; the socket default is -1 (forever), never used
        self._closed = False

    @property
    def socket(self) -> zmq.Socket:
        """The underlying socket, for a poller; do not send or receive on it directly."""
        return self._sock

    def _recv_frames(self, timeout_s: float) -> list[zmq.Frame] | None:
        if self._closed:
            raise EmulationError("receive on a closed transport")
        ms = _timeout_ms(timeout_s)
        if ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            return self._sock.recv_multipart(copy=False)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise EmulationError(f"zmq receive failed: {exc}") from exc

    def _send_frames(self, frames: Frames, who: str) -> None:
        if self._closed:
            raise EmulationError(f"send to {who} on a closed transport")
        try:
            self._sock.send_multipart(frames, copy=False)
        except zmq.Again as exc:
            raise EmulationError(f"send to {who} timed out: its queue is full") from exc
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise EmulationError(f"no connected peer named {who}") from exc
            raise EmulationError(f"zmq send to {who} failed: {exc}") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        if self._own_context:
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ZmqRouter(_ZmqSocket):
    """A bound ROUTER socket; peers are the identities of the dealers connected to it."""

    def __init__(
        self,
        context: zmq.Context | None = None,
        *,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        super().__init__(zmq.ROUTER, context, send_timeout_s, hwm)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.endpoint: str | None = None

    def bind(self, host: str = "127.0.0.1", port: int = 0, *, local: bool = True) -> str:
        """Bind on ``host:port`` (0: any free port) and return the real ``tcp://`` endpoint.

        With ``local`` (runs on one machine) only a loopback host is allowed, so that a local run
        is never reachable from the network.
        """
        if local and not is_loopback(host):
            raise EmulationError(f"a local run binds loopback only, not {host!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise EmulationError(f"port must be in 0..65535, got {port!r}")
        bare = host.strip("[]")
        if ":" in bare:
            self._sock.setsockopt(zmq.IPV6, 1)
            bare = f"[{bare}]"
        try:
            self._sock.bind(f"tcp://{bare}:{port or '*'}")
        except zmq.ZMQError as exc:
            raise EmulationError(f"cannot bind {host}:{port}: {exc}") from exc
        last = self._sock.getsockopt(zmq.LAST_ENDPOINT)
        self.endpoint = last.decode() if isinstance(last, bytes) else str(last)
        return self.endpoint

    def send(self, peer: bytes, frames: Frames) -> None:
        self._send_frames([peer, *frames], repr(peer))

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        got = self._recv_frames(timeout_s)
        if got is None:
            return None
        if len(got) < 2:  # a ROUTER always prepends the identity; an empty message is noise
            return (got[0].bytes, [])
        return (got[0].bytes, got[1:])


class ZmqDealer(_ZmqSocket):
    """A DEALER with identity ``identity`` connected to one router, its only peer."""

    def __init__(
        self,
        identity: bytes,
        context: zmq.Context | None = None,
        *,
        router_id: bytes = b"router",
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        hwm: int = DEFAULT_HWM,
    ) -> None:
        if not isinstance(identity, bytes) or not identity or identity.startswith(b"\0"):
            # zmq reserves identities starting with a zero byte for generated ones
            raise ValueError(
                f"identity must be non-empty bytes not starting with 0, got {identity!r}"
            )
        super().__init__(zmq.DEALER, context, send_timeout_s, hwm)
        self._sock.setsockopt(zmq.IDENTITY, identity)
        self.identity = identity
        self.router_id = router_id

    def connect(self, endpoint: str) -> None:
        """Connect to a router's endpoint (as returned by :meth:`ZmqRouter.bind`)."""
        if "[" in endpoint:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise EmulationError(f"cannot connect to {endpoint}: {exc}") from exc

    def send(self, peer: bytes | None, frames: Frames) -> None:
        if peer is not None and peer != self.router_id:
            raise EmulationError(
                f"dealer {self.identity!r} can only reach {self.router_id!r}, not {peer!r}"
            )
        self._send_frames(frames, repr(self.router_id))

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        got = self._recv_frames(timeout_s)
        return None if got is None else (self.router_id, got)


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
        _timeout_ms(timeout_s)  # same argument check as the zmq transports
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
