"""Golden analytic summaries: the cases, how each is computed, and how to rewrite them.

    .venv/bin/python tests/golden/regen.py            # rewrite every golden file
    .venv/bin/python tests/golden/regen.py --check    # compare, print the differences

``tests/test_golden.py`` recomputes every case and compares it with ``tests/golden/*.json``
to 1e-12 relative: a speed-up of the analytic engine or of a policy must not change one
number. A change of the analytic engine's *semantics* changes them on purpose; then run
this script and say in the commit message why the numbers moved (see README.md).

A case is one configuration and a list of policies. Its golden document holds, per policy,
the ``summary.json`` fields (:func:`cluster.core.metrics.summarize` plus the speedup over
``monde``) and a digest of the step records that the summary does not show (lower bounds,
step start times, trace intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cluster.core.config import load_config  # noqa: E402
from cluster.core.metrics import PolicyRecords, RunResult, summary_of  # noqa: E402
from cluster.core.routing import build_routing  # noqa: E402
from cluster.engines.analytic import run_policy  # noqa: E402

HERE = Path(__file__).resolve().parent
REL_TOL = 1e-12

ALL_POLICIES = ["ep", "monde", "monde-tp", "tp", "tp-lb", "paper", "eplb", "tp-lb+lru",
                "tp-lb+lfu", "tp-lb+oracle", "tp-lb+profiled", "paper-refresh",
                "tp-lb+context-aware", "tp-lb+od-moe", "tp-lb+expertflow"]
MAIN = ["ep", "monde", "tp", "tp-lb", "paper", "eplb"]

# name -> (system, model, overrides, policies). Small: the whole set runs in seconds.
CASES: dict[str, tuple[str | None, str | None, list[str], list[str]]] = {
    "qwen3_ndp4_b1": ("edge-rtx5080-ndp4", "qwen3-30b-a3b",
                      ["workload.prompt_tokens=64", "workload.output_tokens=12"], ALL_POLICIES),
    "qwen3_ndp4_b1_fractional": ("edge-rtx5080-ndp4", "qwen3-30b-a3b",
                                 ["workload.prompt_tokens=32", "workload.output_tokens=8",
                                  "policy.lb_split=\"fractional\""], ["tp-lb", "paper"]),
    "qwen3_ndp4_b1_equal_priority": ("edge-rtx5080-ndp4", "qwen3-30b-a3b",
                                     ["workload.prompt_tokens=32", "workload.output_tokens=8",
                                      "link.prefetch_priority=\"equal\""],
                                     ["paper", "tp-lb+lru", "tp-lb+oracle"]),
    "mixtral_ndp2_b4": ("edge-rtx5080-ndp2", "mixtral-8x7b",
                        ["workload.batch_size=4", "workload.prompt_tokens=16",
                         "workload.output_tokens=6"], MAIN),
    "deepseek_ndp6_b8": ("edge-rtx5080-ndp6", "deepseek-v2-lite",
                         ["workload.batch_size=8", "workload.prompt_tokens=16",
                          "workload.output_tokens=6", "workload.alpha=1.2"], MAIN),
    "qwen3_ndp3_slow_unit": ("edge-rtx5080-ndp3", "qwen3-30b-a3b",
                             ["workload.batch_size=2", "workload.prompt_tokens=16",
                              "workload.output_tokens=6", "emulate.inject=\"slow:ndp1x3\""],
                             ["ep", "monde", "tp", "tp-lb", "paper"]),
    "stress_256e_64u_b64": ("edge-rtx5080-ndp4", "qwen3-30b-a3b",
                            ["model.num_experts=256", "model.top_k=8", "ndp.num_ndp_units=64",
                             "workload.batch_size=64", "workload.prompt_tokens=8",
                             "workload.output_tokens=3", "model.num_layers=8"],
                            ["ep", "monde", "tp", "tp-lb", "paper", "eplb"]),
    "qwen3_128e_16u_b32_fastlink": ("edge-rtx5080-ndp4", "qwen3-30b-a3b",
                                    ["model.num_experts=128", "model.top_k=8",
                                     "ndp.num_ndp_units=16", "workload.batch_size=32",
                                     "workload.prompt_tokens=8", "workload.output_tokens=3",
                                     "model.num_layers=8", "link.bw_gbps=256"],
                                    [*MAIN, "tp-lb+lru"]),
    "olmoe_ndp8_b16_top16": ("edge-rtx5080-ndp4", "olmoe-1b-7b",
                             ["ndp.num_ndp_units=8", "model.top_k=16", "workload.batch_size=16",
                              "workload.prompt_tokens=8", "workload.output_tokens=4"],
                             ["ep", "tp", "tp-lb", "paper", "eplb"]),
}
# The default `ndpmoe run --engine analytic` (paper's workload, 512 in / 512 out).
DEFAULT_RUN = ("default_run", (None, None, [], ["ep", "monde", "tp", "tp-lb", "paper"]))


def _digest(rec: PolicyRecords) -> dict[str, Any]:
    """What the summary leaves out: per-step lower bounds and starts, trace intervals."""
    return {
        "lower_bound_sum_s": math.fsum(s.lower_bound_s for s in rec.steps),
        "lower_bound_max_s": max((s.lower_bound_s for s in rec.steps), default=0.0),
        "step_start_sum_s": math.fsum(s.start_s for s in rec.steps),
        "gpu_busy_sum_s": math.fsum(s.gpu_busy_s for s in rec.steps),
        "gpu_experts": sum(s.gpu_experts for s in rec.steps),
        "intervals": len(rec.intervals),
        "interval_end_sum_s": math.fsum(iv.end_s for iv in rec.intervals),
    }


def compute(case: tuple[str | None, str | None, list[str], list[str]]) -> dict[str, Any]:
    system, model, overrides, names = case
    cfg = load_config(system, model, None, list(overrides))
    routing = build_routing(cfg)
    summaries, digests = {}, {}
    for n in names:
        rec = run_policy(cfg, routing, n)
        summaries[n] = summary_of(rec, cfg.ndp.num_ndp_units)
        digests[n] = _digest(rec)
    return {"case": {"system": system, "model": model, "overrides": overrides, "policies": names},
            "policies": RunResult("analytic", cfg, summaries).summaries, "steps": digests}


def path_of(name: str) -> Path:
    return HERE / f"{name}.json"


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON documents, numbers to ``REL_TOL``."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in want if k not in got]
        out += [f"{where}/{k}: unexpected" for k in got if k not in want]
        for k in want:
            if k in got:
                out += differences(want[k], got[k], f"{where}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: length {len(got)} != {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) \
            and not isinstance(want, bool) and not isinstance(got, bool):
        if math.isclose(want, got, rel_tol=REL_TOL, abs_tol=0.0) or want == got:
            return []
        return [f"{where}: {got!r} != golden {want!r}"]
    return [] if want == got else [f"{where}: {got!r} != golden {want!r}"]


def _normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """The document as it reads back from JSON (tuples become lists, numpy numbers plain)."""
    from cluster.studies.report import _json_default

    return json.loads(json.dumps(doc, default=_json_default))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of rewriting")
    ap.add_argument("--skip-default", action="store_true",
                    help="leave out the default 512/512 run (the slowest case)")
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    cases = dict(CASES)
    if not args.skip_default:
        cases[DEFAULT_RUN[0]] = DEFAULT_RUN[1]
    names = args.cases or list(cases)
    bad = 0
    for name in names:
        doc = _normalise(compute(cases[name]))
        if args.check:
            diffs = differences(json.loads(path_of(name).read_text()), doc)
            bad += bool(diffs)
            print(f"{name}: {'OK' if not diffs else f'{len(diffs)} differences'}")
            for d in diffs[:20]:
                print("   ", d)
        else:
            path_of(name).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            print(f"wrote {path_of(name)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
