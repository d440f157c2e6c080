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

Security (DESIGN.md section 9): a router binds loopback only in a local run (:meth:`ZmqRouter.bind`).
Optionally (``emulate.curve``) the data plane is authenticated and encrypted with CURVE: the
router is a CURVE server with its own :class:`CurveKeys` and lets in only the client public keys
it was given (a ZAP authenticator thread on its context; a handshake with any other key, or with
no key, fails before a single message is delivered), and each dealer presents its own keypair
and the server's public key. Each client key is also bound to the identities it may use (a
device's ``name`` and ``name.hb``): a message whose identity does not belong to the key that
authenticated its connection is dropped and counted (:attr:`ZmqRouter.impostors`). Keys are
never sent over zmq; the launcher hands them out through Ray (:mod:`cluster.launch`). Without
``curve`` nothing of this runs and the sockets are exactly as before.
"""

from __future__ import annotations

import ipaddress
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from zmq.utils import z85

from cluster.errors import EmulationError

Frames = Sequence[Any]
"""A message as frames: ``bytes``, ``memoryview``, ``zmq.Frame`` or any buffer."""

DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_HWM = 1000
ZAP_BIND_WAIT_S = 1.0  # a CURVE router waits this long for its context's ZAP name to be free


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


def require_curve() -> None:
    """Raises EmulationError unless this libzmq supports CURVE (``zmq.has("curve")``)."""
    if not zmq.has("curve"):
        raise EmulationError(
            f"CURVE authentication (emulate.curve) is on, but this libzmq {zmq.zmq_version()} "
            f"(pyzmq {zmq.__version__}) was built without it: zmq.has('curve') is False. Install "
            "a pyzmq wheel (it bundles a libzmq with CURVE) or turn emulate.curve off")


def _z85_key(value: Any, what: str) -> bytes:
    """A CURVE key as its 40-character Z85 text; never echoes the value (it may be a secret)."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 CURVE key "
                         f"(as zmq.curve_keypair() makes), got {type(value).__name__}")
    try:
        z85.decode(value)
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{what} is not valid Z85 text") from exc
    return value


@dataclass(frozen=True, repr=False)
class CurveKeys:
    """One CURVE keypair, Z85-encoded (40 bytes each). ``repr`` never shows the secret."""

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", _z85_key(self.public, "CURVE public key"))
        object.__setattr__(self, "secret", _z85_key(self.secret, "CURVE secret key"))
        if zmq.has("curve") and zmq.curve_public(self.secret) != self.public:
            raise ValueError("CURVE public key does not belong to the secret key")

    @classmethod
    def generate(cls) -> CurveKeys:
        """A fresh keypair (``zmq.curve_keypair()``); EmulationError without CURVE support."""
        require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:
        return f"CurveKeys(public={self.public!r}, secret=<hidden>)"


class _KnownClients:
    """ZAP credentials provider: lets a CURVE client in only if its public key is known.

    ``callback`` runs on the authenticator's thread; ``denied`` counts refused handshakes.
    """

    def __init__(self, keys: Iterable[bytes]) -> None:
        self.keys = frozenset(keys)
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            self.denied += 1
        return ok


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
        self._auth: Any = None  # a router's ZAP authenticator (CURVE only)

    def _fail_init(self) -> None:
        """Undo a half-done constructor (its caller re-raises): close what was made."""
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._ctx.destroy(linger=0)

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
        if self._auth is not None:  # after the socket: no connection is ever let in unchecked
            self._auth.stop()
            self._auth = None
        if self._own_context:
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ZmqRouter(_ZmqSocket):
    """A bound ROUTER socket; peers are the identities of the dealers connected to it.

    With ``curve`` (the router's keypair) it is a CURVE server that admits only the client
    public keys in ``clients``, each mapped to the identities that key may use, e.g.
    ``{ndp0_keys.public: [b"ndp0", b"ndp0.hb"]}``. A ZAP authenticator thread runs on the
    router's context from construction (before any bind) until :meth:`close`; a context holds
    one ZAP handler, so two CURVE routers cannot share a context. ``denied`` counts refused
    CURVE handshakes, ``impostors`` messages dropped for using an identity their key may not.
    """

    def __init__(
        self,
        context: zmq.Context | None = None,
        *,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        hwm: int = DEFAULT_HWM,
        curve: CurveKeys | None = None,
        clients: Mapping[bytes, Iterable[bytes]] | None = None,
    ) -> None:
        self._bound: dict[str, frozenset[bytes]] | None = None  # User-Id -> identities (CURVE)
        self._known: _KnownClients | None = None
        self.impostors = 0
        if curve is None:
            if clients is not None:
                raise ValueError("clients are CURVE client keys: give the router's curve keys too")
        else:
            require_curve()
            if not isinstance(curve, CurveKeys):
                raise TypeError(f"curve must be CurveKeys, got {type(curve).__name__}")
            if not clients:
                raise ValueError("a CURVE router needs clients: {client public key: identities}")
            bound = {}
            for key, ids in clients.items():
                ids = frozenset(ids)
                if not ids or not all(isinstance(i, bytes) and i for i in ids):
                    raise ValueError("each CURVE client needs non-empty bytes identities")
                bound[_z85_key(key, "CURVE client public key").decode("ascii")] = ids
            self._bound = bound
        super().__init__(zmq.ROUTER, context, send_timeout_s, hwm)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if curve is not None:
                self._start_curve(curve)
        except BaseException:
            self._fail_init()
            raise
        self.endpoint: str | None = None

    def _start_curve(self, curve: CurveKeys) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self._sock.curve_secretkey = curve.secret
        self._sock.curve_publickey = curve.public
        self._sock.curve_server = True
        self._known = _KnownClients(k.encode("ascii") for k in self._bound)
        # zmq frees a closed socket's inproc name a moment later, so the ZAP name of a router
        # just closed on a shared context may still be taken: try again for a short while
        deadline = time.monotonic() + ZAP_BIND_WAIT_S
        while True:
            auth = ThreadAuthenticator(self._ctx)
            auth.pipe_endpoint = f"inproc://ndpmoe-zap-pipe-{uuid.uuid4().hex}"  # never reused
            auth.configure_curve_callback(domain="*", credentials_provider=self._known)
            try:
                auth.start()
                break
            except zmq.ZMQError as exc:
                auth.stop()  # closes the ZAP socket it made
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise EmulationError(f"cannot start the CURVE authenticator: {exc} "
                                         "(one CURVE router per zmq context)") from exc
                time.sleep(0.005)
        self._auth = auth

    @property
    def denied(self) -> int:
        """CURVE handshakes refused because the client's key is unknown (0 without CURVE)."""
        return 0 if self._known is None else self._known.denied

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
        got = self._recv_frames(timeout_s) if self._bound is None else self._recv_vetted(timeout_s)
        if got is None:
            return None
        if len(got) < 2:  # a ROUTER always prepends the identity; an empty message is noise
            return (got[0].bytes, [])
        return (got[0].bytes, got[1:])


    def _key_owns(self, ident: zmq.Frame) -> bool:
        """Whether the CURVE key that authenticated this message may use its identity."""
        try:
            uid = ident.get("User-Id")
        except zmq.ZMQError:  # no metadata: not an authenticated connection
            uid = None
        if ident.bytes in self._bound.get(uid, ()):
            return True
        self.impostors += 1
        return False

    def _recv_vetted(self, timeout_s: float) -> list[zmq.Frame] | None:
        """Like ``_recv_frames``, skipping messages whose key may not use their identity."""
        _timeout_ms(timeout_s)  # the same argument check, before any arithmetic on it
        deadline = time.monotonic() + timeout_s
        while True:
            got = self._recv_frames(max(0.0, deadline - time.monotonic()))
            if got is None or self._key_owns(got[0]):
                return got


