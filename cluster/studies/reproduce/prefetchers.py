"""Study 4, ``prefetchers``: ``tp-lb+NAME`` for every prefetcher, ``profiled`` calibrated on
another routing distribution or with a flatter skew, and the neighbour policies that are
registered, at the focus unit count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import policies
from cluster.core.spec import Config
from cluster.studies.reproduce.common import (
    Case,
    Configs,
    Options,
    Outcome,
    Study,
    Tables,
    base_config,
    md_table,
    save,
    speedup,
)
from cluster.studies.reproduce.common import and_ as _and
from cluster.studies.reproduce.common import pct as _pct
from cluster.studies.reproduce.common import plt as _plt
from cluster.studies.reproduce.common import x as _x

PREFETCHERS = ("none", "lru", "lfu", "profiled", "oracle", "prefill-freq")
NEIGHBOURS = ("context-aware", "od-moe", "expertflow", "paper-refresh")
PROFILED_FLAT_ALPHA = 0.3
PROFILED_OTHER = "tp-lb+profiled, other domain"
PROFILED_FLAT = f"tp-lb+profiled, flatter calibration (alpha {PROFILED_FLAT_ALPHA})"
# a policy defined by reduced-bit NDP experts (context-aware) runs at these uniform widths; its
# paper allocates 1..4 bits per expert by hotness, which the cost model cannot express yet
REDUCED_BITS = (8, 4)

CSV_COLUMNS = {
    "prefetchers": ("model", "units", "variant", "policy", "e2e_latency_s",
                    "speedup_vs_no_prefetch", "tpot_s", "prefetch_hit_rate",
                    "prefetched_experts", "prefetch_gb", "fetched_experts", "fetch_gb",
                    "output_tokens"),
}


def neighbour_policies() -> list[str]:
    """The neighbour policies registered at run time, as runnable policy names."""
    out = []
    for name in NEIGHBOURS:
        if name in policies.all_policy_names():
            out.append(name)
        elif name in policies.names("prefetcher"):
            out.append(f"tp-lb+{name}")
    return out


def prefetcher_variants(opts: Options) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(label, policy, extra overrides)`` of the prefetcher study, neighbours included."""
    other = base_config(opts).workload.seed + 1  # a domain seed the served prompts do not use
    rows = [(f"tp-lb+{p}", f"tp-lb+{p}", ()) for p in PREFETCHERS]
    rows.append((PROFILED_OTHER, "tp-lb+profiled", (f"policy.profile_domain_seed={other}",)))
    rows.append((PROFILED_FLAT, "tp-lb+profiled", (f"policy.profile_alpha={PROFILED_FLAT_ALPHA}",)))
    for p in neighbour_policies():
        c = policies.resolve(p)
        parts = f"{c.scheduler}+{c.prefetcher}"
        label = p if p == parts else f"{p} ({parts})"
        if uses_reduced_bits(p):
            rows += [(f"{label}, {b}-bit NDP experts", p, (f"policy.ndp_weight_bits={b}",))
                     for b in REDUCED_BITS]
        else:
            rows.append((label, p, ()))
    return rows


def uses_reduced_bits(policy: str) -> bool:
    """Whether ``policy`` is defined by reduced-bit NDP experts (``uses_ndp_weight_bits``)."""
    c = policies.resolve(policy)
    return any(getattr(policies.get(kind, name), "uses_ndp_weight_bits", False)
               for kind, name in (("scheduler", c.scheduler), ("prefetcher", c.prefetcher)))


def cases(opts: Options, load: Configs) -> list[Case]:
    n = opts.focus_units
    out = []
    for model in opts.models:
        for label, policy, extra in prefetcher_variants(opts):
            out.append(Case("prefetchers", {"model": model, "units": n, "variant": label},
                            load.sweep(n, model, *extra), policy))
    return out


def derive(tables: Tables, opts: Options) -> None:
    speedup(tables.get("prefetchers", []), ("model",), lambda r: r["variant"] == "tp-lb+none",
            "speedup_vs_no_prefetch")


# --- figure ----------------------------------------------------------------------------------


def plot_prefetchers(path: Path, rows: Sequence[dict[str, Any]], models: Sequence[str]) -> Path:
    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.15 * len(models) * len(variants) + 1.9),
                                 sharey=True)
    y = np.arange(len(variants))
    h = 0.8 / len(models)
    for i, m in enumerate(models):
        by = {r["variant"]: r for r in rows if r["model"] == m}
        off = (i - (len(models) - 1) / 2) * h
        a1.barh(y + off, [by[v]["prefetch_hit_rate"] * 100 for v in variants], h, label=m)
        a2.barh(y + off, [by[v]["speedup_vs_no_prefetch"] - 1 for v in variants], h, left=1.0,
                label=m)
    a1.set_yticks(y, variants, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("decode GPU hit rate (%)")
    a1.set_title("Hit rate")
    a1.set_xlim(0, 100)
    a2.set_xlabel("speedup over tp-lb+none (x)")
    a2.set_title("End-to-end latency gain")
    gains = [r["speedup_vs_no_prefetch"] for r in rows]
    a2.set_xlim(min(0.95, min(gains) - 0.05), max(gains) + 0.08)
    a2.axvline(1.0, color="black", lw=0.8)
    for a in (a1, a2):
        a.grid(axis="x", alpha=0.3)
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(models), fontsize=9, frameon=False)
    fig.suptitle(f"Prefetchers with tp-lb, and neighbour policies, at {rows[0]['units']} NDP units",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, path)


