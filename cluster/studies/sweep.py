"""Sweeps: a grid of configurations x policies on the analytic engine, fanned out over CPUs.

``ndpmoe sweep`` takes any axes (``--axis ndp.num_ndp_units=2,4,8``, or a TOML file with a
``[grid]`` table of lists, keys as in ``--set``); ``ndpmoe stress`` is a sweep with axes for
load balance at scale (NDP units x experts x top-k x routing skew x batch) on a short,
shallow workload. Each (configuration, policy) pair is a *point*. Points run in ``--workers``
local processes, or as Ray tasks on the cluster at ``--address`` (``local``: a local Ray), so
a cluster makes a sweep faster; configurations that fail validation are recorded with their
error, not fatal.

Output: ``sweep.csv`` (one row per point), ``summary.json``, heatmaps of ``max_over_mean``,
``balancedness`` and latency over the first two axes (mean over the others) per policy, and
optionally a few points re-run on the emulation engine (``--emulate K``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import policies  # registers every policy's knobs: a worker's load_config then checks them
from cluster.core.errors import ConfigError

STRESS_AXES: dict[str, list[Any]] = {
    "ndp.num_ndp_units": [4, 8, 16, 32, 64],
    "model.num_experts": [64, 128, 256],
    "model.top_k": [2, 8],
    "workload.alpha": [0.0, 0.6, 1.2],
    "workload.batch_size": [1, 16, 64],
}
STRESS_POLICIES = ["ep", "eplb", "tp", "tp-lb"]
# A shallow, short workload: the stress test is about balance per step, not about depth.
STRESS_BASE = ["model.num_layers=4", "workload.prompt_tokens=16", "workload.output_tokens=8",
               "ndp.capacity_bytes=1099511627776", "policy.eplb_period_steps=4",
               "policy.eplb_window_steps=16"]
METRICS = ("e2e_latency_s", "ttft_s", "tpot_s", "max_over_mean", "balancedness", "gpu_util",
           "prefetch_hit_rate", "speedup_vs_monde")


@dataclass(frozen=True)
class Grid:
    """Axes (config key -> values), policies and base overrides; ``only`` picks a subset."""

    axes: dict[str, list[Any]]
    policies: list[str]
    base: list[str]
    only: tuple[int, ...] | None = None  # indices into the full product, in order

    def configs(self) -> list[dict[str, Any]]:
        keys = list(self.axes)
        every = [dict(zip(keys, vals)) for vals in itertools.product(*self.axes.values())]
        return every if self.only is None else [every[i] for i in self.only]

    @property
    def num_points(self) -> int:
        n = math.prod(len(v) for v in self.axes.values()) if self.only is None else len(self.only)
        return n * len(self.policies)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``"ndp.num_ndp_units=2,4,8"`` -> ``("ndp.num_ndp_units", [2, 4, 8])``."""
    from cluster.core.config import parse_override

    if "=" not in text:
        raise ConfigError(f"--axis {text!r} is not allowed: must look like section.field=v1,v2,...")
    key, raw = text.split("=", 1)
    values = [parse_override(f"{key}={v.strip()}")[2] for v in raw.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"--axis {text!r} has no values")
    return key.strip(), values


def read_grid_file(path: str | Path) -> tuple[dict[str, list[Any]], list[str] | None, list[str]]:
    """A TOML grid: ``[grid]`` key = [values...]; optional ``policies = [...]``, ``set = [...]``."""
    from cluster.core.config import read_toml

    data = read_toml(path)
    grid = data.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"grid file {str(path)!r} needs a [grid] table of lists")
    axes = {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"grid.{k} in {str(path)!r} must be a non-empty list, got {v!r}")
        axes[k] = v
    return axes, data.get("policies"), list(data.get("set", []))


def _overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in point.items()]


