"""Loading a :class:`~cluster.core.spec.Config`: presets, TOML files, HF ``config.json``, overrides.

Order of precedence, lowest first: built-in defaults, the system preset or TOML file
(``--system``), the model preset (``--model``) or Hugging Face config (``--model-config``),
then ``--set section.field=value`` overrides in the order given. Unknown sections or fields,
values of the wrong type and out-of-range values fail here with the field, the value and what
is allowed, before any work starts.

The ``policy`` section holds the shared policy fields and every registered policy's own knobs
(:class:`~cluster.core.knobs.Knobs`, registered with the policy by :mod:`policies`), each by its
own name: ``--set policy.odmoe_recall=0.5`` reaches ``od-moe``'s knobs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cluster.core import presets
from cluster.core.checks import close_matches, coerce_value
from cluster.core.errors import ConfigError
from cluster.core.knobs import knob_classes, policy_field_types, unknown_policy_field
from cluster.core.spec import SECTIONS, Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _field_types(section: str) -> dict[str, type]:
    """A section's fields and their declared types; ``policy`` has the shared fields and the
    knobs of every registered policy (:func:`cluster.core.knobs.register_knobs`)."""
    if section == "policy":
        return policy_field_types()
    cls = SECTIONS[section]
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _coerce(section: str, key: str, value: Any) -> Any:
    """Checks a raw value against the field's declared type (annotations are strings)."""
    return coerce_value(section, key, _field_types(section)[key], value)


def _merge(base: dict[str, dict[str, Any]], update: Mapping[str, Any], origin: str) -> None:
    for section, fields in update.items():
        if section == "system_name":
            base["system_name"] = fields
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {origin}: allowed are "
                              f"{close_matches(section, SECTIONS)}")
        if not isinstance(fields, Mapping):
            raise ConfigError(f"config section {section!r} in {origin} must be a table of fields")
        allowed = _field_types(section)
        for key, value in fields.items():
            if key in allowed:
                value = _coerce(section, key, value)
            elif section == "policy" and not knob_classes():
                raise unknown_policy_field(key)
            else:
                raise ConfigError(f"unknown field {section}.{key} in {origin}: {section} has "
                                  f"{close_matches(key, allowed)}")
            base.setdefault(section, {})[key] = value


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"link.bw_gbps=32"`` -> ``("link", "bw_gbps", 32)``; values are TOML literals or strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r} is not allowed: must look like section.field=value, "
                          f"for example link.bw_gbps=32")
    key, raw = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as synthetic or a path
    return section, name, value


