"""Study 6, ``beyond``: ``paper`` against its extensions (the fractional split
``policy.lb_split=fractional``, ``paper-refresh``) at the focus unit count, when they exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import policies
from cluster.core.knobs import LB_SPLITS
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
from cluster.studies.reproduce.common import gmean as _gmean
from cluster.studies.reproduce.common import plt as _plt
from cluster.studies.reproduce.common import s3 as _s

CSV_COLUMNS = {
    "beyond": ("model", "units", "variant", "policy", "e2e_latency_s", "gain_vs_paper", "tpot_s",
               "prefetch_hit_rate", "fetch_gb", "prefetch_gb", "output_tokens"),
}


def has_fractional_split() -> bool:
    return "fractional" in LB_SPLITS


def beyond_variants() -> list[tuple[str, str, tuple[str, ...]]]:
    rows = [("paper", "paper", ())]
    if has_fractional_split():
        rows.append(("paper, lb_split=fractional", "paper", ("policy.lb_split=fractional",)))
    if "paper-refresh" in policies.all_policy_names():
        rows.append(("paper-refresh", "paper-refresh", ()))
    return rows


def cases(opts: Options, load: Configs) -> list[Case]:
    variants = beyond_variants()
    if len(variants) < 2:
        return []
    n = opts.focus_units
    return [Case("beyond", {"model": model, "units": n, "variant": label},
                 load.sweep(n, model, *extra), policy)
            for model in opts.models for label, policy, extra in variants]


def derive(tables: Tables, opts: Options) -> None:
    speedup(tables.get("beyond", []), ("model",), lambda r: r["variant"] == "paper",
            "gain_vs_paper")


# --- figure ----------------------------------------------------------------------------------


def plot_beyond(path: Path, rows: Sequence[dict[str, Any]], models: Sequence[str]) -> Path:
    plt = _plt()
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "paper"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(models) + 2), 3.9))
    x = np.arange(len(models))
    w = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        by = {r["model"]: r for r in rows if r["variant"] == v}
        gains = [(by[m]["gain_vs_paper"] - 1) * 100 for m in models]
        bars = ax.bar(x + (i - (len(variants) - 1) / 2) * w, gains, w, label=v)
        ax.bar_label(bars, fmt="%+.1f%%", fontsize=7, padding=1)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, models)
    ax.set_xlabel("model")
    ax.set_ylabel("end-to-end latency gain over paper (%)")
    ax.set_title(f"Beyond the paper at {rows[0]['units']} NDP units")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.2)
    fig.tight_layout()
    return save(fig, path)


def figures(o: Outcome, opts: Options) -> list[Path]:
    if not o.tables.get("beyond"):
        return []
    return [plot_beyond(o.run_dir / "beyond_paper.png", o.tables["beyond"], opts.models)]


# --- report ----------------------------------------------------------------------------------


def section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    rows = o.tables.get("beyond")
    if not rows:
        return ["## 6. Beyond the paper", "",
                "No extension (policy.lb_split=fractional, paper-refresh) is available in this "
                "build.", ""]
    n = rows[0]["units"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["model"], r["variant"]): r for r in rows}
    out = [f"## 6. Beyond the paper ({n} NDP units)", ""]
    tab = [[m, *[f"{_s(by[(m, v)]['e2e_latency_s'])} ({(by[(m, v)]['gain_vs_paper'] - 1) * 100:+.1f}%)"
                 for v in variants]] for m in opts.models]
    out.append(md_table(["model", *[f"{v}: e2e s (gain)" for v in variants]], tab))
    what = {"paper, lb_split=fractional": "tp-lb may also split the next expert after its best "
            "prefix by columns between the GPU and the NDP units, so both sides finish together "
            "instead of at whole-expert granularity"}
    what.update({name: desc for name, (_, _, desc) in policies.combos().items()})
    desc = []
    for v in variants[1:]:
        g = [by[(m, v)]["gain_vs_paper"] for m in opts.models]
        desc.append(f"`{v}` ({what.get(v, 'see its docstring')}): {(_gmean(g) - 1) * 100:+.1f}% "
                    f"(geometric mean; {min(g) * 100 - 100:+.1f}% to {max(g) * 100 - 100:+.1f}%)")
    flat = [v for v in variants[1:] if "refresh" in v
            and all(abs(by[(m, v)]["gain_vs_paper"] - 1) < 0.01 for m in opts.models)]
    note = (f" {_and(flat)} changes less than 1%: in our synthetic routing prefill and decode "
            "share one distribution, so decode counts have little to correct; it is meant for "
            "prompts whose routing drifts." if flat else "")
    out += ["", "![beyond](beyond_paper.png)", "",
            "Gain = paper latency / variant latency - 1. " + "; ".join(desc) + "." + note, ""]
    return out


STUDY = Study("beyond", cases=cases, derive=derive, csvs=CSV_COLUMNS, figures=figures,
              section=section)
