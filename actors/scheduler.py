"""The scheduler actor: drives an :class:`~cluster.analytic.Episode` through the devices.

The scheduler owns the run's only clock and the host-link model (it plays the root complex
between the GPU and the NDP units). For every MoE step it asks the policy for a plan (the
episode does), times it with the shared rules of :func:`policies.plan.time_plan`, and then:

1. sends each NDP unit its tasks with the activations of the tokens it needs, stamped with
   the emulated time the link model delivers them;
2. collects every unit's partial output, stamped by the unit's own cost model;
3. sends the GPU its own tasks (each with the time its weights are ready: at once if cached,
   when the link delivers the fetch otherwise) and every partial with its link arrival time;
4. receives the GPU's completion time, checks every device's stamps against the plan's timing
   (a mismatch is a bug and is counted), and paces: sleeps until the step's emulated end.

Pacing makes wall-clock time follow emulated time times the dilation D. When the real work
and messaging of a segment take longer than its modelled duration x D, the scheduler reaches
the pacing point late: that is an **overrun**, counted with its lag, never hidden. Reported
emulated latency is the clock's reading (wall-clock / D) at the last token.

Fetched and prefetched expert weights are regenerated on the GPU from the seed rather than
shipped; the link model charges their bytes. Ray appears nowhere here (see cluster.launch).

Faults (DESIGN.md section 9) are the :class:`Dispatcher`'s business: deadlines, heartbeats
(a device waited on, or paced past, that stays silent for ``emulate.heartbeat_timeout_s`` is
dead), recovery of restarted NDP units (``emulate.recover``: re-warm, reset, re-dispatch the
interrupted task), and retries of messages lost to an injected ``drop:P``. Wall time lost to
recovery and retries moves the run clock's epoch, so emulated time never includes it; it is
reported as ``recovery_wall_s`` and ``retry_wall_s``. A failed run leaves its records with
:meth:`SchedulerCore.partial`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import policies
from actors import kernels as K
from actors import wire
from actors.clock import Clock, RealClock, wall_now
from actors.transport import Transport
from cluster.analytic import Episode, Executor
from cluster.errors import EmulationError
from cluster.faults import Kill, parse_inject
from cluster.metrics import PolicyRecords
from cluster.routing import Routing
from cluster.spec import Config

GPU_PEER = b"gpu"
HEARTBEAT_SUFFIX = b".hb"  # a device's heartbeat socket is its name plus this

RETRY_S = 0.2  # first per-try wait for a reply when messages may be dropped (then doubling)
RETRY_MAX_S = 1.0
MAX_TRIES = 16  # sends of one task at most; after the last one only the deadline applies
REJOIN_TIMEOUT_S = 120.0  # a dead unit must be restarted and rejoin within this (recovery)
POLL_S = 0.1  # longest receive slice while waiting, so silence and retries are noticed
IDLE_MIN_S = 1.0  # paced waits longer than this watch the heartbeats while they wait
IDLE_MARGIN_S = 0.01  # ...until this much before the target, then the clock's precise sleep


def unit_peer(u: int) -> bytes:
    return f"ndp{u}".encode()


def heartbeat_peer(peer: bytes) -> bytes:
    """The identity of ``peer``'s heartbeat socket."""
    return peer + HEARTBEAT_SUFFIX


@dataclass
class EmulationStats:
    """What the scheduler measured while driving one policy."""

    segments: int = 0
    overruns: int = 0
    lag_max_s: float = 0.0
    lag_total_s: float = 0.0
    stamp_mismatches: int = 0
    stamp_mismatch_max_s: float = 0.0
    messages: int = 0
    ratios: list[float] = field(default_factory=list)  # real wall / modelled, per segment
    wall_s: float = 0.0
    emulated_e2e_s: float = 0.0
    recoveries: int = 0  # dead units restarted and rejoined
    recovery_wall_s: float = 0.0  # wall time lost to them, taken out of emulated time
    retries: int = 0  # task messages sent again after no reply within the per-try wait
    retry_wall_s: float = 0.0  # wall time lost waiting for replies that never came
    dropped: int = 0  # task messages dropped by the injected drop:P fault
    kills: list[str] = field(default_factory=list)  # injected kills fired, "ndpK@decode step S layer L"

    def as_dict(self) -> dict[str, Any]:
        return {"overruns": self.overruns, "paced_segments": self.segments,
                "lag_max_s": self.lag_max_s, "lag_total_s": self.lag_total_s,
                "stamp_mismatches": self.stamp_mismatches, "messages": self.messages,
                "wall_s": self.wall_s, "recoveries": self.recoveries,
                "recovery_wall_s": self.recovery_wall_s, "retries": self.retries,
                "retry_wall_s": self.retry_wall_s, "dropped_messages": self.dropped,
                "injected_kills": list(self.kills)}


