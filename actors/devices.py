"""The GPU and NDP-unit actors as plain classes: self-throttling single servers.

Each device is a single server with a queue (DESIGN.md section 5). A task starts when its
inputs have arrived and the device is free; the device does the real numpy matmuls, then
holds its output until ``start + D x`` the task's duration from *its own* cost model. Real
work that does not fit its slot is a device **overrun**: the output leaves when the work is
done, late, and the lateness travels on. No device is told when anything should happen, and
none reports an emulated time: they report wall-clock start and end times, for the trace.

Times are wall seconds in the run's reference timebase (the scheduler's clock; a device on
another host adds its measured offset, :attr:`Device.offset_s`). Every message carries the
time it takes effect at its receiver (``at_s``): a receiver schedules from that stamp, not
from when its process happened to read the message, so host message latency shorter than the
modelled time disappears into the dilation and longer latency shows up as an overrun.

Each device body is a small coroutine program (as in SimPy): it ``yield``s a :class:`Hold`
(wall time to wait for) or a :class:`Until` (a condition on what has arrived) and the
:class:`DeviceServer` loop resumes it, receiving messages all the while. Real compute blocks
the loop; messages queue in the socket meanwhile.

- :class:`GpuDevice` runs the model forward by itself once told ``run``: embeddings, dense
  layers, attention + router of each MoE layer (stand-in matmuls, time from the cost model);
  after each router it sends the scheduler an ``event`` ``routed`` (with the expert weights
  that have landed in its cache since the last one) and waits for the step's ``cmd`` ``moe``;
  then sends each unit the activations it needs over the link, runs its own experts (cached
  ones first, fetched ones as their weights land: a wait it logs), waits for every partial,
  combines, and goes on. At each token it reads the wall clock and sends ``event`` ``token``.
  Its expert cache holds only weights that arrived over the link, keyed by transfer id;
  ``evict`` lists drop them.
- :class:`NdpUnit` holds its slices of the experts (generated from the seed before the run),
  runs a step's shards once both the scheduler's ``cmd`` ``moe`` and the GPU's activations
  have arrived, and sends its one partial per token to the GPU over the link. A ``cmd``
  ``ship`` sends the weights of an expert it holds whole to the GPU over the link (fetch or
  prefetch class), at once: the link, not the unit, is the modelled resource of a move.

Control requests (``task`` messages, answered with ``result``): ``reset`` (a new policy: its
cost config, D, the run's timebase offset, trace window; for a restarted unit also the run's
pause state, its next command number and its credit window), ``warm`` (NDP: generate slices),
``run`` (GPU: start the program at the run's epoch), ``report`` (logs, overruns, busy time),
``collect`` (GPU: final hidden states), ``preload`` (GPU: wait until keys have landed),
``status`` and ``resend`` (GPU, recovery: the MoE step in progress, which partials and which
transfer ids reached it; the step's activations again to a restarted unit).

Faults (DESIGN.md section 9): :class:`DeviceServer` answers a repeated task id from a reply
cache, sends heartbeats from its own socket, greets with ``hello`` when it (re)starts, and
obeys an injected ``die`` only when its host allows it. ``cmd`` ``pause`` freezes the device's
clock (:meth:`Device.now`: no hold ends, the program does not run, messages are still taken
in) until ``cmd`` ``resume`` gives it the run's total paused wall time, which every clock
subtracts: the scheduler pauses the whole system while it repairs a fault it injected
(:class:`actors.world.World`). Commands with a sequence number (``cseq``: the scheduler
numbers them when it injects message drops) are acknowledged on receipt and applied in
order, a copy of one already applied is counted and ignored. Ray wraps these classes only in
:mod:`cluster.engines.launch`.

Modules: this one holds what both devices share (:class:`Device`: the timebase, the program
runner, work slots, the pause); :mod:`actors.gpu` and :mod:`actors.ndp` the two devices;
:mod:`actors.device_server` the loop that serves one on a transport.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors import wire
from actors.clock import wall_now
from actors.peers import LINK_PEER, SCHED_PEER
from cluster.core import kernels as K
from cluster.core import reference as R
from cluster.core.cost import CostModel
from cluster.core.errors import ProtocolError
from cluster.core.spec import Config


@dataclass(frozen=True)
class Hold:
    """Resume the program at wall time ``until_s``."""

    until_s: float


@dataclass(frozen=True)
class Until:
    """Resume the program once ``ready()`` is true (checked after every message)."""

    ready: Callable[[], bool]


Program = Generator[Any, None, None]


def reply(request: dict[str, Any], fields: dict[str, Any], arrays: list[np.ndarray] = ()) -> list:
    """A ``result`` for ``request``: its task id, and which send of it (``attempt``) ran."""
    head = {"task_id": request["task_id"], "attempt": request.get("attempt", 1)}
    return wire.encode("result", {**head, **fields}, list(arrays))


def cost_from_fields(cfg: Config, f: dict[str, Any]) -> CostModel:
    """The device's cost model for the policy about to run: its own hardware (``cfg``, the
    config it was built with) with what the policy's cost configuration changes (``cost``:
    section -> {field: value}, e.g. ``{"ndp": {"weight_bits": 4}}`` for ``context-aware``'s
    reduced-bit NDP experts) and, for tests, ``unit_factor`` slow-downs."""
    import dataclasses

    c = cfg
    changes = f.get("cost") or {}
    if changes:
        c = cfg.replace(**{name: dataclasses.replace(getattr(cfg, name), **fields)
                           for name, fields in changes.items() if name in COST_SECTIONS})
    uf = f.get("unit_factor")
    return CostModel(c, tuple(float(x) for x in uf) if uf else None)


COST_SECTIONS = ("gpu", "ndp", "link")  # what a policy's cost configuration may change


def cost_fields(cost_cfg: Config, cfg: Config) -> dict[str, dict[str, Any]]:
    """The ``cost`` field of a reset: every field of the cost sections in which the policy's
    cost configuration differs from the run's config, as plain values (msgpack). Devices
    apply them over their own hardware, so a policy's change reaches them whatever it is,
    and what the devices really are (a test may build them slower) stays theirs."""
    import dataclasses

    out: dict[str, dict[str, Any]] = {}
    for name in COST_SECTIONS:
        mine, base = dataclasses.asdict(getattr(cost_cfg, name)), dataclasses.asdict(getattr(cfg, name))
        diff = {k: v for k, v in mine.items() if base[k] != v}
        if diff:
            out[name] = diff
    return out


class Device:
    """What both devices share: the timebase, the program runner, work slots, the logs."""

    name = "device"

    def __init__(self, cfg: Config, scale: float) -> None:
        self.cfg = cfg
        self.cost = CostModel(cfg)
        self.sm = R.scaled_model(cfg, scale)
        self.offset_s = 0.0
        self.shift_s = 0.0  # wall seconds the run's clock was paused for (fault injection)
        self.frozen_s: float | None = None  # the clock's reading while paused, else None
        self.dilation = 1.0
        self.out: list[tuple[bytes, list]] = []
        self._prog: Program | None = None
        self._wait: Any = None
        self._new_run()

    # --- per run state --------------------------------------------------------------------
    def _new_run(self) -> None:
        self.free_s = -np.inf
        self.overruns = 0
        self.overrun_total_s = 0.0
        self.overrun_max_s = 0.0
        self.overrun_by_kind: dict[str, list[float]] = {}  # kind -> [count, lag, late start]
        self.slots = 0
        self.arrival_late: dict[str, list[float]] = {}  # message kind -> receipt - stamp (wall)
        self.ratios: list[float] = []  # real compute / modelled duration, per slot
        self.busy_by_seq: dict[int, float] = {}  # MoE step -> held wall seconds
        self.log: list[list] = []  # [kind, label, start, end] for traced steps
        self.trace_seqs = (0, -1)
        self.error: str | None = None
        # the scheduler's sequenced commands (drop faults): next expected number, those that
        # came early, and copies of ones already taken (a retry whose first send arrived)
        self.cmd_next = 1
        self.cmd_held: dict[int, wire.Message] = {}
        self.cmd_duplicates = 0

    def reset(self, f: dict[str, Any]) -> None:
        self.cost = cost_from_fields(self.cfg, f)
        self.dilation = float(f.get("dilation", 1.0))
        self.offset_s = float(f.get("offset_s", self.offset_s))
        self._prog = None
        self._wait = None
        self._new_run()
        lo, hi = f.get("trace_seqs", [0, -1])
        self.trace_seqs = (int(lo), int(hi))
        self.cmd_next = int(f.get("cseq_next", 1))
        self.shift_s, self.frozen_s = float(f.get("shift_s", 0.0)), None
        if f.get("paused"):  # a unit restarted while the run is paused joins it paused
            self.pause()

    def now(self) -> float:
        """The run's clock: wall time in the run's timebase less the time it was paused."""
        if self.frozen_s is not None:
            return self.frozen_s
        return wall_now() + self.offset_s - self.shift_s

    # --- the run's pause (fault injection: DESIGN.md section 9) -----------------------------
    def pause(self) -> None:
        """Freezes the clock: no hold ends and the program does not run until :meth:`resume`
        (messages are still taken in). The scheduler pauses every device and the link when
        it injects a fault, so that detecting and repairing it takes no emulated time."""
        if self.frozen_s is None:
            self.frozen_s = self.now()

    def resume(self, shift_s: float) -> None:
        """Thaws the clock with the run's total pause ``shift_s`` (the same for every device
        and the link, set by the scheduler, so that all share one clock again)."""
        self.shift_s = float(shift_s)
        self.frozen_s = None

    # --- the program ------------------------------------------------------------------------
    def start_program(self, prog: Program) -> None:
        self._prog, self._wait = prog, None
        self.advance()

    def advance(self) -> None:
        """Runs the program until it waits for something not yet there."""
        while self._prog is not None and self.frozen_s is None:
            w = self._wait
            if isinstance(w, Hold) and self.now() < w.until_s:
                return
            if isinstance(w, Until) and not w.ready():
                return
            try:
                self._wait = next(self._prog)
            except StopIteration:
                self._prog = self._wait = None
            except Exception as exc:  # a program error stops this device's run, named
                self._prog = self._wait = None
                self.error = f"{self.name}: {type(exc).__name__}: {exc}"
                self.out.append((SCHED_PEER, wire.encode("event", {"kind": "failed",
                                                                   "message": self.error[:2000]})))

    def next_wake_s(self) -> float:
        if self.frozen_s is not None:
            return np.inf
        return self._wait.until_s if isinstance(self._wait, Hold) else np.inf

    def work(self, modelled_s: float, fn: Callable[[], Any], ready_s: float, kind: str,
             label: str, seq: int = -1) -> Generator[Any, None, Any]:
        """One task: its slot opens at ``start = max(free, ready)`` (stamps) and closes at
        ``start + D x modelled_s``; its output is effective at the slot's end, or when the real
        work is done if that is later (an overrun, counted).

        The real work runs as soon as the inputs are physically here and the previous task's
        work is done, and the output leaves at once stamped with its effective time: a
        receiver never acts on it before then, so the time the message spends in flight
        disappears into the slot (DESIGN.md section 5). Code that must observe the wall clock
        at the slot's end (a token's time, the cache seen by the router) holds until then.
        """
        start = max(self.free_s, ready_s)
        t0 = self.now()
        out = fn()
        t1 = self.now()
        slot_end = start + self.dilation * modelled_s
        self.slots += 1
        if modelled_s > 0:
            self.ratios.append((t1 - t0) / modelled_s)
        if t1 > slot_end:
            self.overruns += 1
            self.overrun_total_s += t1 - slot_end
            self.overrun_max_s = max(self.overrun_max_s, t1 - slot_end)
            late = self.overrun_by_kind.setdefault(kind, [0, 0.0, 0.0])
            late[0] += 1
            late[1] += t1 - slot_end
            late[2] += max(0.0, t0 - start)  # of which the work began after its slot opened
        finish = max(slot_end, t1)
        self.free_s = finish
        if seq >= 0:
            self.busy_by_seq[seq] = self.busy_by_seq.get(seq, 0.0) + (finish - start)
        if self._traced(seq, start):
            self.log.append([kind, label, start, finish])
        return out
        yield  # a generator, for ``yield from`` in programs

    def _traced(self, seq: int, start: float) -> bool:
        lo, hi = self.trace_seqs
        return lo <= seq <= hi or (seq < 0 and getattr(self, "_tracing", False))

    def report(self) -> dict[str, Any]:
        return {"overruns": self.overruns, "overrun_total_s": self.overrun_total_s,
                "overrun_max_s": self.overrun_max_s, "slots": self.slots,
                "overrun_by_kind": self.overrun_by_kind,
                "arrival_late": {k: [float(np.quantile(v, q)) for q in (0.5, 0.9, 1.0)]
                                 for k, v in self.arrival_late.items()},
                "ratios": self.ratios, "busy_by_seq": {str(k): v for k, v in self.busy_by_seq.items()},
                "log": self.log, "error": self.error, "cmd_duplicates": self.cmd_duplicates,
                "shift_s": self.shift_s}

    # --- messages -----------------------------------------------------------------------------
    def handle(self, msg: wire.Message) -> list:
        """A control request (``task``): its reply frames."""
        raise NotImplementedError

    def on_message(self, peer: bytes, msg: wire.Message) -> None:
        """A ``cmd`` from the scheduler or ``data`` from the link."""
        raise ProtocolError(f"{self.name} got an unexpected {msg.type!r} message")

    def send_link(self, fields: dict[str, Any], arrays: list[np.ndarray]) -> None:
        self.out.append((LINK_PEER, wire.encode("data", fields, arrays)))


def slice_cols(w: K.ExpertWeights, lo_s: int, hi_s: int, full_s: int) -> K.ExpertWeights:
    """Columns ``[lo_s, hi_s)`` of a whole expert's weights (contiguous copies)."""
    if lo_s == 0 and hi_s == full_s:
        return w
    g, u, d = w
    return (np.ascontiguousarray(g[:, lo_s:hi_s]), np.ascontiguousarray(u[:, lo_s:hi_s]),
            np.ascontiguousarray(d[lo_s:hi_s]))


def int_field(f: dict[str, Any], name: str) -> int:
    v = f.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"field {name!r} must be an int, got {v!r}")
    return v
