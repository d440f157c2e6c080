"""Run records (plain events), their aggregation into the per-policy summary, and the typed
results both engines return (:class:`PolicySummary`, :class:`RunResult`).

Engines append :class:`StepRecord` and :class:`TokenRecord` rows while they run; nothing is
aggregated until :func:`summary_of`. Imbalance, named as in DESIGN.md section 6:

- ``max_over_mean``: per MoE step, max unit busy time / mean unit busy time (>= 1), then
  averaged over the steps that gave the NDP units any work;
- ``balancedness``: per step mean / max (SGLang's), averaged over the same steps.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from cluster.core.spec import Config


@dataclass
class StepRecord:
    """One MoE step of one layer under one policy (times in emulated seconds)."""

    policy: str
    phase: str  # "prefill" | "decode"
    step: int  # 0 = prefill, 1.. = decode steps
    layer: int
    start_s: float
    end_s: float
    active: int  # experts with tokens
    gpu_hits: int  # active experts resident in the GPU cache
    fetched: int  # experts (or slices) fetched on demand
    gpu_experts: int  # expert tasks run on the GPU
    gpu_busy_s: float
    unit_busy_s: list[float]
    bytes_activation: int
    bytes_partial: int
    bytes_fetch: int
    lower_bound_s: float = 0.0

    @property
    def makespan_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def max_over_mean(self) -> float:
        return _max_over_mean(self.unit_busy_s)

    @property
    def balancedness(self) -> float:
        busy = self.unit_busy_s
        mx = max(busy)
        return (sum(busy) / len(busy)) / mx if mx > 0 else 1.0


def _max_over_mean(busy: list[float]) -> float:
    mean = sum(busy) / len(busy)
    return max(busy) / mean if mean > 0 else 1.0


@dataclass
class TokenRecord:
    """An output token: when it was ready, and the time since the previous one."""

    policy: str
    index: int
    time_s: float
    latency_s: float


@dataclass
class PolicyRecords:
    """Everything one policy's run produced."""

    policy: str
    scheduler: str
    prefetcher: str
    steps: list[StepRecord] = field(default_factory=list)
    tokens: list[TokenRecord] = field(default_factory=list)
    gpu_other_busy_s: float = 0.0  # attention, router, dense layers, LM head
    prefetch_bytes: int = 0
    prefetched_experts: int = 0
    intervals: list[Any] = field(default_factory=list)  # policies.plan.Interval, absolute times
    extra: dict[str, Any] = field(default_factory=dict)

    def __reduce__(self):
        """Pickled with its steps as columns, one list per :class:`StepRecord` field: a few
        long lists instead of thousands of small objects unpickle several times faster (an
        analytic run's policies send their records from worker processes to the parent)."""
        state = dict(self.__dict__)
        steps = state.pop("steps")
        columns = [list(col) for col in zip(*map(_step_fields, steps))]
        return _records_from_columns, (state, columns)


def _records_from_columns(state: dict[str, Any], columns: list[list[Any]]) -> PolicyRecords:
    rec = PolicyRecords.__new__(PolicyRecords)
    rec.__dict__.update(state)
    rec.steps = list(map(StepRecord, *columns)) if columns else []
    return rec


