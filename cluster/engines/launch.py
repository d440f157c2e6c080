"""The one Ray seam: start (or attach to) Ray, place the actors, exchange zmq endpoints.

Control plane only: Ray creates the scheduler, GPU and NDP-unit actors, passes the config and
the routing once, hands each device the scheduler's zmq endpoint, and carries results back at
the end of each policy. Per-step traffic never goes through Ray (a Ray call costs ~1 ms); it
goes over zmq (:mod:`actors.zmq_transport`). Actor bodies are the plain classes of
:mod:`actors`, hosted by :mod:`cluster.engines.ray_actors`; ``ray.remote`` appears only here.

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
import os
import time
from dataclasses import dataclass, field
from typing import Any

from actors.peers import (
    GPU,
    GPU_PEER,
    LINK_PEER,
    NDP,
    SCHED_PEER,
    device_name,
    device_peers,
    unit_peer,
)
from cluster.core.errors import EmulationError, NdpmoeError
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines.ray_actors import MAX_UNIT_RESTARTS, DeviceActor, LinkActor, SchedulerActor


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
        sched = ray.remote(SchedulerActor).options(max_concurrency=2, **opts).remote(
            cfg, routing, host, local)
        link = ray.remote(LinkActor).options(**opts).remote(cfg, host, local)
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
        gpu = ray.remote(DeviceActor).options(**opts).remote(cfg, GPU, -1, scale, endpoint,
                                                              server_key, keys.get(GPU_PEER),
                                                              link_endpoint, link_key)
        unit_opts = [opts] * cfg.ndp.num_ndp_units
        if not local:
            pg, unit_opts = _unit_placement(cfg, ready_timeout_s)
        if cfg.emulate.recover:
            unit_opts = [{**o, "max_restarts": MAX_UNIT_RESTARTS} for o in unit_opts]
        units = [ray.remote(DeviceActor).options(**unit_opts[u]).remote(
                     cfg, NDP, u, scale, endpoint, server_key, keys.get(unit_peer(u)),
                     link_endpoint, link_key)
                 for u in range(cfg.ndp.num_ndp_units)]
        peers = device_peers(cfg.ndp.num_ndp_units)
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