def figures(o: Outcome, opts: Options) -> list[Path]:
    return [plot_prefetchers(o.run_dir / "prefetchers.png", o.tables["prefetchers"], opts.models)]


# --- report ----------------------------------------------------------------------------------


def section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    rows = o.tables["prefetchers"]
    n = rows[0]["units"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["model"], r["variant"]): r for r in rows}
    out = [f"## 4. Prefetchers side by side, and the neighbours ({n} NDP units)", ""]
    tab = [[v, *[f"{_pct(by[(m, v)]['prefetch_hit_rate'])} / {_x(by[(m, v)]['speedup_vs_no_prefetch'])}"
                 for m in opts.models]] for v in variants]
    out.append(md_table(["prefetcher / policy", *[f"{m}: hit / gain" for m in opts.models]], tab))
    ran = {r["policy"] for r in rows}
    missing = [nm for nm in NEIGHBOURS if nm not in ran and f"tp-lb+{nm}" not in ran]
    out += ["", "Hit rate = share of the decode steps' active experts already on the GPU; gain = "
            "tp-lb+none latency / the row's latency. `tp-lb+prefill-freq` is `paper`. 'other "
            "domain' calibrates `profiled` on a trace whose popular experts are a different random "
            "set (policy.profile_domain_seed); 'flatter calibration' keeps the served popular "
            f"experts but draws the calibration trace with Zipf alpha {PROFILED_FLAT_ALPHA} "
            "(policy.profile_alpha)."
            + (f" Neighbour policies not registered in this build, so not shown: {', '.join(missing)}."
               if missing else ""), "", "![prefetchers](prefetchers.png)", ""]

    def mean(v: str, k: str) -> float:
        return float(np.mean([by[(m, v)][k] for m in opts.models]))

    pf, orc, prof = "tp-lb+prefill-freq", "tp-lb+oracle", "tp-lb+profiled"
    other, flat = PROFILED_OTHER, PROFILED_FLAT
    hits = {lbl: mean(v, "prefetch_hit_rate") for lbl, v in (
        ("prefill-freq", pf), ("profiled", prof), ("profiled on another domain", other),
        ("oracle", orc), ("lru", "tp-lb+lru"), ("lfu", "tp-lb+lfu"))}
    text = ["Mean hit rates over the models: " + ", ".join(f"{k} {_pct(v)}" for k, v in hits.items()) + "."]
    if mean(other, "speedup_vs_no_prefetch") < mean(pf, "speedup_vs_no_prefetch"):
        text.append(f"Calibrated on another domain, profiled gains {_x(mean(other, 'speedup_vs_no_prefetch'))} "
                    f"where prefill-freq gains {_x(mean(pf, 'speedup_vs_no_prefetch'))}: this is the "
                    "case dataset-free prefetch is meant to win, and it wins it.")
    else:
        text.append("Even calibrated on another domain, profiled is not worse than prefill-freq here.")
    if abs(mean(flat, "prefetch_hit_rate") - mean(prof, "prefetch_hit_rate")) < 0.03:
        text.append("A calibration trace with a different skew but the same popular experts costs "
                    "profiled almost nothing: what matters is which experts are popular.")
    if mean(prof, "e2e_latency_s") <= mean(pf, "e2e_latency_s"):
        text.append(f"On the served distribution, profiled is at least as good as prefill-freq: "
                    f"its calibration trace is longer ({cfg.policy.profile_tokens} tokens against "
                    f"the {opts.prompt_tokens}-token prompt) and it is preloaded at model-load time, "
                    "while prefill-freq fetches its set over the link after the prefill.")
    if mean(orc, "prefetch_hit_rate") < mean(prof, "prefetch_hit_rate"):
        text.append("The oracle knows the decode routing but, like prefill-freq, fills after the "
                    "prefill over the link; the preloaded profiled cache starts full, which is why "
                    "the oracle is not an upper bound on the hit rate here.")
    neighbours = list(dict.fromkeys(
        r["variant"] for r in rows if r["policy"] in NEIGHBOURS
        or r["policy"].removeprefix("tp-lb+") in NEIGHBOURS))
    if neighbours:
        text.append("Neighbour policies (each with its own scheduler, see `ndpmoe policies`), mean "
                    "gain over tp-lb+none: " + ", ".join(
                        f"{v} {_x(mean(v, 'speedup_vs_no_prefetch'))}" for v in neighbours)
                    + f", against {_x(mean(pf, 'speedup_vs_no_prefetch'))} for prefill-freq.")
    reduced = [v for v in neighbours if "-bit NDP experts" in v]
    if reduced:
        widths = _and([f"{b}" for b in REDUCED_BITS])
        text.append(f"The reduced-bit rows store the NDP-side experts at {widths} bits (uniform "
                    "widths; context-aware's paper allocates 1 to 4 bits per expert by how hot it is): the "
                    "NDP units read and ship fewer bytes, which is where their gain comes from. "
                    "Fewer bits also change the model's outputs, and this emulator does not "
                    "measure that accuracy cost: these rows are not latencies at equal quality.")
    empty = [m for m in opts.models if by[(m, "tp-lb+lru")]["prefetch_hit_rate"] < 0.01]
    if empty:
        text.append(f"LRU and LFU admit only experts fetched on demand; for {_and(empty)} tp-lb "
                    "fetches none during decode at batch 1 (an expert's link time exceeds the NDP "
                    "time it would save), so their caches stay empty and they equal tp-lb+none.")
    out += [" ".join(text), ""]
    return out


STUDY = Study("prefetchers", cases=cases, derive=derive, csvs=CSV_COLUMNS, figures=figures,
              section=section)
