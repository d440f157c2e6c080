"""Prefetchers: who owns the GPU expert cache and what gets moved into it ahead of use.

The cache holds ``(layer, expert)`` keys up to a capacity in experts; a prefetcher changes it
only through :class:`ExpertCache`, which refuses to exceed its capacity. Engines call:

- :meth:`Prefetcher.preload` once before the run: keys resident at no cost (model load time);
- :meth:`Prefetcher.after_prefill` with the prefill's activation counts ``[layers, experts]``:
  keys to fetch in the background, in issue order;
- :meth:`Prefetcher.after_step` after every decode step of a layer, with the routed token
  counts and the experts fetched on demand (already on the GPU): more background keys.

Background fetches travel below on-demand traffic on the link; a key counts as resident
for a step only once its bytes have arrived (the engine tracks that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cluster.core.knobs import Knobs
from cluster.core.spec import Config
from policies.registry import register

Key = tuple[int, int]  # (layer, expert)


class ExpertCache:
    """An ordered set of ``(layer, expert)`` keys that never holds more than ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity {capacity} < 0")
        self.capacity = capacity
        self._keys: OrderedDict[Key, None] = OrderedDict()
        self._by_layer: dict[int, set[int]] = {}
        self._added: list[Key] = []  # keys new to the cache since the last drain
        self._removed: list[Key] = []  # keys removed since the last drain

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys)

    @property
    def full(self) -> bool:
        return len(self._keys) >= self.capacity

    def add(self, key: Key) -> None:
        if key in self._keys:
            self._keys.move_to_end(key)
            return
        if len(self._keys) >= self.capacity:
            raise OverflowError(f"expert cache full ({self.capacity} experts); evict first")
        self._keys[key] = None
        self._by_layer.setdefault(key[0], set()).add(key[1])
        self._added.append(key)

    def touch(self, key: Key) -> None:
        self._keys.move_to_end(key)

    def remove(self, key: Key) -> None:
        del self._keys[key]
        self._by_layer[key[0]].discard(key[1])
        self._removed.append(key)

    def drain(self) -> tuple[list[Key], list[Key]]:
        """``(added, removed)`` since the last drain: keys put in that are still in, keys taken
        out that are still out (a key taken out and put back counts as added; one put in and
        taken out as removed: applying both lists to the old contents gives the new ones)."""
        added = [k for k in dict.fromkeys(self._added) if k in self._keys]
        removed = [k for k in dict.fromkeys(self._removed) if k not in self._keys]
        self._added.clear()
        self._removed.clear()
        return added, removed

    def oldest(self) -> Key:
        return next(iter(self._keys))

    def layer(self, layer: int) -> frozenset[int]:
        return frozenset(self._by_layer.get(layer, ()))


