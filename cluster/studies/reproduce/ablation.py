"""Study 2, ``ablation``: ``tp`` -> + load balancing (``tp-lb``) -> + prefetch (``paper``) at the
focus unit count, and the other order (prefetch without load balancing, ``tp+prefill-freq``).

It runs only ``tp+prefill-freq`` itself (table ``ablation_extra``); the other latencies are
read off the ``headline`` study's rows, so it is registered after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.core.spec import Config
from cluster.studies.reproduce.common import (
    COLORS,
    Case,
    Configs,
    Options,
    Outcome,
    Study,
    Tables,
    md_table,
    save,
)
from cluster.studies.reproduce.common import gmean as _gmean
from cluster.studies.reproduce.common import plt as _plt
from cluster.studies.reproduce.common import s3 as _s
from cluster.studies.reproduce.common import x as _x

ABLATION = (("tp", "tp"), ("tp-lb", "+ load balancing"), ("paper", "+ prefill-freq prefetch"))
ABLATION_OTHER_ORDER = "tp+prefill-freq"  # prefetch without load balancing

CSV_COLUMNS = {
    "ablation": ("model", "units", "monde_e2e_latency_s", "tp_e2e_latency_s",
                 "tp-lb_e2e_latency_s", "paper_e2e_latency_s", "tp+prefill-freq_e2e_latency_s",
                 "tp_vs_monde", "lb_gain", "prefetch_gain", "paper_vs_monde",
                 "prefetch_gain_without_lb", "lb_gain_with_prefetch"),
}


def cases(opts: Options, load: Configs) -> list[Case]:
    """tp + prefetch without load balancing; the other policies come from the headline."""
    n = opts.focus_units
    return [Case("ablation_extra", {"model": m, "units": n}, load(n, m), ABLATION_OTHER_ORDER)
            for m in opts.models]


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


def derive(tables: Tables, opts: Options) -> None:
    """The ``ablation`` table from the headline's rows and this study's own."""
    tables["ablation"] = ablation_rows(tables["headline"], tables.pop("ablation_extra", []),
                                       opts.focus_units, opts.models)


# --- figure ----------------------------------------------------------------------------------


def plot_ablation(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    plt = _plt()
    models = [r["model"] for r in rows]
    steps = [("monde", "monde (baseline)"), *ABLATION,
             (ABLATION_OTHER_ORDER, "tp + prefetch, no load balancing")]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.0 * len(models) + 2), 4.3))
    width = 0.8 / len(steps)
    x = np.arange(len(models))
    for i, (p, label) in enumerate(steps):
        ys = [r["monde_e2e_latency_s"] / r[f"{p}_e2e_latency_s"] for r in rows]
        bars = ax.bar(x + (i - (len(steps) - 1) / 2) * width, ys, width, label=label,
                      color=COLORS[p], hatch="//" if p == ABLATION_OTHER_ORDER else None,
                      edgecolor="white" if p == ABLATION_OTHER_ORDER else None)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, models)
    ax.set_ylabel("speedup over monde (x)")
    ax.set_xlabel("model")
    ax.set_title(f"Ablation at {rows[0]['units']} NDP units: tp, + load balancing, + prefetch (= paper)")
    ax.set_ylim(0, max(r["paper_vs_monde"] for r in rows) * 1.22)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def figures(o: Outcome, opts: Options) -> list[Path]:
    return [plot_ablation(o.run_dir / "ablation.png", o.tables["ablation"])]


# --- report ----------------------------------------------------------------------------------


def section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    rows = o.tables["ablation"]
    n = rows[0]["units"]
    out = [f"## 2. Ablation at {n} NDP units", ""]
    out.append(md_table(
        ["model", "monde (s)", "tp (s)", "tp-lb (s)", "paper (s)", "tp / monde", "+ LB",
         "+ prefetch", "paper / monde", "prefetch without LB", "LB after prefetch"],
        [[r["model"], _s(r["monde_e2e_latency_s"]), _s(r["tp_e2e_latency_s"]),
          _s(r["tp-lb_e2e_latency_s"]), _s(r["paper_e2e_latency_s"]), _x(r["tp_vs_monde"]),
          _x(r["lb_gain"]), _x(r["prefetch_gain"]), _x(r["paper_vs_monde"]),
          _x(r["prefetch_gain_without_lb"]), _x(r["lb_gain_with_prefetch"])] for r in rows]))
    gm = {k: _gmean(r[k] for r in rows) for k in (
        "tp_vs_monde", "lb_gain", "prefetch_gain", "paper_vs_monde", "prefetch_gain_without_lb",
        "lb_gain_with_prefetch")}
    total = math.log(gm["paper_vs_monde"])
    share = {k: math.log(gm[k]) / total * 100 if total > 0 else float("nan")
             for k in ("tp_vs_monde", "lb_gain", "prefetch_gain")}
    link, units_bw = cfg.link.bw_gbps, n * cfg.ndp.internal_bw_gbps
    para = (f"Step gains: '+ LB' = tp / tp-lb, '+ prefetch' = tp-lb / paper latency. The last two "
            f"columns take the other order: `{ABLATION_OTHER_ORDER}` (prefetch, no load "
            "balancing) over tp, then paper over it. Geometric means over the models: tensor "
            f"parallelism {_x(gm['tp_vs_monde'])}, load balancing on top {_x(gm['lb_gain'])}, "
            f"prefetch on top {_x(gm['prefetch_gain'])} (in log terms {share['tp_vs_monde']:.0f}% / "
            f"{share['lb_gain']:.0f}% / {share['prefetch_gain']:.0f}% of the total "
            f"{_x(gm['paper_vs_monde'])}). Load balancing adds {_x(gm['lb_gain'])} without a cache "
            f"and {_x(gm['lb_gain_with_prefetch'])} with the prefetched cache. Without a cache, "
            f"tp-lb can move an expert to the GPU only by fetching it over the {link:g} GB/s link, "
            f"while the {n} units together read it at {units_bw:g} GB/s; at batch 1 that pays for "
            "few experts. ")
    if gm["lb_gain_with_prefetch"] > gm["lb_gain"] * 1.05:
        para += ("With prefetched experts on the GPU it has more to balance: cached experts run "
                 "on the GPU for free and the NDP side shrinks. ")
    elif gm["lb_gain_with_prefetch"] < gm["lb_gain"] / 1.05:
        para += "With the prefetched cache, less is left for load balancing to move. "
    else:
        para += "Its gain is about the same with or without the prefetched cache. "
    para += ("The paper's ablation numbers are not recovered, so this split cannot be compared "
             "with it.")
    out += ["", "![ablation](ablation.png)", "", para, ""]
    return out


STUDY = Study("ablation", cases=cases, derive=derive, csvs=CSV_COLUMNS, figures=figures,
              section=section)
