"""Building a policy for a run: its prefetcher with the context it asks for, and the config its
cost model is built from. Shared by both engines (the analytic one and the emulation's scheduler
core), so that they make the same policy from the same config.

The prefetcher's class flags say what context it needs (``needs_future``,
``needs_prefill_routing``, ``needs_calibration``); nothing here knows a policy by name.
"""

from __future__ import annotations

import dataclasses

import policies
from cluster.core.routing import calibration_counts
from cluster.core.selection import Routing, group_by_expert
from cluster.core.spec import Config
from policies.prefetch import PrefetchContext, Prefetcher


def decode_future(routing: Routing) -> list[list[dict[int, int]]]:
    """[decode step][layer] -> {expert: tokens}: what only the oracle may see."""
    out = []
    for s in range(routing.decode_steps):
        out.append([{e: len(t) for e, t in group_by_expert(routing.decode_ids(s, lay)).items()}
                    for lay in range(routing.num_layers)])
    return out


def make_prefetcher(cfg: Config, name: str, routing: Routing) -> Prefetcher:
    cls = policies.get("prefetcher", name)
    ctx = PrefetchContext(cfg, cfg.cache_capacity_experts)
    if cls.needs_future:
        ctx.future = decode_future(routing)
    if cls.needs_calibration:
        k = cfg.policy.knobs_of(cls.knobs_class)
        ctx.calibration = calibration_counts(cfg, k.profile_tokens, k.profile_seed, k.profile_alpha,
                                             k.profile_domain_seed)
    if cls.needs_prefill_routing:
        P = routing.prompt_tokens
        ctx.prefill_ids = routing.topk_ids[:, :P].reshape(-1, *routing.topk_ids.shape[2:])
        ctx.prefill_weights = routing.topk_weights[:, :P].reshape(-1, *routing.topk_weights.shape[2:])
    return cls(ctx)


def policy_cost_config(cfg: Config, *classes: type) -> Config:
    """The config a policy's cost model is built from: ``cfg``, unless one of its classes
    (scheduler, prefetcher) sets ``uses_ndp_weight_bits`` and the ``ndp_weight_bits`` of its
    own knobs (``policy.ndp_weight_bits`` for ``context-aware``) is below ``ndp.weight_bits``.

    Then the NDP side stores its experts at those bits: ``ndp.weight_bits`` of the returned
    config, which the cost model reads (an NDP unit reads fewer weight bytes, a fetched expert
    moves fewer), so every user of it (plans, timing, lower bounds, both engines and the
    emulated devices, which are sent this config) agrees. Flops, activations and the GPU's own
    weights do not change.
    """
    bits = ndp_weight_bits(cfg, *classes)
    if bits >= cfg.ndp.weight_bits:
        return cfg
    return cfg.replace(ndp=dataclasses.replace(cfg.ndp, weight_bits=bits))


def ndp_weight_bits(cfg: Config, *classes: type) -> int:
    """The bit-width of a policy's NDP-side expert weights: the ``ndp_weight_bits`` knob of
    those of its classes that set ``uses_ndp_weight_bits`` (the lowest), else 16 (fp16)."""
    return min((cfg.policy.knobs_of(c.knobs_class).ndp_weight_bits for c in classes
                if getattr(c, "uses_ndp_weight_bits", False)), default=16)
