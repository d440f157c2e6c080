"""Median decision time per MoE step of every policy, at the paper's scale and at stress scale.

    .venv/bin/python bench/bench_policy.py [--steps 2000] [--out bench/results/bench_policy.json]

Paper scale: qwen3-30b-a3b, 4 NDP units, batch 1, decode steps. Stress scale: 256 experts,
top-8, 64 NDP units, batch 64. A decision is the scheduler's ``plan`` for one layer's step plus
the prefetcher's ``after_step``; routing comes from the synthetic generator and the GPU cache
holds what the policy's prefetcher put there after the prefill. Target: < 100 us per step at
the paper's scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import policies
from cluster.core.config import load_config
from cluster.core.cost import CostModel
from cluster.core.routing import build_routing
from cluster.core.selection import group_by_expert
from policies.build import make_prefetcher

SCALES = {
    "paper": dict(model="qwen3-30b-a3b", overrides=[
        "workload.batch_size=1", "workload.prompt_tokens=512", "workload.output_tokens=64"]),
    "stress": dict(model="qwen3-30b-a3b", overrides=[
        "model.num_experts=256", "model.top_k=8", "ndp.num_ndp_units=64", "workload.batch_size=64",
        "workload.prompt_tokens=32", "workload.output_tokens=48"]),
}
POLICIES = ["ep", "monde", "tp", "tp-lb", "paper", "eplb", "tp-lb+lru", "tp-lb+oracle"]


def bench(scale: str, steps: int) -> list[dict]:
    spec = SCALES[scale]
    cfg = load_config(model=spec["model"], overrides=spec["overrides"])
    cost = CostModel(cfg)
    routing = build_routing(cfg)
    L = cfg.model.num_layers
    inputs = []
    for s in range(routing.decode_steps):
        for layer in range(L):
            inputs.append((s, layer, group_by_expert(routing.decode_ids(s, layer))))
    inputs = inputs[:steps]
    rows = []
    for name in POLICIES:
        choice = policies.resolve(name)
        sched = policies.get("scheduler", choice.scheduler)(cfg, cost)
        pf = make_prefetcher(cfg, choice.prefetcher, routing)
        pf.preload()
        pf.after_prefill(routing.prefill_counts(cfg.model.num_experts))
        times = []
        for s, layer, routed in inputs:
            cached = pf.cache.layer(layer)
            t0 = time.perf_counter()
            inp = policies.StepInput(layer, "decode", routed, cached)
            plan = sched.plan(inp)
            sched.observe(inp)
            pf.after_step(layer, s, {e: len(v) for e, v in routed.items()},
                          [f.expert for f in plan.fetches])
            times.append(time.perf_counter() - t0)
        times.sort()
        rows.append({
            "scale": scale, "policy": name, "steps": len(times),
            "median_us": statistics.median(times) * 1e6,
            "p90_us": times[int(0.9 * (len(times) - 1))] * 1e6,
            "units": cfg.ndp.num_ndp_units, "experts": cfg.model.num_experts,
            "top_k": cfg.model.top_k, "batch": cfg.workload.batch_size,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="MoE steps timed per policy and scale")
    ap.add_argument("--out", default="bench/results/bench_policy.json")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = bench("paper", args.steps) + bench("stress", max(200, args.steps // 4))
    t = Table(title="decision time per MoE step (median; target < 100 us at paper scale)",
              title_justify="left")
    for col in ("scale", "policy", "units x experts, top-k, batch", "median", "p90"):
        t.add_column(col, justify="left" if col in ("scale", "policy") else "right")
    for r in rows:
        t.add_row(r["scale"], r["policy"], f"{r['units']} x {r['experts']}, {r['top_k']}, {r['batch']}",
                  f"{r['median_us']:.1f} us", f"{r['p90_us']:.1f} us")
    Console().print(t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
