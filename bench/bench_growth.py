"""How the analytic engine's time per MoE step grows with each axis of the problem.

    .venv/bin/python bench/bench_growth.py [--repeats 3] [--out bench/results/bench_growth.json]

One axis at a time around the paper's point (qwen3-30b-a3b: 128 experts, top-8; 4 NDP units;
batch 1): experts 64..1024, NDP units 2..256, batch 1..256, top-k 1..16, for ``ep``, ``tp``,
``tp-lb``, ``paper`` and ``eplb``. Each point is a short analytic run (16 layers, 16 prompt
tokens, 10 output tokens); the time per MoE step is the CPU time of the decode steps (the
policy's decision, the engine's timing of the plan and its bookkeeping) over their number,
the best of ``--repeats`` runs (CPU time, not wall: the machine is shared). Prints a table,
writes JSON, a log-log PNG with one panel per axis, and the least-squares slope of
log(time) over log(axis value) for every curve: 0 is flat, 1 linear.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cluster.core.config import load_config  # noqa: E402
from cluster.core.routing import build_routing  # noqa: E402
from cluster.engines.analytic import run_policy  # noqa: E402

POLICIES = ["ep", "tp", "tp-lb", "paper", "eplb"]
PAPER_POINT = {"model.num_experts": 128, "ndp.num_ndp_units": 4, "workload.batch_size": 1,
               "model.top_k": 8}
AXES = {
    "model.num_experts": [64, 128, 256, 512, 1024],
    "ndp.num_ndp_units": [2, 4, 8, 16, 32, 64, 128, 256],
    "workload.batch_size": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    "model.top_k": [1, 2, 4, 8, 16],
}
BASE = ["model.num_layers=16", "workload.prompt_tokens=16", "workload.output_tokens=10",
        "ndp.capacity_bytes=1099511627776", "policy.eplb_period_steps=4",
        "policy.eplb_window_steps=16"]


def time_per_step_s(point: dict[str, int], policy: str, repeats: int) -> float:
    """Best-of-``repeats`` CPU seconds per decode MoE step of one policy at one point."""
    cfg = load_config("edge-rtx5080-ndp4", "qwen3-30b-a3b", None,
                      [*BASE, *(f"{k}={v}" for k, v in point.items())])
    routing = build_routing(cfg)
    steps = routing.decode_steps * cfg.model.num_layers
    best = math.inf
    for _ in range(repeats):
        marks: list[float] = []  # CPU time after the prefill and after every decode step
        run_policy(cfg, routing, policy, progress=lambda k, m=marks: m.append(time.process_time()),
                   trace_steps=range(0))
        best = min(best, (marks[-1] - marks[0]) / steps)
    return best


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) over log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(rows: list[dict], slopes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.8), sharey=True)
    for ax, axis in zip(axes, AXES):
        for pol in POLICIES:
            pts = [(r["value"], r["step_us"]) for r in rows if r["axis"] == axis and r["policy"] == pol]
            ax.loglog(*zip(*pts), marker="o", ms=3,
                      label=f"{pol} (slope {slopes[axis][pol]:.2f})")
        ax.set_xlabel(axis.split(".")[-1])
        ax.set_title(f"{axis} (paper: {PAPER_POINT[axis]})", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("engine CPU time per MoE step (us)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per point; the best counts")
    ap.add_argument("--out", default="bench/results/bench_growth.json")
    ap.add_argument("--axes", nargs="*", default=list(AXES), choices=list(AXES))
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = []
    for axis in args.axes:
        for value in AXES[axis]:
            point = {**PAPER_POINT, axis: value}
            for pol in POLICIES:
                us = time_per_step_s(point, pol, args.repeats) * 1e6
                rows.append({"axis": axis, "value": value, "policy": pol, "step_us": us})
                print(f"{axis}={value} {pol}: {us:.1f} us", flush=True)
    slopes = {axis: {pol: slope([r["value"] for r in rows if r["axis"] == axis and r["policy"] == pol],
                                [r["step_us"] for r in rows if r["axis"] == axis and r["policy"] == pol])
                     for pol in POLICIES} for axis in args.axes}
    t = Table(title="slope of log(time per MoE step) over log(axis), around the paper's point",
              title_justify="left")
    t.add_column("axis")
    for pol in POLICIES:
        t.add_column(pol, justify="right")
    for axis in args.axes:
        lo, hi = AXES[axis][0], AXES[axis][-1]
        t.add_row(f"{axis} {lo}..{hi}", *(f"{slopes[axis][p]:.2f}" for p in POLICIES))
    Console().print(t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"paper_point": PAPER_POINT, "base": BASE, "rows": rows,
                               "slopes": slopes, "clock": "process CPU time, best of "
                               f"{args.repeats}"}, indent=2))
    if set(args.axes) == set(AXES):
        plot(rows, slopes, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