def summary_of(rec: PolicyRecords, num_units: int) -> PolicySummary:
    """The policy's :class:`PolicySummary` (its speed-up is the run's to fill in)."""
    steps = rec.steps
    e2e = rec.tokens[-1].time_s if rec.tokens else 0.0
    ttft = rec.tokens[0].time_s if rec.tokens else 0.0
    decode = [t.latency_s for t in rec.tokens[1:]]
    busy = [s.unit_busy_s for s in steps]
    # per step with NDP work: max/mean and mean/max of its units' busy times (as the
    # StepRecord properties compute them)
    ndp_busy = [b for b in busy if max(b) > 0]
    max_over_mean = [_max_over_mean(b) for b in ndp_busy]
    balancedness = [(sum(b) / len(b)) / max(b) for b in ndp_busy]
    dec_steps = [s for s in steps if s.phase == "decode"]
    active = sum([s.active for s in dec_steps])
    hits = sum([s.gpu_hits for s in dec_steps])
    unit_busy = np.sum(busy, axis=0) if steps else np.zeros(num_units)
    gpu_busy = rec.gpu_other_busy_s + sum([s.gpu_busy_s for s in steps])
    moe = [s.end_s - s.start_s for s in dec_steps]
    return PolicySummary(
        scheduler=rec.scheduler,
        prefetcher=rec.prefetcher,
        e2e_latency_s=e2e,
        ttft_s=ttft,
        tpot_s=float(np.mean(decode)) if decode else 0.0,
        moe_step_mean_s=float(np.mean(moe)) if moe else 0.0,
        moe_step_p50_s=float(np.median(moe)) if moe else 0.0,
        moe_step_p99_s=float(np.percentile(moe, 99)) if moe else 0.0,
        max_over_mean=float(np.mean(max_over_mean)) if ndp_busy else 1.0,
        balancedness=float(np.mean(balancedness)) if ndp_busy else 1.0,
        gpu_util=gpu_busy / e2e if e2e > 0 else 0.0,
        unit_util=[float(b / e2e) if e2e > 0 else 0.0 for b in unit_busy],
        prefetch_hit_rate=hits / active if active else 0.0,
        link_bytes={
            "activation": int(sum([s.bytes_activation for s in steps])),
            "partial": int(sum([s.bytes_partial for s in steps])),
            "fetch": int(sum([s.bytes_fetch for s in steps])),
            "prefetch": int(rec.prefetch_bytes),
        },
        fetched_experts=int(sum([s.fetched for s in steps])),
        prefetched_experts=int(rec.prefetched_experts),
        moe_steps=len(steps),
        extra=dict(rec.extra),
    )


def summarize(rec: PolicyRecords, num_units: int) -> dict[str, Any]:
    """Per-policy summary fields of ``summary.json``, without the speed-up (which needs the
    other policies of the run: :class:`RunResult` fills it in)."""
    return summary_of(rec, num_units).fields()


STEP_FIELDS = [f.name for f in dataclasses.fields(StepRecord)]
_step_fields = attrgetter(*STEP_FIELDS)  # a step's fields as a tuple, in order


