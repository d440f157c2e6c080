"""CURVE security for the zmq data plane (DESIGN.md section 9): keys and the router's gatekeeper.

With ``curve`` (``emulate.curve``, on by default) the data plane is authenticated and encrypted
with CURVE: the router (:class:`~actors.zmq_transport.ZmqRouter`) is a CURVE server with its own :class:`CurveKeys` and lets in only the
client public keys it was given. Its gatekeeper thread (:class:`Gatekeeper`) answers the
context's ZAP requests (RFC 27) and watches the socket's failed handshakes, so every refusal is
recorded with what is known of the peer (its key and address for an unknown key; the zmq
protocol error for a peer without CURVE, with a wrong server key, or speaking garbage): a
handshake with any other key, or with no key, fails before a single message is delivered. Each
dealer presents its own keypair and the server's public key. Each client key is also bound to
the identities it may use (a device's ``name`` and ``name.hb``): a message whose identity does
not belong to the key that authenticated its connection is dropped and recorded. Keys are
never sent over zmq; the launcher hands them out through Ray (:mod:`cluster.engines.launch`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from actors.transport import Refusals
from cluster.core.errors import EmulationError

ZAP_BIND_WAIT_S = 1.0  # a CURVE router waits this long for its context's ZAP name to be free


def require_curve() -> None:
    """Raises EmulationError unless this libzmq supports CURVE (``zmq.has("curve")``)."""
    if not zmq.has("curve"):
        raise EmulationError(
            f"CURVE authentication (emulate.curve) is on, but this libzmq {zmq.zmq_version()} "
            f"(pyzmq {zmq.__version__}) was built without it: zmq.has('curve') is False. Install "
            "a pyzmq wheel (it bundles a libzmq with CURVE) or turn emulate.curve off")


def z85_key(value: Any, what: str) -> bytes:
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
        object.__setattr__(self, "public", z85_key(self.public, "CURVE public key"))
        object.__setattr__(self, "secret", z85_key(self.secret, "CURVE secret key"))
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


HANDSHAKE_ERRORS = {getattr(zmq, n): n[len("PROTOCOL_ERROR_"):].lower().replace("_", " ")
                     for n in dir(zmq) if n.startswith("PROTOCOL_ERROR_")}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # RFC 27: where libzmq sends a context's ZAP requests


class Gatekeeper:
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
            why = HANDSHAKE_ERRORS.get(event["value"], f"protocol error {event['value']:#x}")
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
