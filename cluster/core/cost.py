"""Roofline cost model of the emulated hardware. Pure: numbers in, seconds out.

Every duration is a roofline plus a fixed cost::

    compute(device, flops, bytes) = launch_overhead + max(flops / peak_flops, bytes / mem_bw)
    transfer(bytes)               = link_latency + bytes / link_bw

A SwiGLU expert (gate and up ``d_model x d_ff``, down ``d_ff x d_model``) applied to ``n``
tokens, restricted to a fraction ``f`` of its ``d_ff`` columns (a tensor-parallel slice):

    flops = 2 * 3 * d_model * d_ff * f * n
    bytes = 3 * d_model * d_ff * f * bits / 8   (weights at the device's weight_bits, read once)
          + 2 * n * d_model * 2                 (fp16 activations in and partial out)

Weight precision is per device (``gpu.weight_bits``, ``ndp.weight_bits``; 16 = fp16): the GPU
reads its layers and cached experts at its bits, an NDP unit its experts at its own, and a
fetched expert crosses the link as the NDP side stores it. Flops do not change with bits.

Bandwidths are in GB/s (1e9 bytes/s), compute in TFLOPS/GFLOPS (1e12/1e9 flop/s).

Injected faults that change the model (``emulate.inject``, :mod:`cluster.core.faults`): a slowed
NDP unit ``u`` takes ``unit_factor[u]`` times as long for all its work
(:meth:`CostModel.ndp_unit_expert_s`), and a link delay adds to ``link_latency_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.core.spec import BYTES_PER_ACT, Config, weight_bytes


@dataclass(frozen=True)
class CostModel:
    """Durations of every kind of work, in seconds, derived from one :class:`Config`.

    Precomputes per-device rates so that a policy can ask thousands of times per step.
    ``unit_factor`` (one number >= 1 per NDP unit) defaults to the config's injected
    ``slow:ndpKxF`` faults (all 1.0 without them).
    """

    cfg: Config
    unit_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        c, m = self.cfg, self.cfg.model
        s = object.__setattr__
        faults = c.faults.model  # the run-side faults (kill, drop) do not change the model
        if self.unit_factor is None:
            s(self, "unit_factor", faults.unit_factors(c.ndp.num_ndp_units))
        elif len(self.unit_factor) != c.ndp.num_ndp_units:
            raise ValueError(f"unit_factor has {len(self.unit_factor)} entries for "
                             f"{c.ndp.num_ndp_units} NDP units")
        s(self, "unit_speed_sum", sum(1.0 / f for f in self.unit_factor))
        s(self, "gpu_flops_per_s", c.gpu.peak_tflops * 1e12)
        s(self, "gpu_bw_bytes_per_s", c.gpu.mem_bw_gbps * 1e9)
        s(self, "gpu_launch_s", c.gpu.launch_overhead_us * 1e-6)
        s(self, "ndp_flops_per_s", c.ndp.peak_gflops * 1e9)
        s(self, "ndp_bw_bytes_per_s", c.ndp.internal_bw_gbps * 1e9)
        s(self, "ndp_launch_s", c.ndp.launch_overhead_us * 1e-6)
        s(self, "link_bw_bytes_per_s", c.link.bw_gbps * 1e9)
        s(self, "link_latency_s", (c.link.latency_us + faults.link_delay_us) * 1e-6)
        s(self, "gpu_expert_bytes", c.gpu_expert_bytes)
        s(self, "ndp_expert_bytes", c.ndp_expert_bytes)
        s(self, "gpu_weight_bits", c.gpu.weight_bits)
        s(self, "expert_flops_per_token", 2 * m.expert_params)
        s(self, "act_bytes_per_token", m.d_model * BYTES_PER_ACT)
        # expert durations by (tokens, column fraction): asked for again and again by the
        # policies and the engines, with few distinct arguments
        s(self, "_gpu_expert_memo", {})
        s(self, "_ndp_expert_memo", {})
        s(self, "_combine_memo", {})
        s(self, "_layer_memo", {})
        s(self, "_roofline_memo", {})

    # --- primitives -------------------------------------------------------------------------
    def gpu_compute_s(self, flops: float, nbytes: float) -> float:
        """GPU kernel: launch + max(flops / peak, bytes / bandwidth)."""
        return self.gpu_launch_s + max(flops / self.gpu_flops_per_s, nbytes / self.gpu_bw_bytes_per_s)

    def ndp_compute_s(self, flops: float, nbytes: float) -> float:
        """NDP-unit kernel: launch + max(flops / peak, bytes / internal bandwidth)."""
        return self.ndp_launch_s + max(flops / self.ndp_flops_per_s, nbytes / self.ndp_bw_bytes_per_s)

    def transfer_s(self, nbytes: float) -> float:
        """One message over the host link: latency + bytes / bandwidth."""
        return self.link_latency_s + nbytes / self.link_bw_bytes_per_s

    # --- experts ----------------------------------------------------------------------------
    def expert_work(self, n_tokens: int, frac: float = 1.0, on_gpu: bool = False) -> tuple[float, float]:
        """(flops, bytes) of a SwiGLU expert slice covering ``frac`` of d_ff for ``n_tokens``,
        its weights at the GPU's or the NDP side's bits."""
        flops = self.expert_flops_per_token * frac * n_tokens
        weights = self.gpu_expert_bytes if on_gpu else self.ndp_expert_bytes
        nbytes = weights * frac + 2 * n_tokens * self.act_bytes_per_token
        return flops, nbytes

    def gpu_expert_s(self, n_tokens: int, frac: float = 1.0) -> float:
        key = (n_tokens, frac)
        s = self._gpu_expert_memo.get(key)
        if s is None:
            s = self._gpu_expert_memo[key] = self.gpu_compute_s(*self.expert_work(n_tokens, frac, True))
        return s

    def gpu_expert_roofline_s(self, n_tokens: int, frac: float = 1.0) -> float:
        """The GPU's roofline time of an expert slice, without the launch overhead (bounds)."""
        key = (n_tokens, frac)
        s = self._roofline_memo.get(key)
        if s is None:
            flops, nbytes = self.expert_work(n_tokens, frac, True)
            s = self._roofline_memo[key] = max(flops / self.gpu_flops_per_s, nbytes / self.gpu_bw_bytes_per_s)
        return s

    def ndp_expert_s(self, n_tokens: int, frac: float = 1.0) -> float:
        """On a healthy NDP unit; see :meth:`ndp_unit_expert_s` for a given unit."""
        key = (n_tokens, frac)
        s = self._ndp_expert_memo.get(key)
        if s is None:
            s = self._ndp_expert_memo[key] = self.ndp_compute_s(*self.expert_work(n_tokens, frac))
        return s

    def ndp_unit_expert_s(self, unit: int, n_tokens: int, frac: float = 1.0) -> float:
        """On NDP unit ``unit``: the healthy time times its slow-down factor."""
        return self.ndp_expert_s(n_tokens, frac) * self.unit_factor[unit]

    def fetch_s(self, frac: float = 1.0) -> float:
        """Moving (a ``frac`` slice of) one expert's weights NDP -> GPU over the link."""
        return self.transfer_s(self.ndp_expert_bytes * frac)  # as the NDP side stores it

    def activation_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.act_bytes_per_token

    # --- the GPU's own per-layer work -------------------------------------------------------
    def gpu_layer_s(self, n_tokens: int, context_tokens: int, batch: int) -> float:
        """Attention, router and shared experts of one MoE layer on the GPU.

        Reads the layer's resident weights once and the KV cache of every sequence
        (``batch`` sequences of ``context_tokens``); attention flops are ``4 * n * ctx *
        heads * head_dim`` (scores and weighted sum).
        """
        key = (n_tokens, context_tokens, batch)
        s = self._layer_memo.get(key)  # the same for every layer of a step
        if s is None:
            s = self._layer_memo[key] = self._gpu_layer_s(n_tokens, context_tokens, batch)
        return s

    def _gpu_layer_s(self, n_tokens: int, context_tokens: int, batch: int) -> float:
        m = self.cfg.model
        kernels = 3 + (1 if m.num_shared_experts else 0)  # attention, router, norm/residual, shared
        return (kernels - 1) * self.gpu_launch_s + self._resident_layer_s(
            m.gpu_layer_params, n_tokens, context_tokens, batch)

    def gpu_dense_layer_s(self, n_tokens: int, context_tokens: int, batch: int) -> float:
        """A leading dense layer (attention + dense MLP), all on the GPU."""
        return 2 * self.gpu_launch_s + self._resident_layer_s(
            self.cfg.model.dense_layer_params, n_tokens, context_tokens, batch)

    def _resident_layer_s(self, params: int, n_tokens: int, context_tokens: int, batch: int) -> float:
        """One layer of GPU-resident weights (``params``) over ``n_tokens`` tokens with the KV
        cache of ``batch`` sequences of ``context_tokens``: one roofline, one launch."""
        m = self.cfg.model
        kv = batch * context_tokens * m.kv_elems_per_token_layer * BYTES_PER_ACT
        flops = 2 * params * n_tokens + 4 * n_tokens * context_tokens * m.num_heads * m.head_dim
        nbytes = weight_bytes(params, self.gpu_weight_bits) + kv + 2 * n_tokens * self.act_bytes_per_token
        return self.gpu_compute_s(flops, nbytes)

    def gpu_head_s(self, n_tokens: int) -> float:
        """Embedding lookup and LM head for ``n_tokens`` output positions."""
        m = self.cfg.model
        params = m.vocab_size * m.d_model
        return self.gpu_compute_s(2 * params * n_tokens, weight_bytes(params, self.gpu_weight_bits))

    def gpu_combine_s(self, n_tokens: int, n_partials: int) -> float:
        """Summing ``n_partials`` gate-weighted partial outputs into the residual stream."""
        key = (n_tokens, n_partials)
        s = self._combine_memo.get(key)
        if s is None:
            nbytes = (n_partials + 1) * n_tokens * self.act_bytes_per_token
            s = self._combine_memo[key] = self.gpu_compute_s(
                n_partials * n_tokens * self.cfg.model.d_model, nbytes)
        return s
