"""``ndpmoe reproduce``: the paper's studies on the analytic engine, into one run directory.

Studies (PAPER.md, issue 4), each a list of *cases* ``(row labels, config, policy)``:

1. ``headline``: speedup over ``monde`` of ``ep``, ``tp``, ``tp-lb``, ``paper`` per model x
   NDP-unit count (the paper's 2.41x average / 2.56x maximum), plus contrast models that fit
   the GPU and are not averaged in;
2. ``ablation``: ``tp`` -> + load balancing (``tp-lb``) -> + prefetch (``paper``), read off
   the headline cases at the focus unit count;
3. ``prefetch_budget``: ``paper`` over ``policy.cache_fraction``;
4. ``prefetchers``: ``tp-lb+NAME`` for every prefetcher, ``profiled`` calibrated on another
   routing distribution, and the neighbour policies that are registered;
5. ``sensitivity``: paper-over-monde speedup of the focus model under changed assumptions;
6. ``beyond``: ``paper`` against its extensions (fractional split, ``paper-refresh``) when
   they exist;
7. ``routing_headline`` and ``odmoe_link`` (:mod:`cluster.studies.reproduce_routing`): the headline
   on real-like routing beside the stationary one, ``paper-drift`` against ``paper`` and the
   oracle, and the link bandwidth at which ``od-moe`` pays.

Cases are grouped by their resolved :class:`~cluster.core.spec.Config` (equal configs run once:
the ablation reuses the headline, the budget sweep's 1.0 the default) into *jobs* of one
config and several policies. A job builds its routing once and returns one summary per
policy; jobs run in spawned worker processes, or as Ray tasks when Ray is already
initialised. Tables, figures and ``report.md`` are made afterwards from the summaries alone.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import policies
from cluster.core import presets
from cluster.core.config import load_config
from cluster.core.errors import NdpmoeError
from cluster.core.spec import LB_SPLITS, Config
from cluster.studies import reproduce_routing

PAPER_AVG_SPEEDUP = 2.41
PAPER_MAX_SPEEDUP = 2.56
PAPER_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b")
CONTRAST_MODELS = ("olmoe-1b-7b",)
UNITS = (2, 3, 4, 5, 6)
HEADLINE_POLICIES = ("monde", "ep", "tp", "tp-lb", "paper")
ABLATION = (("tp", "tp"), ("tp-lb", "+ load balancing"), ("paper", "+ prefill-freq prefetch"))
ABLATION_OTHER_ORDER = "tp+prefill-freq"  # prefetch without load balancing
CACHE_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
PREFETCHERS = ("none", "lru", "lfu", "profiled", "oracle", "prefill-freq")
NEIGHBOURS = ("context-aware", "od-moe", "expertflow", "paper-refresh")
PROFILED_FLAT_ALPHA = 0.3
PROFILED_OTHER = "tp-lb+profiled, other domain"
PROFILED_FLAT = f"tp-lb+profiled, flatter calibration (alpha {PROFILED_FLAT_ALPHA})"
SPOT_CHECK = {"model": "qwen3-30b-a3b", "units": 4, "prompt_tokens": 16, "output_tokens": 8,
              "policies": ("monde", "paper"), "target_pct": 5.0}
QUICK = {"models": ("qwen3-30b-a3b", "mixtral-8x7b"), "units": (2, 4), "prompt_tokens": 32,
         "output_tokens": 16, "cache_fractions": (0.0, 0.2, 1.0)}


@dataclass(frozen=True)
class Variant:
    """One assumption of the sensitivity study and the values it is moved to."""

    assumption: str
    key: str  # section.field
    scale: bool  # True: values are factors of the base value; False: absolute values
    values: tuple[float, ...]


SENSITIVITY_POLICIES = ("monde", "ep", "paper")
SENSITIVITY = (
    Variant("NDP internal bandwidth", "ndp.internal_bw_gbps", True, (0.5, 2.0)),
    Variant("NDP compute", "ndp.peak_gflops", True, (0.5, 2.0)),
    Variant("host link bandwidth", "link.bw_gbps", True, (0.5, 2.0)),
    Variant("GPU expert-cache budget", "policy.cache_fraction", False, (0.5,)),
    Variant("routing skew (Zipf alpha)", "workload.alpha", False, (0.4, 1.2)),
    Variant("temporal reuse", "workload.reuse", False, (0.0, 0.5)),
)


UNITS_OF = {"_gbps": " GB/s", "_gflops": " GFLOPS", "_tflops": " TFLOPS"}


@dataclass(frozen=True)
class Options:
    """What ``ndpmoe reproduce`` runs. ``sweep_output_tokens`` serves studies 3-6."""

    models: tuple[str, ...] = PAPER_MODELS
    contrast_models: tuple[str, ...] = CONTRAST_MODELS
    units: tuple[int, ...] = UNITS
    prompt_tokens: int = 512
    output_tokens: int = 512
    sweep_output_tokens: int = 512
    overrides: tuple[str, ...] = ()
    cache_fractions: tuple[float, ...] = CACHE_FRACTIONS
    workers: int = 1
    spot_check: bool = False
    quick: bool = False

    @property
    def focus_units(self) -> int:
        """The unit count of studies 2-6: 4 (the paper system's default) when swept."""
        return 4 if 4 in self.units else sorted(self.units)[len(self.units) // 2]

    @property
    def focus_model(self) -> str:
        return "qwen3-30b-a3b" if "qwen3-30b-a3b" in self.models else self.models[0]


def options(models: Sequence[str] | None = None, units: Sequence[int] | None = None,
            prompt_tokens: int | None = None, output_tokens: int | None = None,
            sweep_output_tokens: int | None = None, contrast_models: Sequence[str] | None = None,
            overrides: Sequence[str] = (), workers: int | None = None, quick: bool = False,
            spot_check: bool = False) -> Options:
    """:class:`Options` from command-line values (``None``: the default, or ``--quick``'s)."""
    q = QUICK if quick else {}
    out = output_tokens or q.get("output_tokens", 512)
    return Options(
        models=tuple(models or q.get("models", PAPER_MODELS)),
        contrast_models=tuple(CONTRAST_MODELS if contrast_models is None else contrast_models),
        units=tuple(sorted(set(units or q.get("units", UNITS)))),
        prompt_tokens=prompt_tokens or q.get("prompt_tokens", 512),
        output_tokens=out,
        sweep_output_tokens=sweep_output_tokens or out,
        overrides=tuple(overrides),
        cache_fractions=tuple(q.get("cache_fractions", CACHE_FRACTIONS)),
        workers=max(1, workers or os.cpu_count() or 1),
        spot_check=spot_check,
        quick=quick,
    )


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of one study: labels, the config it runs and the policy."""

    study: str
    labels: dict[str, Any]
    cfg: Config
    policy: str


@dataclass(frozen=True)
class Job:
    """The unit of parallel work: one config, the policies to run on it."""

    cfg: Config
    policies: tuple[str, ...]

    @property
    def cost(self) -> float:
        """A rough relative run time, for longest-first scheduling."""
        m, w = self.cfg.model, self.cfg.workload
        return len(self.policies) * m.num_layers * (m.top_k + 4) * (w.output_tokens + w.prompt_tokens / 16)


def system_name(units: int) -> str:
    return f"edge-rtx5080-ndp{units}"


def neighbour_policies() -> list[str]:
    """The neighbour policies registered at run time, as runnable policy names."""
    out = []
    for name in NEIGHBOURS:
        if name in policies.all_policy_names():
            out.append(name)
        elif name in policies.names("prefetcher"):
            out.append(f"tp-lb+{name}")
    return out


def has_fractional_split() -> bool:
    return "fractional" in LB_SPLITS


class _Configs:
    """Loads configs once per (units, model, overrides); validates before any work starts."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._cache: dict[tuple, Config] = {}

    def __call__(self, units: int, model: str, *extra: str, output_tokens: int | None = None) -> Config:
        o = self.opts
        out = output_tokens or o.output_tokens
        overrides = (f"workload.prompt_tokens={o.prompt_tokens}", f"workload.output_tokens={out}",
                     *o.overrides, *extra)
        key = (units, model, overrides)
        if key not in self._cache:
            self._cache[key] = load_config(system_name(units), model, None, overrides)
        return self._cache[key]

    def sweep(self, units: int, model: str, *extra: str) -> Config:
        return self(units, model, *extra, output_tokens=self.opts.sweep_output_tokens)


def headline_cases(opts: Options, load: _Configs) -> list[Case]:
    cases = []
    for model in (*opts.models, *opts.contrast_models):
        for n in opts.units:
            cfg = load(n, model)
            for p in HEADLINE_POLICIES:
                cases.append(Case("headline", {"model": model, "units": n,
                                               "in_average": model in opts.models}, cfg, p))
    return cases


def ablation_cases(opts: Options, load: _Configs) -> list[Case]:
    """tp + prefetch without load balancing; the other policies come from the headline."""
    n = opts.focus_units
    return [Case("ablation_extra", {"model": m, "units": n}, load(n, m), ABLATION_OTHER_ORDER)
            for m in opts.models]


def budget_cases(opts: Options, load: _Configs) -> list[Case]:
    n = opts.focus_units
    cases = []
    for model in opts.models:
        for f in opts.cache_fractions:
            cfg = load.sweep(n, model, f"policy.cache_fraction={f}")
            cases.append(Case("prefetch_budget", {"model": model, "units": n, "cache_fraction": f},
                              cfg, "paper"))
    return cases


def base_config(opts: Options) -> Config:
    """The focus point's config (focus model, focus units, headline workload, user overrides)."""
    return load_config(system_name(opts.focus_units), opts.focus_model, None,
                       (f"workload.prompt_tokens={opts.prompt_tokens}",
                        f"workload.output_tokens={opts.output_tokens}", *opts.overrides))


def prefetcher_variants(opts: Options) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(label, policy, extra overrides)`` of the prefetcher study, neighbours included."""
    other = base_config(opts).workload.seed + 1  # a domain seed the served prompts do not use
    rows = [(f"tp-lb+{p}", f"tp-lb+{p}", ()) for p in PREFETCHERS]
    rows.append((PROFILED_OTHER, "tp-lb+profiled", (f"policy.profile_domain_seed={other}",)))
    rows.append((PROFILED_FLAT, "tp-lb+profiled", (f"policy.profile_alpha={PROFILED_FLAT_ALPHA}",)))
    for p in neighbour_policies():
        c = policies.resolve(p)
        parts = f"{c.scheduler}+{c.prefetcher}"
        rows.append((p if p == parts else f"{p} ({parts})", p, ()))
    return rows


def prefetcher_cases(opts: Options, load: _Configs) -> list[Case]:
    n = opts.focus_units
    cases = []
    for model in opts.models:
        for label, policy, extra in prefetcher_variants(opts):
            cases.append(Case("prefetchers", {"model": model, "units": n, "variant": label},
                              load.sweep(n, model, *extra), policy))
    return cases


def sensitivity_values(base: Config) -> list[tuple[str, str, str, float]]:
    """``(assumption, key, variant label, value)`` for every sensitivity point."""
    out = []
    for v in SENSITIVITY:
        section, key_name = v.key.split(".")
        b = getattr(getattr(base, section), key_name)
        for x in v.values:
            value = b * x if v.scale else x
            unit = next((u for suffix, u in UNITS_OF.items() if key_name.endswith(suffix)), "")
            label = f"x{x:g} ({value:g}{unit})" if v.scale else f"{value:g} (base {b:g})"
            out.append((v.assumption, v.key, label, value))
    return out


def sensitivity_cases(opts: Options, load: _Configs) -> list[Case]:
    n, model = opts.focus_units, opts.focus_model
    base = load.sweep(n, model)
    cases = [Case("sensitivity", {"model": model, "units": n, "assumption": "base",
                                  "key": "", "variant": "base", "value": ""}, base, p)
             for p in SENSITIVITY_POLICIES]
    for assumption, key, label, value in sensitivity_values(base):
        cfg = load.sweep(n, model, f"{key}={value!r}")
        for p in SENSITIVITY_POLICIES:
            cases.append(Case("sensitivity", {"model": model, "units": n, "assumption": assumption,
                                              "key": key, "variant": label, "value": value}, cfg, p))
    return cases


def beyond_variants() -> list[tuple[str, str, tuple[str, ...]]]:
    rows = [("paper", "paper", ())]
    if has_fractional_split():
        rows.append(("paper, lb_split=fractional", "paper", ("policy.lb_split=fractional",)))
    if "paper-refresh" in policies.all_policy_names():
        rows.append(("paper-refresh", "paper-refresh", ()))
    return rows


def beyond_cases(opts: Options, load: _Configs) -> list[Case]:
    variants = beyond_variants()
    if len(variants) < 2:
        return []
    n = opts.focus_units
    return [Case("beyond", {"model": model, "units": n, "variant": label},
                 load.sweep(n, model, *extra), policy)
            for model in opts.models for label, policy, extra in variants]


def all_cases(opts: Options) -> list[Case]:
    """Every case of every study; configs and policy names are checked here."""
    load = _Configs(opts)
    cases = [*headline_cases(opts, load), *ablation_cases(opts, load), *budget_cases(opts, load),
             *prefetcher_cases(opts, load),
             *sensitivity_cases(opts, load), *beyond_cases(opts, load),
             *(Case(*spec) for spec in reproduce_routing.case_specs(opts, load))]
    for name in {c.policy for c in cases}:
        policies.resolve(name)
    return cases


def jobs_of(cases: Iterable[Case]) -> list[Job]:
    """Equal configs merge into one job; longest first."""
    by_cfg: dict[Config, dict[str, None]] = {}
    for c in cases:
        by_cfg.setdefault(c.cfg, {})[c.policy] = None
    jobs = [Job(cfg, tuple(p)) for cfg, p in by_cfg.items()]
    return sorted(jobs, key=lambda j: -j.cost)


# --- running ---------------------------------------------------------------------------------


def run_job(job: Job) -> dict[str, dict[str, Any]]:
    """Worker body: the job's routing once, then every policy; returns their summaries.

    Two names for one scheduler + prefetcher pair (``paper`` and ``tp-lb+prefill-freq``)
    run once: the engine is deterministic, the second gets a copy of the first's summary.
    """
    import policies
    from cluster.core.metrics import summarize
    from cluster.core.routing import kept_routing
    from cluster.engines.analytic import run_policy

    routing = kept_routing(job.cfg)  # the full run's 102 jobs share 17 routings
    out: dict[str, dict[str, Any]] = {}
    ran: dict[tuple[str, str], str] = {}  # (scheduler, prefetcher) -> the name it ran as
    for name in job.policies:
        choice = policies.resolve(name)
        twin = ran.setdefault((choice.scheduler, choice.prefetcher), name)
        if twin != name:
            out[name] = copy.deepcopy(out[twin])
            continue
        rec = run_policy(job.cfg, routing, name, trace_steps=range(0), lower_bounds=False)
        s = summarize(rec, job.cfg.ndp.num_ndp_units)
        s["cache_capacity_experts"] = job.cfg.cache_capacity_experts
        s["cache_bytes"] = job.cfg.cache_bytes
        out[name] = s
    return out


def _job(_shared: None, job: Job, _report: Callable[[Any], None]) -> dict[str, dict[str, Any]]:
    return run_job(job)


def _ray_ready() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def execute(jobs: Sequence[Job], workers: int, on_done: Callable[[Job], None] = lambda j: None
            ) -> dict[Config, dict[str, dict[str, Any]]]:
    """Runs ``jobs`` in-process (1 worker), as Ray tasks (Ray initialised) or in processes."""
    results: dict[Config, dict[str, dict[str, Any]]] = {}
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            results[j.cfg] = run_job(j)
            on_done(j)
        return results
    if _ray_ready():
        import ray

        task = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(j): j for j in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                j = pending.pop(ref)
                results[j.cfg] = ray.get(ref)
                on_done(j)
        return results
    from cluster.engines import fanout  # daemonic spawn workers that an interrupt ends at once

    def done(i: int, summaries: dict[str, dict[str, Any]]) -> None:
        results[jobs[i].cfg] = summaries
        on_done(jobs[i])

    fanout.run_each(_job, None, jobs, done, workers=workers)
    return results


# --- tables ----------------------------------------------------------------------------------

METRICS = ("e2e_latency_s", "ttft_s", "tpot_s", "prefetch_hit_rate", "max_over_mean", "gpu_util")


def _row(case: Case, s: dict[str, Any]) -> dict[str, Any]:
    lb = s["link_bytes"]
    return {**case.labels, "policy": case.policy, **{k: s[k] for k in METRICS},
            "prefetched_experts": s["prefetched_experts"], "fetched_experts": s["fetched_experts"],
            "prefetch_gb": lb["prefetch"] / 1e9, "fetch_gb": lb["fetch"] / 1e9,
            "cache_experts": s["cache_capacity_experts"], "cache_gb": s["cache_bytes"] / 1e9,
            "output_tokens": case.cfg.workload.output_tokens}


def tables(cases: Sequence[Case], results: dict[Config, dict[str, dict[str, Any]]]
           ) -> dict[str, list[dict[str, Any]]]:
    """Study name -> rows, with each study's derived columns."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        rows.setdefault(c.study, []).append(_row(c, results[c.cfg][c.policy]))
    _speedup(rows.get("headline", []), ("model", "units"), lambda r: r["policy"] == "monde",
             "speedup_vs_monde")
    _speedup(rows.get("prefetchers", []), ("model",), lambda r: r["variant"] == "tp-lb+none",
             "speedup_vs_no_prefetch")
    _speedup(rows.get("prefetch_budget", []), ("model",), lambda r: r["cache_fraction"] == 0,
             "speedup_vs_no_cache")
    _speedup(rows.get("beyond", []), ("model",), lambda r: r["variant"] == "paper",
             "gain_vs_paper")
    if "sensitivity" in rows:
        rows["sensitivity"] = _sensitivity_rows(rows["sensitivity"])
    return rows


def _speedup(rows: list[dict[str, Any]], group: tuple[str, ...], is_base: Callable[[dict], bool],
             column: str) -> None:
    base = {tuple(r[g] for g in group): r["e2e_latency_s"] for r in rows if is_base(r)}
    for r in rows:
        b = base.get(tuple(r[g] for g in group))
        r[column] = b / r["e2e_latency_s"] if b else float("nan")


def _sensitivity_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: monde and paper latency and the speedup between them."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        k = (r["assumption"], r["variant"])
        o = out.setdefault(k, {key: r[key] for key in ("model", "units", "assumption", "key",
                                                         "variant", "value", "output_tokens")})
        o[f"{r['policy']}_e2e_latency_s"] = r["e2e_latency_s"]
        o[f"{r['policy']}_fetch_gb"] = r["fetch_gb"]
        if r["policy"] == "paper":
            o["paper_hit_rate"] = r["prefetch_hit_rate"]
    for o in out.values():
        o["speedup_paper_vs_monde"] = o["monde_e2e_latency_s"] / o["paper_e2e_latency_s"]
        o["speedup_paper_vs_best_baseline"] = (min(o["monde_e2e_latency_s"], o["ep_e2e_latency_s"])
                                               / o["paper_e2e_latency_s"])
    return list(out.values())


def headline_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average and maximum speedup of ``paper`` over ``monde`` over the averaged points."""
    pts = [r for r in rows if r["policy"] == "paper" and r["in_average"]]
    sp = [r["speedup_vs_monde"] for r in pts]
    best = max(pts, key=lambda r: r["speedup_vs_monde"]) if pts else None
    return {"points": len(sp), "avg": float(np.mean(sp)) if sp else float("nan"),
            "max": max(sp) if sp else float("nan"), "min": min(sp) if sp else float("nan"),
            "argmax": (best["model"], best["units"]) if best else None}


CSV_COLUMNS = {
    "headline": ("model", "units", "policy", "in_average", "e2e_latency_s", "speedup_vs_monde",
                 "ttft_s", "tpot_s", "prefetch_hit_rate", "max_over_mean", "gpu_util",
                 "fetch_gb", "prefetch_gb", "cache_experts", "output_tokens"),
    "prefetch_budget": ("model", "units", "policy", "cache_fraction", "cache_experts", "cache_gb",
                        "e2e_latency_s", "speedup_vs_no_cache", "ttft_s", "tpot_s",
                        "prefetch_hit_rate", "prefetched_experts", "prefetch_gb",
                        "fetched_experts", "fetch_gb", "output_tokens"),
    "prefetchers": ("model", "units", "variant", "policy", "e2e_latency_s",
                    "speedup_vs_no_prefetch", "tpot_s", "prefetch_hit_rate",
                    "prefetched_experts", "prefetch_gb", "fetched_experts", "fetch_gb",
                    "output_tokens"),
    "sensitivity": ("model", "units", "assumption", "key", "variant", "value",
                    "monde_e2e_latency_s", "ep_e2e_latency_s", "paper_e2e_latency_s",
                    "speedup_paper_vs_monde", "speedup_paper_vs_best_baseline", "paper_hit_rate",
                    "monde_fetch_gb", "paper_fetch_gb", "output_tokens"),
    "beyond": ("model", "units", "variant", "policy", "e2e_latency_s", "gain_vs_paper", "tpot_s",
               "prefetch_hit_rate", "fetch_gb", "prefetch_gb", "output_tokens"),
    "ablation": ("model", "units", "monde_e2e_latency_s", "tp_e2e_latency_s",
                 "tp-lb_e2e_latency_s", "paper_e2e_latency_s", "tp+prefill-freq_e2e_latency_s",
                 "tp_vs_monde", "lb_gain", "prefetch_gain", "paper_vs_monde",
                 "prefetch_gain_without_lb", "lb_gain_with_prefetch"),
}


def ablation_rows(headline: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]], units: int,
                  models: Sequence[str]) -> list[dict[str, Any]]:
    """Step-by-step gains at ``units``: tp over monde, tp-lb over tp, paper over tp-lb; and the
    other order (prefetch first: ``tp+prefill-freq`` over tp, paper over that)."""
    lat = {(r["model"], r["policy"]): r["e2e_latency_s"]
           for r in (*headline, *extra) if r["units"] == units}
    out = []
    for m in models:
        row: dict[str, Any] = {"model": m, "units": units}
        for p in ("monde", "tp", "tp-lb", "paper", ABLATION_OTHER_ORDER):
            row[f"{p}_e2e_latency_s"] = lat[(m, p)]
        row["tp_vs_monde"] = lat[(m, "monde")] / lat[(m, "tp")]
        row["lb_gain"] = lat[(m, "tp")] / lat[(m, "tp-lb")]
        row["prefetch_gain"] = lat[(m, "tp-lb")] / lat[(m, "paper")]
        row["paper_vs_monde"] = lat[(m, "monde")] / lat[(m, "paper")]
        row["prefetch_gain_without_lb"] = lat[(m, "tp")] / lat[(m, ABLATION_OTHER_ORDER)]
        row["lb_gain_with_prefetch"] = lat[(m, ABLATION_OTHER_ORDER)] / lat[(m, "paper")]
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in columns])
    return path


# --- spot check ------------------------------------------------------------------------------


def spot_check(opts: Options, run_dir: Path, console=None) -> dict[str, Any]:
    """The emulate engine on a short qwen3 workload: its paper-over-monde speedup vs analytic."""
    from cluster.studies.runner import run

    sc = SPOT_CHECK
    cfg = load_config(system_name(sc["units"]), sc["model"], None,
                      (*opts.overrides, f"workload.prompt_tokens={sc['prompt_tokens']}",
                       f"workload.output_tokens={sc['output_tokens']}"))
    t0 = time.perf_counter()
    res = run(cfg, list(sc["policies"]), engine="emulate", out=run_dir / "spot_check",
              console=console, progress=False, plots=False)
    s = res.summaries
    emu = s["monde"]["emulated_e2e_latency_s"] / s["paper"]["emulated_e2e_latency_s"]
    ana = s["monde"]["analytic_e2e_latency_s"] / s["paper"]["analytic_e2e_latency_s"]
    return {"model": sc["model"], "units": sc["units"], "prompt_tokens": sc["prompt_tokens"],
            "output_tokens": sc["output_tokens"], "emulated_speedup": emu, "analytic_speedup": ana,
            "difference_pct": (emu - ana) / ana * 100, "target_pct": sc["target_pct"],
            "fidelity_error": {p: s[p]["fidelity_error"] for p in sc["policies"]},
            "fidelity_tpot": {p: (s[p].get("fidelity") or {}).get("tpot") for p in sc["policies"]},
            "dilation": s["paper"].get("dilation"),
            "overruns": {p: f"{s[p].get('overruns', 0)}/{sum((s[p].get('device_slots') or {}).values())}"
                         for p in sc["policies"]},
            "control_path_emulated_us": (s["paper"].get("emulator_floor") or {}).get(
                "control_path_emulated_us"),
            "wall_s": time.perf_counter() - t0, "run_dir": str(res.run_dir)}


# --- the whole run ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a reproduce run produced."""

    run_dir: Path
    tables: dict[str, list[dict[str, Any]]]
    headline: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    csvs: list[Path] = field(default_factory=list)
    spot: dict[str, Any] | None = None
    spot_error: str | None = None
    compute_s: float = 0.0
    jobs: int = 0
    runs: int = 0


def reproduce(opts: Options, out: str | Path | None = None, console=None, progress: bool = True,
              command: str = "ndpmoe reproduce") -> Outcome:
    """Runs every study, writes CSVs, figures, ``results.json`` and ``report.md``."""
    from cluster.studies import reproduce_report as rr
    from cluster.studies.report import new_run_dir
    from cluster.studies.runner import _progress

    for m in (*opts.models, *opts.contrast_models):
        if m not in presets.MODELS:
            from cluster.core.errors import ConfigError

            raise ConfigError(f"--models {m!r} is not a model preset: presets are "
                              f"{', '.join(presets.MODELS)}")
    cases = all_cases(opts)  # validates every config and policy before any work
    jobs = jobs_of(cases)
    run_dir = Path(out) if out else new_run_dir(engine="reproduce")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _progress(console, progress) as bar:
        task = bar.add_task(f"reproduce: {len(jobs)} points on {opts.workers} worker(s)",
                            total=len(jobs))
        results = execute(jobs, opts.workers, lambda j: bar.advance(task, 1))
    compute_s = time.perf_counter() - t0
    tabs = tables(cases, results)
    tabs["ablation"] = ablation_rows(tabs["headline"], tabs.pop("ablation_extra", []),
                                     opts.focus_units, opts.models)
    reproduce_routing.derive(tabs)
    o = Outcome(run_dir, tabs, headline_stats(tabs["headline"]), compute_s=compute_s,
                jobs=len(jobs), runs=sum(len(j.policies) for j in jobs))
    for name, cols in {**CSV_COLUMNS, **reproduce_routing.CSV_COLUMNS}.items():
        if tabs.get(name):
            o.csvs.append(write_csv(run_dir / f"{name}.csv", tabs[name], cols))
    o.figures = rr.write_figures(o, opts)
    _write_results(run_dir, opts, o)
    rr.write_report(o, opts, command)
    if opts.spot_check:
        try:
            o.spot = spot_check(opts, run_dir, console)
            write_csv(run_dir / "spot_check.csv", [{k: v for k, v in o.spot.items()
                                                    if not isinstance(v, dict)}],
                      ("model", "units", "prompt_tokens", "output_tokens", "emulated_speedup",
                       "analytic_speedup", "difference_pct", "target_pct", "dilation", "wall_s"))
        except NdpmoeError as exc:
            o.spot_error = str(exc)
        _write_results(run_dir, opts, o)
        rr.write_report(o, opts, command)
    return o


def _write_results(run_dir: Path, opts: Options, o: Outcome) -> None:
    doc = {"options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
           "focus_units": opts.focus_units, "focus_model": opts.focus_model,
           "headline": o.headline, "compute_s": o.compute_s, "jobs": o.jobs, "runs": o.runs,
           "paper": {"avg_speedup": PAPER_AVG_SPEEDUP, "max_speedup": PAPER_MAX_SPEEDUP},
           "tables": o.tables,
           "spot_check": o.spot, "spot_check_error": o.spot_error}
    (run_dir / "results.json").write_text(json.dumps(doc, indent=2, default=_json_default))


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")
