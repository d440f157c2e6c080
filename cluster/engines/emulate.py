"""The emulation engine: policies run on the Ray + zmq cluster with real matmuls; measured.

Flow of :func:`run_emulation`: choose the weight scale (fits the machine unless set), start
the cluster (:mod:`cluster.engines.launch`: scheduler, GPU, NDP units, host link), have every unit
generate its weight slices, measure each actor's clock offset and the hop floor, calibrate
the dilation D (unless ``emulate.dilation`` is set), run every policy at D and compare what
was measured with what the analytic engine predicts.

Nothing here, nor in :mod:`actors`, computes the run's timing (DESIGN.md section 5): the
devices and the link throttle themselves in wall-clock time and report what happened; the
records below are built from those reports. Emulated time = (wall - run epoch - wall time the
run was paused) / D; a token's time is the run's clock as the GPU read it when it finished the
token (every device and the link keep that clock: wall time less the pauses).

Calibration (auto D): every policy's prefill and first decode steps run at D = 1, where every
slot overruns and each device records its real compute time over its modelled duration.
D is the smallest value meeting both conditions:

- compute: ``DILATION_MARGIN`` x the ``DILATION_QUANTILE`` quantile of those ratios, so that the
  real work of almost every slot fits in it;
- hop floor: the real control path of one MoE step (router event to the scheduler, the plan,
  commands to the devices), measured in the calibration runs themselves as how late the GPU
  had each step's command (median, over steps and then over policies), minus what the modelled
  hops absorb (D x 2 x link latency, but at most half the path), over D, is at most half the
  fidelity target times the median modelled MoE step.

Faults (``emulate.inject``, ``emulate.recover``; DESIGN.md section 9): ``slow`` and ``delay``
are part of the cost model, so both engines see them. ``drop:P`` loses each command the
scheduler sends a device in the timed run with probability P; the devices acknowledge
numbered commands and the scheduler sends a lost one again after a timeout. ``kill:ndpK@stepS``
ends unit K's process; without recovery the run fails naming it and the step, and the policies
that finished keep their summaries, the failing one is marked ``"status": "failed"`` and
:class:`PartialRunError` carries all of it to the caller; with recovery Ray restarts it, it
rejoins and is sent what it had not done. The scheduler pauses the whole emulated system (every
device and the link) from the moment it injects a fault until it is repaired
(:class:`actors.world.World`): detection, retries and recovery are real and take wall time,
and none of it is emulated time. The summary reports ``dropped_messages``, ``retries``,
``duplicate_commands`` (retries whose first send did arrive: ``retries = dropped_messages +
duplicate_commands``; these three count commands that reached a live device, those a killed
unit never acknowledged are ``abandoned_commands``, with their ``abandoned_sends``, and the
recovery re-issues their work), ``recoveries``, ``pauses``, and the wall time paused for each
(``retry_wall_s``, ``recovery_wall_s``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from actors.peers import GPU, LINK, device_names, unit_name
from cluster.core.cost import CostModel
from cluster.core.errors import ConfigError, EmulationError
from cluster.core.metrics import PolicyRecords, summarize
from cluster.core.selection import Routing
from cluster.core.spec import Config
from cluster.engines.analytic import run_policy

DEFAULT_WEIGHT_BUDGET_BYTES = 1 << 30  # real expert weights across all units, both layouts
CALIBRATION_DECODE_STEPS = 2
DILATION_MARGIN = 1.5
DILATION_QUANTILE = 0.98
HOP_ABSORBED_MAX = 0.5  # the share of the control path the modelled hops may absorb


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
    from cluster.core import kernels as K

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


def choose_dilation(ratios: list[float], hop_path_s: float = 0.0, link_latency_s: float = 0.0,
                    step_s: float = 0.0, target: float = 0.05) -> dict[str, float]:
    """D from calibration: ``ratios`` (real compute / modelled, per slot), ``hop_path_s`` (real
    wall seconds of one MoE step's control path), the modelled link latency and the median
    modelled MoE step. Returns D and both lower bounds (see the module docstring)."""
    d_compute = 1.0
    if ratios:
        d_compute = DILATION_MARGIN * float(np.quantile(np.asarray(ratios), DILATION_QUANTILE))
    d_hop = 1.0
    if hop_path_s > 0 and step_s > 0:
        # excess(D) / D <= budget  with excess = max(path - D * 2 * latency, path / 2): the
        # modelled hops absorb at most half the path (HOP_ABSORBED_MAX), since the path is
        # a median and the steps whose path runs longer are not absorbed (without the cap a
        # large modelled latency, e.g. delay:link+50us, let D fall to ~9, where one
        # benchmark run measured 8% e2e error)
        budget = 0.5 * target * step_s
        d_hop = max(hop_path_s / (budget + 2 * link_latency_s),
                    (1 - HOP_ABSORBED_MAX) * hop_path_s / budget)
    d = max(1.0, math.ceil(max(d_compute, d_hop)))
    return {"dilation": float(d), "compute_bound": d_compute, "hop_bound": d_hop}


def records_from_run(cfg: Config, name: str, stats: Any, meta: dict[str, Any],
                     trace_steps: range = range(1, 3)) -> PolicyRecords:
    """A policy's records from what the devices and the link measured (wall -> emulated)."""
    from cluster.core.cost import CostModel
    from cluster.core.metrics import StepRecord, TokenRecord
    from policies import lower_bound_s
    from policies.plan import Interval
    from policies.registry import resolve

    D, epoch = float(meta["dilation"]), float(meta["epoch_s"])
    N = cfg.ndp.num_ndp_units
    choice = resolve(name)
    rec = PolicyRecords(name, choice.scheduler, choice.prefetcher)

    def emu(w: float) -> float:
        return (w - epoch) / D

    rep = stats.reports
    gpu, link = rep[GPU], rep[LINK]
    prev = 0.0
    for step, wall in gpu["tokens"]:
        t = emu(wall)
        rec.tokens.append(TokenRecord(name, int(step), t, t - prev if rec.tokens else t))
        prev = t
    cost = CostModel(meta["cost_cfg"])
    units = [rep.get(unit_name(u), {}) for u in range(N)]
    for i, st in enumerate(stats.steps):
        seq = str(st["seq"])
        if seq not in gpu["step_times"]:
            break
        a, b = gpu["step_times"][seq]
        sb = link["step_bytes"].get(seq, {})
        rec.steps.append(StepRecord(
            name, st["phase"], st["step"], st["layer"], emu(a), emu(b), st["active"], st["hits"],
            st["fetched"], st["gpu_experts"], gpu["busy_by_seq"].get(seq, 0.0) / D,
            [u.get("busy_by_seq", {}).get(seq, 0.0) / D for u in units],
            int(sb.get("activation", 0)), int(sb.get("partial", 0)), int(sb.get("fetch", 0)),
            lower_bound_s(stats.plans[i], cost, N)))
    rec.gpu_other_busy_s = gpu["other_busy_s"] / D
    rec.prefetch_bytes = int(link["bytes"]["prefetch"])
    rec.prefetched_experts = int(link["transfers"]["prefetch"])
    for res, r in [(GPU, gpu), *((unit_name(u), units[u]) for u in range(N))]:
        for kind, label, a, b in r.get("log", []):
            rec.intervals.append(Interval(res, kind, emu(a), emu(b), label))
    # the link's segments within the traced steps (background prefetches included)
    L = cfg.model.num_layers
    seqs = [str(q) for q in range(trace_steps.start * L, trace_steps.stop * L)]
    spans = [gpu["step_times"][q] for q in seqs if q in gpu["step_times"]]
    if spans:
        w0, w1 = min(a for a, _ in spans), max(b for _, b in spans)
        for kind, label, a, b, _seq in link.get("intervals", []):
            if b > w0 and a < w1:
                rec.intervals.append(Interval("link", kind, emu(a), emu(b), label))
    return rec


def calibrate(cluster: Any, cfg: Config, routing: Routing, names: list[str]) -> dict[str, Any]:
    """Clock offsets, the hop floor and the compute ratio, from short runs at D = 1 (see the
    module docstring); returns the dilation bounds, the floor and the ratios."""
    from cluster.engines import launch

    residual = launch.get(cluster.scheduler.sync_clocks.remote())
    one_way = [r / 2 for r in launch.get(cluster.scheduler.hop_samples.remote())]
    hop_s = float(np.quantile(one_way, 0.9)) if one_way else 0.0
    ratios: list[float] = []
    paths: list[float] = []
    decisions: list[float] = []
    steps_modelled: list[float] = []
    for n in names:
        st, _meta = launch.get(cluster.scheduler.run_policy.remote(
            n, 1.0, True, CALIBRATION_DECODE_STEPS))
        for d, r in st.reports.items():
            if d != "link":
                ratios += r["ratios"]
        # the real control path of a MoE step, under this run's own load: how late the
        # GPU had its step's command (at D = 1 the modelled hops absorb nothing)
        late = st.reports[GPU].get("arrival_late", {}).get("cmd:moe")
        if late:
            paths.append(late[0])
        decisions += st.decisions_s
        ana = run_policy(cfg, routing, n)
        steps_modelled += [x.makespan_s for x in ana.steps if x.phase == "decode"]
    lat = CostModel(cfg).link_latency_s
    path_s = float(np.median(paths)) if paths else 2 * hop_s
    step_s = float(np.median(steps_modelled)) if steps_modelled else 0.0
    bounds = choose_dilation(ratios, path_s, lat, step_s, cfg.emulate.target_fidelity)
    floor = {"hop_one_way_us_p90": 1e6 * hop_s,
             "decision_us_p90": 1e6 * float(np.quantile(decisions, 0.9)) if decisions else 0.0,
             "control_path_wall_us": 1e6 * path_s,
             "modelled_control_hops_us": 1e6 * 2 * lat,
             "median_decode_moe_step_us": 1e6 * step_s,
             "clock_offset_residual_us": {k: 1e6 * v for k, v in residual.items()}}
    return {"bounds": bounds, "floor": floor, "ratios": ratios}


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
            "dropped_messages": stats.dropped, "duplicate_commands": stats.duplicates,
            "abandoned_commands": stats.abandoned, "abandoned_sends": stats.abandoned_sends,
            "pauses": stats.pauses, "injected_kills": list(stats.kills)}


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
        if rec is None:  # the measuring engine: what the scheduler saw before the failure
            s["tokens_completed"] = stats.tokens_completed
            s["moe_steps_completed"] = len(stats.steps)
        s.update(_fault_fields(stats))
        s["wall_s"] = stats.wall_s
    return s


