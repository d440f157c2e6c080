"""Study 3, ``prefetch_budget``: ``paper`` over ``policy.cache_fraction`` (``Options.cache_fractions``)
at the focus unit count, and whether the latency has an interior optimum.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.core.spec import Config
from cluster.studies.reproduce.common import (
    Case,
    Configs,
    Options,
    Outcome,
    Study,
    Tables,
    md_table,
    save,
    speedup,
)
from cluster.studies.reproduce.common import and_ as _and
from cluster.studies.reproduce.common import pct as _pct
from cluster.studies.reproduce.common import plt as _plt
from cluster.studies.reproduce.common import s3 as _s
from cluster.studies.reproduce.common import spec as _spec
from cluster.studies.reproduce.common import x as _x

CSV_COLUMNS = {
    "prefetch_budget": ("model", "units", "policy", "cache_fraction", "cache_experts", "cache_gb",
                        "e2e_latency_s", "speedup_vs_no_cache", "ttft_s", "tpot_s",
                        "prefetch_hit_rate", "prefetched_experts", "prefetch_gb",
                        "fetched_experts", "fetch_gb", "output_tokens"),
}


def cases(opts: Options, load: Configs) -> list[Case]:
    n = opts.focus_units
    out = []
    for model in opts.models:
        for f in opts.cache_fractions:
            cfg = load.sweep(n, model, f"policy.cache_fraction={f}")
            out.append(Case("prefetch_budget", {"model": model, "units": n, "cache_fraction": f},
                            cfg, "paper"))
    return out


def derive(tables: Tables, opts: Options) -> None:
    speedup(tables.get("prefetch_budget", []), ("model",), lambda r: r["cache_fraction"] == 0,
            "speedup_vs_no_cache")


# --- figure ----------------------------------------------------------------------------------


def plot_budget(path: Path, rows: Sequence[dict[str, Any]], models: Sequence[str]) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in models:
        pts = sorted((r["cache_fraction"], r["e2e_latency_s"], r["prefetch_hit_rate"]) for r in rows
                     if r["model"] == m)
        if not pts:
            continue
        fs, lat, hit = zip(*pts)
        rel = np.asarray(lat) / lat[0]
        line, = a1.plot(fs, rel, marker="o", ms=4, label=m)
        best = int(np.argmin(rel))
        a1.plot(fs[best], rel[best], marker="*", ms=13, color=line.get_color(), ls="none")
        a2.plot(fs, np.asarray(hit) * 100, marker="o", ms=4, label=m)
    for a in (a1, a2):
        a.set_xlabel("prefetch budget (policy.cache_fraction of the free GPU memory)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    a1.set_ylabel("end-to-end latency / latency at budget 0")
    a1.set_title("paper: latency vs prefetch budget (star = lowest)")
    a2.set_ylabel("decode GPU hit rate (%)")
    a2.set_title("paper: active experts already on the GPU")
    a2.set_ylim(0, 100)
    fig.tight_layout()
    return save(fig, path)


def figures(o: Outcome, opts: Options) -> list[Path]:
    return [plot_budget(o.run_dir / "prefetch_budget.png", o.tables["prefetch_budget"], opts.models)]


# --- report ----------------------------------------------------------------------------------


def section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    rows = o.tables["prefetch_budget"]
    n = rows[0]["units"]
    out = [f"## 3. Prefetch-budget sweep (paper, {n} NDP units)", ""]
    fr = sorted({r["cache_fraction"] for r in rows})
    by = {(r["model"], r["cache_fraction"]): r for r in rows}
    tab = []
    for m in opts.models:
        for f in fr:
            r = by[(m, f)]
            tab.append([m, f"{f:g}", r["cache_experts"], f"{r['cache_gb']:.2f}", _s(r["e2e_latency_s"]),
                        _x(r["speedup_vs_no_cache"]), _pct(r["prefetch_hit_rate"]),
                        f"{r['prefetch_gb']:.2f}", f"{r['fetch_gb']:.2f}"])
    out.append(md_table(["model", "cache_fraction", "cache (experts)", "cache (GB)", "e2e (s)",
                          "vs budget 0", "hit rate", "prefetched (GB)", "fetched on demand (GB)"],
                         tab, "llrrrrrrr"))
    out += ["", "![prefetch budget](prefetch_budget.png)", ""]
    interior, notes = [], []
    for m in opts.models:
        lat = [by[(m, f)]["e2e_latency_s"] for f in fr]
        hit = [by[(m, f)]["prefetch_hit_rate"] for f in fr]
        best = int(np.argmin(lat))
        if best < len(fr) - 1 and lat[-1] > lat[best] * 1.005:
            interior.append(f"{m} (lowest at {fr[best]:g}, {(lat[-1] / lat[best] - 1) * 100:.1f}% "
                            f"slower at {fr[-1]:g}; hit rate {_pct(hit[best])} there against "
                            f"{_pct(hit[-1])} at {fr[-1]:g})")
        elif lat[0] > lat[-1] and len(fr) > 2:
            mid = min(fr, key=lambda f: abs(f - 0.4))
            notes.append(f"{m} gets {(lat[0] - by[(m, mid)]['e2e_latency_s']) / (lat[0] - lat[-1]) * 100:.0f}% "
                         f"of its full-budget latency reduction at budget {mid:g} (hit rate "
                         f"{_pct(by[(m, mid)]['prefetch_hit_rate'])}, {_pct(hit[-1])} at {fr[-1]:g})")
    mechanism = ("In our engine prefetches use only link time the steps leave idle, so they never "
                 "delay on-demand traffic, and a cached expert runs on the GPU, faster than the NDP "
                 "side at these bandwidths. The cost of a larger budget is in the fill order: "
                 "prefill-freq issues its whole set in layer order after the prefill, so with a "
                 "larger set the popular experts of the later layers arrive later, which costs hit "
                 "rate in the first decode steps and is amortised over a long output. ")
    if interior:
        text = ("An interior optimum appears for " + "; ".join(interior) + ". " + mechanism
                + "Where the hit rate at the optimum is higher than at the full budget, that order "
                "effect is what we see.")
    else:
        text = ("We find no interior optimum, unlike the paper: for every model the latency falls "
                "monotonically (within 0.5%) up to the full budget. " + mechanism
                + "An optimum like the paper's needs a cost we do not model: prefetch traffic "
                "competing with on-demand fetches at equal priority, or GPU memory the cache takes "
                "from something else (we reserve the KV cache and the fetch buffer first).")
    if notes:
        text += (" Returns diminish because prefill-freq caches the most counted experts first: "
                 + "; ".join(notes) + ".")
    few = [m for m in opts.models if len(fr) > 1 and by[(m, fr[-1])]["cache_experts"]
           < 0.2 * _spec(m).num_layers * _spec(m).num_experts
           and by[(m, fr[-1])]["prefetch_hit_rate"] > 1.05 * by[(m, fr[-2])]["prefetch_hit_rate"]]
    if few:
        text += (f" For {_and(few)} the full budget holds under 20% of the routed experts and the "
                 "hit rate is still climbing at the full budget.")
    out += [text, ""]
    return out


STUDY = Study("prefetch_budget", cases=cases, derive=derive, csvs=CSV_COLUMNS, figures=figures,
              section=section)
