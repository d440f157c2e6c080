"""Fault injection specs (``emulate.inject``, CLI ``--inject``): parsing and checking. Pure.

A spec is a ``;``-separated list of faults::

    kill:ndpK@stepS     NDP unit K dies at decode step S, layer 0 (its process exits)
    slow:ndpKxF         NDP unit K computes F times slower (F >= 1)
    delay:link+Nus      the host link's latency grows by N microseconds
    drop:P              each command the scheduler sends a device during a run (step shards,
                        ship orders) is lost with probability P (seeded; found missing by its
                        acknowledgement's timeout and sent again)

``slow`` and ``delay`` change the *model*: the cost model applies them (``CostModel.unit_factor``
and ``link_latency_s``), so both engines, the policies' estimates, the lower bounds and the
traces see them and the emulation still agrees with the analytic reference. ``kill`` and
``drop`` happen to the emulation cluster only (the analytic engine has no processes to lose):
the emulation pauses its clocks from the moment it injects one until it is repaired, so
neither changes the measured latency (``actors.world.World``). Transfers on the emulated
host link are never dropped: PCIe retries lost packets itself, inside its modelled latency.

A kill fires once per cluster: at the first timed run (not a calibration run) that reaches
decode step S with work for unit K (at layer 0, or, if K has no work there, at the next MoE
step that gives it some).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass

from cluster.core.errors import ConfigError

GRAMMAR = ("';'-separated faults: kill:ndpK@stepS (unit K dies at decode step S), slow:ndpKxF "
           "(unit K computes F >= 1 times slower), delay:link+Nus (link latency + N us), drop:P "
           "(each message lost with probability P in 0..0.5)")
MAX_SLOW_FACTOR = 1000.0
MAX_DELAY_US = 1e6
MAX_DROP = 0.5

_NUM = r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"  # one group: a number >= 0
_KILL = re.compile(r"kill:ndp(\d+)@step(\d+)")
_SLOW = re.compile(rf"slow:ndp(\d+)x{_NUM}")
_DELAY = re.compile(rf"delay:link\+{_NUM}us")
_DROP = re.compile(rf"drop:{_NUM}")


@dataclass(frozen=True)
class Kill:
    """NDP unit ``unit`` dies at decode step ``step`` (layer 0)."""

    unit: int
    step: int


@dataclass(frozen=True)
class ModelFaults:
    """The faults that change the model: what the cost model, hence both engines, sees."""

    slow: tuple[tuple[int, float], ...] = ()  # (unit, factor), at most one per unit
    link_delay_us: float = 0.0

    def unit_factors(self, num_units: int) -> tuple[float, ...]:
        """Per unit: how many times slower it computes (1.0 for a healthy unit)."""
        f = [1.0] * num_units
        for u, x in self.slow:
            if u < num_units:
                f[u] = x
        return tuple(f)


@dataclass(frozen=True)
class RunFaults:
    """The faults that happen to the emulation cluster only (the analytic engine has none)."""

    kills: tuple[Kill, ...] = ()
    drop_p: float = 0.0


@dataclass(frozen=True)
class Faults:
    """The parsed ``emulate.inject`` (``Config.faults``). Empty (no faults) by default."""

    kills: tuple[Kill, ...] = ()
    slow: tuple[tuple[int, float], ...] = ()  # (unit, factor), at most one per unit
    link_delay_us: float = 0.0
    drop_p: float = 0.0

    @property
    def model(self) -> ModelFaults:
        return ModelFaults(self.slow, self.link_delay_us)

    @property
    def run(self) -> RunFaults:
        return RunFaults(self.kills, self.drop_p)

    def unit_factors(self, num_units: int) -> tuple[float, ...]:
        return self.model.unit_factors(num_units)

    def as_dict(self) -> dict:
        return {"kill": [{"unit": k.unit, "step": k.step} for k in self.kills],
                "slow": {f"ndp{u}": x for u, x in self.slow},
                "link_delay_us": self.link_delay_us, "drop_p": self.drop_p}

    def __bool__(self) -> bool:
        return bool(self.kills or self.slow or self.link_delay_us or self.drop_p)


def _bad(text: str, problem: str) -> ConfigError:
    return ConfigError(f"emulate.inject = {text!r} is not allowed: {problem}; must be {GRAMMAR}")


@functools.lru_cache(maxsize=64)
def parse_inject(text: str) -> Faults:
    """``"kill:ndp2@step40;slow:ndp1x3"`` -> :class:`Faults`; a bad spec raises ConfigError
    naming the field, the value and the grammar."""
    if not isinstance(text, str):
        raise _bad(text, "not a string")
    kills: list[Kill] = []
    slow: dict[int, float] = {}
    delay: float | None = None
    drop: float | None = None
    for raw in text.split(";"):
        part = raw.strip().lower()
        if not part:
            continue
        if m := _KILL.fullmatch(part):
            k = Kill(int(m[1]), int(m[2]))
            if k.step < 1:
                raise _bad(text, f"{part!r}: the step must be a decode step >= 1")
            if k in kills:
                raise _bad(text, f"{part!r} is given twice")
            kills.append(k)
        elif m := _SLOW.fullmatch(part):
            u, x = int(m[1]), float(m[2])
            if not (1.0 <= x <= MAX_SLOW_FACTOR):
                raise _bad(text, f"{part!r}: the factor must be in 1..{MAX_SLOW_FACTOR:g}")
            if u in slow:
                raise _bad(text, f"{part!r}: unit ndp{u} is slowed twice")
            slow[u] = x
        elif m := _DELAY.fullmatch(part):
            us = float(m[1])
            if not (math.isfinite(us) and 0 <= us <= MAX_DELAY_US):
                raise _bad(text, f"{part!r}: the delay must be in 0..{MAX_DELAY_US:g} us")
            if delay is not None:
                raise _bad(text, f"{part!r}: the link delay is given twice")
            delay = us
        elif m := _DROP.fullmatch(part):
            p = float(m[1])
            if not (0 <= p <= MAX_DROP):
                raise _bad(text, f"{part!r}: the probability must be in 0..{MAX_DROP:g}")
            if drop is not None:
                raise _bad(text, f"{part!r}: the drop probability is given twice")
            drop = p
        else:
            raise _bad(text, f"{part!r} is not a fault")
    return Faults(tuple(kills), tuple(sorted(slow.items())), delay or 0.0, drop or 0.0)


def check_against(text: str, num_units: int, output_tokens: int) -> None:
    """Checks that span sections: the units ``text`` names exist (``ndp.num_ndp_units``) and
    its kill steps happen in the run (``workload.output_tokens``)."""
    faults = parse_inject(text)
    n = num_units
    decode_steps = output_tokens - 1
    for u in [k.unit for k in faults.kills] + [u for u, _ in faults.slow]:
        if u >= n:
            raise _bad(text, f"there is no unit ndp{u}: the system has ndp0..ndp{n - 1} "
                             f"(ndp.num_ndp_units = {n})")
    for k in faults.kills:
        if k.step > decode_steps:
            raise _bad(text, f"kill:ndp{k.unit}@step{k.step} would never fire: the run has decode "
                             f"steps 1..{decode_steps} (workload.output_tokens = "
                             f"{output_tokens})")


def inject_overrides(specs: list[str]) -> list[str]:
    """``--inject SPEC`` (repeatable) as ``--set`` overrides: ``["emulate.inject=\\"a;b\\""]``.

    The specs are joined with ``;`` into one TOML string; ``load_config`` checks them.
    """
    parts = [s.strip() for s in specs if s and s.strip()]
    if not parts:
        return []
    return [f"emulate.inject={json.dumps(';'.join(parts))}"]
