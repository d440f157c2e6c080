"""The ``ndpmoe`` commands that describe rather than run: ``policies`` (every scheduler,
prefetcher and named combination), ``presets`` (system and model presets, or one as TOML) and
``routing-stats`` (a trace's routing statistics, with ``--fit`` beside the fitted generator's).
:mod:`cluster.cli` parses the command line and calls :func:`command`.
"""

from __future__ import annotations

import argparse


def command(args: argparse.Namespace, console) -> int:
    if args.cmd == "routing-stats":
        return cmd_routing_stats(args, console)
    if args.cmd == "policies":
        return cmd_policies(console)
    return cmd_presets(args, console)


def _pct_or_dash(v: float) -> str:
    import math

    return f"{v:.1%}" if math.isfinite(v) else "-"


def cmd_routing_stats(args: argparse.Namespace, console) -> int:
    """Statistics of a trace; with ``--fit`` beside those of the fitted generator."""
    from pathlib import Path

    from rich.markup import escape
    from rich.table import Table

    from cluster.core import routing_stats as rst
    from cluster.core.errors import ConfigError

    ids, E = rst.read_ids(args.trace, args.experts)
    S = ids.shape[1]
    prompt = args.prompt if args.prompt is not None else S // 2
    if args.window < 2:
        raise ConfigError(f"--window {args.window} is not allowed: must be an integer >= 2")
    share = rst.DEFAULT_SHARE if args.drift_share is None else args.drift_share
    if not 0 < share <= 1:
        raise ConfigError(f"--drift-share {share!r} is not allowed: must be a number in (0, 1]")
    st = rst.measure(ids, prompt, E, args.window)
    console.print(f"[bold]{escape(args.trace)}[/]: {st.sequences} sequence(s) x {S} positions, "
                  f"{st.num_layers} layers, {E} experts, top-{st.top_k}; prefill {prompt} tokens, "
                  f"decode {st.decode_tokens} measured", highlight=False)
    fitted = None
    if args.fit:
        with console.status("fitting the generator ..."):
            fitted = rst.fit(st, drift_share=share, popularity=args.popularity)
    t = Table(title="per layer, averaged over layers and sequences", title_justify="left")
    t.add_column("statistic")
    t.add_column("trace", justify="right")
    if fitted:
        t.add_column("fitted generator", justify="right")
    for name in rst.STATS:
        label = rst.LABELS[name] + (f" (uniform {st.uniform_reuse:.1%})" if name == "reuse" else "")
        row = [label, _pct_or_dash(st.values[name])]
        if fitted:
            row.append(_pct_or_dash(fitted.stats.values[name]))
        t.add_row(*row)
    console.print(t)
    if fitted:
        p = fitted.params
        sets = " ".join(f"--set workload.{k}={v if isinstance(v, str) else round(v, 4)}"
                        for k, v in p.items())
        console.print(f"fitted ({fitted.evaluations} candidates, RMS difference "
                      f"{fitted.error * 100:.1f} points): {sets}", highlight=False)
        png = Path(args.png) if args.png else Path(Path(args.trace).stem + "-fit.png")
        rst.plot_curves(png, st, fitted.stats, f"{Path(args.trace).name}: trace vs fitted generator")
        console.print(f"coverage curves: {escape(str(png))}", highlight=False)
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

    from cluster.core import presets
    from cluster.core.spec import ModelSpec

    if args.show:
        return _show_preset(args.show, console)
    t = Table(title="system presets", title_justify="left")
    t.add_column("name", style="bold", no_wrap=True)
    t.add_column("hardware")
    for name, desc in presets.SYSTEM_DESCRIPTIONS.items():
        t.add_row(name + (" (default)" if name == presets.DEFAULT_SYSTEM else ""), desc)
    console.print(t)
    m = Table(title="model presets", title_justify="left")
    m.caption = "layers: MoE (+dense); d_ff per expert; E experts; k top-k; GB: routed experts, fp16"
    for col in ("name", "layers", "d_model", "d_ff", "E", "k", "shared", "GB"):
        m.add_column(col, justify="right" if col != "name" else "left", no_wrap=True)
    for name, fields in presets.MODELS.items():
        spec = ModelSpec(**fields)
        dense = f"+{spec.num_dense_layers}" if spec.num_dense_layers else ""
        m.add_row(name + (" (default)" if name == presets.DEFAULT_MODEL else ""),
                  f"{spec.num_layers}{dense}", str(spec.d_model), str(spec.d_ff), str(spec.num_experts),
                  str(spec.top_k), str(spec.num_shared_experts), f"{spec.routed_expert_bytes / 1e9:.0f}")
    console.print(m)
    return 0


def _show_preset(name: str, console) -> int:
    """Prints a system or model preset as TOML, ready to copy into a ``--system`` file."""
    import json

    from cluster.core import presets
    from cluster.core.errors import ConfigError

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