def _rel(a: float, b: float) -> float:
    return abs(a - b) / b if b > 0 else 0.0


def _emulated_summary(rec: PolicyRecords, stats, cfg: Config, analytic: PolicyRecords,
                      dilation: float, floor: dict[str, Any]) -> dict[str, Any]:
    N = cfg.ndp.num_ndp_units
    s = summarize(rec, N)
    a = summarize(analytic, N)
    rep = stats.reports
    devices = device_names(N)
    overruns = {d: int(rep[d]["overruns"]) for d in devices if d in rep}
    link = rep.get("link", {})
    s.update({
        "status": "ok",
        "emulated_e2e_latency_s": s["e2e_latency_s"],  # the same number: e2e is measured
        "analytic_e2e_latency_s": a["e2e_latency_s"],
        "analytic_ttft_s": a["ttft_s"],
        "analytic_tpot_s": a["tpot_s"],
        "fidelity_error": _rel(s["e2e_latency_s"], a["e2e_latency_s"]),
        "fidelity": {"e2e": _rel(s["e2e_latency_s"], a["e2e_latency_s"]),
                     "ttft": _rel(s["ttft_s"], a["ttft_s"]),
                     "tpot": _rel(s["tpot_s"], a["tpot_s"])},
        "dilation": dilation,
        "overruns": sum(overruns.values()),
        "device_overruns": overruns,
        "device_slots": {d: int(rep[d]["slots"]) for d in devices if d in rep},
        "device_overruns_by_kind": {d: {k: {"count": int(v[0]), "lag_s": v[1] / dilation,
                                            "late_start_s": v[2] / dilation}
                                        for k, v in rep[d].get("overrun_by_kind", {}).items()}
                                    for d in devices if d in rep},
        "overrun_lag_max_s": max((rep[d]["overrun_max_s"] / dilation for d in devices if d in rep),
                                 default=0.0),
        "emulated_link_bytes": dict(link.get("bytes", {})),
        "link_transfers": dict(link.get("transfers", {})),
        "link_upgraded_prefetches": link.get("upgraded", 0),
        "link_cancelled_prefetches": link.get("cancelled", 0),
        "link_late_arrivals": link.get("late_arrivals", 0),
        "gpu_fetch_waits": len(rep.get(GPU, {}).get("waits", [])),
        "gpu_cache_peak_experts": rep.get(GPU, {}).get("cache_peak", 0),
        "decision_us_p50": 1e6 * float(np.median(stats.decisions_s)) if stats.decisions_s else 0.0,
        "decision_us_max": 1e6 * float(np.max(stats.decisions_s)) if stats.decisions_s else 0.0,
        "emulator_floor": floor,
        "wall_s": stats.wall_s,
        "messages": stats.messages,
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

    from cluster.core.reference import reference_forward
    from cluster.engines import launch

    scale = choose_scale(cfg)
    say = console.print if console is not None else (lambda *a, **k: None)
    faults = cfg.faults
    if not cfg.emulate.curve:
        say("[yellow]warning:[/] emulate.curve = false: the data plane is neither authenticated "
            "nor encrypted; peers are told apart by the name they claim, which any process that "
            "reaches the ports can forge (README, 'Clusters, faults and security')")
    cluster = launch.start(cfg, routing, scale, address)
    summaries: dict[str, dict[str, Any]] = {}
    records: list[PolicyRecords] = []
    outputs: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {"emulation": {"weights_scale": scale, "startup_s": cluster.startup_s,
                                           "rtt_s": cluster.rtt_s, "recover": cfg.emulate.recover,
                                           "curve": cfg.emulate.curve}}
    if faults:
        extra["faults"] = {"inject": cfg.emulate.inject, **faults.as_dict()}
    ref = None
    current = "(startup)"
    try:
        held = launch.get(cluster.scheduler.warm.remote(unit_layouts(cfg, scale)))
        say(f"cluster up in {cluster.startup_s:.2f} s: 1 GPU + {cfg.ndp.num_ndp_units} NDP actors, "
            f"weights at scale {scale:.4g} ({sum(held.values()) / 1e6:.0f} MB on the units), "
            f"zmq round trip {1e6 * float(np.median(list(cluster.rtt_s.values()))):.0f} us")
        current = "(calibration)"
        cal = calibrate(cluster, cfg, routing, names)
        auto, floor, ratios = cal["bounds"], cal["floor"], cal["ratios"]
        dilation = cfg.emulate.dilation if cfg.emulate.dilation > 0 else auto["dilation"]
        floor["control_path_emulated_us"] = floor["control_path_wall_us"] / dilation
        floor["unabsorbed_emulated_us"] = max(
            0.0, floor["control_path_wall_us"] - dilation * floor["modelled_control_hops_us"]) / dilation
        path_s = floor["control_path_wall_us"] * 1e-6
        say(f"dilation D = {dilation:g} ({'set' if cfg.emulate.dilation > 0 else 'calibrated'}: "
            f"compute needs {auto['compute_bound']:.1f} (p{int(100 * DILATION_QUANTILE)} of "
            f"{len(ratios)} slots' real/modelled x {DILATION_MARGIN}), the hop floor "
            f"{auto['hop_bound']:.1f}); control path {1e6 * path_s:.0f} us wall = "
            f"{1e6 * path_s / dilation:.2f} us emulated per MoE step")
        extra["emulation"].update({
            "dilation": dilation, "calibrated": cfg.emulate.dilation <= 0,
            "calibration_slots": len(ratios),
            "calibration_ratio_quantile": float(np.quantile(ratios, DILATION_QUANTILE)) if ratios else None,
            "dilation_bounds": auto, "emulator_floor": floor,
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
                st, meta = launch.get(ref_obj)
                rec = records_from_run(cfg, n, st, meta)
                out = launch.get(cluster.scheduler.collect.remote())
                outputs[n] = out
                analytic = run_policy(cfg, routing, n)
                s = _emulated_summary(rec, st, cfg, analytic, dilation, floor)
                s["output_rel_error"] = float(np.abs(out - ref).max() / max(1e-30, np.abs(ref).max()))
                summaries[n] = s
                records.append(rec)
        extra["emulation"]["node_ids"] = cluster.node_ids()
        extra.update(cluster.rejected_peers())  # refused peers and messages (issue 13)
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
    from cluster.engines import launch

    rec = stats = where = None
    if current in names:  # failed in a timed run, not at startup or calibration
        # if the scheduler itself is gone, the error is reported without records
        with contextlib.suppress(Exception):
            rec, stats, where = launch.get(cluster.scheduler.partial.remote(), timeout=10)
        summaries[current] = failed_summary(current, str(exc), rec, stats, where, cfg)
        if rec is not None:
            records.append(rec)
    done = [n for n in names if summaries.get(n, {}).get("status") == "ok"]
    with contextlib.suppress(Exception):
        extra = {**extra, **cluster.rejected_peers()}
    extra = {**extra, "status": "failed", "error": str(exc), "failed_policy": current,
             "not_run": [n for n in names if n not in summaries]}
    msg = f"{exc} (policy {current}; finished: {', '.join(done) or 'none'})"
    return PartialRunError(msg, summaries, records, extra)
