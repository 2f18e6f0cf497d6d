"""What a model folder holds, read from config.json and safetensors headers alone (no weights loaded)."""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from exlcore.config import ModelConfig
from exlcore.formats import format_of
from exlcore.layers import Linear
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

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * bytes_per_value


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
    linears: dict[str, LinearGroup] = {}
    counted: set[str] = set()
    for module in spec.build(cfg).modules():
        if not isinstance(module, Linear):
            continue
        role = re.sub(r"\.\d+\.", ".", re.sub(r"^model\.layers\.\d+\.", "", module.key))
        group = linears.setdefault(role, LinearGroup())
        group.count += 1
        group.weights += module.in_features * module.out_features
        own = [k for k in sizes if k.startswith(module.key + ".")]
        group.bytes += sum(sizes[k] for k in own)
        counted.update(own)
        group.formats.add(_format(w, module.key))
    logical = sum(g.weights for g in linears.values()) + sum(
        math.prod(i["shape"]) for k, (_, i) in w.index.items() if k not in counted and not k.startswith("lm_head."))
    if "lm_head" in linears and not any(k.startswith("lm_head.") for k in sizes):
        linears["lm_head"].formats = {"tied to embedding"}
        logical -= linears["lm_head"].weights
    return ModelInfo(folder, cfg, logical, sum(sizes.values()), linears)

