"""The bodies of the emulation's Ray actors: thin hosts of the plain classes of :mod:`actors`
(a device and its server, the link, the scheduler core), made remote by
:mod:`cluster.engines.launch`, which places them. Part of the Ray seam: with ``launch``,
``emulate`` and ``preflight``, the only engine modules that import :mod:`actors`.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import numpy as np

from actors.peers import (
    GPU,
    LINK_PEER,
    NDP,
    SCHED_PEER,
    device_name,
    device_peers,
    heartbeat_peer,
)
from cluster.core.errors import EmulationError
from cluster.core.selection import Routing
from cluster.core.spec import Config


def _one_blas_thread() -> Any:
    """One BLAS thread per actor (DESIGN.md section 5): several actors share the cores.

    Set at run time with threadpoolctl rather than through a Ray ``runtime_env`` (which
    costs ~1.5 s of actor start-up here); the returned handle keeps the limit in force.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


MAX_UNIT_RESTARTS = 4  # per NDP-unit actor, with emulate.recover


def _exit_now() -> None:
    """An injected ``kill``: the process dies as a crashed one would (Ray may restart it)."""
    os._exit(1)


LINK_READY_TIMEOUT_S = 30.0


def _await_link(link: Any, timeout_s: float = LINK_READY_TIMEOUT_S) -> list[tuple[bytes, list]]:
    """Pings the link over a device's own link socket until it answers, so that the link can
    deliver to the device before the device greets the scheduler: a unit that Ray restarted
    is sent its step's activations through the link as soon as the scheduler has heard from
    it (a ROUTER cannot send to a dealer whose connection is not up yet). Returns anything
    else that came meanwhile, for the device to handle."""
    from actors import wire

    deadline = time.monotonic() + timeout_s
    other: list[tuple[bytes, list]] = []
    for seq in itertools.count(1):
        link.send(LINK_PEER, wire.encode("ping", {"seq": seq}))
        until = time.monotonic() + 0.5
        while (left := until - time.monotonic()) > 0:
            got = link.recv(left)
            if got is None:
                break
            msg = wire.decode(got[1])
            if msg.type == "pong" and msg.fields.get("seq") == seq:
                return other
            if msg.type != "pong":
                other.append(got)
        if time.monotonic() > deadline:
            raise EmulationError(f"the host link did not answer within {timeout_s:g} s")
    raise AssertionError("unreachable")  # pragma: no cover


class DeviceActor:
    """Ray body of a GPU or NDP-unit actor: a device served on a zmq DEALER in a thread,
    with a heartbeat on a second DEALER (zmq sockets are not shared between threads)."""

    def __init__(self, cfg: Config, kind: str, unit: int, scale: float, endpoint: str,
                 server_key: bytes | None = None, keys: Any = None, link_endpoint: str = "",
                 link_key: bytes | None = None) -> None:
        """``server_key`` and ``keys`` (this device's :class:`~actors.curve.CurveKeys`):
        the CURVE keys of its sockets when ``emulate.curve`` is on, else None; ``link_key``:
        the link's public key then."""
        from actors.device_server import DeviceServer
        from actors.gpu import GpuDevice
        from actors.ndp import NdpUnit
        from actors.transport import Mux
        from actors.zmq_transport import ZmqDealer

        self._blas = _one_blas_thread()
        self.kind, self.unit = kind, unit
        device = GpuDevice(cfg, scale) if kind == GPU else NdpUnit(cfg, unit, scale)
        identity = device_name(kind, unit).encode()
        curve = {} if keys is None else {"curve": keys, "server_key": server_key}
        self.main = ZmqDealer(identity, router_id=SCHED_PEER, **curve)
        self.main.connect(endpoint)
        link_curve = {} if keys is None else {"curve": keys, "server_key": link_key}
        self.link = ZmqDealer(identity, router_id=LINK_PEER, **link_curve)
        self.link.connect(link_endpoint)
        early = _await_link(self.link)  # before it greets anyone: the link can reach it
        self.transport = Mux(self.main, {LINK_PEER: self.link})
        # a late heartbeat is worthless: never block on it, keep only a few queued
        self.heartbeat = ZmqDealer(heartbeat_peer(identity), router_id=SCHED_PEER, send_timeout_s=0.0, hwm=4,
                                   **curve)
        self.heartbeat.connect(endpoint)
        doomed = kind == NDP and any(k.unit == unit for k in cfg.faults.kills)
        self.server = DeviceServer(device, self.transport, heartbeat=self.heartbeat,
                                   incarnation=os.getpid(), announce_to=SCHED_PEER,
                                   on_die=_exit_now if doomed else None)
        for peer, frames in early:
            self.server._handle(peer, frames)
        self.server.start()

    def info(self) -> dict[str, Any]:
        import ray

        return {"kind": self.kind, "unit": self.unit, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "handled": self.server.handled, "rejected": self.server.rejected}

    def rejected_peers(self) -> dict[str, list[dict[str, Any]]]:
        """What this device refused: unknown peers, and known peers' malformed messages."""
        name = self.server.name
        return {"peers": self.server.refusals.as_list(name) + self.transport.refusals.as_list(name),
                "malformed": self.server.malformed.as_list(name)}

    def stop(self) -> None:
        self.server.stop()
        self.transport.close()
        self.heartbeat.close()