class ZmqDealer(_ZmqSocket):
    """A DEALER with identity ``identity`` connected to one router, its only peer.

    With ``curve`` (this client's keypair) and ``server_key`` (the router's public key) it is a
    CURVE client: its connection is encrypted, and a router that does not know its key refuses
    it (messages then wait in the queue, and sends time out once it is full).
    """

    def __init__(
        self,
        identity: bytes,
        context: zmq.Context | None = None,
        *,
        router_id: bytes = b"router",
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        hwm: int = DEFAULT_HWM,
        curve: CurveKeys | None = None,
        server_key: bytes | None = None,
    ) -> None:
        if not isinstance(identity, bytes) or not identity or identity.startswith(b"\0"):
            # zmq reserves identities starting with a zero byte for generated ones
            raise ValueError(
                f"identity must be non-empty bytes not starting with 0, got {identity!r}"
            )
        if (curve is None) != (server_key is None):
            raise ValueError("a CURVE dealer needs both its own keys (curve) and server_key")
        if curve is not None:
            require_curve()
            if not isinstance(curve, CurveKeys):
                raise TypeError(f"curve must be CurveKeys, got {type(curve).__name__}")
            server_key = _z85_key(server_key, "CURVE server public key")
        super().__init__(zmq.DEALER, context, send_timeout_s, hwm)
        try:
            self._sock.setsockopt(zmq.IDENTITY, identity)
            if curve is not None:
                self._sock.curve_serverkey = server_key
                self._sock.curve_publickey = curve.public
                self._sock.curve_secretkey = curve.secret
        except BaseException:
            self._fail_init()
            raise
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


class Mux:
    """Several transports behind one: ``send`` goes by peer, ``recv`` takes from whichever
    has a message (zmq sockets are polled together; anything else in turn).

    A device talks to the scheduler on one socket and to the link on another; ``routes``
    maps a peer to the transport that reaches it, and ``default`` takes every other peer.
    """

    def __init__(self, default: Transport, routes: dict[bytes, Transport]) -> None:
        self.default, self.routes = default, dict(routes)
        self.members = [default, *(t for t in self.routes.values() if t is not default)]
        socks = [getattr(t, "socket", None) for t in self.members]
        self._poller = None
        if all(s is not None for s in socks):
            self._poller = zmq.Poller()
            for s in socks:
                self._poller.register(s, zmq.POLLIN)
            self._by_sock = dict(zip(socks, self.members))

    def send(self, peer: bytes, frames: Frames) -> None:
        self.routes.get(peer, self.default).send(peer, frames)

    def recv(self, timeout_s: float) -> tuple[bytes, list[Any]] | None:
        for t in self.members:  # whatever is already there, without waiting
            got = t.recv(0.0)
            if got is not None:
                return got
        if timeout_s <= 0:
            return None
        if self._poller is not None:
            ready = dict(self._poller.poll(_timeout_ms(timeout_s)))
            for s, t in self._by_sock.items():
                if s in ready:
                    got = t.recv(0.0)
                    if got is not None:
                        return got
            return None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t in self.members:
                got = t.recv(0.0)
                if got is not None:
                    return got
            time.sleep(min(1e-4, max(0.0, deadline - time.monotonic())))
        return None

    def close(self) -> None:
        for t in self.members:
            t.close()
