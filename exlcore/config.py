"""config.json -> a typed ModelConfig. Architecture plugins call `parse_common` and fill in what is theirs."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from exlcore.errors import ExlError
from exlcore.rope import RopeConfig


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Per-layer attention kind, "full_attention" or "sliding_attention" (transformers' names).
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    rope_local: RopeConfig | None = None  # Gemma 3's sliding layers rotate with their own base


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ExlError(f"{folder}: no such model folder; pass a folder holding config.json and *.safetensors")
    if not path.is_file():
        raise ExlError(f"{path}: missing; a model folder needs its config.json from the original model")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExlError(f"{path}: not valid JSON ({e}); restore the original config.json") from None
    if not isinstance(raw, dict):
        raise ExlError(f"{path}: expected a JSON object; restore the original config.json")
    return raw


def architecture_of(raw: dict, folder: Path) -> str:
    archs = raw.get("architectures")
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ExlError(f"{folder / 'config.json'}: no 'architectures' list; add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    return archs[0]


def need(raw: dict, key: str, kind=int):
    if key not in raw or raw[key] is None:
        raise ExlError(f"config.json: missing required key {key!r}; restore the original config.json")
    try:
        return kind(raw[key])
    except (TypeError, ValueError):
        raise ExlError(f"config.json: {key!r} = {raw[key]!r} is not a valid {kind.__name__}") from None


def setting(raw: dict, key: str, default, kind=float):
    """An optional key: `default` when it is missing or null, as transformers reads it."""
    return default if raw.get(key) is None else need(raw, key, kind)


KNOWN_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def parse_rope(raw: dict, layer_type: str | None = None) -> RopeConfig:
    """Read rope settings from either transformers 5's `rope_parameters` (optionally keyed by layer
    type) or the older `rope_theta` + `rope_scaling` pair that most hub checkpoints carry."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
    if not isinstance(params, dict):
        params = dict(raw.get("rope_scaling") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in KNOWN_TYPES:
        raise ExlError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(KNOWN_TYPES)})")
    orig = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    return RopeConfig(
        theta=setting(params, "rope_theta", setting(raw, "rope_theta", 10000.0)),
        type=kind,
        factor=setting(params, "factor", 1.0),
        original_max_position=int(orig) if orig else None,
        low_freq_factor=setting(params, "low_freq_factor", 1.0),
        high_freq_factor=setting(params, "high_freq_factor", 4.0),
        beta_fast=setting(params, "beta_fast", 32.0),
        beta_slow=setting(params, "beta_slow", 1.0),
        attention_factor=params.get("attention_factor"),
    )


def parse_common(raw: dict, architecture: str, **overrides) -> ModelConfig:
    """The fields every decoder-only transformer shares, under their Hugging Face names."""
    hidden = need(raw, "hidden_size")
    heads = need(raw, "num_attention_heads")
    layers = need(raw, "num_hidden_layers")
    window = raw.get("sliding_window")
    cfg = ModelConfig(
        architecture=architecture,
        vocab_size=need(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=need(raw, "intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // max(heads, 1)),
        norm_eps=setting(raw, "rms_norm_eps", 1e-6),
        max_position_embeddings=setting(raw, "max_position_embeddings", 4096, int),
        rope=parse_rope(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        hidden_act=raw.get("hidden_activation") or raw.get("hidden_act") or "silu",
        layer_types=list(raw.get("layer_types") or ["full_attention"] * layers),
        sliding_window=int(window) if window else None,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if min(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, layers) <= 0 or cfg.num_heads % cfg.num_kv_heads:
        raise ExlError(f"config.json: {cfg.num_heads} attention heads, {cfg.num_kv_heads} key/value heads, head_dim "
                       f"{cfg.head_dim}: sizes must be positive and heads a multiple of key/value heads")
    if len(cfg.layer_types) != cfg.num_layers:
        raise ExlError(f"config.json: layer_types has {len(cfg.layer_types)} entries for {layers} layers")
    return cfg
