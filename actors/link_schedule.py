"""The host link's queueing core (:class:`LinkSchedule`): pure, wall seconds in, completion
times out; the tests drive it directly and :mod:`actors.link` runs it on a transport.

Service discipline (DESIGN.md section 5), the same one the analytic engine assumes:

- three priority classes, preemptive: activations and partials (0) > on-demand fetches (1) >
  prefetches (2, or 1 with ``link.prefetch_priority = equal``); first come first served
  within a class, by arrival stamp then by the order the scheduler issued the transfer;
- a transfer *arrives* at its stamp (``at_s``, the wall time its sender says it entered the
  link), not when the link process happens to read it: host message latency shorter than the
  modelled time is absorbed. The link reschedules retroactively from the stamp; only a
  delivery it has already made cannot move (a stamp older than the last delivery is taken at
  that delivery and counted in ``late_arrivals``);
- preemption is exact and event-driven: :class:`LinkSchedule` keeps each transfer's remaining
  service and re-plans the queue only when something arrives, is cancelled, or is upgraded.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

CLASS_STEP = 0  # activations and partial outputs
CLASS_FETCH = 1  # on-demand expert weights
CLASS_PREFETCH = 2  # background expert weights (lowest) -- or CLASS_FETCH when "equal"
KINDS = ("activation", "partial", "fetch", "prefetch")
CLASS_OF = {"activation": CLASS_STEP, "partial": CLASS_STEP, "fetch": CLASS_FETCH,
             "prefetch": CLASS_PREFETCH}  # prefetch: see HostLink.prefetch_class
EPS_S = 1e-9  # wall seconds: a transfer owing less than this is complete


@dataclass(slots=True)
class Transfer:
    """One message on the link. ``remaining_s`` is wall seconds of service still owed."""

    xid: int
    kind: str
    cls: int
    arrive_s: float
    order: int
    recv_seq: int
    remaining_s: float
    true_bytes: int
    dst: bytes = b""
    frames: list[Any] = field(default_factory=list)
    seq: int = -1  # the MoE step it belongs to (-1: background)
    served: list[tuple[float, float]] = field(default_factory=list)
    src: bytes = b""  # the device that handed it over
    decoded: Any = None  # its header as the link decoded it (re-packed with the new stamp)
    label: str = ""  # its name on the trace's link track (default: its kind)
    windowed: bool = False  # a prefetch under its unit's credit window
    pid: int | None = None  # the scheduler's id for it (prefetches, fetches)
    upgraded: bool = False  # a prefetch turned on-demand fetch
    done_s: float = math.nan  # its completion, once popped

    def key(self) -> tuple:
        return (self.cls, self.arrive_s, self.order, self.recv_seq)


class LinkSchedule:
    """Preemptive-priority single server over wall time, re-planned from stamps.

    ``base_s`` is the time up to which service is committed: every transfer's ``remaining_s``
    is owed from then on. Transfers that have arrived by ``base_s`` wait in a heap by priority
    (lazily cleaned: a cancelled or re-keyed entry is skipped when it surfaces); later ones in
    a list by arrival. The next completion involves only the heap's top and the later
    arrivals that may preempt it -- every other waiting transfer has a lower priority than the
    top and cannot run before it is done -- so a backlog of a thousand prefetches costs each
    event O(log n), not O(n). :meth:`commit` moves ``base_s`` forward (never past the next
    completion), :meth:`pop_due` hands over the next completion.
    """

    def __init__(self, base_s: float = 0.0) -> None:
        self.base_s = base_s
        self.pending: dict[int, Transfer] = {}
        self.late_arrivals = 0
        self.late_total_s = 0.0
        self._recv = itertools.count()
        self._heap: list[tuple[tuple, int]] = []  # (key, xid) of arrived transfers
        self._future: list[tuple[float, tuple, int]] = []  # (arrive, key, xid), sorted
        self._plan: tuple[float, int] | None = None  # the next completion, cached

    # --- filing -----------------------------------------------------------------------------
    def _file(self, t: Transfer) -> None:
        if t.arrive_s <= self.base_s:
            heapq.heappush(self._heap, (t.key(), t.xid))
        else:
            bisect.insort(self._future, (t.arrive_s, t.key(), t.xid))
        self._plan = None

    def _top(self) -> Transfer | None:
        """The arrived transfer first in priority (stale heap entries dropped on the way)."""
        h = self._heap
        while h:
            key, xid = h[0]
            t = self.pending.get(xid)
            if t is not None and t.key() == key and t.arrive_s <= self.base_s:
                return t
            heapq.heappop(h)
        return None

    def _futures(self) -> list[Transfer]:
        out = []
        for arrive, key, xid in self._future:
            t = self.pending.get(xid)
            if t is not None and t.key() == key and t.arrive_s == arrive:
                out.append(t)
        return out

    # --- changes --------------------------------------------------------------------------
    def add(self, t: Transfer) -> None:
        t.recv_seq = next(self._recv)
        if t.arrive_s < self.base_s:  # older than a delivery already made: it cannot go back
            self.late_arrivals += 1
            self.late_total_s += self.base_s - t.arrive_s
            t.arrive_s = self.base_s
        self.pending[t.xid] = t
        self._file(t)

    def cancel(self, xid: int, at_s: float) -> Transfer | None:
        """Drops a transfer from ``at_s`` on (its service so far is wasted)."""
        if xid not in self.pending:
            return None
        self.commit(max(at_s, self.base_s))
        self._plan = None
        return self.pending.pop(xid)  # its heap or list entry is stale from now on

    def upgrade(self, xid: int, cls: int, at_s: float, order: int = -1) -> bool:
        """Moves a queued transfer into class ``cls`` from ``at_s`` on, keeping what it has
        already been served (an on-demand fetch of an expert whose prefetch is in flight)."""
        t = self.pending.get(xid)
        if t is None or t.cls < cls:
            return False
        self.commit(max(at_s, self.base_s))
        t.cls = cls
        t.upgraded = True
        t.arrive_s = max(t.arrive_s, self.base_s if at_s <= self.base_s else at_s)
        t.order = order  # its place among this step's fetches (the plan's order)
        self._file(t)
        return True

    # --- planning ---------------------------------------------------------------------------
    def _sim(self, until: float | None) -> tuple[float, int] | None:
        """Serves from ``base_s``: the heap's top and the later arrivals, by priority.

        Without ``until``: the first completion ``(time, xid)``, changing nothing. With
        ``until`` (no later than that completion): serves up to it for real, recording the
        served segments and what each transfer still owes.
        """
        t = self.base_s
        top = self._top()
        future = self._futures()
        active: list[tuple[tuple, int]] = [] if top is None else [(top.key(), top.xid)]
        rem: dict[int, float] = {}
        fi = 0
        while True:
            if not active:
                if fi >= len(future):
                    break
                nxt = future[fi].arrive_s
                if until is not None and nxt >= until:
                    break
                t = nxt
                while fi < len(future) and future[fi].arrive_s <= t:
                    heapq.heappush(active, (future[fi].key(), future[fi].xid))
                    fi += 1
                continue
            xid = active[0][1]
            r = rem.get(xid, self.pending[xid].remaining_s)
            if r < EPS_S:  # below what t + r can resolve: done
                r = 0.0
            nxt_arr = future[fi].arrive_s if fi < len(future) else math.inf
            finish = t + r
            if until is None and finish <= nxt_arr:
                return finish, xid
            stop = min(finish, nxt_arr) if until is None else min(finish, nxt_arr, until)
            if until is not None and stop > t:
                sv = self.pending[xid].served
                if sv and sv[-1][1] == t:  # a commit boundary, not a preemption: one segment
                    sv[-1] = (sv[-1][0], stop)
                else:
                    sv.append((t, stop))
            rem[xid] = r - (stop - t) if finish > stop else 0.0
            t = stop
            if until is not None and t >= until:
                break
            if rem[xid] <= 0:
                heapq.heappop(active)
            while fi < len(future) and future[fi].arrive_s <= t:
                heapq.heappush(active, (future[fi].key(), future[fi].xid))
                fi += 1
        if until is None:
            return None
        for xid, r in rem.items():
            self.pending[xid].remaining_s = max(0.0, r)
        self.base_s = max(self.base_s, until)
        # arrivals now in the past join the heap
        while self._future and self._future[0][0] <= self.base_s:
            arrive, key, xid = self._future.pop(0)
            tr = self.pending.get(xid)
            if tr is not None and tr.key() == key and tr.arrive_s == arrive:
                heapq.heappush(self._heap, (key, xid))
        return None

    def next_due(self) -> tuple[float, int] | None:
        """(completion wall time, transfer id) of the transfer that completes first."""
        if self._plan is None:
            self._plan = self._sim(None) or (math.inf, -1)
        return None if self._plan[1] < 0 else self._plan

    def next_due_s(self) -> float:
        nd = self.next_due()
        return nd[0] if nd else math.inf

    def commit(self, until_s: float) -> None:
        """Serves the queue up to ``until_s``, or up to the next completion if that is sooner
        (a change stamped later than a completion not yet delivered applies at it)."""
        nd = self.next_due()
        if nd is not None:
            until_s = min(until_s, nd[0])
        if until_s <= self.base_s:
            return
        self._sim(until_s)
        self._plan = None

    def pop_due(self, now_s: float) -> Transfer | None:
        """The transfer that completes first, if that is no later than ``now_s``; its
        completion becomes ``base_s``."""
        if len(self.pending) == 1:
            return self._pop_only(now_s)
        nd = self.next_due()
        if nd is None or nd[0] > now_s:
            return None
        done_s, xid = nd
        self.commit(done_s)
        t = self.pending.pop(xid)
        if t.remaining_s > 1e-12:  # the commit ended exactly at its completion
            a = done_s - t.remaining_s
            if t.served and t.served[-1][1] == a:
                t.served[-1] = (t.served[-1][0], done_s)
            else:
                t.served.append((a, done_s))
        t.remaining_s = 0.0
        self._plan = None
        t.done_s = done_s
        return t

    def _pop_only(self, now_s: float) -> Transfer | None:
        """:meth:`pop_due` when one transfer is pending (the usual case between a step's
        traffic and the next): it is served alone from ``max(base, its arrival)``, so its
        completion is known without simulating -- the same segments, stamps and ``base_s``
        as the general path, for a fraction of its cost per message."""
        ((xid, t),) = self.pending.items()
        start = max(self.base_s, t.arrive_s)
        done = start + (t.remaining_s if t.remaining_s >= EPS_S else 0.0)
        self._plan = (done, xid)
        if done > now_s:
            return None
        if done > start:
            sv = t.served
            if sv and sv[-1][1] == start:
                sv[-1] = (sv[-1][0], done)
            else:
                sv.append((start, done))
        del self.pending[xid]
        self._heap.clear()  # every entry left is stale now
        self._future.clear()
        self.base_s = max(self.base_s, done)
        self._plan = None
        t.remaining_s = 0.0
        t.done_s = done
        return t

    def plan(self) -> list[tuple[float, int]]:
        """Every pending transfer's completion if nothing else arrives (for tests; it
        replays :meth:`pop_due` on a copy)."""
        import copy

        twin = copy.deepcopy(self)
        out = []
        while (t := twin.pop_due(math.inf)) is not None:
            out.append((t.done_s, t.xid))
        return out