@dataclass
class PrefetchContext:
    """What a prefetcher may know. ``future``: decode routing, only for classes that set
    ``needs_future`` (``oracle``, and predictors whose accuracy is a knob);
    ``calibration``: activation counts ``[layers, experts]`` of a separate trace, for ``profiled``;
    ``prefill_ids``/``prefill_weights``: the prompt's routing ``[batch * prompt, layers, k]``
    (token ``b * P + p``), for classes that set ``needs_prefill_routing``; they may read it
    from :meth:`Prefetcher.after_prefill` on, when the router has produced it.
    """

    cfg: Config
    capacity: int
    future: list[list[Mapping[int, int]]] | None = None  # [decode step][layer] -> {expert: n}
    calibration: np.ndarray | None = None
    prefill_ids: np.ndarray | None = None
    prefill_weights: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What a prefetcher decided at one hook, the only thing an engine learns from it.

    ``fetch``: keys to move to the GPU in the background, in issue order (at preload: keys
    resident at no cost). ``admit``: keys it now holds that need no fetch (experts fetched on
    demand this step that it keeps). ``evict``: keys it no longer holds (they stop serving at
    once; their queued fetches are cancelled). The engine's view of what the prefetcher holds
    is the sum of its decisions.
    """

    fetch: tuple[Key, ...] = ()
    admit: tuple[Key, ...] = ()
    evict: tuple[Key, ...] = ()


class Prefetcher:
    """No prefetching; the cache stays empty. Base class of the others.

    A prefetcher writes its hooks (:meth:`preload`, :meth:`after_prefill`, :meth:`after_step`:
    each changes its own :class:`ExpertCache` and returns the keys to fetch); engines call
    :meth:`decide_preload`, :meth:`decide_after_prefill` and :meth:`decide_after_step`, which
    run the hook and return its :class:`Decision`. Engines never look into the cache.

    Class flags the engines read: ``needs_future``, ``needs_prefill_routing`` and
    ``needs_calibration`` (fill those :class:`PrefetchContext` fields; see ``policies.build``);
    ``uses_ndp_weight_bits`` (the policy's NDP-side experts are stored at the
    ``ndp_weight_bits`` of its own knobs: its cost model scales their weight bytes).
    ``knobs_class``: the prefetcher's own settings, set by ``@register(..., knobs=...)``;
    ``self.knobs`` is the config's instance of it (None without).
    """

    name = "base"
    needs_future = False
    needs_prefill_routing = False
    needs_calibration = False
    uses_ndp_weight_bits = False
    knobs_class: type[Knobs] | None = None

    def __init__(self, ctx: PrefetchContext) -> None:
        self.ctx = ctx
        self.knobs: Any = ctx.cfg.policy.knobs_of(self.knobs_class)  # None without; checks them
        self.cache = ExpertCache(ctx.capacity)
        self.num_layers = ctx.cfg.model.num_layers

    # --- what engines call ----------------------------------------------------------------
    def decide_preload(self) -> Decision:
        return self._decision(self.preload())

    def decide_after_prefill(self, counts: np.ndarray) -> Decision:
        return self._decision(self.after_prefill(counts))

    def decide_after_step(self, layer: int, step: int, routed: Mapping[int, int],
                          fetched: Iterable[int]) -> Decision:
        return self._decision(self.after_step(layer, step, routed, fetched))

    def acts_after_steps(self) -> bool:
        """Whether :meth:`after_step` can decide anything (an engine may skip calling it)."""
        return getattr(self.after_step, "__func__", None) is not Prefetcher.after_step

    def _decision(self, fetch: list[Key]) -> Decision:
        added, removed = self.cache.drain()
        asked = set(fetch)
        return Decision(tuple(fetch), tuple(k for k in added if k not in asked), tuple(removed))

    # --- what a prefetcher writes ---------------------------------------------------------
    def preload(self) -> list[Key]:
        return []

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        return []

    def after_step(self, layer: int, step: int, routed: Mapping[int, int],
                   fetched: Iterable[int]) -> list[Key]:
        return []

    def _fill_by_rank(self, counts: np.ndarray) -> list[Key]:
        """The ``capacity`` most counted keys (ties: lower layer, lower expert), in layer order."""
        flat = counts.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))  # count desc, then index asc
        top = [int(i) for i in order[: self.cache.capacity] if flat[i] > 0]
        E = counts.shape[1]
        keys = sorted(((i // E, i % E) for i in top), key=lambda k: (k[0], -flat[k[0] * E + k[1]], k[1]))
        for k in keys:
            self.cache.add(k)
        return keys


@register("prefetcher", "none")
class NoPrefetch(Prefetcher):
    """No expert cache: experts run where the scheduler puts them, fetched ones are dropped."""


@register("prefetcher", "prefill-freq")
class PrefillFrequency(Prefetcher):
    """The paper's dataset-free prefetch: after prefill, cache the prompt's most used experts."""

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        return self._fill_by_rank(counts)


@dataclass(frozen=True)
class ProfiledKnobs(Knobs):
    """``profiled``'s calibration trace (:func:`cluster.core.routing.calibration_counts`):
    ``profile_tokens`` tokens drawn with sampling seed ``profile_seed``; ``profile_alpha``
    and ``profile_domain_seed`` (-1: the workload's) draw it from another distribution."""

    profile_alpha: float = -1.0
    profile_seed: int = 1
    profile_domain_seed: int = -1
    profile_tokens: int = 2048

    def __post_init__(self) -> None:
        self.integers("profile_tokens")
        self.integers("profile_seed", minimum=0)
        self.integers("profile_domain_seed", minimum=-1)
        a = self.profile_alpha
        self.check("profile_alpha", isinstance(a, (int, float)) and (a == -1 or 0 <= a <= 10),
                   "-1 (same as workload.alpha) or a number in 0..10")


@register("prefetcher", "profiled", knobs=ProfiledKnobs)
class Profiled(Prefetcher):
    """Dataset-based: cache the most used experts of a separate calibration trace, preloaded."""

    needs_calibration = True

    def preload(self) -> list[Key]:
        if self.ctx.calibration is None:
            raise ValueError("the profiled prefetcher needs calibration counts")
        return self._fill_by_rank(self.ctx.calibration)


@register("prefetcher", "lru")
class Lru(Prefetcher):
    """Online LRU: experts fetched on demand stay cached; the least recently used is evicted."""

    def after_step(self, layer, step, routed, fetched) -> list[Key]:
        for e in routed:
            if (layer, e) in self.cache:
                self.cache.touch((layer, e))
        for e in fetched:
            if self.cache.capacity == 0:
                break
            if (layer, e) not in self.cache and self.cache.full:
                self.cache.remove(self.cache.oldest())
            self.cache.add((layer, e))
        return []


@register("prefetcher", "lfu")
class Lfu(Prefetcher):
    """Online LFU: experts fetched on demand are cached if used more often than the least used."""

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        self.freq = np.zeros((ctx.cfg.model.num_layers, ctx.cfg.model.num_experts), dtype=np.int64)

    def after_step(self, layer, step, routed, fetched) -> list[Key]:
        for e, n in routed.items():
            self.freq[layer, e] += n
        for e in fetched:
            key = (layer, e)
            if key in self.cache or self.cache.capacity == 0:
                continue
            if self.cache.full:
                victim = min(self.cache, key=lambda k: (self.freq[k], k))
                if self.freq[victim] >= self.freq[key]:
                    continue
                self.cache.remove(victim)
            self.cache.add(key)
        return []


@register("prefetcher", "oracle")
class Oracle(Prefetcher):
    """Upper bound: knows future routing; fills with the decode's most used experts, Belady after."""

    needs_future = True

    NEVER = 1 << 60

    def __init__(self, ctx: PrefetchContext) -> None:
        super().__init__(ctx)
        if ctx.future is None:
            raise ValueError("the oracle prefetcher needs the future routing")
        self.next_use: dict[Key, list[int]] = {}
        for s, layers in enumerate(ctx.future):
            for lay, routed in enumerate(layers):
                for e in routed:
                    self.next_use.setdefault((lay, e), []).append(s)
        for uses in self.next_use.values():
            uses.reverse()  # pop() from the end gives the soonest
        # the next use after the latest step of every key, and which keys are cached: the
        # Belady victim is then one masked argmax instead of a scan of the cache in Python
        L, E = self.num_layers, ctx.cfg.model.num_experts
        self.E = E
        self.nxt = np.full((L, E), self.NEVER, dtype=np.int64)
        for (lay, e), uses in self.next_use.items():
            self.nxt[lay, e] = uses[-1]
        self.held = np.zeros((L, E), dtype=bool)
        self.now = -1  # the step ``nxt`` is up to date for

    def _next(self, key: Key, step: int) -> int:
        uses = self.next_use.get(key)
        while uses and uses[-1] <= step:
            uses.pop()
        return uses[-1] if uses else self.NEVER

    def _advance(self, step: int) -> None:
        """``nxt`` for ``step``: only keys used at steps up to it move on (to their next use)."""
        while self.now < step:
            self.now += 1
            if self.now < len(self.ctx.future):  # type: ignore[arg-type]
                for lay, routed in enumerate(self.ctx.future[self.now]):  # type: ignore[index]
                    for e in routed:
                        self.nxt[lay, e] = self._next((lay, e), self.now)

    def _victim(self) -> Key:
        """The cached key used furthest in the future (ties: the largest key), as
        ``max(cache, key=(next use, key))`` would pick it."""
        masked = np.where(self.held, self.nxt, -1)
        far = masked.max()
        flat = int(np.flatnonzero(masked.ravel() == far)[-1])
        return (flat // self.E, flat % self.E)

    def _add(self, key: Key) -> None:
        self.cache.add(key)
        self.held[key] = True

    def after_prefill(self, counts: np.ndarray) -> list[Key]:
        L, E = self.ctx.cfg.model.num_layers, self.ctx.cfg.model.num_experts
        future = np.zeros((L, E))
        for layers in self.ctx.future or []:
            for lay, routed in enumerate(layers):
                for e, n in routed.items():
                    future[lay, e] += n
        keys = self._fill_by_rank(future)
        for k in keys:
            self.held[k] = True
        return keys

    def after_step(self, layer, step, routed, fetched) -> list[Key]:
        for e in fetched:
            key = (layer, e)
            if key in self.cache or self.cache.capacity == 0:
                continue
            self._advance(step)
            nxt = int(self.nxt[key])
            if self.cache.full:
                victim = self._victim()
                if self.nxt[victim] <= nxt:
                    continue
                self.cache.remove(victim)
                self.held[victim] = False
            self._add(key)
        return []
