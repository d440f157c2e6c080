"""Fidelity of the measuring emulation against dilation, and cluster start-up time.

    .venv/bin/python bench/bench_fidelity.py [--dilations 5 10 20 50 100 auto] [--repeats 3]
                                             [--out bench/results/bench_fidelity.json]

Uses the emulate engine's embedded default (edge-rtx5080-ndp4, qwen3-30b-a3b with scaled
weights, batch 1, 16 in / 6 out) and the default policies, on one warm local cluster. For
each repeat the dilation is calibrated afresh (``auto``: what ``ndpmoe run`` would pick),
then every policy runs at every D. Fidelity = |emulated - analytic| / analytic, for the
end-to-end latency and the TPOT; the table gives the median and the max over policies and
repeats. Nothing is paced to the model: the error is what the devices and the link measured
(DESIGN.md section 5), so it must fall as D grows. Start-up = creating the scheduler, the
link, the GPU and 4 NDP actors and connecting them over zmq, after ``ray.init``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from cluster.cli import _emulate_defaults
from cluster.core.config import load_config
from cluster.core.metrics import summarize
from cluster.core.routing import build_routing
from cluster.engines import launch
from cluster.engines.analytic import run_policy
from cluster.engines.emulate import calibrate, choose_scale, records_from_run, unit_layouts
from cluster.studies.runner import DEFAULT_POLICIES


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dilations", nargs="+", default=["5", "10", "20", "50", "100", "auto"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/bench_fidelity.json")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cfg = load_config(overrides=_emulate_defaults([]))
    routing = build_routing(cfg)
    scale = choose_scale(cfg)
    names = list(DEFAULT_POLICIES)
    N = cfg.ndp.num_ndp_units
    analytic = {n: summarize(run_policy(cfg, routing, n), N) for n in names}
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.monotonic() - t0
    rows: list[dict] = []
    startups: list[float] = []
    autos: list[float] = []
    try:
        for _ in range(args.repeats):
            c = launch.start(cfg, routing, scale)
            startups.append(c.startup_s)
            c.close()
        cluster = launch.start(cfg, routing, scale)
        try:
            launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)))
            for rep in range(args.repeats):
                cal = calibrate(cluster, cfg, routing, names)
                auto = cal["bounds"]["dilation"]
                autos.append(auto)
                console.print(f"repeat {rep}: auto D = {auto:g} (bounds {cal['bounds']})")
                for d in args.dilations:
                    D = auto if d == "auto" else float(d)
                    for n in names:
                        st, meta = launch.get(cluster.scheduler.run_policy.remote(n, D), timeout=3600)
                        got = summarize(records_from_run(cfg, n, st, meta), N)
                        want = analytic[n]
                        row = {"dilation": d, "D": D, "repeat": rep, "policy": n,
                               "analytic_e2e_s": want["e2e_latency_s"], "emulated_e2e_s": got["e2e_latency_s"],
                               "e2e_error": _rel(got["e2e_latency_s"], want["e2e_latency_s"]),
                               "tpot_error": _rel(got["tpot_s"], want["tpot_s"]),
                               "overruns": sum(st.reports[k]["overruns"] for k in st.reports if k != "link"),
                               "slots": sum(st.reports[k]["slots"] for k in st.reports if k != "link"),
                               "wall_s": st.wall_s}
                        rows.append(row)
                        console.print(f"D={D:g} {n}: e2e {row['e2e_error'] * 100:.2f}% "
                                      f"TPOT {row['tpot_error'] * 100:.2f}% overruns "
                                      f"{row['overruns']}/{row['slots']} wall {st.wall_s:.1f} s")
        finally:
            cluster.close()
    finally:
        ray.shutdown()
    table = Table(title="fidelity vs dilation (median / max over policies x repeats)")
    for col in ("D", "e2e error", "TPOT error", "overruns", "wall per policy"):
        table.add_column(col, justify="right")
    summary = []
    for d in args.dilations:
        rs = [r for r in rows if r["dilation"] == d]
        e, t = [r["e2e_error"] for r in rs], [r["tpot_error"] for r in rs]
        s = {"dilation": d, "D": sorted({r["D"] for r in rs}),
             "e2e_median": statistics.median(e), "e2e_max": max(e),
             "tpot_median": statistics.median(t), "tpot_max": max(t),
             "overruns": sum(r["overruns"] for r in rs), "slots": sum(r["slots"] for r in rs),
             "wall_median_s": statistics.median(r["wall_s"] for r in rs)}
        summary.append(s)
        label = d if d != "auto" else f"auto ({', '.join(f'{x:g}' for x in s['D'])})"
        table.add_row(label, f"{s['e2e_median'] * 100:.2f}% ({s['e2e_max'] * 100:.2f}%)",
                      f"{s['tpot_median'] * 100:.2f}% ({s['tpot_max'] * 100:.2f}%)",
                      f"{s['overruns']}/{s['slots']}", f"{s['wall_median_s']:.1f} s")
    console.print(table)
    console.print(f"start-up after ray.init (1 GPU + 4 NDP + link): median "
                  f"{statistics.median(startups):.2f} s of {startups}; ray.init {init_s:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows, "startup_s": startups,
                               "ray_init_s": init_s, "auto_dilations": autos,
                               "config": {"system": cfg.system_name, "model": cfg.model.name,
                                          "prompt": cfg.workload.prompt_tokens,
                                          "output": cfg.workload.output_tokens,
                                          "policies": names}}, indent=1))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
