"""What a model folder holds, read from config.json and safetensors headers alone (no weights loaded)."""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from exlcore.cache import element_bytes
from exlcore.config import ModelConfig
from exlcore.formats import format_of
from exlcore.layers import linears
from exlcore.loader import read_model_config
from exlcore.weights import Weights


@dataclass
class LinearGroup:
    count: int = 0
    weights: int = 0  # logical weights (in x out)
    bytes: int = 0  # stored bytes, everything the format keeps for these layers
    formats: set = field(default_factory=set)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights if self.weights else 0.0


@dataclass
class ModelInfo:
    folder: Path
    config: ModelConfig
    parameters: int  # logical parameters
    file_bytes: int  # all tensor bytes on disk
    linears: dict[str, LinearGroup]  # by role: "self_attn.q_proj", "mlp.experts.w1", "lm_head", ...

    @property
    def formats(self) -> set:
        return set().union(*(g.formats for g in self.linears.values()))

    def kv_bytes_per_token(self, bits: int = 16) -> float:
        """Keys and values of every layer in a cache of `bits` (exlcore.cache: quantized, an fp16 scale per group)."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * element_bytes(bits)


def _format(w: Weights, key: str) -> str:
    fmt = format_of(w, key)
    if fmt == "dense" and f"{key}.weight" in w:
        return w.index[f"{key}.weight"][1]["dtype"].lower()
    return fmt


def inspect(path) -> ModelInfo:
    folder = Path(path)
    _, spec, cfg = read_model_config(folder)
    w = Weights(folder)
    sizes = {k: i["data_offsets"][1] - i["data_offsets"][0] for k, (_, i) in w.index.items()}  # stored bytes
    groups: dict[str, LinearGroup] = {}
    counted: set[str] = set()
    for key, module in linears(spec.build(cfg)).items():
        role = re.sub(r"\.\d+\.", ".", re.sub(r"^model\.layers\.\d+\.", "", key))
        group = groups.setdefault(role, LinearGroup())
        group.count += 1
        group.weights += module.in_features * module.out_features
        own = [k for k in sizes if k.startswith(key + ".")]
        group.bytes += sum(sizes[k] for k in own)
        counted.update(own)
        group.formats.add(_format(w, key))
    logical = sum(g.weights for g in groups.values()) + sum(
        math.prod(i["shape"]) for k, (_, i) in w.index.items() if k not in counted and not k.startswith("lm_head."))
    if "lm_head" in groups and not any(k.startswith("lm_head.") for k in sizes):
        groups["lm_head"].formats = {"tied to embedding"}
        logical -= groups["lm_head"].weights
    return ModelInfo(folder, cfg, logical, sum(sizes.values()), groups)

