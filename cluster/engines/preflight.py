"""Estimates before work: how long an emulated run will take and how much memory it needs.

Called by the command line before the emulation cluster starts. Pure arithmetic on the
config and the analytic engine; no Ray.

- **Wall time** = start-up + sum over policies of (analytic end-to-end latency x D), plus,
  when D is calibrated, the unpaced calibration runs. D is ``emulate.dilation`` when set.
  Otherwise it is not known until the cluster has run its calibration, and the estimate
  uses :data:`ASSUMED_DILATION`, chosen above the calibrated D of the default run on a
  2-core machine (about 30); the estimate says so. Above ``emulate.max_wall_s`` the run is
  refused with the numbers and the override.
- **Memory** = the real expert weights the NDP units generate (both layouts, fp32, at the
  chosen ``weights.scale``) + the GPU actor's copies of cached experts + Ray and the actor
  processes (:data:`RAY_BASE_BYTES`, :data:`ACTOR_BYTES` each, measured: ``ray.init`` ~400
  MB, ~47 MB per actor). The weights may use at most half the machine's memory (the rule
  ``weights.scale`` already follows) and the whole estimate must fit the memory available
  now; otherwise a local run is refused, naming ``weights.memory_budget_bytes``. (Attached
  to a Ray cluster, the weights live on its nodes: the memory is printed, not checked.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cluster.core.errors import ConfigError
from cluster.core.selection import Routing
from cluster.core.spec import Config

ASSUMED_DILATION = 50.0
STARTUP_S = 5.0  # ray.init ~3.5 s + actors and weights (README, "cluster start-up")
ACTOR_START_S = 0.3
RAY_BASE_BYTES = 500 << 20
ACTOR_BYTES = 64 << 20
CALIBRATION_MARGIN = 1.5  # calibration runs unpaced: about D / margin per modelled second


@dataclass(frozen=True)
class Estimate:
    """What an emulated run is expected to cost, and from which assumptions."""

    wall_s: float
    dilation: float
    dilation_assumed: bool
    analytic_s: dict[str, float]
    memory_bytes: int
    weight_bytes: int
    machine_bytes: int
    available_bytes: int

    def describe(self) -> str:
        d = (f"D = {self.dilation:g} assumed (the calibrated D is known only once the cluster "
             f"runs; --dilation D gives an exact estimate)" if self.dilation_assumed
             else f"D = {self.dilation:g}")
        total = sum(self.analytic_s.values())
        return (f"estimate: about {_fmt_s(self.wall_s)} wall ({len(self.analytic_s)} policies, "
                f"{_fmt_s(total)} of analytic latency x {d}); memory about "
                f"{_gb(self.memory_bytes)} of {_gb(self.machine_bytes)} "
                f"({_gb(self.weight_bytes)} of real expert weights)")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo, else the machine's physical memory."""
    from cluster.engines.emulate import machine_memory_bytes

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return machine_memory_bytes()


def estimate(cfg: Config, routing: Routing, names: Sequence[str]) -> Estimate:
    """Wall time and memory of emulating ``names`` (raises ConfigError for an impossible scale)."""
    from cluster.core import kernels as K
    from cluster.engines.analytic import run_policy
    from cluster.engines.emulate import choose_scale, machine_memory_bytes

    m, n = cfg.model, cfg.ndp.num_ndp_units
    analytic = {}
    ttft = {}
    for name in names:
        rec = run_policy(cfg, routing, name)
        analytic[name] = rec.tokens[-1].time_s if rec.tokens else 0.0
        ttft[name] = rec.tokens[0].time_s if rec.tokens else 0.0
    assumed = cfg.emulate.dilation <= 0
    d = ASSUMED_DILATION if assumed else cfg.emulate.dilation
    wall = STARTUP_S + ACTOR_START_S * (n + 2) + d * sum(analytic.values())
    if assumed:  # prefill + a couple of decode steps of every policy, unpaced
        wall += d / CALIBRATION_MARGIN * sum(ttft.values())
    scale = choose_scale(cfg)
    weights = 2 * K.routed_weight_bytes(m, scale, n)
    per_expert = K.routed_weight_bytes(m, scale, 1) // max(1, m.num_layers * m.num_experts)
    cached = min(cfg.cache_capacity_experts, m.num_layers * m.num_experts) * per_expert
    memory = weights + cached + RAY_BASE_BYTES + ACTOR_BYTES * (n + 2)
    return Estimate(wall, d, assumed, analytic, memory, weights, machine_memory_bytes(),
                    available_memory_bytes())


def check(est: Estimate, cfg: Config, local: bool = True) -> None:
    """Refuses a run estimated above ``emulate.max_wall_s`` or, for a local run (``local``;
    on a Ray cluster the weights live on other machines), above this machine's memory."""
    limit = cfg.emulate.max_wall_s
    if est.wall_s > limit:
        how = (f"at an assumed D = {est.dilation:g} (set --dilation for an exact estimate)"
               if est.dilation_assumed else f"at D = {est.dilation:g}")
        raise ConfigError(
            f"this run would take about {_fmt_s(est.wall_s)} of wall time {how}: "
            f"{_fmt_s(sum(est.analytic_s.values()))} of analytic latency over "
            f"{len(est.analytic_s)} policies x D, above emulate.max_wall_s = {limit:g} s; "
            "use fewer output tokens, fewer policies or a smaller --dilation, or allow it with "
            f"--set emulate.max_wall_s={int(est.wall_s * 1.2) + 1}")
    if not local:
        return
    half = est.machine_bytes // 2
    if est.weight_bytes > half:
        raise ConfigError(
            f"weights.memory_budget_bytes = {cfg.weights.memory_budget_bytes} is not allowed here: "
            f"the real expert weights would take {_gb(est.weight_bytes)} (both layouts), above "
            f"half this machine's memory ({_gb(half)}); use weights.memory_budget_bytes <= {half} "
            "or 0 (the default, 1 GiB)")
    if est.memory_bytes > est.available_bytes:
        raise ConfigError(
            f"this run needs about {_gb(est.memory_bytes)} of memory ({_gb(est.weight_bytes)} of "
            f"real expert weights, the rest Ray and its actors) but {_gb(est.available_bytes)} is "
            f"available now (of {_gb(est.machine_bytes)}); lower weights.memory_budget_bytes "
            "or weights.scale")
