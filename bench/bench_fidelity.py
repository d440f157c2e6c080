"""Fidelity error of the emulation engine against dilation, and cluster startup time.

    .venv/bin/python bench/bench_fidelity.py [--dilations 1 2 5 10 20 auto] [--repeats 3]
                                             [--out bench/results/bench_fidelity.json]

Uses the emulate engine's embedded default (edge-rtx5080-ndp4, qwen3-30b-a3b with scaled
weights, batch 1, 16 in / 8 out) and the default policies. For each dilation D every policy
runs paced; fidelity error = |emulated - analytic| / analytic end-to-end latency. ``auto`` is
the calibrated D the ``ndpmoe run`` command would pick. Startup = creating the scheduler, the
GPU and 4 NDP actors and connecting them over zmq, after ``ray.init`` (median of repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from cluster import launch
from cluster.analytic import run_policy
from cluster.cli import _emulate_defaults
from cluster.config import load_config
from cluster.emulate import (
    CALIBRATION_DECODE_STEPS,
    choose_dilation,
    choose_scale,
    unit_layouts,
)
from cluster.routing import build_routing
from cluster.runner import DEFAULT_POLICIES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dilations", nargs="+", default=["1", "2", "5", "10", "20", "auto"])
    ap.add_argument("--repeats", type=int, default=3, help="startup measurements")
    ap.add_argument("--out", default="bench/results/bench_fidelity.json")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = load_config(overrides=_emulate_defaults([]))
    routing = build_routing(cfg)
    scale = choose_scale(cfg)
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.monotonic() - t0
    startups = []
    try:
        for _ in range(args.repeats):
            c = launch.start(cfg, routing, scale)
            startups.append(c.startup_s)
            c.close()
        cluster = launch.start(cfg, routing, scale)
        try:
            launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)))
            ratios = []
            for n in DEFAULT_POLICIES:
                _, st = launch.get(cluster.scheduler.run_policy.remote(n, 1.0, True, CALIBRATION_DECODE_STEPS))
                ratios += st.ratios
            auto = choose_dilation(ratios)
            analytic = {n: run_policy(cfg, routing, n).tokens[-1].time_s for n in DEFAULT_POLICIES}
            rows = []
            for d in args.dilations:
                D = auto if d == "auto" else float(d)
                for n in DEFAULT_POLICIES:
                    _rec, st = launch.get(cluster.scheduler.run_policy.remote(n, D))
                    err = abs(st.emulated_e2e_s - analytic[n]) / analytic[n]
                    rows.append({"dilation": D, "auto": d == "auto", "policy": n,
                                 "analytic_s": analytic[n], "emulated_s": st.emulated_e2e_s,
                                 "fidelity_error": err, "overruns": st.overruns,
                                 "segments": st.segments, "wall_s": st.wall_s})
                    console.print(f"D={D:g} {n}: error {err * 100:.2f}% overruns {st.overruns}/{st.segments} "
                                  f"wall {st.wall_s:.1f} s")
        finally:
            cluster.close()
    finally:
        ray.shutdown()
    t = Table(title="emulation fidelity vs dilation (default config, 5 policies)", title_justify="left")
    for col in ("dilation", "median error", "max error", "overrun segments", "wall per policy"):
        t.add_column(col, justify="right")
    summary = []
    for D in dict.fromkeys(r["dilation"] for r in rows):
        rs = [r for r in rows if r["dilation"] == D]
        errs = [r["fidelity_error"] for r in rs]
        row = {"dilation": D, "auto": any(r["auto"] for r in rs), "median_error": statistics.median(errs),
               "max_error": max(errs), "overruns": sum(r["overruns"] for r in rs),
               "segments": sum(r["segments"] for r in rs),
               "median_wall_s": statistics.median(r["wall_s"] for r in rs)}
        summary.append(row)
        t.add_row(f"{D:g}" + (" (auto)" if row["auto"] else ""), f"{row['median_error'] * 100:.3f}%",
                  f"{row['max_error'] * 100:.3f}%", f"{row['overruns']}/{row['segments']}",
                  f"{row['median_wall_s']:.1f} s")
    console.print(t)
    console.print(f"ray.init: {init_s:.2f} s; cluster startup after ray.init (1 GPU + 4 NDP actors, "
                  f"median of {len(startups)}): {statistics.median(startups):.2f} s "
                  f"(all: {', '.join(f'{s:.2f}' for s in startups)}); target <= 5 s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "auto_dilation": auto,
                               "calibration_p98": float(np.quantile(ratios, 0.98)),
                               "ray_init_s": init_s, "startup_s": startups}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
