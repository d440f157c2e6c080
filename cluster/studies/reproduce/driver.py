"""``ndpmoe reproduce``'s driver: the registered studies' cases, run once per config, then each
study's tables, CSV files, figures and ``report.md`` section, plus ``results.json``.

Cases are grouped by their resolved :class:`~cluster.core.spec.Config` (equal configs run once:
the ablation reuses the headline, the budget sweep's 1.0 the default) into jobs of one config
and several policies (:mod:`~cluster.studies.reproduce.run`). Tables, figures and the report
are made afterwards from the summaries alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import policies
from cluster.core import presets
from cluster.core.errors import ConfigError
from cluster.core.spec import Config
from cluster.studies.reproduce import registry
from cluster.studies.reproduce.common import (
    Case,
    Configs,
    Options,
    Outcome,
    Study,
    Tables,
    base_config,
    row,
    write_csv,
)
from cluster.studies.reproduce.headline import PAPER_AVG_SPEEDUP, PAPER_MAX_SPEEDUP, headline_stats
from cluster.studies.reproduce.run import execute, jobs_of


def all_cases(opts: Options, studies: Sequence[Study] | None = None) -> list[Case]:
    """Every case of every study (default: all registered); configs and policy names are
    checked here."""
    load = Configs(opts)
    cases = [c for s in (registry.selected() if studies is None else studies)
             for c in s.cases(opts, load)]
    for name in {c.policy for c in cases}:
        policies.resolve(name)
    return cases


def tables(cases: Sequence[Case], results: dict[Config, dict[str, dict[str, Any]]], opts: Options,
           studies: Sequence[Study]) -> Tables:
    """Table name -> rows: each case's row, then each study's derived columns and tables."""
    rows: Tables = {}
    for c in cases:
        rows.setdefault(c.study, []).append(row(c, results[c.cfg][c.policy]))
    for s in studies:
        s.derive(rows, opts)
    return rows


def reproduce(opts: Options, out: str | Path | None = None, console=None, progress: bool = True,
              command: str = "ndpmoe reproduce", studies: Sequence[str] | None = None) -> Outcome:
    """Runs the registered studies (``studies``: only those names), writes CSVs, figures,
    ``results.json`` and ``report.md``."""
    from cluster.studies.report import new_run_dir
    from cluster.studies.runner import _progress

    for m in (*opts.models, *opts.contrast_models):
        if m not in presets.MODELS:
            raise ConfigError(f"--models {m!r} is not a model preset: presets are "
                              f"{', '.join(presets.MODELS)}")
    chosen = registry.selected(studies)
    cases = all_cases(opts, chosen)  # validates every config and policy before any work
    jobs = jobs_of(cases)
    run_dir = Path(out) if out else new_run_dir(engine="reproduce")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _progress(console, progress) as bar:
        task = bar.add_task(f"reproduce: {len(jobs)} points on {opts.workers} worker(s)",
                            total=len(jobs))
        results = execute(jobs, opts.workers, lambda j: bar.advance(task, 1))
    compute_s = time.perf_counter() - t0
    tabs = tables(cases, results, opts, chosen)
    head = headline_stats(tabs["headline"]) if "headline" in tabs else {}
    o = Outcome(run_dir, tabs, head, compute_s=compute_s, jobs=len(jobs),
                runs=sum(len(j.policies) for j in jobs))
    for s in chosen:
        for name, cols in s.csvs.items():
            if tabs.get(name):
                o.csvs.append(write_csv(run_dir / f"{name}.csv", tabs[name], cols))
    for s in chosen:
        o.figures += s.figures(o, opts)
    write_results(run_dir, opts, o)
    write_report(o, opts, command, chosen)
    if any([s.after(o, opts, console) for s in chosen if s.after is not None]):
        write_results(run_dir, opts, o)
        write_report(o, opts, command, chosen)
    return o


def write_results(run_dir: Path, opts: Options, o: Outcome) -> None:
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


# --- report ----------------------------------------------------------------------------------


def write_report(o: Outcome, opts: Options, command: str, studies: Sequence[Study]) -> Path:
    """``report.md``: a header, each study's section in registration order, the assumptions."""
    cfg = base_config(opts)
    lines = ["# Reproducing 'A Scheduling Framework for Efficient MoE Inference on Edge GPU-NDP "
             "Systems' (DATE 2026) with ndpmoe", "",
             f"Command: `{command}`  ",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}: {o.runs} policy runs in {o.jobs} "
             f"jobs on {opts.workers} worker(s), {o.compute_s:.0f} s of wall time (analytic engine).  ",
             f"Workload: batch 1, {opts.prompt_tokens} prompt / {opts.output_tokens} output tokens "
             + (f"for the headline and the ablation; studies 3-6 use {opts.sweep_output_tokens} "
                "output tokens" if opts.sweep_output_tokens != opts.output_tokens else "in every study")
             + (". `--quick`: a tiny workload for tests, not the paper's setup." if opts.quick else ".")
             + (f"  \nOverrides for every point: `{' '.join(opts.overrides)}`." if opts.overrides else ""),
             "",
             "Times are modelled seconds of the target hardware. Tables as CSV: "
             + ", ".join(f"`{p.name}`" for p in o.csvs) + "; `results.json` holds every row.", ""]
    for s in studies:
        lines += s.section(o, opts, cfg)
    lines += ["## Assumptions", "", *[f"- {a}" for a in assumptions(cfg)], ""]
    path = o.run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def assumptions(cfg: Config) -> list[str]:
    g, n, link, w, p = cfg.gpu, cfg.ndp, cfg.link, cfg.workload, cfg.policy
    return [
        f"GPU: {g.name}, {g.mem_bytes / 2**30:.0f} GiB, {g.mem_bw_gbps:g} GB/s, "
        f"{g.peak_tflops:g} TFLOPS fp16, {g.launch_overhead_us:g} us per kernel.",
        f"NDP unit (DDR5-4800 NDP-DIMM, each): {n.capacity_bytes / 2**30:.0f} GiB, "
        f"{n.internal_bw_gbps:g} GB/s internal (two ranks in parallel), {n.peak_gflops:g} GFLOPS, "
        f"{n.launch_overhead_us:g} us launch. These DIMM figures are ours: the paper's DIMM "
        "parameters are not recovered.",
        f"One host link (PCIe 5.0 x16): {link.bw_gbps:g} GB/s effective, {link.latency_us:g} us, "
        "shared by all units and by activations, partials, on-demand fetches and prefetches; "
        "prefetch has the lowest priority and only uses link time the steps leave idle.",
        "fp16 weights; every duration is a roofline plus a fixed cost (cluster/core/cost.py), where "
        "the paper used an AttAcc-style GPU model and Ramulator2 for the DIMMs.",
        "GPU expert cache = GPU memory left after the non-expert weights, the KV cache of the "
        "whole context and a one-layer on-demand fetch buffer, times policy.cache_fraction "
        f"({p.cache_fraction:g} by default).",
        f"Routing is synthetic: per-layer Zipf popularity with alpha {w.alpha:g} over a seeded "
        f"random order of experts, temporal reuse probability {w.reuse:g}, seed {w.seed}. Prefill "
        "and decode draw from the same distribution (the most favourable case for prefill-based "
        "prefetch; PAPER.md quotes 0.89 cosine similarity between prefill and decode activations "
        "on Mixtral). The paper used real prompts.",
        "tp-lb is our reconstruction of the paper's scheduler (its Algorithm 1 and equations are "
        "not recovered): cached experts run on the GPU; of the others, the prefix of the "
        "most-routed experts whose fetch + GPU compute minimises max(GPU finish, NDP finish) "
        "moves to the GPU.",
        "monde: per expert, 'fetch + GPU compute < compute in place on the home unit' by the cost "
        "model, without accounting for link contention between the experts it fetches (MoNDE's "
        "own threshold is not recovered).",
        "prefill-freq and oracle fill the cache after the prefill over the link; profiled is "
        "preloaded at model-load time, at no cost to the request.",
        "Three of the paper's four models are not named in what we could read; we use "
        "mixtral-8x7b, deepseek-v2-lite and qwen1.5-moe-a2.7b beside qwen3-30b-a3b. Per-model "
        "numbers and the paper's ablation are not recovered either, so only the 2.41x / 2.56x "
        "headline can be compared.",
    ]
