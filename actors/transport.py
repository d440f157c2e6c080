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
``zmq.COPY_THRESHOLD`` itself, where that is cheaper; small ``bytes`` frames such as identities
and headers are sent with ``copy=True``, which skips pyzmq's Frame object), and received with
``copy=False``, so
``recv`` returns ``zmq.Frame`` objects that ``wire.decode`` views without copying. A zmq
transport must be used from one thread only. Sockets close with linger 0; a context the
transport created is terminated on close, which ends its I/O threads.

Security (DESIGN.md section 9): a router binds loopback only in a local run (:meth:`ZmqRouter.bind`).
With ``curve`` (``emulate.curve``, on by default) the data plane is authenticated and encrypted
with CURVE: the router is a CURVE server with its own :class:`CurveKeys` and lets in only the
client public keys it was given. Its gatekeeper thread (:class:`_Gatekeeper`) answers the
context's ZAP requests (RFC 27) and watches the socket's failed handshakes, so every refusal is
recorded with what is known of the peer (its key and address for an unknown key; the zmq
protocol error for a peer without CURVE, with a wrong server key, or speaking garbage): a
handshake with any other key, or with no key, fails before a single message is delivered. Each
dealer presents its own keypair and the server's public key. Each client key is also bound to
the identities it may use (a device's ``name`` and ``name.hb``): a message whose identity does
not belong to the key that authenticated its connection is dropped and recorded. Keys are
never sent over zmq; the launcher hands them out through Ray (:mod:`cluster.engines.launch`).

A router takes a second connection with an identity already connected (``ROUTER_HANDOVER``)
only when asked (``handover``, for a restarted device under ``emulate.recover``); otherwise zmq
refuses the newcomer, so nobody can take over a live device's identity and receive its commands.
Every refusal at an endpoint goes into its :class:`Refusals` (bounded counts by peer and
reason), which the run reports in ``summary.json`` (``rejected_peers``).
"""

from __future__ import annotations

import contextlib
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
from zmq.utils.monitor import recv_monitor_message

from cluster.core.errors import EmulationError

Frames = Sequence[Any]
"""A message as frames: ``bytes``, ``memoryview``, ``zmq.Frame`` or any buffer."""

DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_HWM = 1000
_COPY_BELOW = 64 * 1024  # bytes frames shorter than this are sent with copy=True
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


_HANDSHAKE_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):].lower().replace("_", " ")
                     for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # RFC 27: where libzmq sends a context's ZAP requests


class _Gatekeeper:
    """A CURVE router's ZAP handler (RFC 27) and handshake watcher, on one thread of its own.

    ZAP: a CURVE client is let in only if its public key is in ``keys`` (the reply's User-Id is
    the Z85 key, which :meth:`ZmqRouter._key_owns` reads back); any other key, or another
    mechanism, is refused and recorded with the key and the client's address. The socket's
    monitor reports handshakes that fail before ZAP is asked (a peer without CURVE, a wrong
    server key, bytes that are not ZMTP): recorded with the protocol error, as zmq does not
    tell who the peer was. ``denied`` counts the ZAP refusals.
    """

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, keys: frozenset[str],
                 refusals: Refusals) -> None:
        self.keys, self.refusals = keys, refusals
        self.denied = 0
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        # zmq frees a closed socket's inproc name a moment later, so the ZAP name of a router
        # just closed on a shared context may still be taken: try again for a short while
        deadline = time.monotonic() + ZAP_BIND_WAIT_S
        while True:
            try:
                self.zap.bind(ZAP_ENDPOINT)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    self.zap.close(linger=0)
                    raise EmulationError(f"cannot start the CURVE authenticator: {exc} "
                                         "(one CURVE router per zmq context)") from exc
                time.sleep(0.005)
        made = [self.zap]
        try:
            self.mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            made.append(self.mon)
            pipe = f"inproc://ndpmoe-gate-{uuid.uuid4().hex}"
            self._stop_rx = ctx.socket(zmq.PAIR)
            made.append(self._stop_rx)
            self._stop_rx.bind(pipe)
            self._stop_tx = ctx.socket(zmq.PAIR)
            made.append(self._stop_tx)
            self._stop_tx.setsockopt(zmq.LINGER, 0)
            self._stop_tx.connect(pipe)
        except BaseException:
            for s in made:  # a context with a socket left open never terminates
                s.close(linger=0)
            raise
        self._sock = sock
        self.thread = threading.Thread(target=self._run, name="ndpmoe-zap", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in (self.zap, self.mon, self._stop_rx):
            poller.register(s, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_rx in ready:
                    return
                if self.zap in ready:
                    self._answer(self.zap.recv_multipart())
                if self.mon in ready:
                    self._watch(recv_monitor_message(self.mon))
        finally:
            for s in (self.zap, self.mon, self._stop_rx):
                s.close(linger=0)

    def _answer(self, msg: list[bytes]) -> None:
        if len(msg) < 6:  # not a ZAP request; answer what can be answered
            if len(msg) >= 2:
                self.zap.send_multipart([b"1.0", msg[1], b"400", b"malformed request", b"", b""])
            return
        _version, rid, _domain, address, _identity, mechanism, *cred = msg[:7]
        where = address.decode("ascii", "replace")
        if mechanism == b"CURVE" and len(cred) == 1 and len(cred[0]) == 32:
            key = z85.encode(cred[0]).decode("ascii")
            if key in self.keys:
                self.zap.send_multipart([b"1.0", rid, b"200", b"OK", key.encode("ascii"), b""])
                return
            who, why = f"CURVE key {key} from {where}", "unknown CURVE key (ZAP refused)"
        else:
            who = f"{mechanism.decode('ascii', 'replace')} client from {where}"
            why = "not CURVE (ZAP refused)"
        self.denied += 1
        self.refusals.add(who, why)
        self.zap.send_multipart([b"1.0", rid, b"400", b"not allowed", b"", b""])

    def _watch(self, event: dict[str, Any]) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = _HANDSHAKE_ERRORS.get(event["value"], f"protocol error {event['value']:#x}")
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            why = "no detail"
        else:
            return
        self.refusals.add("(unauthenticated tcp peer)", f"handshake failed: {why}")

    def stop(self) -> None:
        """Ends the thread; call after the router's socket is closed (never let anyone in
        unchecked: without a ZAP handler libzmq would admit any CURVE client)."""
        with contextlib.suppress(zmq.ZMQError):
            self._stop_tx.send(b"")
        self.thread.join(5.0)
        self._stop_tx.close(linger=0)


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
        try:
            if ms == 0:  # a loop's "anything else there?": no socket option to flip each time
                if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return None  # nothing there: asked without the cost of raising zmq.Again
                return self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            if ms != self._rcvtimeo:
                self._sock.setsockopt(zmq.RCVTIMEO, ms)
                self._rcvtimeo = ms
            return self._sock.recv_multipart(copy=False)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise EmulationError(f"zmq receive failed: {exc}") from exc

    def _send_frames(self, frames: Frames, who: str) -> None:
        if self._closed:
            raise EmulationError(f"send to {who} on a closed transport")
        sock, last = self._sock, len(frames) - 1
        try:
            for i, f in enumerate(frames):
                # a small bytes frame (an identity, a header) is copied into the message
                # directly; anything else goes without a copy (pyzmq still copies what is
                # under its threshold, but through a Frame object, which costs more)
                if type(f) is bytes and len(f) < _COPY_BELOW:
                    sock.send(f, zmq.SNDMORE if i < last else 0, copy=True)
                else:
                    sock.send(f, zmq.SNDMORE if i < last else 0, copy=False)
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
    ``{ndp0_keys.public: [b"ndp0", b"ndp0.hb"]}``. A gatekeeper thread runs on the router's
    context from construction (before any bind) until :meth:`close`; a context holds one ZAP
    handler, so two CURVE routers cannot share a context. ``handover``: a new connection may
    take over an identity already connected (a restarted device); without it zmq refuses it.
    ``refusals`` records refused handshakes and messages dropped for using an identity their
    key may not (``denied`` and ``impostors`` count them).
    """

    def __init__(
        self,
        context: zmq.Context | None = None,
        *,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
        hwm: int = DEFAULT_HWM,
        curve: CurveKeys | None = None,
        clients: Mapping[bytes, Iterable[bytes]] | None = None,
        handover: bool = False,
    ) -> None:
        self._bound: dict[str, frozenset[bytes]] | None = None  # User-Id -> identities (CURVE)
        self.impostors = 0
        self.refusals = Refusals()
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
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
            if curve is not None:
                self._sock.curve_secretkey = curve.secret
                self._sock.curve_publickey = curve.public
                self._sock.curve_server = True
                self._auth = _Gatekeeper(self._ctx, self._sock, frozenset(self._bound),
                                         self.refusals)
        except BaseException:
            self._fail_init()
            raise
        self.endpoint: str | None = None

    @property
    def denied(self) -> int:
        """CURVE handshakes refused because the client's key is unknown (0 without CURVE)."""
        return 0 if self._auth is None else self._auth.denied

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
        owner = sorted(self._bound.get(uid, ()))
        self.refusals.add(ident.bytes, "identity not bound to the CURVE key it used"
                          + (f" (the key of {peer_name(owner[0])})" if owner else ""))
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
                self._poller.poll(_timeout_ms(left))
            else:
                time.sleep(min(1e-4, left))

    def close(self) -> None:
        for t in self.members:
            t.close()