class LinkActor:
    """Ray body of the host link: a ROUTER that every device's link socket connects to, served
    by :class:`actors.link.LinkServer` in a thread."""

    def __init__(self, cfg: Config, host: str | None, local: bool) -> None:
        import ray

        from actors.curve import CurveKeys
        from actors.link import LinkServer
        from actors.zmq_transport import ZmqRouter

        host = host or ray.util.get_node_ip_address()
        self._keys = CurveKeys.generate() if cfg.emulate.curve else None
        self._host, self._local = host, local
        self.router: Any = None
        self.server: Any = None
        self._cfg = cfg
        self._router_cls, self._server_cls = ZmqRouter, LinkServer

    def public_key(self) -> bytes | None:
        return None if self._keys is None else self._keys.public

    def bind(self, clients: dict[bytes, Any] | None) -> str:
        """Binds (admitting ``clients`` = {public key: identities} with CURVE) and serves."""
        curve = {} if self._keys is None else {"curve": self._keys, "clients": clients}
        self.router = self._router_cls(handover=self._cfg.emulate.recover, **curve)
        endpoint = self.router.bind(self._host, 0, local=self._local)
        self.server = self._server_cls(self.router, devices=device_peers(self._cfg.ndp.num_ndp_units))
        self.server.start()
        return endpoint

    def rejected_peers(self) -> dict[str, list[dict[str, Any]]]:
        """What the link refused: handshakes, unknown peers; known peers' malformed messages."""
        if self.server is None:
            return {"peers": [], "malformed": []}
        return {"peers": self.router.refusals.as_list("link") + self.server.refusals.as_list("link"),
                "malformed": self.server.malformed.as_list("link")}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.router.close()


