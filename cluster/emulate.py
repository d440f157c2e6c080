"""The emulation engine: policies run on the Ray + zmq cluster with real matmuls, paced.

Flow of :func:`run_emulation`: choose the weight scale (fits the machine unless set), check
memory before launching, start the cluster (:mod:`cluster.launch`), have every unit generate
its weight slices, calibrate the dilation D (unless ``emulate.dilation`` is set), then run
every policy paced at D and compare with the analytic engine.

Calibration: every policy runs its prefill and first decode steps unpaced while the scheduler
records, for each paced segment (a GPU layer, a MoE step), the real wall time it took over
its modelled duration. D is a margin times the high quantile of those ratios, so that the
real work of almost every segment fits inside its slot; a segment that still overruns is
counted and its lag shows in the fidelity error.

Faults (DESIGN.md section 9, :mod:`cluster.faults`): when a policy's run fails (a dead or
silent device, a deadline), the policies that finished keep their summaries, the failing one
is summarised from the records the scheduler kept (``"status": "failed"``, the error, where it
stopped) and :class:`PartialRunError` carries all of it to the caller, which writes the run
directory and re-raises. Recoveries and retries are reported per policy (``recoveries``,
``recovery_wall_s``, ``retries``, ``retry_wall_s``); their wall time is not emulated time.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cluster.analytic import run_policy
from cluster.errors import ConfigError, EmulationError
from cluster.faults import parse_inject
from cluster.metrics import PolicyRecords, summarize
from cluster.routing import Routing
from cluster.spec import Config

DEFAULT_WEIGHT_BUDGET_BYTES = 1 << 30  # real expert weights across all units, both layouts
CALIBRATION_DECODE_STEPS = 2
DILATION_MARGIN = 1.5
DILATION_QUANTILE = 0.98


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30


def choose_scale(cfg: Config) -> float:
    """``weights.scale``, or the largest scale whose real weights fit the budget.

    Units hold each expert twice (a tensor-parallel slice and, for expert-parallel
    policies, whole experts), so the budget covers twice the routed weights. An explicit
    scale that would not fit in half the machine's memory is refused with the numbers.
    """
    from actors import kernels as K

    m, n = cfg.model, cfg.ndp.num_ndp_units
    if cfg.weights.scale > 0:
        need = 2 * K.routed_weight_bytes(m, cfg.weights.scale, n)
        have = machine_memory_bytes() // 2
        if need > have:
            fit = K.auto_scale(m, have // 2, n)
            raise ConfigError(
                f"weights.scale = {cfg.weights.scale} needs {need / 1e9:.2f} GB of real expert "
                f"weights ({m.name}, both layouts) but at most {have / 1e9:.2f} GB (half this "
                f"machine's memory) is allowed; use weights.scale <= {fit:.4g} or 0 (auto)")
        return cfg.weights.scale
    budget = cfg.weights.memory_budget_bytes or DEFAULT_WEIGHT_BUDGET_BYTES
    return K.auto_scale(m, budget // 2, n)


def unit_layouts(cfg: Config, scale: float) -> dict[int, list[tuple[int, int, int, int]]]:
    """Slices each unit holds before the run: its TP slice of every expert, its EP experts."""
    from policies.plan import tp_bounds

    m, N = cfg.model, cfg.ndp.num_ndp_units
    bounds = tp_bounds(m.d_ff, N)
    out: dict[int, list[tuple[int, int, int, int]]] = {u: [] for u in range(N)}
    for layer in range(m.num_layers):
        for e in range(m.num_experts):
            out[e % N].append((layer, e, 0, m.d_ff))
            for u, (lo, hi) in enumerate(bounds):
                if hi > lo:
                    out[u].append((layer, e, lo, hi))
    return out


def choose_dilation(ratios: list[float]) -> float:
    """D from calibration ratios (real wall / modelled per segment)."""
    if not ratios:
        return 10.0
    q = float(np.quantile(np.asarray(ratios), DILATION_QUANTILE))
    return max(1.0, math.ceil(DILATION_MARGIN * q))


class PartialRunError(EmulationError):
    """A run that stopped early, with what it produced: ``summaries`` (the failed policy marked
    ``"status": "failed"``), ``records`` and ``extra`` for ``summary.json``."""

    def __init__(self, message: str, summaries: dict[str, dict[str, Any]],
                 records: list[PolicyRecords], extra: dict[str, Any]) -> None:
        super().__init__(message)
        self.summaries, self.records, self.extra = summaries, records, extra
        self.interrupted = False  # stopped by Ctrl-C/SIGTERM rather than by a fault


def _fault_fields(stats) -> dict[str, Any]:
    return {"recoveries": stats.recoveries, "recovery_wall_s": stats.recovery_wall_s,
            "retries": stats.retries, "retry_wall_s": stats.retry_wall_s,
            "dropped_messages": stats.dropped, "injected_kills": list(stats.kills)}


def failed_summary(name: str, error: str, rec: PolicyRecords | None, stats,
                   where: tuple[str, int, int] | None, cfg: Config) -> dict[str, Any]:
    """The summary of a policy whose run failed: the error, where, and what it had done."""
    s: dict[str, Any] = {"status": "failed", "error": error, "e2e_latency_s": None}
    if where is not None:
        s["failed_at"] = {"phase": where[0], "step": where[1], "layer": where[2]}
    if rec is not None:
        s["tokens_completed"] = len(rec.tokens)
        s["moe_steps_completed"] = len(rec.steps)
        if rec.steps:
            part = summarize(rec, cfg.ndp.num_ndp_units)
            part.pop("e2e_latency_s", None)
            s["partial"] = part
    if stats is not None:
        s.update(_fault_fields(stats))
        s["wall_s"] = stats.wall_s
    return s


def _emulated_summary(rec: PolicyRecords, stats, cfg: Config, analytic: PolicyRecords,
                      dilation: float) -> dict[str, Any]:
    s = summarize(rec, cfg.ndp.num_ndp_units)
    ana_e2e = analytic.tokens[-1].time_s
    emu = stats.emulated_e2e_s
    lag = stats.lag_max_s
    s.update({
        "e2e_latency_s": emu,
        "emulated_e2e_latency_s": emu,
        "analytic_e2e_latency_s": ana_e2e,
        "modelled_e2e_latency_s": rec.tokens[-1].time_s,
        "fidelity_error": abs(emu - ana_e2e) / ana_e2e if ana_e2e > 0 else 0.0,
        "dilation": dilation,
        "overruns": stats.overruns,
        "overrun_lag_max_s": lag,
        "paced_segments": stats.segments,
        "stamp_mismatches": stats.stamp_mismatches,
        "wall_s": stats.wall_s,
        "messages": stats.messages,
        "status": "ok",
        **_fault_fields(stats),
    })
    return s


def run_emulation(cfg: Config, routing: Routing, names: list[str], run_dir: Path, console=None,
                  progress: bool = True, address: str | None = None,
                  save_outputs: bool = False) -> tuple[dict, list[PolicyRecords], dict]:
    """Runs ``names`` on the emulation cluster; returns (summaries, records, extra).

    A failure (dead device, deadline) raises :class:`PartialRunError` with the summaries of
    the policies that finished and of the failing one; the cluster is closed either way.
    """
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster import launch
    from cluster.reference import reference_forward

    scale = choose_scale(cfg)
    say = console.print if console is not None else (lambda *a, **k: None)
    faults = parse_inject(cfg.emulate.inject)
    cluster = launch.start(cfg, routing, scale, address)
    summaries: dict[str, dict[str, Any]] = {}
    records: list[PolicyRecords] = []
    outputs: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {"emulation": {"weights_scale": scale, "startup_s": cluster.startup_s,
                                           "rtt_s": cluster.rtt_s, "recover": cfg.emulate.recover}}
    if faults:
        extra["faults"] = {"inject": cfg.emulate.inject, **faults.as_dict()}
    ref = None
    current = "(startup)"
    try:
        held = launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)))
        say(f"cluster up in {cluster.startup_s:.2f} s: 1 GPU + {cfg.ndp.num_ndp_units} NDP actors, "
            f"weights at scale {scale:.4g} ({sum(held.values()) / 1e6:.0f} MB on the units), "
            f"zmq round trip {1e6 * float(np.median(list(cluster.rtt_s.values()))):.0f} us")
        if cfg.emulate.dilation > 0:
            dilation, ratios = cfg.emulate.dilation, []
        else:
            ratios = []
            for n in names:
                current = f"{n} (calibration)"
                _, st = launch.get(cluster.scheduler.run_policy.remote(
                    n, 1.0, True, CALIBRATION_DECODE_STEPS))
                ratios += st.ratios
            dilation = choose_dilation(ratios)
            say(f"calibrated dilation D = {dilation:g} (p{int(100 * DILATION_QUANTILE)} of "
                f"{len(ratios)} segments' real/modelled time = "
                f"{np.quantile(ratios, DILATION_QUANTILE):.2f}, margin {DILATION_MARGIN})")
        extra["emulation"].update({
            "dilation": dilation, "calibrated": cfg.emulate.dilation <= 0,
            "calibration_segments": len(ratios),
            "calibration_ratio_quantile": float(np.quantile(ratios, DILATION_QUANTILE)) if ratios else None,
            "unit_weight_bytes": held})
        ref = reference_forward(cfg, routing, scale)
        steps = routing.decode_steps + 1
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=not progress) as bar:
            for n in names:
                current = n
                task = bar.add_task(f"{n} (D={dilation:g})", total=steps)
                ref_obj = cluster.scheduler.run_policy.remote(n, dilation)
                while True:
                    ready, _ = ray.wait([ref_obj], timeout=0.2)
                    bar.update(task, completed=launch.get(cluster.scheduler.progress.remote()))
                    if ready:
                        break
                rec, st = launch.get(ref_obj)
                out = launch.get(cluster.scheduler.collect.remote())
                outputs[n] = out
                analytic = run_policy(cfg, routing, n)
                s = _emulated_summary(rec, st, cfg, analytic, dilation)
                s["output_rel_error"] = float(np.abs(out - ref).max() / max(1e-30, np.abs(ref).max()))
                summaries[n] = s
                records.append(rec)
        extra["emulation"]["node_ids"] = cluster.node_ids()
    except EmulationError as exc:
        raise _partial(cluster, cfg, current, names, exc, summaries, records, extra) from exc
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cluster.cli): stop, keep what there is
        err = EmulationError("interrupted by the user (Ctrl-C or SIGTERM)")
        partial = _partial(cluster, cfg, current, names, err, summaries, records, extra)
        partial.interrupted = True
        raise partial from None
    finally:
        cluster.close()
    if save_outputs:
        np.savez_compressed(run_dir / "outputs.npz", reference=ref, **{k.replace("+", "_"): v
                                                                        for k, v in outputs.items()})
    return summaries, records, extra


def _partial(cluster, cfg: Config, current: str, names: list[str], exc: EmulationError,
             summaries: dict[str, dict[str, Any]], records: list[PolicyRecords],
             extra: dict[str, Any]) -> PartialRunError:
    """What a failed run leaves: finished policies, the failing one from the scheduler's
    records of it (when the scheduler still answers), and the error."""
    from cluster import launch

    rec = stats = where = None
    if current in names:  # failed in a timed run, not at startup or calibration
        # if the scheduler itself is gone, the error is reported without records
        with contextlib.suppress(Exception):
            rec, stats, where = launch.get(cluster.scheduler.partial.remote(), timeout=10)
        summaries[current] = failed_summary(current, str(exc), rec, stats, where, cfg)
        if rec is not None:
            records.append(rec)
    done = [n for n in names if summaries.get(n, {}).get("status") == "ok"]
    extra = {**extra, "status": "failed", "error": str(exc), "failed_policy": current,
             "not_run": [n for n in names if n not in summaries]}
    msg = f"{exc} (policy {current}; finished: {', '.join(done) or 'none'})"
    return PartialRunError(msg, summaries, records, extra)
