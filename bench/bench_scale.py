"""Scale: a 64-unit emulation and the analytic sweep's throughput with 1 and 2 workers.

    .venv/bin/python bench/bench_scale.py [--units 64] [--sweep-configs 60] [--sweep-only]
                                          [--out bench/results/bench_scale.json]

Emulation: a 256-expert top-8 model (qwen3-30b-a3b's widths and 4 layers, scaled weights) on
64 NDP units, batch 1, 8 in / 4 out, policies ``ep`` and ``tp``. Reports cluster start-up
(after ``ray.init``), peak resident memory of this run's Ray processes (sampled every 0.2 s
from /proc), the calibrated dilation and the fidelity error (target <= 10%).

Sweep: the stress grid's first configurations (``cluster.studies.sweep``) with 1 and then 2 local
worker processes (what ``ndpmoe stress`` uses without ``--address``); points per second and
the ratio. ``--sweep-only`` skips the emulation and keeps the emulation part of an existing
``--out`` file.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def _rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def _ray_pids() -> set[int]:
    """Processes of the Ray started by this benchmark (children of this process)."""
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, stack = set(), [me]
    while stack:
        p = stack.pop()
        for c in children.get(p, []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out | {me}


class PeakMemory:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes(_ray_pids()))
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def bench_emulation(units: int) -> dict:
    import ray

    from cluster.core.config import load_config
    from cluster.core.routing import build_routing
    from cluster.engines import launch
    from cluster.engines.analytic import run_policy
    from cluster.engines.emulate import (
        calibrate,
        choose_scale,
        records_from_run,
        unit_layouts,
    )

    cfg = load_config(overrides=[
        f"ndp.num_ndp_units={units}", "model.num_experts=256", "model.top_k=8", "model.num_layers=4",
        "workload.prompt_tokens=8", "workload.output_tokens=4", "ndp.capacity_bytes=1099511627776"])
    routing = build_routing(cfg)
    scale = choose_scale(cfg)
    names = ["ep", "tp"]
    with PeakMemory() as mem:
        t0 = time.monotonic()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.monotonic() - t0
        try:
            cluster = launch.start(cfg, routing, scale, ready_timeout_s=300)
            try:
                launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)))
                cal = calibrate(cluster, cfg, routing, names)
                bounds, floor = cal["bounds"], cal["floor"]
                dilation = bounds["dilation"]
                rows = []
                for n in names:
                    st, meta = launch.get(cluster.scheduler.run_policy.remote(n, dilation))
                    emu = records_from_run(cfg, n, st, meta).tokens[-1].time_s
                    ana = run_policy(cfg, routing, n).tokens[-1].time_s
                    devs = [k for k in st.reports if k != "link"]
                    rows.append({"policy": n, "analytic_s": ana, "emulated_s": emu,
                                 "fidelity_error": abs(emu - ana) / ana,
                                 "overruns": sum(st.reports[k]["overruns"] for k in devs),
                                 "segments": sum(st.reports[k]["slots"] for k in devs),
                                 "wall_s": st.wall_s})
            finally:
                cluster.close()
        finally:
            ray.shutdown()
    return {"units": units, "experts": 256, "top_k": 8, "scale": scale, "ray_init_s": init_s,
            "startup_s": cluster.startup_s, "peak_rss_bytes": mem.peak, "dilation": dilation,
            "dilation_bounds": bounds, "emulator_floor": floor, "runs": rows}


def bench_sweep(n_configs: int) -> list[dict]:
    from cluster.studies.sweep import STRESS_AXES, STRESS_BASE, STRESS_POLICIES, Grid, run_sweep

    out = []
    for workers in (1, 2):
        grid = Grid(STRESS_AXES, STRESS_POLICIES, STRESS_BASE, only=tuple(range(n_configs)))
        _, info = run_sweep(grid, workers=workers, progress=False)
        out.append({"workers": workers, **info})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--sweep-configs", type=int, default=60)
    ap.add_argument("--out", default="bench/results/bench_scale.json")
    ap.add_argument("--sweep-only", action="store_true",
                    help="measure the sweep only; keep the emulation part of --out")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    out = Path(args.out)
    if args.sweep_only:
        emu = json.loads(out.read_text())["emulation"]
    else:
        emu = bench_emulation(args.units)
    sweep = bench_sweep(args.sweep_configs)
    t = Table(title=f"emulation at scale: {args.units} NDP units, 256 experts, top-8", title_justify="left")
    for col in ("policy", "startup", "peak memory", "dilation", "emulated", "analytic", "fidelity error", "overruns"):
        t.add_column(col, justify="right")
    for r in emu["runs"]:
        t.add_row(r["policy"], f"{emu['startup_s']:.1f} s", f"{emu['peak_rss_bytes'] / 2**30:.2f} GiB",
                  f"{emu['dilation']:g}", f"{r['emulated_s'] * 1e3:.3f} ms", f"{r['analytic_s'] * 1e3:.3f} ms",
                  f"{r['fidelity_error'] * 100:.2f}%", f"{r['overruns']}/{r['segments']}")
    console.print(t)
    s = Table(title="analytic sweep throughput (stress grid, local worker processes)",
              title_justify="left")
    for col in ("workers", "points", "wall", "points/s"):
        s.add_column(col, justify="right")
    for r in sweep:
        s.add_row(str(r["workers"]), str(r["points"]), f"{r['wall_s']:.1f} s", f"{r['points_per_s']:.1f}")
    console.print(s)
    if len(sweep) == 2:
        console.print(f"2 workers / 1 worker: {sweep[1]['points_per_s'] / sweep[0]['points_per_s']:.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"emulation": emu, "sweep": sweep}, indent=2, default=float))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
