"""The one Ray seam: start (or attach to) Ray, place the actors, exchange zmq endpoints.

Control plane only: Ray creates the scheduler, GPU and NDP-unit actors, passes the config and
the routing once, hands each device the scheduler's zmq endpoint, and carries results back at
the end of each policy. Per-step traffic never goes through Ray (a Ray call costs ~1 ms); it
goes over zmq (:mod:`actors.zmq_transport`). Actor bodies are the plain classes of
:mod:`actors.devices` and :mod:`actors.scheduler`; ``ray.remote`` appears only here.

Local runs (no ``address``) start an embedded Ray with the dashboard off, bind loopback only,
and shut Ray down again when the cluster is closed.

Faults: each device also connects a heartbeat DEALER (identity ``<name>.hb``) to the
scheduler. With ``emulate.recover`` NDP-unit actors are created with Ray ``max_restarts``: a
unit whose process dies is re-created by Ray with the same arguments, reconnects with the same
identity (the ROUTERs hand the identity over), pings the link until it answers (so the link
can deliver to it), greets the scheduler with a new ``incarnation`` (its pid), and the
scheduler resets and re-warms it and sends it what it had not done
(``actors.scheduler.SchedulerCore._on_rejoin``) while the run is paused. The GPU is never
restarted: it holds the hidden states, so losing it fails the run.

Security: every receiver listens only to the peers this run created (the scheduler to the
devices and the link, the link to the scheduler and the devices, each device to the scheduler
and the link) and records everyone else it refused; :meth:`EmuCluster.rejected_peers` gathers
those records for ``summary.json``. Routers refuse a second connection with a live identity
unless ``emulate.recover`` needs it for a restarted unit. With ``emulate.curve`` (the default)
the data plane uses CURVE (:mod:`actors.curve`). The
scheduler actor makes a server keypair and one client keypair per device and admits only
those keys, each for its own device's identities (``name`` and ``name.hb``). The keys travel
on the control plane only: the driver asks the scheduler for the server's public key and the
device keypairs and passes each device its own keypair and the server's public key as
constructor arguments (a restarted unit gets the same ones back from Ray). The server's secret
key never leaves the scheduler's process, and no key is ever sent over zmq. Ray's own traffic
is not covered: keep its ports private or turn on Ray's TLS (deploy/README.md, "Security").
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.peers import (
    GPU,
    GPU_PEER,
    LINK_PEER,
    NDP,
    SCHED_PEER,
    device_name,
    device_peers,
    heartbeat_peer,
    unit_peer,
)
from cluster.core.errors import EmulationError, NdpmoeError
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


class _DeviceActor:
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


class _LinkActor:
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
        self.server = self._server_cls(self.router, devices=_peers(self._cfg))
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


class _SchedulerActor:
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
            devices = {peer: CurveKeys.generate() for peer in _peers(cfg)}
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


@dataclass
class EmuCluster:
    """Handles on a running emulation cluster."""

    scheduler: Any
    gpu: Any
    units: list[Any]
    link: Any
    started_ray: bool
    startup_s: float
    rtt_s: dict[str, float] = field(default_factory=dict)
    placement_group: Any = None

    def node_ids(self) -> dict[str, str]:
        import ray

        infos = ray.get([a.info.remote() for a in [self.gpu, *self.units]])
        return {device_name(i["kind"], i["unit"]): i["node_id"] for i in infos}

    def rejected_peers(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Every refusal of every actor, for ``summary.json``: ``rejected_peers`` (messages and
        handshakes from outside the run, dropped) and ``malformed_messages`` (from the run's
        own peers, answered), each ``{"total": n, "by_peer": [{"at", "peer", "reason",
        "count"}, ...]}``. An actor that does not answer is skipped."""
        import ray

        actors = [self.scheduler, self.link, self.gpu, *self.units]
        peers: list[dict[str, Any]] = []
        malformed: list[dict[str, Any]] = []
        for a in actors:
            try:
                got = ray.get(a.rejected_peers.remote(), timeout=timeout_s)
            except Exception:  # a dead actor: its refusals are lost with it
                continue
            peers += got["peers"]
            malformed += got["malformed"]
        return {"rejected_peers": {"total": sum(r["count"] for r in peers), "by_peer": peers},
                "malformed_messages": {"total": sum(r["count"] for r in malformed),
                                       "by_peer": malformed}}

    def close(self) -> None:
        import ray

        try:
            ray.get(self.scheduler.shutdown.remote(), timeout=10)
            ray.get([a.stop.remote() for a in [self.gpu, *self.units, self.link]], timeout=10)
        except Exception:  # best effort: the actors are killed next anyway
            pass
        for a in [self.scheduler, self.gpu, *self.units, self.link]:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` with Ray's wrapping undone: an actor's own error comes back as itself,
    anything else as :class:`EmulationError` naming the cause (no remote traceback)."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, NdpmoeError):
            raise type(cause)(str(cause)) from None
        raise EmulationError(f"an actor failed: {type(cause).__name__}: {cause}") from None
    except ray.exceptions.RayError as exc:
        raise EmulationError(f"the emulation cluster failed: {type(exc).__name__}: {exc}") from None


def init_ray(address: str | None) -> bool:
    """Starts a local Ray (or attaches to ``address``). Returns whether this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler (exit 1, no cleanup); keep ours (cluster.cli:
    # SIGTERM ends a run like Ctrl-C, with partial results and exit 130)
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # address="local": never attach to another Ray that happens to run on this machine
            ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    except Exception as exc:  # Ray raises several unrelated types here
        raise EmulationError(f"could not start or attach to Ray ({address or 'local'}): {exc}") from exc
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


def _peers(cfg: Config) -> list[bytes]:
    """The devices' zmq identities: the GPU, then the NDP units."""
    return device_peers(cfg.ndp.num_ndp_units)


def start(cfg: Config, routing: Routing, scale: float, address: str | None = None,
          ready_timeout_s: float = 60.0) -> EmuCluster:
    """Creates the scheduler, the GPU and one actor per NDP unit and connects them over zmq."""
    import ray

    if cfg.emulate.curve:  # before anything is launched
        from actors.curve import require_curve

        require_curve()
    started = init_ray(address)
    t0 = time.monotonic()
    local = address is None
    opts = {"num_cpus": 0}
    pg = None
    try:
        host = "127.0.0.1" if local else None
        sched = ray.remote(_SchedulerActor).options(max_concurrency=2, **opts).remote(
            cfg, routing, host, local)
        link = ray.remote(_LinkActor).options(**opts).remote(cfg, host, local)
        endpoint = ray.get(sched.endpoint.remote())
        # CURVE keys (emulate.curve) travel on the control plane only, one keypair per device
        server_key, keys = ray.get(sched.curve_keys.remote()) if cfg.emulate.curve else (None, {})
        link_key = ray.get(link.public_key.remote())
        clients = None
        if cfg.emulate.curve:
            clients = {k.public: (peer,) for peer, k in keys.items()}
            clients[ray.get(sched.link_client_key.remote())] = (SCHED_PEER,)
        link_endpoint = ray.get(link.bind.remote(clients))
        ray.get(sched.connect_link.remote(link_endpoint, link_key))
        gpu = ray.remote(_DeviceActor).options(**opts).remote(cfg, GPU, -1, scale, endpoint,
                                                              server_key, keys.get(GPU_PEER),
                                                              link_endpoint, link_key)
        unit_opts = [opts] * cfg.ndp.num_ndp_units
        if not local:
            pg, unit_opts = _unit_placement(cfg, ready_timeout_s)
        if cfg.emulate.recover:
            unit_opts = [{**o, "max_restarts": MAX_UNIT_RESTARTS} for o in unit_opts]
        units = [ray.remote(_DeviceActor).options(**unit_opts[u]).remote(
                     cfg, NDP, u, scale, endpoint, server_key, keys.get(unit_peer(u)),
                     link_endpoint, link_key)
                 for u in range(cfg.ndp.num_ndp_units)]
        peers = _peers(cfg)
        rtt = ray.get(sched.wait_ready.remote([*peers, LINK_PEER], ready_timeout_s))
    except Exception as exc:
        if pg is not None:
            ray.util.remove_placement_group(pg)
        if started:
            ray.shutdown()
        if isinstance(exc, EmulationError):
            raise
        raise EmulationError(f"could not start the emulation cluster: {exc}") from exc
    return EmuCluster(sched, gpu, units, link, started, time.monotonic() - t0, rtt, placement_group=pg)


def _unit_placement(cfg: Config, timeout_s: float) -> tuple[Any, list[dict[str, Any]]]:
    """A placement group with one bundle per NDP unit, spread by ``emulate.placement_strategy``.

    Bundles ask for one ``ndp_slot`` each when the cluster has enough of that custom resource
    (nodes started with ``--resources='{"ndp_slot": K}'``), else for a sliver of CPU.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = cfg.ndp.num_ndp_units
    slots = ray.cluster_resources().get("ndp_slot", 0)
    bundle = {"ndp_slot": 1} if slots >= n else {"CPU": 0.01}
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=cfg.emulate.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise EmulationError(
            f"could not place {n} NDP units with strategy {cfg.emulate.placement_strategy} "
            f"(bundles {bundle}) within {timeout_s:g} s; the cluster has {ray.cluster_resources()}")
    res = {"num_cpus": 0, "resources": {"ndp_slot": 1}} if "ndp_slot" in bundle else {"num_cpus": 0.01}
    return pg, [{**res, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=u)} for u in range(n)]
