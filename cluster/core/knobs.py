"""The ``policy`` section: what every policy shares, and each policy's own knobs.

A policy's knobs are a small frozen :class:`Knobs` dataclass that lives with the policy and is
registered with it (``policies.registry.register(..., knobs=...)`` calls
:func:`register_knobs`); :class:`PolicySpec` holds one instance of every registered class, so
``[policy] odmoe_recall = 0.5`` and ``--set policy.odmoe_recall=0.5`` reach their owner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from cluster.core.checks import (
    check,
    close_matches,
    finite,
    integers,
    non_negative,
    positive,
)
from cluster.core.errors import ConfigError

LB_SPLITS = ("expert", "fractional")  # policy.lb_split, a knob of tp-lb (policies.schedulers)
_SHARED_FIELDS = ("expert_cache_bytes", "cache_fraction", "fetch_buffer_experts")
K = TypeVar("K", bound="Knobs")


@dataclass(frozen=True)
class Knobs:
    """Base of a policy's own knobs: a small frozen dataclass that lives with its policy.

    Registered with the policy (``@register("prefetcher", "od-moe", knobs=OdMoeKnobs)``),
    its fields are fields of the ``policy`` section like the shared ones: ``[policy]
    odmoe_recall = 0.5`` in a TOML file, ``--set policy.odmoe_recall=0.5``. Field names are
    unique over all policies (a clash fails at registration). ``__post_init__`` validates with
    the helpers below, which fail like every spec: field, value, what is allowed.
    """

    SECTION: ClassVar[str] = "policy"

    def check(self, name: str, ok: bool, allowed: str) -> None:
        """Fails with ``policy.<name> = <value> is not allowed: must be <allowed>`` unless ``ok``."""
        check(self.SECTION, name, getattr(self, name), ok, allowed)

    def integers(self, *names: str, minimum: int = 1) -> None:
        integers(self.SECTION, self, *names, minimum=minimum)

    def positive(self, *names: str) -> None:
        positive(self.SECTION, self, *names)

    def non_negative(self, *names: str) -> None:
        non_negative(self.SECTION, self, *names)

    def fractions(self, *names: str) -> None:
        """Each a number in 0..1."""
        for n in names:
            v = getattr(self, n)
            self.check(n, finite(v) and 0 <= v <= 1, "a number in 0..1")

    def one_of(self, name: str, allowed: tuple[str, ...]) -> None:
        self.check(name, getattr(self, name) in allowed, f"one of {', '.join(allowed)}")


# Every registered knob class by owner (``"prefetcher od-moe"``), in registration order: the
# order of the knobs in PolicySpec and in Config.to_dict(). Filled by policies.registry.
_KNOB_OWNERS: dict[str, type[Knobs]] = {}


def _knob_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def register_knobs(owner: str, cls: type[Knobs]) -> None:
    """Registers ``cls`` as the knobs of ``owner``; its fields join the ``policy`` section.

    ``cls`` must be a frozen :class:`Knobs` dataclass whose defaults pass its own checks and
    whose field names no other policy (nor PolicySpec itself) uses. The same class may serve
    several owners (a policy and its variant).
    """
    if owner in _KNOB_OWNERS:
        raise ValueError(f"{owner} already has knobs ({_KNOB_OWNERS[owner].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, Knobs) and dataclasses.is_dataclass(cls)
            and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"knobs of {owner} must be a frozen dataclass subclassing "
                        f"cluster.core.knobs.Knobs, not {cls!r}")
    taken = {n: "PolicySpec" for n in _SHARED_FIELDS}
    taken.update({n: o for o, c in _KNOB_OWNERS.items() if c is not cls for n in _knob_names(c)})
    for n in _knob_names(cls):
        if n in taken:
            raise ValueError(f"knob policy.{n} of {owner} is already a field of {taken[n]}")
    cls()  # the defaults must pass the class's own checks
    _KNOB_OWNERS[owner] = cls


def unregister_knobs(owner: str) -> None:
    """Removes ``owner``'s knobs (tests that register a policy of their own clean up)."""
    _KNOB_OWNERS.pop(owner, None)


def knob_classes() -> tuple[type[Knobs], ...]:
    """Every registered knob class once, in registration order."""
    return tuple(dict.fromkeys(_KNOB_OWNERS.values()))


def knob_owners() -> dict[str, type[Knobs]]:
    return dict(_KNOB_OWNERS)


def policy_field_types() -> dict[str, Any]:
    """Every field of the ``policy`` section with its declared type: the shared ones, then
    every registered policy's knobs."""
    out = {f.name: f.type for f in dataclasses.fields(PolicySpec) if f.name in _SHARED_FIELDS}
    for cls in knob_classes():
        out.update({f.name: f.type for f in dataclasses.fields(cls)})
    return out