def read_text_file(path: str | Path, what: str, expected: str = "TOML") -> str:
    """The text of a UTF-8 file given on the command line; any failure is a ConfigError
    naming ``what`` (e.g. ``config file``) and the path."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"{what} {str(p)!r} is a directory, not a file")
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(p)!r} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not a text file (not UTF-8 at byte "
                          f"{exc.start}); expected {expected}") from exc


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    p = Path(path)
    text = read_text_file(p, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid TOML: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def model_from_hf_config(path: str | Path) -> dict[str, Any]:
    """Reads a Hugging Face MoE ``config.json`` into ``model`` fields.

    Understands the field names of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE and
    Phi-MoE: experts from ``num_experts``/``num_local_experts``/``n_routed_experts``, the expert
    width from ``moe_intermediate_size`` (else ``intermediate_size``), shared experts from
    ``n_shared_experts`` or ``shared_expert_intermediate_size``, dense layers from
    ``first_k_dense_replace`` or ``mlp_only_layers``.
    """
    p = Path(path)
    text = read_text_file(p, "model config", "JSON")
    try:
        hf = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError, and NaN/Infinity
        raise ConfigError(f"model config {str(p)!r} is not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise ConfigError(f"model config {str(p)!r} is a JSON {type(hf).__name__}; expected an "
                          "object of fields (a Hugging Face config.json)")
    if isinstance(hf.get("text_config"), dict):  # multimodal wrappers keep the LM inside
        hf = {**hf, **hf["text_config"]}

    def as_int(name: str, v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"model config {str(p)!r}: {name} = {v!r} is not allowed: must be "
                              "an integer >= 0")
        return v

    def get(name: str) -> int:
        return as_int(name, hf.get(name) or 0)

    def need(*names: str) -> int:
        for n in names:
            if hf.get(n) is not None:
                return as_int(n, hf[n])
        raise ConfigError(f"model config {str(p)!r} has none of the fields {', '.join(names)}; "
                          "is it a Mixture-of-Experts model?")

    layers = need("num_hidden_layers", "n_layers", "num_layers")
    d_model = need("hidden_size", "d_model")
    experts = need("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    top_k = need("num_experts_per_tok", "moe_top_k", "top_k")
    dense_ff = get("intermediate_size")
    d_ff = get("moe_intermediate_size") or dense_ff
    if d_ff <= 0:
        raise ConfigError(f"model config {str(p)!r} gives no expert width "
                          "(moe_intermediate_size or intermediate_size)")
    if hf.get("first_k_dense_replace") is not None:
        dense_layers = get("first_k_dense_replace")
    elif hf.get("mlp_only_layers"):
        mlp_only = hf["mlp_only_layers"]
        if not isinstance(mlp_only, list):
            raise ConfigError(f"model config {str(p)!r}: mlp_only_layers = {mlp_only!r} is not "
                              "allowed: must be a list of layer indices")
        dense_layers = len(mlp_only)
    else:
        dense_layers = 0
    if dense_layers >= layers:
        raise ConfigError(f"model config {str(p)!r}: {dense_layers} dense layers of "
                          f"num_hidden_layers = {layers} leave no MoE layer")
    shared, shared_ff = 0, 0
    if hf.get("n_shared_experts"):
        shared, shared_ff = get("n_shared_experts"), d_ff
    elif hf.get("shared_expert_intermediate_size"):
        shared, shared_ff = 1, get("shared_expert_intermediate_size")
    heads = get("num_attention_heads") or max(1, d_model // 128)
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("v_head_dim") or max(1, d_model // heads)
    kv_dim = 0
    if hf.get("kv_lora_rank"):  # DeepSeek MLA caches the compressed latent plus the rope key
        kv_dim = get("kv_lora_rank") + get("qk_rope_head_dim")
    # named by the file itself, never by the folder it happens to sit in
    name = hf.get("_name_or_path") or hf.get("model_type") or p.stem
    return {
        "name": str(name), "num_layers": layers - dense_layers, "num_dense_layers": dense_layers,
        "d_model": d_model, "d_ff": d_ff, "num_experts": experts, "top_k": top_k,
        "num_shared_experts": shared, "shared_d_ff": shared_ff,
        "dense_d_ff": dense_ff if dense_layers else 0, "num_heads": heads,
        "num_kv_heads": kv_heads, "head_dim": head_dim, "kv_dim": kv_dim,
        "vocab_size": get("vocab_size") or 32000,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def load_config(
    system: str | None = None,
    model: str | None = None,
    model_config: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> Config:
    """Builds the run's frozen config; raises :class:`ConfigError` naming field and value."""
    raw: dict[str, Any] = {}
    system = system or presets.DEFAULT_SYSTEM
    if system in presets.SYSTEMS:
        _merge(raw, presets.SYSTEMS[system], f"system preset {system!r}")
        raw["system_name"] = system
    elif system.endswith(".toml") or Path(system).exists():
        data = read_toml(system)
        _merge(raw, data, f"config file {system!r}")
        raw.setdefault("system_name", Path(system).stem)
    else:
        raise ConfigError(f"--system {system!r} is neither a preset nor a TOML file: presets are "
                          f"{close_matches(system, presets.SYSTEMS)}")
    if model_config is not None:
        if model is not None:
            raise ConfigError("give either --model or --model-config, not both")
        _merge(raw, {"model": model_from_hf_config(model_config)}, f"model config {str(model_config)!r}")
    elif model is not None or "model" not in raw:
        name = model or presets.DEFAULT_MODEL
        if name not in presets.MODELS:
            raise ConfigError(f"--model {name!r} is not a model preset: presets are "
                              f"{close_matches(name, presets.MODELS)}")
        raw["model"] = {}
        _merge(raw, {"model": presets.MODELS[name]}, f"model preset {name!r}")
    for text in overrides:
        section, name, value = parse_override(text)
        _merge(raw, {section: {name: value}}, f"--set {text!r}")
    system_name = raw.pop("system_name", system)
    sections = {name: SECTIONS[name](**raw.get(name, {})) for name in SECTIONS}
    return Config(**sections, system_name=str(system_name))