class SchedulerActor:
    """Ray body of the scheduler: binds the zmq ROUTER and runs policies on request."""

    def __init__(self, cfg: Config, routing: Routing, host: str | None, local: bool) -> None:
        import ray

        from actors.curve import CurveKeys, require_curve
        from actors.scheduler import SchedulerCore
        from actors.zmq_transport import ZmqRouter

        self._blas = _one_blas_thread()
        # cluster mode: bind this node's own address, so devices on other nodes can reach it
        host = host or ray.util.get_node_ip_address()
        self._curve: tuple[bytes, dict[bytes, Any]] | None = None
        curve: dict[str, Any] = {}
        if cfg.emulate.curve:
            require_curve()
            server = CurveKeys.generate()
            devices = {peer: CurveKeys.generate() for peer in device_peers(cfg.ndp.num_ndp_units)}
            curve = {"curve": server,
                     "clients": {k.public: (peer, heartbeat_peer(peer)) for peer, k in devices.items()}}
            self._curve = (server.public, devices)
        self.router = ZmqRouter(handover=cfg.emulate.recover, **curve)
        self.endpoint_ = self.router.bind(host, 0, local=local)
        self._link_keys = CurveKeys.generate() if cfg.emulate.curve else None
        self.transport: Any = self.router
        self.core = SchedulerCore(cfg, routing, self.router)
        self.done_tokens = 0

    def link_client_key(self) -> bytes | None:
        return None if self._link_keys is None else self._link_keys.public

    def connect_link(self, endpoint: str, link_key: bytes | None) -> None:
        """The scheduler's own socket to the link (upgrades, cancels, reset, reports)."""
        from actors.transport import Mux
        from actors.zmq_transport import ZmqDealer

        curve = {} if self._link_keys is None else {"curve": self._link_keys, "server_key": link_key}
        self.link = ZmqDealer(SCHED_PEER, router_id=LINK_PEER, **curve)
        self.link.connect(endpoint)
        self.transport = Mux(self.router, {LINK_PEER: self.link})
        self.core.tr = self.core.net.tr = self.transport

    def endpoint(self) -> str:
        return self.endpoint_

    def curve_keys(self) -> tuple[bytes, dict[bytes, Any]] | None:
        """With ``emulate.curve``: the server's public key and each device's keypair (by
        identity) for the driver to hand out through Ray; else None."""
        return self._curve

    def wait_ready(self, peers: list[bytes], timeout_s: float) -> dict[str, float]:
        """Pings every device until it answers (a DEALER connects asynchronously)."""
        from actors.clock import wall_now

        deadline = wall_now() + timeout_s
        rtt: dict[str, float] = {}
        for peer in peers:
            while True:
                try:
                    rtt[peer.decode()] = float(np.median(self.core.ping(peer, 5)))
                    break
                except EmulationError:
                    if wall_now() > deadline:
                        raise
                    time.sleep(0.01)
        return rtt

    def ping(self, peer: bytes, n: int) -> list[float]:
        return self.core.ping(peer, n)

    def warm(self, layouts: dict[int, list[tuple[int, int, int, int]]]) -> dict[int, int]:
        return self.core.warm(layouts)

    def sync_clocks(self) -> dict[str, float]:
        return self.core.sync_clocks()

    def hop_samples(self, n: int = 20) -> list[float]:
        """Round trips to the GPU and every unit (wall seconds): the hop floor."""
        out: list[float] = []
        for peer in self.core.peers():
            out += self.core.ping(peer, n)
        return out

    def progress(self) -> int:
        return self.core.progress_tokens

    def run_policy(self, name: str, dilation: float, calibrate: bool = False,
                   max_decode_steps: int | None = None):
        return self.core.run_policy(name, dilation, calibrate=calibrate,
                                    max_decode_steps=max_decode_steps)

    def rejected_peers(self) -> dict[str, list[dict[str, Any]]]:
        """What the scheduler refused (handshakes, unknown peers, a name spoofed on the wrong
        socket) and the malformed messages its known peers sent."""
        net = self.core.net
        peers = self.router.refusals.as_list("scheduler") + net.refusals.as_list("scheduler")
        if self.transport is not self.router:
            peers += self.transport.refusals.as_list("scheduler")
        return {"peers": peers, "malformed": net.malformed.as_list("scheduler")}

    def partial(self):
        """The last run's records, stats and (phase, step, layer), finished or failed."""
        return self.core.partial()

    def collect(self) -> np.ndarray:
        return self.core.collect()

    def shutdown(self) -> None:
        self.core.shutdown()
        self.transport.close()
        if self.transport is not self.router:
            return
        self.router.close()
