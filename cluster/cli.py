"""The ``ndpmoe`` command line.

::

    ndpmoe run [--engine analytic|emulate] [--system PRESET|FILE] [--model PRESET]
               [--model-config HF_CONFIG_JSON] [--policies A B ...] [--set key=value ...]
               [--out DIR]
    ndpmoe policies        every scheduler, prefetcher and named combination
    ndpmoe presets         system and model presets

Errors the user can fix (bad config, bad trace, a failed emulation) print one paragraph and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.errors import NdpmoeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ndpmoe", description="Emulate edge GPU + NDP systems "
                                "running Mixture-of-Experts inference and compare scheduling policies.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run policies on the analytic or emulation engine")
    r.add_argument("--engine", default="emulate", choices=["analytic", "emulate"],
                   help="emulate: Ray actors + zmq with real matmuls (default); analytic: virtual clock")
    r.add_argument("--system", default=None, help="system preset or TOML file (default edge-rtx5080-ndp4)")
    r.add_argument("--model", default=None, help="model preset (default qwen3-30b-a3b)")
    r.add_argument("--model-config", default=None, help="a Hugging Face MoE config.json")
    r.add_argument("--policies", nargs="+", default=None, metavar="POLICY",
                   help="policies to run (default: ep monde tp tp-lb paper); SCHED+PREFETCHER allowed")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set link.bw_gbps=32 (repeatable)")
    r.add_argument("--out", default=None, help="run directory (default: a fresh one under runs/)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dilation", type=float, default=None,
                   help="emulate: wall-clock seconds per emulated second (default: calibrated)")
    r.add_argument("--address", default=None, help="emulate: attach to a Ray cluster (auto|HOST:PORT)")
    r.add_argument("--save-outputs", action="store_true",
                   help="emulate: write final hidden states per policy to outputs.npz")

    sub.add_parser("policies", help="list schedulers, prefetchers and named policies")
    pr = sub.add_parser("presets", help="list system and model presets")
    pr.add_argument("--show", default=None, help="print one preset as TOML")
    return p


def _emulate_defaults(overrides: list[str]) -> list[str]:
    """The emulate engine's embedded default is a short run (the analytic one is the paper's)."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    out = []
    if "workload.prompt_tokens" not in keys:
        out.append("workload.prompt_tokens=16")
    if "workload.output_tokens" not in keys:
        out.append("workload.output_tokens=8")
    return out + overrides


def cmd_run(args: argparse.Namespace, console) -> int:
    from cluster.config import load_config
    from cluster.report import results_table
    from cluster.runner import DEFAULT_POLICIES, run

    overrides = list(args.overrides)
    if args.dilation is not None:
        overrides.append(f"emulate.dilation={args.dilation}")
    if args.engine == "emulate":
        overrides = _emulate_defaults(overrides)
    cfg = load_config(args.system, args.model, args.model_config, overrides)
    names = args.policies or list(DEFAULT_POLICIES)
    opts = {}
    if args.engine == "emulate":
        opts = {"address": args.address, "save_outputs": args.save_outputs}
    w = cfg.workload
    console.print(f"[bold]ndpmoe[/] {args.engine}: {cfg.system_name} ({cfg.ndp.num_ndp_units} NDP units), "
                  f"{cfg.model.name}, batch {w.batch_size}, {w.prompt_tokens} in / {w.output_tokens} out, "
                  f"routing {w.routing}; expert cache {cfg.cache_capacity_experts} experts "
                  f"({cfg.cache_bytes / 1e9:.2f} GB)")
    res = run(cfg, names, args.engine, args.out, console=console, progress=not args.quiet,
              plots=not args.no_plots, **opts)
    console.print(results_table(res.summaries, args.engine))
    if "paper" in res.summaries and res.summaries["paper"].get("speedup_vs_monde"):
        console.print(f"paper vs monde: [bold]{res.summaries['paper']['speedup_vs_monde']:.2f}x[/] "
                      "end-to-end speedup (the paper reports 2.41x average, 2.56x max)")
    console.print(f"run directory: {res.run_dir}")
    return 0


def cmd_policies(console) -> int:
    from rich.table import Table

    import policies

    t = Table(title="policies (use a name, or SCHEDULER+PREFETCHER)", title_justify="left")
    t.add_column("kind")
    t.add_column("name", style="bold")
    t.add_column("what it does")
    for name in policies.names("scheduler"):
        t.add_row("scheduler", name, policies.describe(policies.get("scheduler", name)))
    for name in policies.names("prefetcher"):
        t.add_row("prefetcher", name, policies.describe(policies.get("prefetcher", name)))
    for name, (sched, pf, desc) in sorted(policies.combos().items()):
        t.add_row("combination", name, f"{sched} + {pf}: {desc}")
    console.print(t)
    return 0


def cmd_presets(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from cluster import presets
    from cluster.spec import ModelSpec

    if args.show:
        return _show_preset(args.show, console)
    t = Table(title="system presets", title_justify="left")
    t.add_column("name", style="bold")
    t.add_column("hardware")
    for name, desc in presets.SYSTEM_DESCRIPTIONS.items():
        t.add_row(name + (" (default)" if name == presets.DEFAULT_SYSTEM else ""), desc)
    console.print(t)
    m = Table(title="model presets", title_justify="left")
    for col in ("name", "MoE layers", "d_model", "d_ff/expert", "experts", "top-k", "shared",
                "routed experts (fp16)"):
        m.add_column(col, justify="right" if col != "name" else "left")
    for name, fields in presets.MODELS.items():
        spec = ModelSpec(**fields)
        dense = f" (+{spec.num_dense_layers} dense)" if spec.num_dense_layers else ""
        m.add_row(name + (" (default)" if name == presets.DEFAULT_MODEL else ""),
                  f"{spec.num_layers}{dense}", str(spec.d_model), str(spec.d_ff), str(spec.num_experts),
                  str(spec.top_k), str(spec.num_shared_experts), f"{spec.routed_expert_bytes / 1e9:.1f} GB")
    console.print(m)
    return 0


def _show_preset(name: str, console) -> int:
    """Prints a system or model preset as TOML, ready to copy into a ``--system`` file."""
    import json

    from cluster import presets
    from cluster.errors import ConfigError

    if name in presets.SYSTEMS:
        sections = {"system_name": name, **presets.SYSTEMS[name]}
    elif name in presets.MODELS:
        sections = {"model": presets.MODELS[name]}
    else:
        raise ConfigError(f"--show {name!r} is not a preset: systems are "
                          f"{', '.join(presets.SYSTEMS)}; models are {', '.join(presets.MODELS)}")
    lines = []
    for section, fields in sections.items():
        if not isinstance(fields, dict):
            lines.append(f"{section} = {json.dumps(fields)}")
            continue
        lines.append(f"\n[{section}]")
        for k, v in fields.items():
            lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}")
    console.print("\n".join(lines).strip(), highlight=False, markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    console = Console()
    try:
        if args.cmd == "run":
            return cmd_run(args, console)
        if args.cmd == "policies":
            return cmd_policies(console)
        if args.cmd == "presets":
            return cmd_presets(args, console)
    except NdpmoeError as exc:
        if args.debug:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[bold red]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
