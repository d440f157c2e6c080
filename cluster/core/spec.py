"""Frozen specs of the emulated system, the model, the workload and the policies.

Every number of a run is a field here, with its unit in its name. Specs are plain frozen
dataclasses: constructing one validates its own ranges (no I/O); :func:`cluster.core.config.load_config`
builds them from presets, TOML files, Hugging Face ``config.json`` files and ``--set`` overrides
and checks what spans sections (top-k against experts, experts against NDP capacity).

Weight bytes follow each device's ``weight_bits`` (16: fp16, the default; 8 or 4 for a
quantised model; ``ndp.weight_bits`` alone for reduced-bit NDP experts), whatever dtype the
real matmuls of the emulator use; activations and the KV cache are fp16
(:data:`BYTES_PER_ACT`).

This module is longer than most (~500 lines) because every section keeps its validation beside
its fields, and :class:`Config` its checks across sections; the ``policy`` section lives in
:mod:`cluster.core.knobs`, the shared field checks in :mod:`cluster.core.checks`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cluster.core.checks import check, finite, integers, non_negative, positive
from cluster.core.errors import ConfigError
from cluster.core.faults import Faults, check_against, parse_inject
from cluster.core.knobs import PolicySpec

BYTES_PER_PARAM = 2  # fp16 weights in the cost model
BYTES_PER_ACT = 2  # fp16 activations on the wire and in memory
GIB = 1 << 30
MAX_NDP_UNITS = 4096


def _weight_bits(section: str, bits: Any) -> None:
    check(section, "weight_bits", bits, isinstance(bits, int) and not isinstance(bits, bool)
           and 1 <= bits <= 16, "an integer in 1..16 (16: fp16; 8 or 4: a quantised model)")


def weight_bytes(params: int, bits: int) -> int:
    """Bytes of ``params`` weights stored at ``bits`` bits each (rounded up)."""
    return -(-params * bits // 8)


@dataclass(frozen=True)
class GpuSpec:
    """The edge GPU: memory, memory bandwidth, peak compute and per-kernel launch cost."""

    SECTION: ClassVar[str] = "gpu"
    name: str = "rtx5080"
    mem_bytes: int = 16 * GIB
    mem_bw_gbps: float = 960.0
    peak_tflops: float = 112.0
    launch_overhead_us: float = 5.0
    weight_bits: int = 16  # bits per weight the GPU holds (its layers and its cached experts)

    def __post_init__(self) -> None:
        integers(self.SECTION, self, "mem_bytes")
        positive(self.SECTION, self, "mem_bw_gbps", "peak_tflops")
        non_negative(self.SECTION, self, "launch_overhead_us")
        _weight_bits(self.SECTION, self.weight_bits)


@dataclass(frozen=True)
class NdpSpec:
    """Each of ``num_ndp_units`` identical NDP units (an NDP-enabled DIMM)."""

    SECTION: ClassVar[str] = "ndp"
    num_ndp_units: int = 4
    capacity_bytes: int = 64 * GIB
    internal_bw_gbps: float = 76.8
    peak_gflops: float = 512.0
    launch_overhead_us: float = 1.0
    weight_bits: int = 16  # bits per expert weight in NDP memory (what a unit reads, what it ships)

    def __post_init__(self) -> None:
        _weight_bits(self.SECTION, self.weight_bits)
        integers(self.SECTION, self, "num_ndp_units", "capacity_bytes")
        check(self.SECTION, "num_ndp_units", self.num_ndp_units,
               self.num_ndp_units <= MAX_NDP_UNITS, f"an integer in 1..{MAX_NDP_UNITS}")
        positive(self.SECTION, self, "internal_bw_gbps", "peak_gflops")
        non_negative(self.SECTION, self, "launch_overhead_us")


@dataclass(frozen=True)
class LinkSpec:
    """The one host link between the GPU and all NDP units, shared by every kind of traffic.

    Priority classes, preemptive, FIFO within a class: activations and partial outputs, then
    on-demand expert fetches, then background prefetches. ``prefetch_priority``:
    ``lowest`` (prefetches use only the time the link would otherwise idle) or ``equal``
    (prefetches share the on-demand class, FIFO with it: a large prefetch backlog delays the
    fetches behind it, the contention behind the paper's prefetch-budget optimum).
    """

    SECTION: ClassVar[str] = "link"
    bw_gbps: float = 50.0
    latency_us: float = 2.0
    prefetch_priority: str = "lowest"

    def __post_init__(self) -> None:
        positive(self.SECTION, self, "bw_gbps")
        non_negative(self.SECTION, self, "latency_us")
        check(self.SECTION, "prefetch_priority", self.prefetch_priority,
               self.prefetch_priority in PREFETCH_PRIORITIES,
               f"one of {', '.join(PREFETCH_PRIORITIES)}")


@dataclass(frozen=True)
class ModelSpec:
    """An MoE transformer. ``num_layers`` counts MoE layers; ``num_dense_layers`` come first.

    ``d_ff`` is the intermediate size of one routed expert (SwiGLU: gate, up, down).
    ``kv_dim`` is the KV-cache width per token and layer in elements (0: ``2 * num_kv_heads *
    head_dim``; DeepSeek's MLA sets it to its compressed width).
    """

    SECTION: ClassVar[str] = "model"
    name: str = "qwen3-30b-a3b"
    num_layers: int = 48
    num_dense_layers: int = 0
    d_model: int = 2048
    d_ff: int = 768
    num_experts: int = 128
    top_k: int = 8
    num_shared_experts: int = 0
    shared_d_ff: int = 0
    dense_d_ff: int = 0
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 128
    kv_dim: int = 0
    vocab_size: int = 151936
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        s = self.SECTION
        integers(s, self, "num_layers", "d_model", "d_ff", "num_experts", "top_k", "num_heads",
                  "num_kv_heads", "head_dim", "vocab_size")
        integers(s, self, "num_dense_layers", "num_shared_experts", "shared_d_ff", "dense_d_ff",
                  "kv_dim", minimum=0)
        check(s, "top_k", self.top_k, self.top_k <= self.num_experts,
               f"an integer in 1..num_experts ({self.num_experts})")
        if self.num_shared_experts > 0:
            check(s, "shared_d_ff", self.shared_d_ff, self.shared_d_ff > 0,
                   "> 0 when num_shared_experts > 0")
        if self.num_dense_layers > 0:
            check(s, "dense_d_ff", self.dense_d_ff, self.dense_d_ff > 0,
                   "> 0 when num_dense_layers > 0")

    # --- derived sizes (fp16 bytes) -------------------------------------------------------
    @property
    def expert_params(self) -> int:
        return 3 * self.d_model * self.d_ff

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * BYTES_PER_PARAM

    @property
    def routed_expert_bytes(self) -> int:
        """All routed experts of all MoE layers."""
        return self.num_layers * self.num_experts * self.expert_bytes

    @property
    def attention_params(self) -> int:
        q = self.d_model * self.num_heads * self.head_dim
        kv = 2 * self.d_model * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.d_model
        return q + kv + o

    @property
    def router_params(self) -> int:
        return self.d_model * self.num_experts

    @property
    def shared_params(self) -> int:
        return self.num_shared_experts * 3 * self.d_model * self.shared_d_ff

    @property
    def gpu_layer_params(self) -> int:
        """Weights read on the GPU for one MoE layer every step: attention, router, shared."""
        return self.attention_params + self.router_params + self.shared_params

    @property
    def dense_layer_params(self) -> int:
        return self.attention_params + 3 * self.d_model * self.dense_d_ff

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    @property
    def non_expert_params(self) -> int:
        """Everything that lives on the GPU for good: all but the routed experts."""
        return (self.num_layers * self.gpu_layer_params
                + self.num_dense_layers * self.dense_layer_params + self.embedding_params)

    @property
    def non_expert_bytes(self) -> int:
        return self.non_expert_params * BYTES_PER_PARAM

    @property
    def kv_elems_per_token_layer(self) -> int:
        return self.kv_dim or 2 * self.num_kv_heads * self.head_dim

    def kv_bytes(self, tokens: int) -> int:
        layers = self.num_layers + self.num_dense_layers
        return tokens * layers * self.kv_elems_per_token_layer * BYTES_PER_ACT


# Real-like routing presets for ``workload.routing``: the synthetic generator with drift,
# calibrated by ``ndpmoe routing-stats --fit`` to routing statistics measured on two real
# models (issue 14; per layer, averaged). Filled in below by :data:`ROUTING_PRESETS`.
ROUTING_PRESETS: dict[str, dict[str, float | str]] = {
    # Qwen1.5-MoE-A2.7B (60 experts, top-4, 24 layers; 6 prompts of 45-63 tokens + 128
    # generated): decode share on the prefill's top 10/25/50% experts 13-16/29-33/54-61%;
    # decode share on its own top 10% 22-31%; decode coverage in 128 tokens 0.95-0.99;
    # same-layer reuse 15-19% (uniform 6.7%).
    # Fitted (ndpmoe routing-stats --fit on the mid-points, shape 6 x (54 + 128) tokens):
    # Zipf 0.66, a slow walk and a jump at the decode that leave the prefill little to say.
    "qwen15-like": {"popularity": "zipf", "alpha": 0.66, "reuse": 0.06, "drift": 0.018,
                    "drift_jump": 0.55, "drift_share": 1.0},
    # Qwen3.6-35B-A3B (256 experts, top-8, 40 layers; 36 prompt + 127 generated): decode
    # share on the prefill's top 10/25/50% 38/64/81%; on its own top 10% 56%; coverage 0.52;
    # reuse 33% (uniform 3.1%).
    # Fitted (shape 6 x (36 + 127) tokens): a few experts carry the decode evenly and half
    # are never used, which neither Zipf nor log-normal reproduces with the top-10% share;
    # an exponential popularity does. Little walk, a jump at the decode.
    "qwen36-like": {"popularity": "exponential", "alpha": 8.0, "reuse": 0.25, "drift": 0.002,
                    "drift_jump": 0.2, "drift_share": 1.0},
}
ROUTING_SOURCES = ("synthetic", "gate", "trace", *ROUTING_PRESETS)
POPULARITY_SHAPES = ("zipf", "lognormal", "exponential")


@dataclass(frozen=True)
class WorkloadSpec:
    """What is run: batch, prompt and output lengths, and where routing comes from.

    ``synthetic``: per-layer Zipf popularity (exponent ``alpha``, 0 = uniform; with
    ``popularity = "lognormal"`` log-normal, ``alpha`` the spread of the log-popularity; with
    ``"exponential"`` ``p ~ exp(-alpha * rank / experts)``) over a seeded random order of
    experts, and with probability ``reuse`` a token re-picks an expert of the
    previous token at the same layer. ``gate``: a real router matmul on the hidden states of
    the reference forward pass, with a per-expert popularity bias of strength ``gate_bias``.
    ``trace``: the npz file ``trace_path`` (see :mod:`cluster.core.routing`).

    Drift (``synthetic``): which experts are popular moves over the tokens. A share
    ``drift_share`` of each layer's latent popularity score is the sequence's own and follows
    a stationary random walk (Ornstein-Uhlenbeck) that renews a fraction ``drift`` of its
    variance per token, and renews a further share ``drift_jump`` once, at the first decode
    token (generated text departs from its prompt); the rest is the fixed domain order. The
    Zipf shape stays ``alpha``. ``drift_share = 0`` is the stationary generator (``drift``
    and ``drift_jump`` are then ignored).
    ``qwen15-like``, ``qwen36-like``: the synthetic generator with parameters calibrated to
    real routing (:data:`ROUTING_PRESETS`; they replace ``alpha``, ``reuse`` and the drift
    fields).
    """

    SECTION: ClassVar[str] = "workload"
    batch_size: int = 1
    prompt_tokens: int = 512
    output_tokens: int = 512
    routing: str = "synthetic"
    alpha: float = 0.8
    reuse: float = 0.2
    popularity: str = "zipf"
    drift: float = 0.0
    drift_jump: float = 0.0
    drift_share: float = 0.0
    gate_bias: float = 2.0
    trace_path: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        s = self.SECTION
        integers(s, self, "batch_size", "prompt_tokens", "output_tokens")
        integers(s, self, "seed", minimum=0)
        check(s, "routing", self.routing, self.routing in ROUTING_SOURCES,
               f"one of {', '.join(ROUTING_SOURCES)}")
        non_negative(s, self, "alpha", "gate_bias")
        check(s, "alpha", self.alpha, self.alpha <= 10, "a number in 0..10")
        check(s, "reuse", self.reuse, isinstance(self.reuse, (int, float)) and 0 <= self.reuse <= 1,
               "a number in 0..1")
        check(s, "popularity", self.popularity, self.popularity in POPULARITY_SHAPES,
               f"one of {', '.join(POPULARITY_SHAPES)}")
        for name in ("drift", "drift_jump", "drift_share"):
            v = getattr(self, name)
            check(s, name, v, finite(v) and 0 <= v <= 1, "a number in 0..1")
        if self.routing == "trace":
            check(s, "trace_path", self.trace_path, bool(self.trace_path),
                   "a path to an npz routing file when routing = 'trace'")

    @property
    def max_context(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class WeightsSpec:
    """Real matrices of the emulator. ``scale`` shrinks d_model and d_ff (0: chosen to fit)."""

    SECTION: ClassVar[str] = "weights"
    scale: float = 0.0
    memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        check(self.SECTION, "scale", self.scale,
               isinstance(self.scale, (int, float)) and 0 <= self.scale <= 1, "a number in 0..1 (0: auto)")
        integers(self.SECTION, self, "memory_budget_bytes", minimum=0)


PLACEMENT_STRATEGIES = ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK")
PREFETCH_PRIORITIES = ("lowest", "equal")


@dataclass(frozen=True)
class EmulateSpec:
    """The Ray + zmq emulation cluster. ``dilation`` 0 means calibrate automatically.

    ``target_fidelity``: the largest |emulated - analytic| / analytic end-to-end latency a run
    should show; the CLI warns about policies above it (raise the dilation).

    ``placement_strategy``: how NDP-unit actors are spread over the nodes of a Ray cluster
    (a placement group with one bundle per unit; bundles ask for the custom resource
    ``ndp_slot`` when the cluster offers enough of it). Ignored by local runs.

    Faults (DESIGN.md section 9): every device sends a heartbeat every second; a device the
    scheduler waits on that stays silent for ``heartbeat_timeout_s`` is declared dead.
    ``recover``: a dead NDP unit is restarted by Ray, rejoins and the interrupted step is
    re-dispatched (a dead GPU stays fatal: it holds the hidden state). ``inject``: faults to
    inject, ``;``-separated (grammar in :mod:`cluster.core.faults`).

    ``curve`` (default true): authenticate and encrypt the zmq data plane with CURVE. The
    scheduler and the link make server keypairs and each device a client keypair, the keys
    reach the devices through Ray (never over zmq), and each router admits only those keys,
    each for its own device's identities, so a peer without one cannot inject a message or
    take over a device's identity. Needs a libzmq with CURVE (``zmq.has("curve")``; pyzmq's
    wheels have it). ``false`` is an explicit opt-out, warned about at start: peers are then
    told apart by the names they claim.

    ``charge_decision_time``: each MoE step's plan decision holds the step for the real time
    the policy took to decide (host speed, not dilated), on the critical path, in both
    engines: does a policy's own decision time fit inside a decode step?

    ``max_wall_s``: the longest wall-clock time a run may be estimated to take (analytic
    latency x D x policies, :mod:`cluster.engines.preflight`); the command line refuses a longer
    run before the cluster starts, naming this field as the override.
    """

    SECTION: ClassVar[str] = "emulate"
    dilation: float = 0.0
    target_fidelity: float = 0.05
    recv_timeout_s: float = 30.0
    placement_strategy: str = "SPREAD"
    heartbeat_timeout_s: float = 3.0
    recover: bool = False
    inject: str = ""
    curve: bool = True
    charge_decision_time: bool = False
    max_wall_s: float = 900.0

    def __post_init__(self) -> None:
        non_negative(self.SECTION, self, "dilation")
        positive(self.SECTION, self, "target_fidelity", "recv_timeout_s")
        check(self.SECTION, "placement_strategy", self.placement_strategy,
               self.placement_strategy in PLACEMENT_STRATEGIES, f"one of {', '.join(PLACEMENT_STRATEGIES)}")
        hb = self.heartbeat_timeout_s
        check(self.SECTION, "heartbeat_timeout_s", hb,
               isinstance(hb, (int, float)) and not isinstance(hb, bool) and 2 <= hb <= 60,
               "a number in 2..60 (seconds; devices send a heartbeat every second)")
        check(self.SECTION, "recover", self.recover, isinstance(self.recover, bool), "true or false")
        check(self.SECTION, "curve", self.curve, isinstance(self.curve, bool), "true or false")
        check(self.SECTION, "charge_decision_time", self.charge_decision_time,
               isinstance(self.charge_decision_time, bool), "true or false")
        positive(self.SECTION, self, "max_wall_s")
        parse_inject(self.inject)  # raises ConfigError naming emulate.inject and the grammar


@dataclass(frozen=True)
class Config:
    """A whole run's configuration. Frozen: nothing mutates it after load."""

    gpu: GpuSpec = field(default_factory=GpuSpec)
    ndp: NdpSpec = field(default_factory=NdpSpec)
    link: LinkSpec = field(default_factory=LinkSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    weights: WeightsSpec = field(default_factory=WeightsSpec)
    emulate: EmulateSpec = field(default_factory=EmulateSpec)
    system_name: str = "edge-rtx5080-ndp4"

    def __post_init__(self) -> None:
        check_fits(self)

    def to_dict(self) -> dict[str, Any]:
        """Every section as plain values; the policy's knobs flat, by their own names."""
        out = dataclasses.asdict(self)
        out["policy"] = self.policy.to_dict()
        return out

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)

    # --- memory budget -------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        """``emulate.inject`` parsed (checked when the config was made, parsed once and kept):
        ``faults.model`` changes the model both engines time (slow units, link delay);
        ``faults.run`` happens to the emulation cluster only (kills, dropped commands)."""
        return parse_inject(self.emulate.inject)

    # --- weight bytes at each device's precision --------------------------------------------
    @property
    def gpu_expert_bytes(self) -> int:
        """One expert as the GPU holds it (``gpu.weight_bits``)."""
        return weight_bytes(self.model.expert_params, self.gpu.weight_bits)

    @property
    def ndp_expert_bytes(self) -> int:
        """One expert as an NDP unit stores it (``ndp.weight_bits``): what it reads to compute,
        and what crosses the link when the GPU fetches it (the only copy is on the NDP side)."""
        return weight_bytes(self.model.expert_params, self.ndp.weight_bits)

    @property
    def gpu_resident_bytes(self) -> int:
        """The GPU's own weights (all but the routed experts) at ``gpu.weight_bits``."""
        return weight_bytes(self.model.non_expert_params, self.gpu.weight_bits)

    @property
    def fetch_buffer_experts(self) -> int:
        n = self.policy.fetch_buffer_experts or self.model.num_experts
        return min(n, self.model.num_experts)

    @property
    def auto_cache_bytes(self) -> int:
        m = self.model
        need = (self.gpu_resident_bytes + m.kv_bytes(self.workload.batch_size * self.workload.max_context)
                + self.fetch_buffer_experts * self.gpu_expert_bytes)
        return max(0, self.gpu.mem_bytes - need)

    @property
    def cache_bytes(self) -> int:
        base = self.auto_cache_bytes if self.policy.expert_cache_bytes < 0 else self.policy.expert_cache_bytes
        return int(base * self.policy.cache_fraction)

    @property
    def cache_capacity_experts(self) -> int:
        return self.cache_bytes // self.gpu_expert_bytes


SECTIONS: dict[str, type] = {
    "gpu": GpuSpec, "ndp": NdpSpec, "link": LinkSpec, "model": ModelSpec,
    "workload": WorkloadSpec, "policy": PolicySpec, "weights": WeightsSpec, "emulate": EmulateSpec,
}


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def check_fits(cfg: Config) -> None:
    """Checks across sections: the model must fit its memories, with the numbers if not;
    injected faults name units and steps that exist."""
    check_against(cfg.emulate.inject, cfg.ndp.num_ndp_units, cfg.workload.output_tokens)
    m, n = cfg.model, cfg.ndp
    per_unit_experts = math.ceil(m.num_experts / n.num_ndp_units)
    per_unit = m.num_layers * per_unit_experts * cfg.ndp_expert_bytes
    routed = m.num_layers * m.num_experts * cfg.ndp_expert_bytes
    if per_unit > n.capacity_bytes:
        need_units = math.ceil(routed / n.capacity_bytes)
        if need_units <= MAX_NDP_UNITS:
            advice = f"use ndp.num_ndp_units >= {need_units} or a larger ndp.capacity_bytes"
        else:  # no allowed unit count is enough: only the capacity can fix it
            at_max = m.num_layers * math.ceil(m.num_experts / MAX_NDP_UNITS) * cfg.ndp_expert_bytes
            advice = (f"even {MAX_NDP_UNITS} units (the most allowed) would need "
                      f"ndp.capacity_bytes >= {at_max} ({_gb(at_max)}); use a larger "
                      "ndp.capacity_bytes")
        raise ConfigError(
            f"model {m.name!r} does not fit the NDP units: its routed experts take "
            f"{_gb(routed)}, {_gb(per_unit)} per unit over {n.num_ndp_units} units, "
            f"but ndp.capacity_bytes = {n.capacity_bytes} ({_gb(n.capacity_bytes)}); {advice}"
        )
    resident = cfg.gpu_resident_bytes
    gpu_need = resident + m.kv_bytes(cfg.workload.batch_size * cfg.workload.max_context)
    if gpu_need > cfg.gpu.mem_bytes:
        raise ConfigError(
            f"model {m.name!r} does not fit the GPU: non-expert weights {_gb(resident)} "
            f"plus KV cache {_gb(gpu_need - resident)} for batch "
            f"{cfg.workload.batch_size} x {cfg.workload.max_context} tokens = {_gb(gpu_need)}, "
            f"but gpu.mem_bytes = {cfg.gpu.mem_bytes} ({_gb(cfg.gpu.mem_bytes)})"
        )
    if cfg.policy.expert_cache_bytes > cfg.gpu.mem_bytes:
        raise ConfigError(
            f"policy.expert_cache_bytes = {cfg.policy.expert_cache_bytes} is not allowed: must be "
            f"-1 (auto) or at most gpu.mem_bytes ({cfg.gpu.mem_bytes})"
        )
