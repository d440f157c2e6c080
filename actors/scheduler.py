"""The scheduler actor: dispatches plans and prefetch commands, and listens. Never paces.

The scheduler plays the host CPU's MoE runtime. The GPU runs the model forward by itself and,
after each router, tells the scheduler which experts its tokens chose (``event`` ``routed``,
with the expert weights that have landed in its cache since). The scheduler then asks the
policy for the step's plan (pure code, :mod:`policies`) and sends, all stamped with the time
they take effect at their receivers (``at_s``):

1. each NDP unit its shards (``cmd`` ``moe``: experts, column slices, gate weights);
2. the GPU its own tasks, which cached transfer or in-flight fetch each one uses, which units
   to send activations to and expect partials from, evictions and fetches to keep;
3. the unit that holds an expert whole the order to ship it to the GPU over the link
   (``cmd`` ``ship``: on-demand fetches, and the prefetcher's background moves), or the link
   the order to upgrade a prefetch already in flight to the fetch class, or to cancel one.

It then waits for the next event. Nothing here times a plan: the devices throttle themselves
(:mod:`actors.devices`), the link throttles every transfer (:mod:`actors.link`), and the run's
latency is read off the wall clock where the GPU finishes each token. The scheduler's own
hop is modelled as one link latency each way (router -> scheduler, scheduler -> devices);
with ``emulate.charge_decision_time`` each plan also holds the step for the real time the
policy took to decide (host speed, undilated).

Faults (DESIGN.md section 9) are the :class:`~actors.dispatcher.Dispatcher`'s business: deadlines on every
wait, heartbeats (a device silent for ``emulate.heartbeat_timeout_s`` is dead, and the run
fails naming it and the step it was given, or with ``emulate.recover`` waits for Ray to
restart it and brings it up to date: :meth:`SchedulerCore._on_rejoin`), and with a drop fault
numbered, acknowledged commands that are sent again when lost. While a fault the scheduler
injected is found and repaired the whole emulated system is paused
(:class:`~actors.world.World`), so the wall time that takes is not emulated time. A failed run
leaves what it recorded with :meth:`SchedulerCore.partial`.

The scheduler's modules: :mod:`actors.dispatcher` (messaging, deadlines, heartbeats, retries;
:mod:`actors.events` checks what devices send), :mod:`actors.world` (the pause),
:mod:`actors.policy_run` (one policy's plans, commands and books), and this one
(:class:`SchedulerCore`: a run from reset to reports, and recovery). Names of the peers come
from :mod:`actors.peers`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.devices import cost_fields
from actors.dispatcher import Dispatcher
from actors.link_schedule import CLASS_FETCH, CLASS_PREFETCH
from actors.ndp import SHIP_WINDOW
from actors.peers import GPU_PEER, LINK_PEER, device_peers, unit_of, unit_peer
from actors.policy_run import EmulationStats, PolicyRun
from actors.transport import Transport
from actors.world import RESUME_MARGIN_S, World
from cluster.core.errors import EmulationError
from cluster.core.faults import Kill
from cluster.core.selection import Routing
from cluster.core.spec import Config

PREPARE_S = 0.05  # the run's epoch is this far after the start command, so every actor is ready


class SchedulerCore:
    """The scheduler actor's body: run policies, collect outputs. Plain class (Ray-free).

    Keeps the running policy's records (:meth:`partial`) so that a driver can fetch what a
    failed run produced. ``clock`` is its only time source, and its dispatcher's (default
    :func:`~actors.clock.wall_now`); the devices and the link read wall time, so only a clock
    that reads wall time drives real ones (a virtual clock is for tests of the waits alone).
    """

    def __init__(self, cfg: Config, routing: Routing, transport: Transport,
                 clock: Callable[[], float] = wall_now) -> None:
        self.cfg, self.routing, self.tr = cfg, routing, transport
        self.clock = clock  # the scheduler's only time source (its dispatcher's too)
        self.timeout_s = cfg.emulate.recv_timeout_s
        self.faults = cfg.faults
        rng = np.random.default_rng([cfg.workload.seed, 0xD809])
        self.net = Dispatcher(transport, self.timeout_s,
                              heartbeat_timeout_s=cfg.emulate.heartbeat_timeout_s,
                              recover=cfg.emulate.recover, rng=rng,
                              peers=[*self.peers(), LINK_PEER], clock=clock)
        self.world = World(self.net, self.peers)
        self.net.on_down = lambda peer: self.world.hold(("down", peer), "recovery")
        self.net.on_rejoin = self._on_rejoin
        self.net.on_drop = lambda key: self.world.hold(("drop", *key), "retry")
        self.net.on_acked = lambda key: self.world.release(("drop", *key))
        self.kills: list[Kill] = list(self.faults.kills)  # each fires once per cluster
        self.layouts: dict[int, np.ndarray] = {}  # unit -> the slices it generates (warm)
        self._run: PolicyRun | None = None  # the policy running now (recovery's books)
        self._reset_fields: dict[str, Any] = {}  # the running policy's device reset
        self.offsets: dict[bytes, float] = {}  # peer -> wall offset to this host's clock
        self.offset_residual_s: dict[str, float] = {}
        self.device_overrides: dict[str, Any] = {}  # tests: reset fields every device gets
        self._last: tuple[Any, EmulationStats, tuple[str, int, int]] | None = None
        self.progress_tokens = 0
        self.hop_s = 0.0  # one-way hop, 90th percentile (sync_clocks): the link's lookahead

    def peers(self) -> list[bytes]:
        return device_peers(self.cfg.ndp.num_ndp_units)

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        return self.net.ping(peer, n)

    def sync_clocks(self, n: int = 8) -> dict[str, float]:
        """Estimates each device's (and the link's) wall-clock offset to this host by ping
        exchange (the round trip with the smallest time wins); returns the residual
        uncertainty per peer (half that round trip), in seconds."""
        rtts = []
        for peer in [*self.peers(), LINK_PEER]:
            got = self.net.ping_clock(peer, n)
            rtts += [r for r, _ in got]
            best = min(got)
            self.offsets[peer] = best[1]
            self.offset_residual_s[peer.decode()] = best[0] / 2
        self.hop_s = float(np.quantile(rtts, 0.9)) / 2
        self.world.margin_s = max(RESUME_MARGIN_S, 4 * self.hop_s)
        return dict(self.offset_residual_s)

    def _all(self, fields: dict[str, Any], what: str, peers: list[bytes] | None = None,
             arrays: dict[bytes, list[np.ndarray]] | None = None,
             per_peer: dict[bytes, dict[str, Any]] | None = None,
             timeout_s: float | None = None) -> dict[bytes, wire.Message]:
        peers = self.peers() if peers is None else peers
        waiting = {self.net.send(p, {**fields, **(per_peer or {}).get(p, {})},
                                 (arrays or {}).get(p, []), what): p for p in peers}
        return self.net.gather(waiting, what, timeout_s)

    def warm(self, layouts: dict[int, list[tuple[int, int, int, int]]]) -> dict[int, int]:
        """Has each unit generate its weight slices before any timed work."""
        self.layouts = {u: np.asarray(lay, dtype=np.int32).reshape(-1, 4) for u, lay in layouts.items()}
        arrays = {unit_peer(u): [self.layouts[u]] for u in layouts}
        got = self._all({"kind": "warm"}, "weight generation", peers=list(arrays), arrays=arrays,
                        timeout_s=max(self.timeout_s, 600.0))
        return {int(m.fields["unit"]): int(m.fields["bytes"]) for m in got.values()}

    def run_policy(self, name: str, dilation: float = 1.0, calibrate: bool = False,
                   max_decode_steps: int | None = None, progress=None,
                   trace_steps: range = range(1, 3), inject: bool | None = None
                   ) -> tuple[EmulationStats, dict[str, Any]]:
        """Runs one policy through the workload on the devices at dilation D.

        Returns the scheduler's stats (with every device's and the link's report) and the
        run's meta (epoch, dilation, step order). ``calibrate`` only shortens the run to
        ``max_decode_steps`` and skips injected faults: at D = 1 every slot overruns and the
        devices' reports carry real compute / modelled time for each slot.
        """
        routing = self.routing
        if max_decode_steps is not None and max_decode_steps < routing.decode_steps:
            keep = routing.prompt_tokens + max_decode_steps
            routing = Routing(routing.topk_ids[:, :keep], routing.topk_weights[:, :keep],
                              routing.prompt_tokens, routing.source)
        run = PolicyRun(self.cfg, self.net, self.world, self.kills, name, routing, dilation,
                        routing.decode_steps)
        run.inject = not calibrate if inject is None else inject
        self._last = (None, run.stats, run.where)
        L = self.cfg.model.num_layers
        trace_seqs = [trace_steps.start * L, trace_steps.stop * L - 1] if len(trace_steps) else [0, -1]
        cost_cfg = run.cost_cfg
        base = {"kind": "reset", "dilation": float(dilation), "trace_seqs": trace_seqs,
                "cost": cost_fields(cost_cfg, self.cfg), **self.device_overrides}
        per_peer = {p: {"offset_s": self.offsets.get(p, 0.0)} for p in self.peers()}
        w0 = self.clock()
        self.progress_tokens = 0
        # drop faults (injected runs only): commands to devices are numbered and acknowledged
        # for the whole run, and lost from the run's epoch on (not in the preload before it)
        drop_p = self.faults.drop_p if run.inject else 0.0
        self.net.new_run(0.0, sequenced=drop_p > 0)
        before = self.net.counters()
        self._run, self._reset_fields = run, base
        try:
            self._all(base, "reset", per_peer=per_peer)
            pf_class = CLASS_FETCH if self.cfg.link.prefetch_priority == "equal" else CLASS_PREFETCH
            self.net.call(LINK_PEER, {"kind": "reset", "dilation": float(dilation),
                                      "latency_s": run.lat_s, "bw_bytes_per_s": run.cost.link_bw_bytes_per_s,
                                      "prefetch_class": pf_class, "trace_seqs": trace_seqs,
                                      "bypass": True, "base_s": self.clock()}, what="link reset")
            self._preload(run)
            epoch = self.clock() + PREPARE_S
            run.stats.epoch_s = epoch
            self.net.call(LINK_PEER, {"kind": "reset", "dilation": float(dilation),
                                      "latency_s": run.lat_s, "bw_bytes_per_s": run.cost.link_bw_bytes_per_s,
                                      "prefetch_class": pf_class, "trace_seqs": trace_seqs,
                                      "bypass": False, "base_s": epoch,
                                      "lookahead_s": self.hop_s,
                                      "offset_s": self.offsets.get(LINK_PEER, 0.0)},
                          what="link reset")
            self.world.arm()
            self.net.drop_p = drop_p
            self.net.call(GPU_PEER, {"kind": "run", "epoch_s": epoch,
                                     "decode_steps": routing.decode_steps}, what="gpu run")
            total = len(run.order)
            while True:
                at = run.order[min(len(run.stats.steps), total - 1)]
                what = (f"the end of {self.step_name(*run.where)}" if run.stats.steps else
                        f"the router of {self.step_name(*at)}")
                peer, ev = self.net.next_event(what)
                f = ev.fields
                kind = f["kind"]
                if kind == "routed":
                    run.on_routed(f)
                elif kind == "token":
                    run.on_token(f)
                    self.progress_tokens = run.tokens_done
                    if progress is not None:
                        progress(1)
                elif kind == "done":
                    break
                elif kind == "failed":
                    raise EmulationError(f"{peer.decode()} failed at {self.step_name(*run.where)}: "
                                         f"{f.get('message', '')}")
            self.net.drop_p = 0.0
            self.world.disarm()
            run.stats.wall_s = self.clock() - w0
            got = self._all({"kind": "report"}, "run reports")
            for p, m in got.items():
                run.stats.reports[p.decode()] = wire.from_json_array(m.arrays[0])
            run.stats.reports["link"] = wire.from_json_array(self.net.call(
                LINK_PEER, {"kind": "report"}, what="link report").arrays[0])
            run.stats.duplicates = sum(int(r.get("cmd_duplicates", 0))
                                       for d, r in run.stats.reports.items() if d != "link")
        finally:
            self.net.drop_p = 0.0
            self.world.disarm()
            self._run = None
            after = self.net.counters()
            st = run.stats
            st.dropped = after["dropped"] - before["dropped"]
            st.retries = after["retries"] - before["retries"]
            st.recoveries = after["recoveries"] - before["recoveries"]
            st.abandoned = after["abandoned"] - before["abandoned"]
            st.abandoned_sends = after["abandoned_sends"] - before["abandoned_sends"]
            st.pauses = self.world.pauses
            st.retry_wall_s = self.world.paused_wall_s["retry"]
            st.recovery_wall_s = self.world.paused_wall_s["recovery"]
            st.wall_s = st.wall_s or self.clock() - w0
            self._last = (None, st, run.where)
        meta = {"epoch_s": run.stats.epoch_s, "dilation": dilation, "order": run.order,
                "cost_cfg": cost_cfg, "offsets": {p.decode(): o for p, o in self.offsets.items()}}
        return run.stats, meta

    def _on_rejoin(self, peer: bytes) -> None:
        """A restarted NDP unit is back (recovery): measure its clock, reset it to the running
        policy (paused if the run is), have it generate its weight slices again, then send it
        what its predecessor had not done -- its shards of the step in progress unless its
        partial reached the GPU or is on the link, the GPU's activations for them unless they
        are on the link, and every ship order whose weights neither reached the GPU nor are
        on the link (nor were cancelled) -- and let the run go on (:class:`World`)."""
        u = unit_of(peer)
        lost = self.net.forget(peer)  # commands to the dead process
        self.offsets[peer] = min(self.net.ping_clock(peer, 4))[1]
        run = self._run
        try:
            if run is not None:
                pend = wire.from_json_array(self.net.call(
                    LINK_PEER, {"kind": "pending"}, what=f"the link's transfers of {peer.decode()}"
                ).arrays[0])
                name = peer.decode()
                to_it = {(k, q) for k, src, dst, q, _pid, _w in pend if dst == name}
                from_it = [(k, q, pid, w) for k, src, dst, q, pid, w in pend if src == name]
                window = SHIP_WINDOW - sum(1 for *_, w in from_it if w)
                self.net.call(peer, {**self._reset_fields, "offset_s": self.offsets[peer],
                                     "shift_s": self.world.shift_s,
                                     "paused": self.world.since is not None,
                                     "cseq_next": self.net.next_cseq(peer), "window": window},
                              what=f"the reset of restarted {name}")
            if u in self.layouts:
                self.net.call(peer, {"kind": "warm"}, [self.layouts[u]],
                              what=f"weight generation on restarted {peer.decode()}",
                              timeout_s=max(self.timeout_s, 600.0))
            if run is None:
                return
            st = self.net.call(GPU_PEER, {"kind": "status"}, what="the GPU's state (recovery)")
            seen = set(np.asarray(st.arrays[0]).tolist())
            cur, combined = int(st.fields["seq"]), int(st.fields["combined"])
            step = run.unit_cmds.get(u)
            if step is not None and step[0] > combined:
                seq = step[0]
                has_partial = seq == cur and u in st.fields["partials"]
                if not has_partial and ("partial", seq) not in {(k, q) for k, q, _, _ in from_it}:
                    self.net.post(peer, "moe", step[1], step[2])
                    if seq == cur and ("activation", seq) not in to_it:
                        self.net.call(GPU_PEER, {"kind": "resend", "unit": u, "seq": seq},
                                      what="the GPU's activations again (recovery)")
            run.resend_ships(u, seen | {pid for _, _, pid, _ in from_it if pid is not None})
        finally:
            for key in lost:  # lost commands of the dead process: replaced by the above
                self.world.release(("drop", *key))
            self.world.release(("down", peer))

    def _preload(self, run: PolicyRun) -> None:
        """Keys the prefetcher holds from the start (model load time): shipped for real over
        the link with throttling off, before the run's clock starts."""
        said = run.pf.decide_preload()
        run.apply(said)
        keys = list(said.fetch)
        if not keys:
            return
        pre: dict[int, list[list[int]]] = {}
        pids = {}
        for key in keys:
            pid = next(run.pids)
            pids[pid] = key
            pre.setdefault(key[1] % run.N, []).append([key[0], key[1], 0, run.d_ff, pid, 0])
        now = self.clock()
        for u, items in sorted(pre.items()):
            self.net.post(unit_peer(u), "ship", {"class": "prefetch", "items": items, "at_s": now})
        deadline = now + max(self.timeout_s, 60.0)
        while True:
            got = self.net.call(GPU_PEER, {"kind": "preload", "pids": list(pids)},
                                what="preload of the GPU cache").fields["landed"]
            if len(got) == len(pids):
                break
            if self.clock() > deadline:
                raise EmulationError(f"only {len(got)} of {len(pids)} preloaded experts reached "
                                     f"the GPU within {self.timeout_s:g} s")
            time.sleep(0.01)
        for pid, key in pids.items():
            run.landed[key] = pid
        self.net.call(GPU_PEER, {"kind": "report"}, what="gpu preload report")

    @staticmethod
    def step_name(phase: str, step: int, layer: int | None = None) -> str:
        at = f"{phase} step {step}"
        return at if layer is None or layer < 0 else f"{at}, layer {layer}"

    def partial(self) -> tuple[Any, EmulationStats | None, tuple[str, int, int] | None]:
        """(None, stats, (phase, step, layer)) of the last run, finished or not."""
        return self._last if self._last is not None else (None, None, None)

    def collect(self) -> np.ndarray:
        return np.array(self.net.call(GPU_PEER, {"kind": "collect"}).arrays[0])

    def shutdown(self) -> None:
        for peer in [*self.peers(), LINK_PEER]:
            with contextlib.suppress(EmulationError):
                self.tr.send(peer, wire.encode("shutdown"))