@dataclass(frozen=True, init=False)
class PolicySpec:
    """The ``policy`` section: what all policies share, and each registered policy's own knobs.

    ``expert_cache_bytes``: GPU memory for cached experts; -1 means what is left after the
    non-expert weights, the KV cache and the on-demand fetch buffer. ``cache_fraction`` scales
    that budget (the prefetch-budget sweep). ``fetch_buffer_experts``: how many experts one
    step may fetch on demand (0: one whole layer, ``num_experts``).

    ``knobs``: one :class:`Knobs` per registered knob class (each policy documents its own:
    ``lb_split`` of ``tp-lb``, ``eplb_*`` of ``eplb``, ``profile_*`` of ``profiled``,
    ``context_alpha`` and ``ndp_weight_bits`` of ``context-aware``, ``odmoe_*``,
    ``expertflow_max_horizon``, ``refresh_*`` of ``prefill-freq-refresh``, ``drift_*`` of
    ``decayed-freq``). A knob is given by its own name like a shared field: ``PolicySpec(
    odmoe_recall=0.5)``, ``dataclasses.replace(spec, odmoe_recall=0.5)``, ``[policy]
    odmoe_recall = 0.5``; an unknown name fails listing the allowed ones. Policies read their
    own knobs (``self.knobs``, :meth:`knobs_of`); ``spec.odmoe_recall`` is a read-only flat
    view of every knob, for reports.

    Knobs are registered when :mod:`policies` is imported: a process that sets one must import
    it first (every entry point does; a config sent to a worker carries its knob instances,
    whose classes import it), else the knob is refused as unregistered, naming the fix.

    The knobs take part in equality and hashing, so a config that differs in one knob is
    another config (memoisation by config sees it).
    """

    SECTION: ClassVar[str] = "policy"
    expert_cache_bytes: int = -1
    cache_fraction: float = 1.0
    fetch_buffer_experts: int = 0
    knobs: tuple[Knobs, ...] = ()

    def __init__(self, expert_cache_bytes: int = -1, cache_fraction: float = 1.0,
                 fetch_buffer_experts: int = 0, knobs: tuple[Knobs, ...] = (),
                 **knob_values: Any) -> None:
        s = self.SECTION
        for k in knobs:
            if not isinstance(k, Knobs):
                raise ConfigError(f"{s}.knobs holds {k!r}: must hold policy knob dataclasses")
        have = {type(k): k for k in knobs}
        # one instance per registered class, in registration order; unregistered ones kept
        full = {c: have.pop(c, None) or c() for c in knob_classes()}
        full.update(have)
        owner_of = {n: c for c in full for n in _knob_names(c)}
        changes: dict[type, dict[str, Any]] = {}
        for n, v in knob_values.items():
            if n not in owner_of:
                raise unknown_policy_field(n)
            changes.setdefault(owner_of[n], {})[n] = v
        for c, ch in changes.items():
            full[c] = dataclasses.replace(full[c], **ch)
        set_ = object.__setattr__
        set_(self, "expert_cache_bytes", expert_cache_bytes)
        set_(self, "cache_fraction", cache_fraction)
        set_(self, "fetch_buffer_experts", fetch_buffer_experts)
        set_(self, "knobs", tuple(full.values()))
        self.__post_init__()

    def __post_init__(self) -> None:
        s = self.SECTION
        check(s, "expert_cache_bytes", self.expert_cache_bytes,
               isinstance(self.expert_cache_bytes, int) and self.expert_cache_bytes >= -1,
               "-1 (auto) or an integer >= 0")
        check(s, "cache_fraction", self.cache_fraction,
               isinstance(self.cache_fraction, (int, float)) and 0 <= self.cache_fraction <= 1,
               "a number in 0..1")
        integers(s, self, "fetch_buffer_experts", minimum=0)

    def knobs_of(self, cls: type[K] | None) -> K | None:
        """This spec's instance of the knob class ``cls`` (None for None; its defaults where
        ``cls`` was registered after the spec was made)."""
        if cls is None:
            return None
        return next((k for k in self.knobs if type(k) is cls), None) or cls()

    def _knob_view(self) -> list[Knobs]:
        """Every knob instance this spec answers for: its own, then defaults of classes
        registered since it was made."""
        have = {type(k) for k in self.knobs}
        return [*self.knobs, *(c() for c in knob_classes() if c not in have)]

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a knob by its flat name, read-only
        if not name.startswith("_") and "knobs" in self.__dict__:
            for k in self._knob_view():
                if name in k.__dataclass_fields__:
                    return getattr(k, name)
        raise AttributeError(f"{type(self).__name__!r} object has no field or policy knob {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The shared fields, then every knob by its own name (the section as a TOML file
        writes it; ``PolicySpec(**spec.to_dict()) == spec``)."""
        out: dict[str, Any] = {n: getattr(self, n) for n in _SHARED_FIELDS}
        for k in self._knob_view():
            out.update(dataclasses.asdict(k))
        return out


def unknown_policy_field(name: str) -> ConfigError:
    """The error for a ``policy`` field no policy owns (or, with none registered, the fix)."""
    if not _KNOB_OWNERS:
        return ConfigError(f"policy.{name} is not a shared policy field and no policy is "
                           "registered in this process: import the policies package before "
                           "loading a config that sets a policy's knobs")
    return ConfigError(f"unknown field policy.{name}: policy has "
                       f"{close_matches(name, policy_field_types())}")
