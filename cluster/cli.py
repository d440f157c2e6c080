"""The ``ndpmoe`` command line.

::

    ndpmoe run [--engine analytic|emulate] [--system PRESET|FILE] [--model PRESET]
               [--model-config HF_CONFIG_JSON] [--policies A B ...] [--set key=value ...]
               [--out DIR]
    ndpmoe reproduce [--out DIR] [--models M ...] [--units N ...] [--prompt P] [--output O]
                     [--workers W] [--quick] [--set key=value ...] [--spot-check]
    ndpmoe sweep  --axis KEY=V1,V2,... [--axis ...] | --grid FILE.toml  [--policies ...]
                  [--system S] [--model M] [--set key=value ...] [--workers W]
                  [--address ADDR] [--emulate K] [--out DIR]
    ndpmoe stress [the same; default axes: NDP units x experts x top-k x skew x batch]
    ndpmoe routing-stats TRACE.npz [--fit] [--prompt P] [--experts E] [--png PATH]
    ndpmoe policies        every scheduler, prefetcher and named combination
    ndpmoe presets         system and model presets

Errors the user can fix (bad config, bad trace, a failed emulation) print one paragraph and
exit with status 2; ``--debug`` shows the traceback instead. Messages are printed literally
(never as Rich markup: a path or value may hold brackets). Ctrl-C and SIGTERM stop a run,
write its partial results and exit with status 130.

Before an emulated run starts its cluster, :mod:`cluster.engines.preflight` prints the estimated
wall time and memory and refuses a run above ``emulate.max_wall_s`` or the machine's memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cluster.core.errors import EmulationError, NdpmoeError


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
    r.add_argument("--out", default=None, help="run directory, new or empty (default: a fresh "
                   "one under runs/)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run directory at --out (removed before the run starts)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--dilation", type=float, default=None,
                   help="emulate: wall-clock seconds per emulated second (default: calibrated)")
    r.add_argument("--address", default=None, help="emulate: attach to a Ray cluster (auto|HOST:PORT)")
    r.add_argument("--inject", action="append", default=[], metavar="SPEC",
                   help="emulate: inject a fault (repeatable): kill:ndpK@stepS (unit K dies at "
                        "decode step S), slow:ndpKxF (unit K computes F times slower), "
                        "delay:link+Nus (link latency + N us), drop:P (each message lost with "
                        "probability P, retried)")
    r.add_argument("--recover", action="store_true",
                   help="emulate: a dead NDP unit is restarted by Ray, regenerates its weights and "
                        "its interrupted step is re-dispatched (outputs unchanged; lost time "
                        "reported separately); a dead GPU stays fatal")
    r.add_argument("--save-outputs", action="store_true",
                   help="emulate: write final hidden states per policy to outputs.npz")

    rp = sub.add_parser("reproduce", help="the paper's studies (headline, ablation, prefetch "
                        "budget, prefetchers, sensitivity) into a report with figures and CSV")
    rp.add_argument("--out", default=None, help="run directory (default: runs/<time>-reproduce)")
    rp.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                    help="headline models (default: qwen3-30b-a3b mixtral-8x7b deepseek-v2-lite "
                    "qwen1.5-moe-a2.7b)")
    rp.add_argument("--contrast-models", nargs="*", default=None, metavar="MODEL",
                    help="models shown in the headline but not averaged (default: olmoe-1b-7b)")
    rp.add_argument("--units", nargs="+", type=int, default=None, metavar="N",
                    help="NDP-unit counts, presets edge-rtx5080-ndpN (default: 2 3 4 5 6)")
    rp.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512)")
    rp.add_argument("--output", type=int, default=None, help="output tokens (default 512)")
    rp.add_argument("--sweep-output", type=int, default=None,
                    help="output tokens of studies 3-6 (default: as --output)")
    rp.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: the CPU count)")
    rp.add_argument("--quick", action="store_true",
                    help="tiny workload for tests: 2 models, units 2 and 4, 32 in / 16 out")
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field for every point (repeatable)")
    rp.add_argument("--spot-check", action="store_true",
                    help="also run the emulate engine on qwen3-30b-a3b, 4 units, 16 in / 8 out, "
                    "and compare its speedup with the analytic one")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, help_text in (("sweep", "a grid of configurations x policies (analytic, as Ray tasks)"),
                            ("stress", "load balance at scale: NDP units x experts x top-k x skew x batch")):
        sw = sub.add_parser(name, help=help_text)
        sw.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a grid axis, e.g. --axis ndp.num_ndp_units=4,16,64 (repeatable)")
        sw.add_argument("--grid", default=None, help="TOML file with a [grid] table of lists "
                        "(and optional policies = [...], set = [...])")
        sw.add_argument("--policies", nargs="+", default=None, metavar="POLICY")
        sw.add_argument("--system", default=None)
        sw.add_argument("--model", default=None)
        sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="base override applied to every point")
        sw.add_argument("--workers", type=int, default=None,
                        help="local worker processes for the points (default: the CPU count; "
                        "with --address the cluster's CPUs are used)")
        sw.add_argument("--address", default=None, help="run the points on a Ray cluster")
        sw.add_argument("--emulate", type=int, default=0, metavar="K",
                        help="also run the K most imbalanced configurations on the emulation engine")
        sw.add_argument("--out", default=None)
        sw.add_argument("--quiet", action="store_true")

    rs = sub.add_parser("routing-stats", help="routing statistics of a trace (does the prefill "
                        "predict the decode?); --fit: the synthetic generator fitted to them")
    rs.add_argument("trace", help="npz file with topk_ids [tokens, layers, k] or [sequences, "
                    "positions, layers, k]")
    rs.add_argument("--prompt", type=int, default=None,
                    help="prompt tokens per sequence (default: half the positions)")
    rs.add_argument("--experts", type=int, default=None,
                    help="experts per layer (default: the largest id + 1)")
    rs.add_argument("--window", type=int, default=128, help="decode tokens measured (default 128)")
    rs.add_argument("--fit", action="store_true",
                    help="search the generator's alpha, reuse, drift and drift_jump to match")
    rs.add_argument("--drift-share", type=float, default=None,
                    help="--fit: workload.drift_share to fit with (default 1.0)")
    rs.add_argument("--popularity", default=None, choices=["zipf", "lognormal", "exponential"],
                    help="--fit: the popularity shape to fit (default: each, keep the best)")
    rs.add_argument("--png", default=None,
                    help="--fit: where to write the coverage curves (default: TRACE-fit.png in "
                    "the current directory)")

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
        out.append("workload.output_tokens=6")
    return out + overrides


def cmd_run(args: argparse.Namespace, console) -> int:
    import math

    from rich.markup import escape

    import policies
    from cluster.core.config import load_config
    from cluster.core.errors import ConfigError
    from cluster.core.faults import inject_overrides
    from cluster.core.routing import build_routing
    from cluster.engines import preflight
    from cluster.studies import rundir
    from cluster.studies.report import results_table
    from cluster.studies.runner import DEFAULT_POLICIES, run

    overrides = list(args.overrides) + inject_overrides(args.inject)
    if args.recover:
        overrides.append("emulate.recover=true")
    if args.dilation is not None:
        if not (math.isfinite(args.dilation) and args.dilation > 0):
            raise ConfigError(f"--dilation {args.dilation!r} is not allowed: must be a finite "
                              "number > 0 (wall-clock seconds per emulated second)")
        overrides.append(f"emulate.dilation={args.dilation!r}")
    if args.engine == "emulate":
        overrides = _emulate_defaults(overrides)
    cfg = load_config(args.system, args.model, args.model_config, overrides)
    names = list(dict.fromkeys(args.policies or DEFAULT_POLICIES))
    for name in names:  # every input is checked before anything is printed or started
        policies.resolve(name)
    if args.out is not None:
        rundir.check_out(args.out, args.overwrite)
    routing = build_routing(cfg)
    if args.engine == "analytic" and any(x.split(":")[0] in ("kill", "drop") for x in args.inject):
        console.print("[yellow]note:[/] the analytic engine models slow: and delay: faults only; "
                      "kill: and drop: act on the emulation cluster (--engine emulate)")
    opts = {}
    w = cfg.workload
    console.print(f"[bold]ndpmoe[/] {args.engine}: {escape(cfg.system_name)} ({cfg.ndp.num_ndp_units} NDP "
                  f"units), {escape(cfg.model.name)}, batch {w.batch_size}, {w.prompt_tokens} in / "
                  f"{w.output_tokens} out, routing {w.routing}; expert cache "
                  f"{cfg.cache_capacity_experts} experts ({cfg.cache_bytes / 1e9:.2f} GB)")
    if args.engine == "emulate":
        opts = {"address": args.address, "save_outputs": args.save_outputs}
        est = preflight.estimate(cfg, routing, names)
        console.print(escape(est.describe()), highlight=False)
        preflight.check(est, cfg, local=args.address is None)
    res = run(cfg, names, args.engine, args.out, console=console, progress=not args.quiet,
              plots=not args.no_plots, overwrite=args.overwrite, routing=routing, **opts)
    console.print(results_table(res.summaries, args.engine))
    if args.engine == "emulate":
        worse = {n: s["fidelity_error"] for n, s in res.summaries.items()
                 if s.get("fidelity_error") is not None and s["fidelity_error"] > cfg.emulate.target_fidelity}
        if worse:
            console.print(f"[yellow]warning:[/] fidelity error above emulate.target_fidelity = "
                          f"{cfg.emulate.target_fidelity:.0%} for "
                          + ", ".join(f"{n} ({e:.1%})" for n, e in worse.items())
                          + ": the real work did not fit its slots; raise --dilation")
    if "paper" in res.summaries and res.summaries["paper"].get("speedup_vs_monde"):
        short = w.prompt_tokens != 512 or w.output_tokens != 512
        console.print(f"paper vs monde: [bold]{res.summaries['paper']['speedup_vs_monde']:.2f}x[/] "
                      f"end-to-end speedup at {w.prompt_tokens} in / {w.output_tokens} out (the paper "
                      "reports 2.41x average, 2.56x max at 512 / 512"
                      + ("; for that workload: ndpmoe run --engine analytic without workload overrides, or ndpmoe reproduce)"
                         if short else ")"))
    console.print(f"run directory: {escape(str(res.run_dir))}", highlight=False)
    return 0


def cmd_reproduce(args: argparse.Namespace, console, argv: Sequence[str] | None) -> int:
    from rich.table import Table

    from cluster.core.errors import ConfigError
    from cluster.studies import reproduce as rep

    for flag in ("prompt", "output", "sweep_output", "workers"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {v} is not allowed: must be an integer >= 1")
    if args.out is not None:
        from cluster.studies import rundir

        rundir.check_out(args.out, overwrite=True, must_be_empty=False)
    opts = rep.options(args.models, args.units, args.prompt, args.output, args.sweep_output,
                       args.contrast_models, args.overrides, args.workers, args.quick,
                       args.spot_check)
    command = "ndpmoe " + " ".join(sys.argv[1:] if argv is None else argv)
    console.print(f"[bold]ndpmoe reproduce[/]: {len(opts.models)} models x units "
                  f"{' '.join(map(str, opts.units))}, {opts.prompt_tokens} in / {opts.output_tokens} "
                  f"out (studies 3-6: {opts.sweep_output_tokens} out), {opts.workers} worker(s)")
    o = rep.reproduce(opts, args.out, console=console, progress=not args.quiet, command=command)
    st = o.headline
    t = Table(title="paper over monde, end-to-end speedup", title_justify="left")
    for col in ("", "paper (DATE 2026)", "ndpmoe"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("average", f"{rep.PAPER_AVG_SPEEDUP:.2f}x", f"{st['avg']:.2f}x")
    t.add_row("maximum", f"{rep.PAPER_MAX_SPEEDUP:.2f}x", f"{st['max']:.2f}x")
    t.add_row("points", "4 models x 2-6 DIMMs", str(st["points"]))
    console.print(t)
    if o.spot:
        console.print(f"spot check (emulate): paper over monde {o.spot['emulated_speedup']:.3f}x vs "
                      f"analytic {o.spot['analytic_speedup']:.3f}x ({o.spot['difference_pct']:+.2f}%)")
    console.print(f"{o.runs} policy runs in {o.compute_s:.0f} s; report: {o.run_dir / 'report.md'}")
    if o.spot_error:
        raise EmulationError(f"the spot check failed (report and CSVs were written to "
                             f"{o.run_dir}): {o.spot_error}")
    return 0


def cmd_sweep(args: argparse.Namespace, console) -> int:
    """``sweep`` and ``stress``: build the grid, run it, write the run directory."""
    from pathlib import Path

    from cluster.core.errors import ConfigError
    from cluster.studies import sweep
    from cluster.studies.report import new_run_dir

    stress = args.cmd == "stress"
    axes: dict = dict(sweep.STRESS_AXES) if stress else {}
    pols = list(sweep.STRESS_POLICIES) if stress else ["ep", "tp", "tp-lb", "paper"]
    base = list(sweep.STRESS_BASE) if stress else []
    if args.out is not None:
        from cluster.studies import rundir

        rundir.check_out(args.out, overwrite=True, must_be_empty=False)
    if args.grid:
        g_axes, g_pols, g_base = sweep.read_grid_file(args.grid)
        _check_grid_lists(args.grid, g_pols, g_base)
        axes = g_axes if not stress else {**axes, **g_axes}
        pols = g_pols or pols
        base += g_base
    for text in args.axis:
        key, values = sweep.parse_axis(text)
        axes[key] = values
    if not axes:
        raise ConfigError("sweep needs at least one axis: --axis section.field=v1,v2,... or --grid FILE")
    grid = sweep.Grid(axes, args.policies or pols, base + list(args.overrides))
    import policies

    for name in grid.policies:  # fail before any directory or Ray exists
        policies.resolve(name)
    run_dir = Path(args.out) if args.out else new_run_dir(engine=args.cmd)
    sweep.sweep_command(grid, run_dir, console, args.system, args.model, args.workers, args.address,
                        args.emulate, progress=not args.quiet)
    return 0


def _check_grid_lists(path: str, pols, base) -> None:
    """``policies`` and ``set`` of a grid file must be lists of strings."""
    from cluster.core.errors import ConfigError

    for key, value in (("policies", pols), ("set", base)):
        if value is None and key == "policies":
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"grid file {path!r}: {key} = {value!r} is not allowed: must be a "
                              "list of strings")


def _sigterm_interrupts():
    """SIGTERM ends a run like Ctrl-C does: the same cleanup path (actors stopped, Ray shut
    down, partial results written). Returns the previous handler (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _print_error(message: str) -> None:
    """One paragraph on stderr, printed literally: a path or value may hold brackets that
    Rich would otherwise read as markup (and fail on, or silently drop)."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(message),
                                               highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    console = Console()
    previous = _sigterm_interrupts()
    try:
        if args.cmd == "run":
            return cmd_run(args, console)
        if args.cmd == "reproduce":
            return cmd_reproduce(args, console, argv)
        if args.cmd in ("sweep", "stress"):
            return cmd_sweep(args, console)
        if args.cmd in ("routing-stats", "policies", "presets"):
            from cluster import catalog

            return catalog.command(args, console)
    except NdpmoeError as exc:
        if args.debug:
            raise
        _print_error(str(exc))
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[bold red]interrupted[/]: actors stopped, Ray shut down; "
                                   "partial results (if any) are in the run directory")
        return 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