@dataclass
class _Pending:
    """A task sent and not yet answered."""

    peer: bytes
    fields: dict[str, Any]
    arrays: list[np.ndarray]
    what: str
    created_s: float  # wall time the task was issued
    sends_s: list[float] = field(default_factory=list)  # wall time of each send (attempt)
    retry_after_s: float = RETRY_S
    resent_by: str = ""  # "retry" or "recovery" once sent again

    @property
    def tries(self) -> int:
        return len(self.sends_s)

    @property
    def last_s(self) -> float:
        return self.sends_s[-1] if self.sends_s else -math.inf

    def lost_s(self, attempt: Any) -> float:
        """Wall time from the task's issue to the send whose reply came (the one that ran)."""
        if not self.sends_s:
            return 0.0
        k = attempt if isinstance(attempt, int) and 1 <= attempt <= len(self.sends_s) else len(self.sends_s)
        return self.sends_s[k - 1] - self.created_s


class Dispatcher:
    """The scheduler's messaging: task ids, sends, and gathering replies within a deadline.

    Failure handling (DESIGN.md section 9), all while gathering:

    - **deadline**: no reply within ``timeout_s`` fails the wait, naming who and what;
    - **heartbeat**: every message from a device (its heartbeats from ``<name>.hb`` included)
      marks it alive; a device waited on and silent for ``heartbeat_timeout_s`` is dead;
    - **restart**: a ``hello`` with a new ``incarnation`` means the device was restarted;
    - **recovery** (``recover``): a dead NDP unit is waited for until its restarted process
      greets from its main socket, ``on_rejoin(peer)`` re-warms and resets it, and every task
      it had not answered is sent again; without recovery (and for the GPU, which holds the
      hidden state) a dead device fails the run with :class:`EmulationError`;
    - **drop** (``drop_p``, seeded by ``rng``): each task send is lost with that probability;
      a task unanswered after a per-try wait (``RETRY_S``, doubling) is sent again, at most
      ``MAX_TRIES`` times; devices answer a repeated task id from their reply cache.

    Every send of a task carries its ``attempt`` number and devices echo the attempt that
    actually ran, so the wall time lost to recovery and retries (from a task's first send to
    the send that ran) is known exactly; it is reported to ``on_lost(wall_s, why)`` once per
    outermost wait, so that the run's clock can skip it.
    """

    def __init__(self, transport: Transport, timeout_s: float, *,
                 heartbeat_timeout_s: float | None = None, recover: bool = False,
                 drop_p: float = 0.0, rng: np.random.Generator | None = None) -> None:
        self.tr, self.timeout_s = transport, timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.recover = recover
        self.drop_p = drop_p
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.ids = itertools.count(1)
        self.ping_seq = itertools.count(1)
        self.sent = 0
        self.pending: dict[int, _Pending] = {}
        self.inbox: dict[int, tuple[wire.Message, _Pending]] = {}
        self.pongs: set[tuple[bytes, int]] = set()
        self.last_seen: dict[bytes, float] = {}
        self.incarnation: dict[bytes, Any] = {}
        self.down: dict[bytes, tuple[float, str]] = {}  # peer -> (since, cause), awaiting rejoin
        self.on_rejoin: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[float, str], None] | None = None
        self.dropped = self.retries = self.recoveries = 0
        self.recovery_wall_s = self.retry_wall_s = 0.0
        self._depth = 0

    def counters(self) -> dict[str, float]:
        return {"dropped": self.dropped, "retries": self.retries, "recoveries": self.recoveries,
                "recovery_wall_s": self.recovery_wall_s, "retry_wall_s": self.retry_wall_s}

    # --- sending ---------------------------------------------------------------------------
    def send(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "") -> int:
        tid = next(self.ids)
        self.pending[tid] = _Pending(peer, fields, list(arrays), what or str(fields.get("kind", "?")),
                                     wall_now())
        self.sent += 1
        if peer not in self.down:  # a dead unit gets its tasks when it rejoins
            try:
                self._transmit(tid)
            except BaseException:
                self.pending.pop(tid, None)
                raise
        return tid

    def _transmit(self, tid: int, reason: str = "") -> None:
        p = self.pending[tid]
        if reason:
            p.resent_by = reason
            if reason == "retry":
                self.retries += 1
        p.sends_s.append(wall_now())
        frames = wire.encode("task", {"task_id": tid, "attempt": p.tries, **p.fields}, p.arrays)
        if self.drop_p and self.rng.random() < self.drop_p:
            self.dropped += 1
            return
        try:
            self.tr.send(p.peer, frames)
        except EmulationError as exc:  # not connected: the device is gone (or restarting)
            self._mark_down(p.peer, f"is unreachable ({exc})", p.what)

    # --- receiving -------------------------------------------------------------------------
    def _handle(self, peer: bytes, frames: list, what: str, errors: bool = True) -> None:
        base = peer[:-len(HEARTBEAT_SUFFIX)] if peer.endswith(HEARTBEAT_SUFFIX) else peer
        self.last_seen[base] = wall_now()
        msg = wire.decode(frames)
        if msg.type == "result":
            p = self.pending.pop(msg.fields["task_id"], None)
            if p is not None and p.peer == base:
                self.inbox[msg.fields["task_id"]] = (msg, p)
            # else: a stale or stray reply (a retry answered twice, a failed wait): ignore
        elif msg.type == "hello":
            self._hello(base, peer == base, msg.fields.get("incarnation"), what)
        elif msg.type == "pong":
            self.pongs.add((base, msg.fields["seq"]))
        elif msg.type == "error" and errors:
            p = self.pending.get(msg.fields.get("task_id", -1))
            raise EmulationError(f"{base.decode()} rejected {p.what if p else what}: "
                                 f"{msg.fields['message']}")

    def _hello(self, peer: bytes, main: bool, incarnation: Any, what: str) -> None:
        known = self.incarnation.get(peer)
        if known is None and peer not in self.down:
            self.incarnation[peer] = incarnation  # first sight
            return
        if incarnation == known:
            return  # a heartbeat
        if peer not in self.down:
            self._mark_down(peer, "died and was restarted", what)
        if main:  # the restarted device's own socket is connected: it can take work
            self._rejoin(peer, incarnation)

    def _mark_down(self, peer: bytes, cause: str, what: str) -> None:
        if peer in self.down:
            return
        name = peer.decode(errors="replace")
        if peer == GPU_PEER:
            raise EmulationError(
                f"{name} {cause} while the scheduler awaited {what}; the GPU holds the hidden "
                f"state, so a lost GPU cannot be recovered, even with recovery on")
        if not self.recover:
            raise EmulationError(
                f"{name} {cause} while the scheduler awaited {what}; its process died or hung. "
                f"With recovery on (emulate.recover = true, --recover) a dead NDP unit is "
                f"restarted and the step re-dispatched")
        self.down[peer] = (wall_now(), cause)

    def _rejoin(self, peer: bytes, incarnation: Any) -> None:
        """A restarted unit greets: bring it up to date, then send it what it never answered."""
        t0 = wall_now()
        self.down.pop(peer, None)
        self.incarnation[peer] = incarnation
        self.recoveries += 1
        if self.on_rejoin is not None:
            self.on_rejoin(peer)
        for tid in sorted(t for t, p in self.pending.items() if p.peer == peer and p.last_s <= t0):
            self._transmit(tid, "recovery")

    def idle_until(self, wall_s: float, what: str) -> None:
        """Waits until wall time ``wall_s`` watching every known device's heartbeat, so that a
        device that dies during a long paced wait is noticed then, not at the next step. A
        unit restarted meanwhile rejoins at once; the wall time that takes is reported lost
        (and the wait grows by it, as the run's clock does)."""
        hb = self.heartbeat_timeout_s
        start = wall_now()
        while (now := wall_now()) < wall_s:
            if hb:
                for peer in sorted(set(self.incarnation) - set(self.down)):
                    silent = now - max(self.last_seen.get(peer, start), start)
                    if silent > hb:
                        self._mark_down(peer, f"went silent: no heartbeat for {silent:.1f} s "
                                        f"(emulate.heartbeat_timeout_s = {hb:g})", what)
            got = self.tr.recv(min(POLL_S, wall_s - now))
            if got is None:
                continue
            before, t0 = self.recoveries, wall_now()
            self._handle(got[0], got[1], what)
            if self.recoveries != before:
                lost = wall_now() - t0
                self.recovery_wall_s += lost
                wall_s += lost
                if self.on_lost is not None:
                    self.on_lost(lost, "recovery")

    def gather(self, waiting: dict[int, bytes], what: str,
               timeout_s: float | None = None) -> dict[bytes, wire.Message]:
        """Replies to every task in ``waiting`` (task id -> peer), within the deadline."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        hb = self.heartbeat_timeout_s
        start = wall_now()
        deadline = start + timeout
        rejoined = self.recoveries
        self._depth += 1
        try:
            while True:
                open_ = [t for t in waiting if t not in self.inbox]
                if not open_:
                    break
                now = wall_now()
                if self.recoveries != rejoined:  # a unit came back: its work starts over
                    rejoined, deadline = self.recoveries, max(deadline, now + timeout)
                if self.drop_p:
                    for t in open_:
                        p = self.pending.get(t)
                        if (p is not None and p.peer not in self.down and p.tries < MAX_TRIES
                                and now - p.last_s >= p.retry_after_s):
                            p.retry_after_s = min(2 * p.retry_after_s, RETRY_MAX_S)
                            self._transmit(t, "retry")
                # A peer's silence is counted from this wait's start at the earliest, so nobody
                # can be silent for longer than the wait has lasted: the usual fast reply skips
                # the bookkeeping below altogether.
                if not (hb and now - start > hb) and not self.down:
                    got = self.tr.recv(min(POLL_S, max(0.0, deadline - now)))
                    if got is not None:
                        self._handle(got[0], got[1], what)
                    elif now > deadline:
                        names = ", ".join(sorted({waiting[t].decode() for t in open_}))
                        raise EmulationError(f"no reply from {names} within {timeout:g} s while "
                                             f"awaiting {what}")
                    continue
                peers = {waiting[t] for t in open_}
                if hb and now - start > hb:
                    for peer in sorted(peers - set(self.down)):
                        silent = now - max(self.last_seen.get(peer, start), start)
                        if silent > hb:
                            self._mark_down(peer, f"went silent: no heartbeat or reply for "
                                            f"{silent:.1f} s (emulate.heartbeat_timeout_s = {hb:g})",
                                            what)
                down = sorted(peers & set(self.down))
                for peer in down:
                    since, cause = self.down[peer]
                    if now - since > REJOIN_TIMEOUT_S:
                        raise EmulationError(
                            f"{peer.decode()} {cause} while the scheduler awaited {what}, and was "
                            f"not restarted within {REJOIN_TIMEOUT_S:g} s (Ray's restarts for it "
                            f"may be used up)")
                if not down and now > deadline:
                    names = ", ".join(sorted(p.decode() for p in peers))
                    raise EmulationError(f"no reply from {names} within {timeout:g} s while "
                                         f"awaiting {what}")
                left = deadline - now if not down else POLL_S
                got = self.tr.recv(min(POLL_S, max(0.0, left)))
                if got is not None:
                    self._handle(got[0], got[1], what)
        except BaseException:
            for t in waiting:  # a failed wait forgets its tasks; their late replies are stray
                self.pending.pop(t, None)
                self.inbox.pop(t, None)
            raise
        finally:
            self._depth -= 1
        out: dict[bytes, wire.Message] = {}
        lost, why = 0.0, ""
        for t, peer in waiting.items():
            msg, p = self.inbox.pop(t)
            out[peer] = msg
            if p.resent_by and p.lost_s(msg.fields.get("attempt")) > lost:
                lost, why = p.lost_s(msg.fields.get("attempt")), p.resent_by
        if lost > 0 and self._depth == 0:  # nested waits (a rejoin's) are inside the outer one
            if why == "recovery":
                self.recovery_wall_s += lost
            else:
                self.retry_wall_s += lost
            if self.on_lost is not None:
                self.on_lost(lost, why)
        return out

    def call(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "", timeout_s: float | None = None) -> wire.Message:
        what = what or str(fields.get("kind", "?"))
        tid = self.send(peer, fields, arrays, what)
        return self.gather({tid: peer}, what, timeout_s)[peer]

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        """Round trips to ``peer`` in wall seconds (calibration and health)."""
        out = []
        for _ in range(n):
            seq = next(self.ping_seq)
            t0 = wall_now()
            self.tr.send(peer, wire.encode("ping", {"seq": seq}))
            deadline = t0 + self.timeout_s
            while (peer, seq) not in self.pongs:
                left = deadline - wall_now()
                got = self.tr.recv(min(POLL_S, left)) if left > 0 else None
                if got is None and left <= 0:
                    raise EmulationError(f"{peer.decode()} did not answer a ping within {self.timeout_s:g} s")
                if got is not None:
                    self._handle(got[0], got[1], "a ping", errors=False)
            self.pongs.discard((peer, seq))
            out.append(wall_now() - t0)
        return out


class EmulationExecutor(Executor):
    """Runs an episode's work on the devices over ``transport`` and paces it on ``clock``.

    ``calibrate``: no sleeping; record how long each segment's real work takes relative to
    its modelled duration (the dilation calibration).

    ``kills``: injected ``kill:ndpK@stepS`` faults still to fire (shared with the caller, which
    keeps them across runs: each fires once). Before the MoE step that first sends unit K work
    at or after decode step S, the unit is told to ``die``; the task that follows is the
    interrupted one. Wall time the dispatcher reports lost (recovery, retries) moves the
    clock's epoch, so it does not count as emulated time.
    """

    def __init__(self, cfg: Config, routing: Routing, transport: Transport, clock: Clock,
                 timeout_s: float, calibrate: bool = False, tolerance_s: float = 0.0,
                 net: Dispatcher | None = None, kills: list[Kill] | None = None) -> None:
        self.cfg, self.routing, self.tr, self.clock = cfg, routing, transport, clock
        self.timeout_s = timeout_s
        self.calibrate = calibrate
        self.tolerance_s = tolerance_s
        self.stats = EmulationStats()
        self.net = net or Dispatcher(transport, timeout_s)
        self.kills = kills if kills is not None else []
        self.xn: np.ndarray | None = None
        self.current: tuple[str, int] | None = None
        self.where: tuple[str, int, int] = ("prefill", 0, -1)  # (phase, step, layer) at work
        self.last_mark: tuple[float, float] = (wall_now(), 0.0)  # (wall, emulated) at last pace
        self.n_units = cfg.ndp.num_ndp_units

    def lost(self, wall_s: float, why: str) -> None:
        """``wall_s`` of wall time went to recovery or retries: not emulated time."""
        shift = getattr(self.clock, "shift_epoch", None)
        if shift is not None and not self.calibrate:
            shift(wall_s)
        self.last_mark = (self.last_mark[0] + wall_s, self.last_mark[1])
        if why == "recovery":
            self.stats.recovery_wall_s += wall_s
        else:
            self.stats.retry_wall_s += wall_s

    @staticmethod
    def step_name(phase: str, step: int, layer: int | None = None) -> str:
        at = f"{phase} step {step}"
        return at if layer is None or layer < 0 else f"{at}, layer {layer}"

    def _send(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
              what: str = "") -> int:
        self.stats.messages += 1
        return self.net.send(peer, fields, arrays, what)

    def call(self, peer: bytes, fields: dict[str, Any], arrays: list[np.ndarray] = (),
             what: str = "") -> wire.Message:
        self.stats.messages += 1
        return self.net.call(peer, fields, arrays, what)

    # --- pacing ---------------------------------------------------------------------------
    def _pace(self, target_s: float) -> None:
        """Wall-clock catches up with emulated ``target_s``; lateness is an overrun."""
        st = self.stats
        st.segments += 1
        wall = wall_now()
        prev_wall, prev_emu = self.last_mark
        if self.calibrate:
            modelled = target_s - prev_emu
            if modelled > 0:
                st.ratios.append((wall - prev_wall) / modelled)
            self.last_mark = (wall, target_s)
            return
        lag = self.clock.now_s() - target_s
        if lag > self.tolerance_s:
            st.overruns += 1
            st.lag_total_s += lag
            st.lag_max_s = max(st.lag_max_s, lag)
        else:
            to_wall = getattr(self.clock, "to_wall", None)
            if to_wall is not None and self.net.heartbeat_timeout_s:
                # a long wait watches the heartbeats: a death is noticed within the timeout
                until = to_wall(target_s) - IDLE_MARGIN_S
                if until - wall_now() > IDLE_MIN_S:
                    self.net.idle_until(until, f"the end of {self.step_name(*self.where)} (pacing)")
            self.clock.sleep_until_s(target_s)
        self.last_mark = (wall_now(), target_s)

    def _check(self, got: float, want: float) -> None:
        err = abs(got - want)
        if err > 1e-9 + 1e-9 * abs(want):
            self.stats.stamp_mismatches += 1
            self.stats.stamp_mismatch_max_s = max(self.stats.stamp_mismatch_max_s, err)

    # --- Executor hooks -------------------------------------------------------------------
    def _begin(self, phase: str, step: int) -> None:
        if self.current != (phase, step):
            self.current = (phase, step)
            self.where = (phase, step, -1)
            self.call(GPU_PEER, {"kind": "begin", "phase": phase, "step": step},
                      what=f"gpu begin of {self.step_name(phase, step)}")

    def _ctx(self, phase: str, step: int) -> int:
        P = self.cfg.workload.prompt_tokens
        return P if phase == "prefill" else P + step

    def gpu_work(self, kind: str, phase: str, step: int, layer: int, start_s: float,
                 seconds: float) -> None:
        self._begin(phase, step)
        if kind == "head":
            self._pace(start_s + seconds)
            return
        self.where = (phase, step, layer)
        if kind == "dense":
            r = self.call(GPU_PEER, {"kind": "dense", "index": layer, "start_s": start_s,
                                     "ctx": self._ctx(phase, step)},
                          what=f"{self.step_name(phase, step)}, dense layer {layer}")
        else:
            r = self.call(GPU_PEER, {"kind": "attention", "layer": layer, "start_s": start_s,
                                     "ctx": self._ctx(phase, step)},
                          what=f"{self.step_name(phase, step, layer)} attention")
            self.xn = np.array(r.arrays[0])
        self._check(r.fields["done_s"], start_s + seconds)
        self._pace(start_s + seconds)

    def _step_routing(self, phase: str, step: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.routing
        if phase == "prefill":
            w = r.topk_weights[:, : r.prompt_tokens, layer]
            return r.prefill_ids(layer), w.reshape(-1, w.shape[-1])
        return r.decode_ids(step - 1, layer), r.topk_weights[:, r.prompt_tokens + step - 1, layer]

    def moe(self, phase: str, step: int, layer: int, plan: policies.Plan,
            timing: policies.StepTiming, start_s: float) -> None:
        ids, weights = self._step_routing(phase, step, layer)
        xn = self.xn
        per_unit: dict[int, list[policies.Task]] = {}
        gpu_tasks: list[policies.Task] = []
        for t in plan.expand(self.n_units):
            (gpu_tasks if t.device == policies.GPU else per_unit.setdefault(t.device, [])).append(t)
        self.where = (phase, step, layer)
        at = self.step_name(phase, step, layer)
        if self.kills and not self.calibrate and phase == "decode":
            self._inject_kills(step, layer, per_unit)
        # 1. activations and tasks to the units, stamped with their link arrival
        waiting: dict[int, bytes] = {}
        unit_rows: dict[int, np.ndarray] = {}
        for u, tasks in sorted(per_unit.items()):
            toks = np.unique(np.concatenate([np.asarray(t.tokens, dtype=np.int64) for t in tasks]))
            unit_rows[u] = toks.astype(np.int32)
            meta, rows, gates = [], [], []
            for t in tasks:
                tok = np.asarray(t.tokens, dtype=np.int64)
                meta.append([t.expert, t.col_start, t.col_end, len(tok)])
                rows.append(np.searchsorted(toks, tok).astype(np.int32))
                gates.append(K.gate_weights_for(ids, weights, t.expert, tok))
            tid = self._send(unit_peer(u), {
                "kind": "moe", "layer": layer, "arrival_s": start_s + timing.unit_arrival_s[u],
                "meta": meta}, [np.ascontiguousarray(xn[toks]), np.concatenate(rows),
                                np.concatenate(gates).astype(np.float32)], f"{at} expert shards")
            waiting[tid] = unit_peer(u)
        results = self.net.gather(waiting, f"{at} expert shards") if waiting else {}
        # 2. the GPU: its own tasks (ready when cached or fetched) and every partial
        meta, rows, gates = [], [], []
        for t in gpu_tasks:
            tok = np.asarray(t.tokens, dtype=np.int64)
            ready = start_s + timing.fetch_done_s.get(t.expert, 0.0)
            meta.append([t.expert, t.col_start, t.col_end, len(tok), ready])
            rows.append(tok.astype(np.int32))
            gates.append(K.gate_weights_for(ids, weights, t.expert, tok))
        parts, arrays = [], [
            np.concatenate(rows) if rows else np.zeros(0, np.int32),
            np.concatenate(gates).astype(np.float32) if gates else np.zeros(0, np.float32)]
        for u in sorted(per_unit):
            r = results[unit_peer(u)]
            self._check(r.fields["done_s"], start_s + timing.unit_done_s[u])
            parts.append([u, len(unit_rows[u]), start_s + timing.partial_arrival_s[u]])
            arrays += [r.arrays[0], unit_rows[u]]
        done = self.call(GPU_PEER, {"kind": "moe", "layer": layer, "start_s": start_s,
                                    "meta": meta, "parts": parts}, arrays, f"{at} combine")
        end = start_s + timing.makespan_s
        self._check(done.fields["done_s"], end)
        self._pace(end)

    def _inject_kills(self, step: int, layer: int, per_unit: dict[int, list]) -> None:
        """Tells each unit due to die now to ``die``, just before its task of this step."""
        for k in list(self.kills):
            if step >= k.step and k.unit in per_unit:
                self.kills.remove(k)
                # straight to the transport: an injected fault is neither dropped nor retried
                self.tr.send(unit_peer(k.unit), wire.encode("task", {
                    "task_id": next(self.net.ids), "kind": "die"}))
                self.stats.kills.append(f"ndp{k.unit}@{self.step_name('decode', step, layer)}")

    def token_done(self, step: int, time_s: float) -> None:
        self.call(GPU_PEER, {"kind": "end"}, what=f"gpu end of {self.step_name(*self.current)}"
                  if self.current else "gpu end of step")
        self.current = None


class SchedulerCore:
    """The scheduler actor's body: run policies, collect outputs. Plain class (Ray-free).

    Keeps the running policy's records (:meth:`partial`) so that a driver can fetch what a
    failed run produced. With ``emulate.recover`` a restarted unit is re-warmed with the
    slices :meth:`warm` gave it and reset with the running policy's cost model before its
    interrupted task is sent again.
    """

    def __init__(self, cfg: Config, routing: Routing, transport: Transport) -> None:
        self.cfg, self.routing, self.tr = cfg, routing, transport
        self.timeout_s = cfg.emulate.recv_timeout_s
        self.faults = parse_inject(cfg.emulate.inject)
        rng = np.random.default_rng([cfg.workload.seed, 0xD809])  # drops: seeded, own stream
        self.net = Dispatcher(transport, self.timeout_s,
                              heartbeat_timeout_s=cfg.emulate.heartbeat_timeout_s,
                              recover=cfg.emulate.recover, drop_p=self.faults.drop_p, rng=rng)
        self.net.on_rejoin = self._rejoin
        self.kills: list[Kill] = list(self.faults.kills)  # each fires once per cluster
        self.layouts: dict[int, np.ndarray] = {}
        self._reset_fields: dict[str, Any] | None = None
        self._last: tuple[PolicyRecords, EmulationStats, tuple[str, int, int]] | None = None

    def ping(self, peer: bytes, n: int = 20) -> list[float]:
        return self.net.ping(peer, n)

    def _all(self, fields: dict[str, Any], what: str, units_only: bool = False,
             arrays: dict[int, list[np.ndarray]] | None = None,
             timeout_s: float | None = None) -> dict[bytes, wire.Message]:
        peers = {} if units_only else {GPU_PEER: -1}
        peers.update({unit_peer(u): u for u in range(self.cfg.ndp.num_ndp_units)})
        if arrays is not None:
            peers = {p: u for p, u in peers.items() if u in arrays}
        waiting = {self.net.send(p, fields, (arrays or {}).get(u, []), what): p
                   for p, u in peers.items()}
        return self.net.gather(waiting, what, timeout_s)

    def reset(self, ndp_internal_bw_gbps: float | None = None) -> None:
        """A new policy starts: devices forget their queues and take its cost model."""
        bw = self.cfg.ndp.internal_bw_gbps if ndp_internal_bw_gbps is None else ndp_internal_bw_gbps
        self._reset_fields = {"kind": "reset", "ndp_internal_bw_gbps": float(bw)}
        self._all(self._reset_fields, "reset")

    def warm(self, layouts: dict[int, list[tuple[int, int, int, int]]]) -> dict[int, int]:
        """Has each unit generate its weight slices before any timed work."""
        arrays = {u: [np.asarray(lay, dtype=np.int32).reshape(-1, 4)] for u, lay in layouts.items()}
        self.layouts = {u: a[0] for u, a in arrays.items()}
        got = self._all({"kind": "warm"}, "weight generation", units_only=True, arrays=arrays,
                        timeout_s=max(self.timeout_s, 600.0))
        return {int(m.fields["unit"]): int(m.fields["bytes"]) for m in got.values()}

    def _rejoin(self, peer: bytes) -> None:
        """A restarted unit: regenerate its weights, then give it the running policy's model."""
        name = peer.decode()
        u = int(name[3:])
        if u in self.layouts:
            self.net.call(peer, {"kind": "warm"}, [self.layouts[u]],
                          what=f"{name}'s weight regeneration after its restart",
                          timeout_s=max(self.timeout_s, 600.0))
        if self._reset_fields is not None:
            self.net.call(peer, self._reset_fields, what=f"{name}'s reset after its restart")

    def run_policy(self, name: str, dilation: float = 1.0, clock: Clock | None = None,
                   calibrate: bool = False, max_decode_steps: int | None = None, progress=None,
                   trace_steps: range = range(1, 3),
                   inject: bool | None = None) -> tuple[PolicyRecords, EmulationStats]:
        """Runs one policy through the workload on the devices; returns records and stats.

        The run's clock (a :class:`RealClock` at ``dilation`` unless ``clock`` is given)
        starts at emulated 0 once the devices are reset. Injected kills fire only in runs
        with ``inject`` (default: the paced ones, not calibration). If the run fails, its
        records so far stay available from :meth:`partial`.
        """
        routing = self.routing
        if max_decode_steps is not None and max_decode_steps < routing.decode_steps:
            keep = routing.prompt_tokens + max_decode_steps
            routing = Routing(routing.topk_ids[:, :keep], routing.topk_weights[:, :keep],
                              routing.prompt_tokens, routing.source)
        inject = not calibrate if inject is None else inject
        ex = EmulationExecutor(self.cfg, routing, self.tr, clock, self.timeout_s, calibrate=calibrate,
                               net=self.net, kills=self.kills if inject else [])
        episode = Episode(self.cfg, routing, name, executor=ex, trace_steps=trace_steps)
        self._last = (episode.rec, ex.stats, ex.where)
        before = self.net.counters()
        self.net.on_lost = ex.lost
        w0 = wall_now()
        try:
            self.reset(episode.cost.cfg.ndp.internal_bw_gbps)
            if clock is None:  # the run's emulated time starts now, with everything ready
                clock = ex.clock = RealClock(dilation)
            w0 = wall_now()
            ex.last_mark = (w0, 0.0)
            if not calibrate:
                clock.sleep_until_s(0.0)
            rec = episode.run(progress)
        finally:
            self.net.on_lost = None
            st = ex.stats
            after = self.net.counters()
            st.recoveries = int(after["recoveries"] - before["recoveries"])
            st.retries = int(after["retries"] - before["retries"])
            st.dropped = int(after["dropped"] - before["dropped"])
            st.wall_s = wall_now() - w0
            st.emulated_e2e_s = clock.now_s() if (clock is not None and not calibrate) else 0.0
            self._last = (episode.rec, st, ex.where)
        return rec, st

    def partial(self) -> tuple[PolicyRecords | None, EmulationStats | None, tuple[str, int, int] | None]:
        """The records, stats and (phase, step, layer) of the last run, finished or not."""
        return self._last if self._last is not None else (None, None, None)

    def collect(self) -> np.ndarray:
        return np.array(self.net.call(GPU_PEER, {"kind": "collect"}).arrays[0])

    def shutdown(self) -> None:
        for peer in [GPU_PEER, *(unit_peer(u) for u in range(self.cfg.ndp.num_ndp_units))]:
            with contextlib.suppress(EmulationError):
                self.tr.send(peer, wire.encode("shutdown"))