def write_steps_csv(path: Path, records: list[PolicyRecords]) -> None:
    """One row per step, as ``csv.writer`` writes it; rows whose text fields need no quoting
    (every policy and phase name we have) are formatted directly, a few times faster."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*STEP_FIELDS, "makespan_s", "max_over_mean"])
        busy_col = STEP_FIELDS.index("unit_busy_s")
        for rec in records:
            plain = all(_plain(x) for x in {s.policy for s in rec.steps} | {s.phase for s in rec.steps})
            if plain:
                fh.write("".join([_step_line(s) for s in rec.steps]))
                continue
            for s in rec.steps:
                row = [getattr(s, f) for f in STEP_FIELDS]
                row[busy_col] = ";".join(f"{b:.9g}" for b in s.unit_busy_s)
                w.writerow([*row, f"{s.makespan_s:.9g}", f"{s.max_over_mean:.6g}"])


def _plain(text: Any) -> bool:
    """Whether ``csv.writer`` (excel dialect) writes ``text`` as it is, unquoted."""
    return isinstance(text, str) and not any(c in text for c in ',"\r\n') and text != ""


def _step_line(s: StepRecord) -> str:
    """``s`` as ``csv.writer`` writes it (numbers as ``str`` gives them, CRLF line end)."""
    busy = s.unit_busy_s
    return (f"{s.policy},{s.phase},{s.step},{s.layer},{s.start_s},{s.end_s},{s.active},"
            f"{s.gpu_hits},{s.fetched},{s.gpu_experts},{s.gpu_busy_s},"
            f"{';'.join([f'{b:.9g}' for b in busy])},{s.bytes_activation},{s.bytes_partial},"
            f"{s.bytes_fetch},{s.lower_bound_s},{s.end_s - s.start_s:.9g},{_max_over_mean(busy):.6g}\r\n")


def write_tokens_csv(path: Path, records: list[PolicyRecords]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", "index", "time_s", "latency_s"])
        for rec in records:
            for t in rec.tokens:
                w.writerow([t.policy, t.index, f"{t.time_s:.9g}", f"{t.latency_s:.9g}"])


# --- typed results ---------------------------------------------------------------------------

SPEEDUP_BASE = "monde"  # the paper's baseline: every policy's speed-up is over it

# ``RunResult`` is serialised once, by :meth:`RunResult.document`, to ``summary.json``; speed-ups
# over ``monde`` are computed in one place (``RunResult.__post_init__``) and nothing downstream
# edits a summary: an engine with more to say about a policy (fidelity, overruns, fault
# counters, a failure) puts it in the summary's ``extra`` when it builds it.


@dataclass
class PolicySummary:
    """What one policy did in one run. Times in emulated seconds of the target hardware."""

    scheduler: str
    prefetcher: str
    e2e_latency_s: float
    ttft_s: float
    tpot_s: float
    moe_step_mean_s: float
    moe_step_p50_s: float
    moe_step_p99_s: float
    max_over_mean: float  # per MoE step with NDP work, max / mean unit busy time, averaged
    balancedness: float  # mean / max of the same, averaged
    gpu_util: float
    unit_util: list[float]
    prefetch_hit_rate: float
    link_bytes: dict[str, int]  # activation, partial, fetch, prefetch
    fetched_experts: int
    prefetched_experts: int
    moe_steps: int
    extra: dict[str, Any] = field(default_factory=dict)
    speedup_vs_monde: float | None = None

    def fields(self) -> dict[str, Any]:
        """The common fields in order, then ``extra``: the summary before its speed-up."""
        d = {f.name: getattr(self, f.name) for f in COMMON}
        d.update(self.extra)
        return d

    def to_dict(self) -> dict[str, Any]:
        """The policy's object in ``summary.json``."""
        return {**self.fields(), "speedup_vs_monde": self.speedup_vs_monde}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicySummary:
        """The inverse of :meth:`to_dict`: the common fields by name, every other key to
        ``extra`` (a failed policy's summary may lack common fields: they must be there)."""
        missing = [f.name for f in COMMON if f.name not in d]
        if missing:
            raise ValueError(f"a policy summary needs {missing}")
        extra = {k: v for k, v in d.items() if k not in _COMMON_NAMES and k != "speedup_vs_monde"}
        return cls(**{f.name: d[f.name] for f in COMMON}, extra=extra,
                   speedup_vs_monde=d.get("speedup_vs_monde"))

    def get(self, key: str, default: Any = None) -> Any:
        """A field or an ``extra`` key by name, as in ``summary.json``."""
        if key in _COMMON_NAMES or key == "speedup_vs_monde":
            return getattr(self, key)
        return self.extra.get(key, default)



COMMON = [f for f in dataclasses.fields(PolicySummary) if f.name not in ("extra", "speedup_vs_monde")]
_COMMON_NAMES = frozenset(f.name for f in COMMON)


@dataclass
class RunResult:
    """One run of some policies on one engine.

    ``policies`` keeps the order they ran in. ``failures``: the policy that failed part-way
    (its error, where, and a partial summary; an emulation only), after them. ``extra`` holds
    run-level facts (the routing, the cache size, the emulation cluster's calibration and fault
    counters). ``status`` is ``"ok"`` or ``"failed"`` (then ``error`` says why and ``not_run``
    lists the policies that never started). Speed-ups are filled in on creation.
    """

    engine: str
    cfg: Config
    policies: dict[str, PolicySummary]
    records: list[PolicyRecords] = field(default_factory=list)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None
    not_run: list[str] = field(default_factory=list)
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        base = self.policies.get(SPEEDUP_BASE)
        b = base.e2e_latency_s if base is not None else None
        for s in self.policies.values():
            v = s.e2e_latency_s
            s.speedup_vs_monde = (b / v) if b and v else None

    @property
    def summaries(self) -> dict[str, dict[str, Any]]:
        """The per-policy objects of ``summary.json``, by policy name."""
        out = {n: s.to_dict() for n, s in self.policies.items()}
        out.update({n: {**d, "speedup_vs_monde": None} for n, d in self.failures.items()})
        return out

    def document(self) -> dict[str, Any]:
        """The whole ``summary.json``."""
        doc: dict[str, Any] = {
            "engine": self.engine,
            "system": self.cfg.system_name,
            "model": self.cfg.model.name,
            "config": self.cfg.to_dict(),
            "policies": self.summaries,
            **self.extra,
        }
        if self.status != "ok":
            doc["status"] = self.status
            doc["error"] = self.error
            doc["not_run"] = list(self.not_run)
        doc.setdefault("status", "ok")
        return doc
