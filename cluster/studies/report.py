"""What a run leaves behind: the run directory, ``summary.json``, CSVs, trace and plots.

Everything here reads finished records; nothing reaches back into the engines.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from cluster.core.metrics import PolicyRecords, RunResult, write_steps_csv, write_tokens_csv


def new_run_dir(base: str | Path = "runs", engine: str = "analytic") -> Path:
    """A fresh directory ``runs/YYYYmmdd-HHMMSS-ENGINE[-n]``."""
    base = Path(base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        d = base / (f"{stamp}-{engine}" + (f"-{i}" if i else ""))
        try:
            d.mkdir(parents=True, exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise RuntimeError("could not create a fresh run directory")  # pragma: no cover


def write_summary(result: RunResult, run_dir: Path) -> Path:
    """``summary.json`` (:meth:`RunResult.document`) and ``config.json`` of a run."""
    path = run_dir / "summary.json"
    path.write_text(strict_json(result.document()))
    (run_dir / "config.json").write_text(strict_json(result.cfg.to_dict()))
    return path


def strict_json(doc: Any) -> str:
    """JSON that strict parsers accept: NaN and infinities become ``null``."""
    return json.dumps(_finite_only(doc), indent=2, default=_json_default, allow_nan=False)


def _finite_only(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _finite_only(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_only(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite_only(o.tolist())
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_records(run_dir: Path, records: list[PolicyRecords]) -> None:
    write_steps_csv(run_dir / "steps.csv", records)
    write_tokens_csv(run_dir / "tokens.csv", records)


def write_trace(run_dir: Path, records: list[PolicyRecords], time_unit_note: str = "") -> Path:
    """Chrome/Perfetto trace-event JSON: one process per policy, one thread per resource.

    Durations are emulated time in microseconds; resources are ``gpu``, ``link`` and
    ``ndp0``.. (one track each).
    """
    events: list[dict[str, Any]] = []
    for pid, rec in enumerate(records, start=1):
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": rec.policy}})
        tids: dict[str, int] = {}
        for iv in rec.intervals:
            if iv.resource not in tids:
                tids[iv.resource] = _track_order(iv.resource)
                events.append({"ph": "M", "pid": pid, "tid": tids[iv.resource], "name": "thread_name",
                               "args": {"name": iv.resource}})
            events.append({"ph": "X", "pid": pid, "tid": tids[iv.resource], "name": iv.label or iv.kind,
                           "cat": iv.kind, "ts": iv.start_s * 1e6,
                           "dur": max(0.0, (iv.end_s - iv.start_s) * 1e6)})
    path = run_dir / "trace.json"
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                "otherData": {"note": time_unit_note or "emulated time"}}))
    return path


def _track_order(resource: str) -> int:
    if resource == "gpu":
        return 1
    if resource == "link":
        return 2
    if resource.startswith("ndp"):
        return 10 + int(resource[3:])
    return 1000


def write_plots(run_dir: Path, summaries: dict[str, dict[str, Any]],
                records: list[PolicyRecords]) -> list[Path]:
    """PNG plots: latency by policy, per-unit busy time, imbalance over decode steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    out = []
    # 1. latency by policy: TTFT + decode stacked
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    ttft = [summaries[n]["ttft_s"] for n in names]
    e2e = [summaries[n]["e2e_latency_s"] for n in names]
    dec = [max(0.0, a - b) for a, b in zip(e2e, ttft)]
    ax.bar(names, ttft, label="TTFT (prefill)", color="#4C72B0")
    ax.bar(names, dec, bottom=ttft, label="decode", color="#DD8452")
    for i, v in enumerate(e2e):
        sp = summaries[names[i]].get("speedup_vs_monde")
        ax.text(i, v, f"{v:.2f} s" + (f"\n{sp:.2f}x" if sp else ""), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_xlabel("policy")
    ax.set_title("End-to-end latency by policy (speedup vs monde)")
    ax.set_ylim(0, max(e2e) * 1.25 if e2e else 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "latency_by_policy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    # 2. per-unit busy time (utilisation) per policy
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    n_units = len(next(iter(summaries.values()))["unit_util"]) if summaries else 0
    width = 0.8 / max(1, n_units + 1)
    x = np.arange(len(names))
    for u in range(n_units):
        ax.bar(x + u * width, [summaries[n]["unit_util"][u] * 100 for n in names], width,
               label=f"NDP {u}")
    ax.bar(x + n_units * width, [summaries[n]["gpu_util"] * 100 for n in names], width,
           label="GPU", color="black")
    ax.set_xticks(x + width * n_units / 2, names)
    ax.set_ylabel("busy time (% of end-to-end)")
    ax.set_xlabel("policy")
    ax.set_title("Per-unit and GPU busy time")
    ax.legend(fontsize=7, ncol=min(4, n_units + 1))
    fig.tight_layout()
    p = run_dir / "unit_busy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    # 3. imbalance over decode steps (mean over layers of each token step)
    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in records:
        by_step: dict[int, list[float]] = {}
        for s in rec.steps:
            if s.phase == "decode" and max(s.unit_busy_s) > 0:
                if s.step in by_step:
                    by_step[s.step].append(s.max_over_mean)
                else:
                    by_step[s.step] = [s.max_over_mean]
        if by_step:
            xs = sorted(by_step)
            ax.plot(xs, [float(np.mean(by_step[k])) for k in xs], label=rec.policy, lw=1)
    ax.set_xlabel("decode step (output token)")
    ax.set_ylabel("max/mean unit busy time (mean over layers)")
    ax.set_title("NDP load imbalance over decode steps (1 = balanced)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = run_dir / "imbalance_over_steps.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


def fmt_s(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v >= 1:
        return f"{v:.3f}s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f}ms"
    return f"{v * 1e6:.1f}us"


def results_table(summaries: dict[str, dict[str, Any]], engine: str, title: str = ""):
    """A rich Table of the run's headline numbers."""
    from rich.table import Table

    t = Table(title=title or f"ndpmoe {engine} results", title_justify="left")
    emulate = engine == "emulate"
    t.add_column("policy", style="bold", no_wrap=True)
    t.add_column("e2e" if not emulate else "emulated", justify="right", no_wrap=True)
    if emulate:
        t.add_column("analytic", justify="right", no_wrap=True)
        t.add_column("err e2e", justify="right", no_wrap=True)
        t.add_column("err TPOT", justify="right", no_wrap=True)
        t.add_column("D", justify="right", no_wrap=True)
        t.add_column("overruns", justify="right", no_wrap=True)
    if not emulate:
        t.add_column("TTFT", justify="right", no_wrap=True)
        t.add_column("TPOT", justify="right", no_wrap=True)
    t.add_column("vs monde", justify="right", no_wrap=True)
    if not emulate:
        t.add_column("max/mean", justify="right", no_wrap=True)
        t.add_column("GPU", justify="right", no_wrap=True)
        t.add_column("hit", justify="right", no_wrap=True)
    for name, s in summaries.items():
        sp = s.get("speedup_vs_monde")
        row = [name, fmt_s(s["e2e_latency_s"])]
        if emulate:
            fid = s.get("fidelity_error")
            tpot = (s.get("fidelity") or {}).get("tpot")
            row += [fmt_s(s.get("analytic_e2e_latency_s")),
                    f"{fid * 100:.2f}%" if fid is not None and math.isfinite(fid) else "-",
                    f"{tpot * 100:.2f}%" if tpot is not None and math.isfinite(tpot) else "-",
                    f"{s.get('dilation', 0):.0f}", f"{s.get('overruns', 0)}/"
                    f"{sum((s.get('device_slots') or {}).values())}"]
            if s.get("recoveries"):
                row[-1] += f" ({s['recoveries']} recovered)"
        else:
            row += [fmt_s(s["ttft_s"]), fmt_s(s["tpot_s"])]
        row += [f"{sp:.2f}x" if sp else "-"]
        if not emulate:
            row += [f"{s['max_over_mean']:.3f}", f"{s['gpu_util'] * 100:.1f}%",
                    f"{s['prefetch_hit_rate'] * 100:.0f}%"]
        t.add_row(*row)
    return t
