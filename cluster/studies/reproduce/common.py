"""What every study of ``ndpmoe reproduce`` shares: its options, cases and jobs, the
:class:`Study` a study module registers, the run's :class:`Outcome`, and the helpers that
turn summaries into rows, CSV files, markdown and figures.

Nothing here knows a particular study; the study modules and the driver import this module and
it imports none of them.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cluster.core import presets
from cluster.core.config import load_config
from cluster.core.spec import Config, ModelSpec

PAPER_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b")
CONTRAST_MODELS = ("olmoe-1b-7b",)
UNITS = (2, 3, 4, 5, 6)
CACHE_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
QUICK = {"models": ("qwen3-30b-a3b", "mixtral-8x7b"), "units": (2, 4), "prompt_tokens": 32,
         "output_tokens": 16, "cache_fractions": (0.0, 0.2, 1.0)}


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


# --- cases and jobs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One row of one study: the table it goes to, its labels, the config it runs, the policy."""

    study: str  # the table's name (a study may fill more than one table)
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


class Configs:
    """Loads configs once per (units, model, overrides); validates before any work starts.

    ``load(units, model, *overrides)`` gives the headline workload's config,
    ``load.sweep(...)`` the same with ``Options.sweep_output_tokens`` (studies 3-6).
    """

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


def base_config(opts: Options) -> Config:
    """The focus point's config (focus model, focus units, headline workload, user overrides)."""
    return load_config(system_name(opts.focus_units), opts.focus_model, None,
                       (f"workload.prompt_tokens={opts.prompt_tokens}",
                        f"workload.output_tokens={opts.output_tokens}", *opts.overrides))


# --- a study and a run's outcome -------------------------------------------------------------

Tables = dict[str, list[dict[str, Any]]]


@dataclass
class Outcome:
    """What a reproduce run produced."""

    run_dir: Path
    tables: Tables
    headline: dict[str, Any]
    figures: list[Path] = field(default_factory=list)
    csvs: list[Path] = field(default_factory=list)
    spot: dict[str, Any] | None = None
    spot_error: str | None = None
    compute_s: float = 0.0
    jobs: int = 0
    runs: int = 0


def _no_cases(opts: Options, load: Configs) -> list[Case]:
    return []


def _nothing(*args: Any) -> None:
    return None


def _no_figures(o: Outcome, opts: Options) -> list[Path]:
    return []


def _no_section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    return []


@dataclass(frozen=True)
class Study:
    """One study of ``ndpmoe reproduce``, as its module registers it (see ``registry``).

    The driver calls, in registration order: ``cases(opts, load)`` (rows to run; ``load`` is a
    :class:`Configs`), then, once every case has run and its row is in ``tables[case.study]``,
    ``derive(tables, opts)`` (derived columns or tables, in place), writes each table of
    ``csvs`` (name -> columns) that has rows, ``figures(o, opts)`` (paths written into
    ``o.run_dir``) and ``section(o, opts, focus_cfg)`` (markdown lines of ``report.md``).
    ``after(o, opts, console)``, when given, runs once the report exists (e.g. another engine)
    and returns True when it changed ``o``, so results.json and the report are written again.
    """

    name: str
    cases: Callable[[Options, Configs], list[Case]] = _no_cases
    derive: Callable[[Tables, Options], None] = _nothing
    csvs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    figures: Callable[[Outcome, Options], list[Path]] = _no_figures
    section: Callable[[Outcome, Options, Config], list[str]] = _no_section
    after: Callable[[Outcome, Options, Any], bool] | None = None


# --- rows and CSV files ----------------------------------------------------------------------

METRICS = ("e2e_latency_s", "ttft_s", "tpot_s", "prefetch_hit_rate", "max_over_mean", "gpu_util")


def row(case: Case, s: dict[str, Any]) -> dict[str, Any]:
    """A case's row: its labels, the policy and the summary's metrics."""
    lb = s["link_bytes"]
    return {**case.labels, "policy": case.policy, **{k: s[k] for k in METRICS},
            "prefetched_experts": s["prefetched_experts"], "fetched_experts": s["fetched_experts"],
            "prefetch_gb": lb["prefetch"] / 1e9, "fetch_gb": lb["fetch"] / 1e9,
            "cache_experts": s["cache_capacity_experts"], "cache_gb": s["cache_bytes"] / 1e9,
            "output_tokens": case.cfg.workload.output_tokens}


def speedup(rows: list[dict[str, Any]], group: tuple[str, ...], is_base: Callable[[dict], bool],
            column: str) -> None:
    """``column`` = the group's base row's latency / the row's, in place."""
    base = {tuple(r[g] for g in group): r["e2e_latency_s"] for r in rows if is_base(r)}
    for r in rows:
        b = base.get(tuple(r[g] for g in group))
        r[column] = b / r["e2e_latency_s"] if b else float("nan")


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


# --- markdown --------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def x(v: float) -> str:
    return f"{v:.2f}x"


def pct(v: float) -> str:
    return f"{v * 100:.0f}%"


def s3(v: float) -> str:
    return f"{v:.3f}"


def gmean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")


def and_(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def spec(model: str) -> ModelSpec:
    return ModelSpec(**presets.MODELS[model])


# --- figures ---------------------------------------------------------------------------------

COLORS = {"monde": "#7f7f7f", "ep": "#8c564b", "tp": "#1f77b4", "tp-lb": "#ff7f0e",
          "paper": "#2ca02c", "tp+prefill-freq": "#9467bd"}
DPI = 110


def plt():
    """matplotlib's pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt().close(fig)
    return path