def run_config(system: str | None, model: str | None, base: list[str], point: dict[str, Any],
               names: list[str]) -> list[dict[str, Any]]:
    """Runs every policy on one configuration; returns one row per (configuration, policy)."""
    from cluster.core.config import load_config
    from cluster.core.routing import kept_routing
    from cluster.engines.base import run_job

    t0 = time.perf_counter()
    try:
        cfg = load_config(system, model, None, [*base, *_overrides(point)])
    except ConfigError as exc:
        return [{**point, "policy": n, "error": str(exc)} for n in names]
    result = run_job(cfg, kept_routing(cfg), names)  # configurations that differ in hardware only share a routing
    dt = (time.perf_counter() - t0) / max(1, len(names))
    return [{**point, "policy": n, "error": "", "point_s": dt,
             **{m: result.policies[n].get(m) for m in METRICS}} for n in names]


def run_sweep(grid: Grid, system: str | None = None, model: str | None = None,
              workers: int | None = None, address: str | None = None, console=None,
              progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs the grid, one task per configuration (all its policies inside).

    The tasks run as Ray tasks on the cluster at ``address`` (``"local"``: a local Ray with
    ``workers`` CPUs) or on a Ray already initialised in this process; otherwise in
    ``workers`` local worker processes, which start in a fraction of a second where a local
    Ray takes seconds to start and stop. Rows come back in the grid's order either way.
    """
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.core.config import load_config

    load_config(system, model, None, grid.base)  # a bad base fails before any work
    for name in grid.policies:
        policies.resolve(name)
    workers = workers or os.cpu_count() or 2
    configs = grid.configs()
    args = [(system, model, grid.base, point, grid.policies) for point in configs]
    t0 = time.monotonic()
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not progress) as bar:
        job = bar.add_task("points", total=grid.num_points)

        def advance(got: list[dict[str, Any]]) -> None:
            bar.advance(job, len(got))

        if address or _ray_ready():
            results, used = _run_on_ray(args, workers, address, advance)
        else:
            results, used = _run_in_processes(args, workers, advance)
    rows = [row for got in results for row in got]
    wall = time.monotonic() - t0
    info = {"points": len(rows), "configs": len(configs), "wall_s": wall,
            "points_per_s": len(rows) / wall if wall > 0 else None,
            "workers": used, "failed": sum(1 for r in rows if r.get("error"))}
    return rows, info


def _ray_ready() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _run_config_args(indexed: tuple[int, tuple]) -> tuple[int, list[dict[str, Any]]]:
    i, args = indexed
    return i, run_config(*args)


def _run_in_processes(args: list[tuple], workers: int, advance: Callable[[list], None]
                      ) -> tuple[list[list[dict[str, Any]]], int]:
    """``run_config(*a)`` for every ``a`` in ``workers`` spawned processes (here, for one)."""
    results: list[list[dict[str, Any]]] = [[] for _ in args]
    workers = max(1, min(workers, len(args)))
    if workers == 1:
        for i, a in enumerate(args):
            results[i] = run_config(*a)
            advance(results[i])
        return results, 1
    import multiprocessing
    import signal

    # spawn, not fork: the parent runs the progress bar's thread; the pool's workers are
    # daemonic and terminated when the block ends, also on an error or an interrupt (a
    # Ctrl-C reaches the parent alone: the workers ignore SIGINT)
    with multiprocessing.get_context("spawn").Pool(
            workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        for i, got in pool.imap_unordered(_run_config_args, enumerate(args)):
            results[i] = got
            advance(got)
    return results, workers


def _run_on_ray(args: list[tuple], workers: int, address: str | None,
                advance: Callable[[list], None]) -> tuple[list[list[dict[str, Any]]], int]:
    """``run_config(*a)`` for every ``a`` as Ray tasks; starts (and stops) Ray if need be."""
    import ray

    started = False
    if not ray.is_initialized():
        if address and address != "local":
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        started = True
    try:
        task = ray.remote(run_config).options(num_cpus=1, max_retries=1)
        results: list[list[dict[str, Any]]] = [[] for _ in args]
        used = int(ray.cluster_resources().get("CPU", workers))
        todo = iter(enumerate(args))
        pending: dict[Any, int] = {}
        for i, a in itertools.islice(todo, max(1, used) * 2):
            pending[task.remote(*a)] = i
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                advance(results[i])
            for i, a in itertools.islice(todo, len(done)):
                pending[task.remote(*a)] = i
    finally:
        if started:
            ray.shutdown()
    return results, used


def write_csv(path: Path, rows: list[dict[str, Any]], axes: Sequence[str]) -> None:
    cols = [*axes, "policy", *METRICS, "point_s", "error"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def aggregate(rows: list[dict[str, Any]], x: str, y: str, metric: str, policy: str
              ) -> tuple[list[Any], list[Any], np.ndarray]:
    """Mean of ``metric`` over every axis but ``x`` and ``y``, for one policy."""
    ok = [r for r in rows if r["policy"] == policy and not r.get("error") and r.get(metric) is not None]
    xs = sorted({r[x] for r in ok}, key=_sort_key)
    ys = sorted({r[y] for r in ok}, key=_sort_key)
    grid = np.full((len(ys), len(xs)), np.nan)
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            vals = [r[metric] for r in ok if r[x] == xv and r[y] == yv]
            if vals:
                grid[j, i] = float(np.mean(vals))
    return xs, ys, grid


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) else (1, str(v))


def write_heatmaps(run_dir: Path, rows: list[dict[str, Any]], axes: Sequence[str],
                   names: Sequence[str]) -> list[Path]:
    """One PNG per metric: a heatmap per policy over the first two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(axes) < 2:
        return []
    x, y = axes[0], axes[1]
    out = []
    for metric, label, cmap in (("max_over_mean", "max/mean unit busy (1 = balanced)", "magma_r"),
                                ("balancedness", "balancedness mean/max (1 = balanced)", "viridis"),
                                ("e2e_latency_s", "end-to-end latency (s)", "cividis")):
        n = len(names)
        grids = {name: aggregate(rows, x, y, metric, name) for name in names}
        finite = [g[~np.isnan(g)] for _, _, g in grids.values()]
        allv = np.concatenate(finite) if finite else np.zeros(1)
        vmin, vmax = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
        if vmax <= vmin:
            vmax = vmin + 1e-9
        cols = min(n, 4)
        rws = math.ceil(n / cols)
        fig, axs = plt.subplots(rws, cols, figsize=(3.6 * cols + 1, 3.2 * rws + 0.6), squeeze=False)
        for k, name in enumerate(names):
            ax = axs[k // cols][k % cols]
            xs, ys, g = grids[name]
            im = ax.imshow(g, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks(range(len(xs)), [str(v) for v in xs], fontsize=8)
            ax.set_yticks(range(len(ys)), [str(v) for v in ys], fontsize=8)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(name)
            for j in range(len(ys)):
                for i in range(len(xs)):
                    if not np.isnan(g[j, i]):
                        dark = (g[j, i] - vmin) > 0.5 * (vmax - vmin)
                        if cmap == "viridis":  # dark at the low end
                            dark = not dark
                        ax.text(i, j, f"{g[j, i]:.3g}", ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
            fig.colorbar(im, ax=ax, fraction=0.046)
        for k in range(n, rws * cols):
            axs[k // cols][k % cols].axis("off")
        others = list(axes[2:])
        fig.suptitle(f"{label}" + (f" — mean over {', '.join(others)}" if others else ""), fontsize=10)
        fig.tight_layout()
        p = run_dir / f"heatmap_{metric}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out.append(p)
    return out


def summary_table(rows: list[dict[str, Any]], names: Sequence[str]):
    from rich.table import Table

    t = Table(title="sweep summary (mean over the grid; worst = the most imbalanced point)",
              title_justify="left")
    for col in ("policy", "points", "max/mean", "worst", "balanced", "e2e", "failed"):
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for n in names:
        ok = [r for r in rows if r["policy"] == n and not r.get("error")]
        bad = sum(1 for r in rows if r["policy"] == n and r.get("error"))
        if not ok:
            t.add_row(n, "0", "-", "-", "-", "-", str(bad))
            continue
        mom = [r["max_over_mean"] for r in ok]
        t.add_row(n, str(len(ok)), f"{np.mean(mom):.3f}", f"{np.max(mom):.3f}",
                  f"{np.mean([r['balancedness'] for r in ok]):.3f}",
                  f"{np.mean([r['e2e_latency_s'] for r in ok]) * 1e3:.2f} ms", str(bad))
    return t


def emulate_points(rows: list[dict[str, Any]], grid: Grid, k: int, run_dir: Path,
                   system: str | None, model: str | None, console=None,
                   address: str | None = None) -> list[dict[str, Any]]:
    """Re-runs the ``k`` most imbalanced configurations (by their worst policy) emulated.

    Each runs all of the grid's policies on the emulation engine (auto dilation) with its own
    run directory, on the cluster at ``address`` when the sweep ran there (else a local Ray);
    returns per (configuration, policy) the fidelity error.
    """
    from cluster.core.config import load_config
    from cluster.studies.runner import run

    by_cfg: dict[tuple, float] = {}
    for r in rows:
        if r.get("error"):
            continue
        key = tuple((a, r[a]) for a in grid.axes)
        by_cfg[key] = max(by_cfg.get(key, 0.0), r["max_over_mean"])
    picked = sorted(by_cfg, key=lambda key: -by_cfg[key])[:k]
    out = []
    for i, key in enumerate(picked):
        point = dict(key)
        cfg = load_config(system, model, None, [*grid.base, *_overrides(point)])
        res = run(cfg, grid.policies, "emulate", run_dir / f"emulated_{i}", console=console,
                  progress=False, plots=False, address=address)
        for name, s in res.summaries.items():
            out.append({**point, "policy": name, "fidelity_error": s["fidelity_error"],
                        "dilation": s["dilation"], "overruns": s["overruns"],
                        "emulated_e2e_latency_s": s["e2e_latency_s"],
                        "analytic_e2e_latency_s": s["analytic_e2e_latency_s"]})
    return out


def sweep_command(grid: Grid, run_dir: Path, console, system: str | None = None,
                  model: str | None = None, workers: int | None = None, address: str | None = None,
                  emulate: int = 0, progress: bool = True) -> dict[str, Any]:
    """Everything ``ndpmoe sweep``/``stress`` does: run, write CSV/JSON/heatmaps, print."""
    run_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]ndpmoe sweep[/]: {grid.num_points} points "
                  f"({len(grid.configs())} configurations x {len(grid.policies)} policies) over "
                  + ", ".join(f"{k} {v}" for k, v in grid.axes.items()))
    rows, info = run_sweep(grid, system, model, workers, address, console, progress)
    axes = list(grid.axes)
    write_csv(run_dir / "sweep.csv", rows, axes)
    plots = write_heatmaps(run_dir, rows, axes, grid.policies)
    emulated = (emulate_points(rows, grid, emulate, run_dir, system, model, console, address)
                if emulate else [])
    doc = {"axes": grid.axes, "policies": grid.policies, "base": grid.base, **info,
           "emulated": emulated, "plots": [p.name for p in plots]}
    (run_dir / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
    console.print(summary_table(rows, grid.policies))
    if emulated:
        worst = max(e["fidelity_error"] for e in emulated)
        console.print(f"emulated {len(emulated)} points: worst fidelity error {worst * 100:.2f}%")
    console.print(f"{info['points']} points in {info['wall_s']:.1f} s ({info['points_per_s']:.1f} points/s "
                  f"on {info['workers']} workers); run directory: {run_dir}")
    return doc
