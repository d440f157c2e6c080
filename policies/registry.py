"""The one registry of policies: step schedulers, prefetchers and their named combinations.

``@register("scheduler", "tp")`` on a class puts it in; a duplicate name raises, an unknown
name fails listing the valid ones. A *policy* as users name it on the command line is a
scheduler plus a prefetcher: a combination registered by name (``paper`` = ``tp-lb`` +
``prefill-freq``), a scheduler alone (prefetcher ``none``), or ``SCHEDULER+PREFETCHER``.

A policy with settings of its own registers them with it: ``@register("prefetcher", "od-moe",
knobs=OdMoeKnobs)``, a frozen :class:`~cluster.core.knobs.Knobs` dataclass. Its fields join
the config's ``policy`` section (``--set policy.odmoe_recall=0.5``), are validated by the
class, and the policy reads them as ``self.knobs`` (the class is ``cls.knobs_class``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cluster.core.errors import ConfigError
from cluster.core.knobs import Knobs, register_knobs, unregister_knobs

KINDS = ("scheduler", "prefetcher")
_REGISTRY: dict[str, dict[str, type]] = {k: {} for k in KINDS}
_COMBOS: dict[str, tuple[str, str, str]] = {}  # name -> (scheduler, prefetcher, description)

T = TypeVar("T", bound=type)


def register(kind: str, name: str, knobs: type[Knobs] | None = None) -> Callable[[T], T]:
    """Class decorator: registers a scheduler or prefetcher under ``name``, with its own
    ``knobs`` dataclass if it has settings (without, a subclass keeps its base's knobs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}: {KINDS}")

    def deco(cls: T) -> T:
        if name in _REGISTRY[kind] or (kind == "scheduler" and name in _COMBOS):
            raise ValueError(f"{kind} {name!r} is already registered")
        if knobs is not None:
            register_knobs(f"{kind} {name}", knobs)  # checks the class and its field names
            cls.knobs_class = knobs  # type: ignore[attr-defined]
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[kind][name] = cls
        return cls

    return deco


def unregister(kind: str, name: str) -> None:
    """Takes a scheduler or prefetcher, and the knobs registered with it, out again (for
    tests that register a policy of their own)."""
    _REGISTRY[kind].pop(name, None)
    unregister_knobs(f"{kind} {name}")


def register_combo(name: str, scheduler: str, prefetcher: str, description: str) -> None:
    """Names a scheduler + prefetcher pair, such as ``paper``."""
    if name in _COMBOS or name in _REGISTRY["scheduler"]:
        raise ValueError(f"policy {name!r} is already registered")
    _COMBOS[name] = (scheduler, prefetcher, description)


def get(kind: str, name: str) -> type:
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY[kind]))
        raise ConfigError(f"unknown {kind} {name!r}: valid are {valid}") from None


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def combos() -> dict[str, tuple[str, str, str]]:
    return dict(_COMBOS)


def describe(cls: Any) -> str:
    """First line of a class docstring."""
    return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


@dataclass(frozen=True)
class PolicyChoice:
    """A resolved policy name: which scheduler and which prefetcher."""

    name: str
    scheduler: str
    prefetcher: str


def resolve(name: str) -> PolicyChoice:
    """``paper`` -> (tp-lb, prefill-freq); ``tp`` -> (tp, none); ``tp-lb+lru`` -> (tp-lb, lru)."""
    if name in _COMBOS:
        sched, pf, _ = _COMBOS[name]
        return PolicyChoice(name, sched, pf)
    sched, _, pf = name.partition("+")
    if sched not in _REGISTRY["scheduler"]:
        valid = sorted([*_REGISTRY["scheduler"], *_COMBOS])
        raise ConfigError(f"unknown policy {name!r}: valid are {', '.join(valid)}, or "
                          f"SCHEDULER+PREFETCHER with prefetchers {', '.join(names('prefetcher'))}")
    pf = pf or "none"
    get("prefetcher", pf)
    return PolicyChoice(name, sched, pf)


def all_policy_names() -> list[str]:
    return sorted([*_REGISTRY["scheduler"], *_COMBOS])
