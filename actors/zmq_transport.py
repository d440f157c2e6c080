"""The zmq transports of the data plane (the interface is :mod:`actors.transport`'s).

- :class:`ZmqRouter` binds a ROUTER socket; peers are the identities of the dealers that
  connected to it. An unknown peer raises (``ROUTER_MANDATORY``) instead of the silent drop
  zmq does by default, and a restarted actor that reconnects with its old identity takes it
  over (``ROUTER_HANDOVER``). A router learns a dealer's identity only once its connection is
  up, so a dealer speaks first (a ``hello``) and the router sends to it after hearing it.
- :class:`ZmqDealer` connects a DEALER with an identity to one router; its only peer is that
  router, named ``router_id`` (default ``b"router"``) on both ``send`` and ``recv``.

zmq sockets are sent from with ``copy=False`` (pyzmq copies frames under
``zmq.COPY_THRESHOLD`` itself, where that is cheaper; small ``bytes`` frames such as identities
and headers are sent with ``copy=True``, which skips pyzmq's Frame object), and received with
``copy=False``, so ``recv`` returns ``zmq.Frame`` objects that ``wire.decode`` views without
copying. A zmq transport must be used from one thread only. Sockets close with linger 0; a
context the transport created is terminated on close, which ends its I/O threads. A transport
dropped without ``close`` is closed the same way when it is collected (pyzmq alone would hang
the garbage collector on a context caught in a reference cycle).

Security (DESIGN.md section 9): a router binds loopback only in a local run
(:meth:`ZmqRouter.bind`); with ``curve`` the data plane is authenticated and encrypted
(:mod:`actors.curve`). A router takes a second connection with an identity already connected
(``ROUTER_HANDOVER``) only when asked (``handover``, for a restarted device under
``emulate.recover``); otherwise zmq refuses the newcomer, so nobody can take over a live
device's identity and receive its commands.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import zmq

from actors.curve import CurveKeys, Gatekeeper, require_curve, z85_key
from actors.transport import Frames, Refusals, is_loopback, peer_name, timeout_ms
from cluster.core.errors import EmulationError

DEFAULT_SEND_TIMEOUT_S = 5.0
DEFAULT_HWM = 1000
_COPY_BELOW = 64 * 1024  # bytes frames shorter than this are sent with copy=True


class _Owned:
    """What a transport must release: its socket, its authenticator, the context it made."""

    __slots__ = ("auth", "ctx", "sock")

    def __init__(self, sock: zmq.Socket, ctx: zmq.Context | None) -> None:
        self.sock, self.ctx, self.auth = sock, ctx, None

    def release(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:  # after the socket: no connection is ever let in unchecked
            self.auth.stop()
            self.auth = None
        if self.ctx is not None:  # every socket of the context is closed by now
            self.ctx.destroy(linger=0)


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
            self._sock.setsockopt(zmq.SNDTIMEO, timeout_ms(send_timeout_s))
        except BaseException:
            if self._own_context:
                self._ctx.destroy(linger=0)
            raise
        self._rcvtimeo = -2  # not yet set; the socket default is -1 (forever), never used
        self._closed = False
        self._owned = _Owned(self._sock, self._ctx if self._own_context else None)
        # a transport dropped without close() (say, held by a traceback's frames) still
        # closes: left to the garbage collector, a context in a reference cycle is finalised
        # after its socket's weak entry is cleared, and its term() waits forever for that socket
        self._finalizer = weakref.finalize(self, self._owned.release)

    @property
    def _auth(self) -> Any:
        """A router's ZAP authenticator (CURVE only), stopped on close."""
        return self._owned.auth

    @_auth.setter
    def _auth(self, auth: Any) -> None:
        self._owned.auth = auth

    def _fail_init(self) -> None:
        """Undo a half-done constructor (its caller re-raises): close what was made."""
        self._closed = True
        self._finalizer()

    @property
    def socket(self) -> zmq.Socket:
        """The underlying socket, for a poller; do not send or receive on it directly."""
        return self._sock

    def _recv_frames(self, timeout_s: float) -> list[zmq.Frame] | None:
        if self._closed:
            raise EmulationError("receive on a closed transport")
        ms = timeout_ms(timeout_s)
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
        self._finalizer()  # runs _Owned.release once, now

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
                bound[z85_key(key, "CURVE client public key").decode("ascii")] = ids
            self._bound = bound
        super().__init__(zmq.ROUTER, context, send_timeout_s, hwm)
        try:
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
            if curve is not None:
                self._sock.curve_secretkey = curve.secret
                self._sock.curve_publickey = curve.public
                self._sock.curve_server = True
                self._auth = Gatekeeper(self._ctx, self._sock, frozenset(self._bound),
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
        timeout_ms(timeout_s)  # the same argument check, before any arithmetic on it
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
            server_key = z85_key(server_key, "CURVE server public key")
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
