"""Study 7, ``spot_check`` (``--spot-check``): the emulate engine on a short qwen3 workload, its
``paper``-over-``monde`` speedup against the analytic engine's on the same config and routing.

It has no cases for the analytic jobs: it runs after the report is first written
(:attr:`~cluster.studies.reproduce.common.Study.after`) and fills ``Outcome.spot``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cluster.core.config import load_config
from cluster.core.errors import NdpmoeError
from cluster.core.spec import Config
from cluster.studies.reproduce.common import (
    Options,
    Outcome,
    Study,
    md_table,
    system_name,
    write_csv,
)
from cluster.studies.reproduce.common import x as _x

SPOT_CHECK = {"model": "qwen3-30b-a3b", "units": 4, "prompt_tokens": 16, "output_tokens": 8,
              "policies": ("monde", "paper"), "target_pct": 5.0}
CSV = ("model", "units", "prompt_tokens", "output_tokens", "emulated_speedup",
       "analytic_speedup", "difference_pct", "target_pct", "dilation", "wall_s")


def spot_check(opts: Options, run_dir: Path, console=None) -> dict[str, Any]:
    """The emulate engine on a short qwen3 workload: its paper-over-monde speedup vs analytic."""
    from cluster.studies.runner import run

    sc = SPOT_CHECK
    cfg = load_config(system_name(sc["units"]), sc["model"], None,
                      (*opts.overrides, f"workload.prompt_tokens={sc['prompt_tokens']}",
                       f"workload.output_tokens={sc['output_tokens']}"))
    t0 = time.perf_counter()
    res = run(cfg, list(sc["policies"]), engine="emulate", out=run_dir / "spot_check",
              console=console, progress=False, plots=False)
    s = res.summaries
    emu = s["monde"]["emulated_e2e_latency_s"] / s["paper"]["emulated_e2e_latency_s"]
    ana = s["monde"]["analytic_e2e_latency_s"] / s["paper"]["analytic_e2e_latency_s"]
    return {"model": sc["model"], "units": sc["units"], "prompt_tokens": sc["prompt_tokens"],
            "output_tokens": sc["output_tokens"], "emulated_speedup": emu, "analytic_speedup": ana,
            "difference_pct": (emu - ana) / ana * 100, "target_pct": sc["target_pct"],
            "fidelity_error": {p: s[p]["fidelity_error"] for p in sc["policies"]},
            "fidelity_tpot": {p: (s[p].get("fidelity") or {}).get("tpot") for p in sc["policies"]},
            "dilation": s["paper"].get("dilation"),
            "overruns": {p: f"{s[p].get('overruns', 0)}/{sum((s[p].get('device_slots') or {}).values())}"
                         for p in sc["policies"]},
            "control_path_emulated_us": (s["paper"].get("emulator_floor") or {}).get(
                "control_path_emulated_us"),
            "wall_s": time.perf_counter() - t0, "run_dir": str(res.run_dir)}


def after(o: Outcome, opts: Options, console: Any) -> bool:
    """With ``--spot-check``: runs it into ``o.spot`` (or ``o.spot_error``) and spot_check.csv."""
    if not opts.spot_check:
        return False
    try:
        o.spot = spot_check(opts, o.run_dir, console)
        write_csv(o.run_dir / "spot_check.csv",
                  [{k: v for k, v in o.spot.items() if not isinstance(v, dict)}], CSV)
    except NdpmoeError as exc:
        o.spot_error = str(exc)
    return True


# --- report ----------------------------------------------------------------------------------


def section(o: Outcome, opts: Options, cfg: Config) -> list[str]:
    out = ["## 7. Emulated spot check", ""]
    if o.spot_error:
        return [*out, f"The emulation spot check failed: {o.spot_error}", ""]
    if not o.spot:
        return [*out, "Not run (`ndpmoe reproduce --spot-check` runs it).", ""]
    s = o.spot
    ok = abs(s["difference_pct"]) <= s["target_pct"]
    out.append(md_table(
        ["", "value"],
        [["workload", f"{s['model']}, {s['units']} NDP units, {s['prompt_tokens']} in / "
          f"{s['output_tokens']} out"],
         ["paper over monde, emulated (measured: Ray + zmq, real matmuls, self-throttled "
          "devices and link)", _x(s["emulated_speedup"])],
         ["paper over monde, analytic (same config and routing)", _x(s["analytic_speedup"])],
         ["difference", f"{s['difference_pct']:+.2f}% (target: within {s['target_pct']:g}%)"],
         ["e2e error per policy, abs(emulated - analytic) / analytic",
          ", ".join(f"{p} {v * 100:.2f}%" for p, v in s["fidelity_error"].items())],
         *([["TPOT error per policy", ", ".join(f"{p} {v * 100:.2f}%"
                                                for p, v in s["fidelity_tpot"].items()
                                                if v is not None)]]
           if any(v is not None for v in (s.get("fidelity_tpot") or {}).values()) else []),
         ["dilation; device overruns / task slots", f"{s['dilation']:g}x; "
          + ", ".join(f"{p} {v}" for p, v in s["overruns"].items())],
         *([["control path per MoE step, emulated",
             f"{s['control_path_emulated_us']:.2f} us"]]
           if s.get("control_path_emulated_us") is not None else []),
         ["wall time", f"{s['wall_s']:.0f} s"]], "lr"))
    out += ["", ("Within the target." if ok else "Outside the target.")
            + " Both engines run the same short workload here, so this speedup is not the "
            "512/512 headline. The analytic engine predicts; the emulation measures: its devices "
            "and host link hold each task and transfer for D times its modelled duration in "
            "wall-clock time, real bytes cross the link, and latency is read off the wall clock, "
            "so the difference above is a measurement that could have come out otherwise. "
            f"The emulation's own run directory is `{Path(s['run_dir']).name}/` in this one.", ""]
    return out


STUDY = Study("spot_check", section=section, after=after)
