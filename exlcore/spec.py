"""What an architecture plugin declares: the HF architecture strings it serves, how to read their config,
how to build the module graph (keyed by checkpoint tensor names), and how conversion should calibrate it."""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exlcore.config import ModelConfig
from exlcore.model import Model


@dataclass(frozen=True)
class Calibration:
    """Conversion behaviour. Suffixes are relative to a layer's prefix (e.g. "self_attn.q_proj")."""

    # Linears that read the same input, so one captured Hessian serves the whole group.
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    # Route every calibration token through every expert, so no expert is quantized without data.
    all_experts_see_tokens: bool = False
    # Fragments of the names of linears in the layers that stay unquantized, such as a router (embeddings, norms
    # and the head are not layer linears, so need no entry).
    keep_unquantized: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchitectureSpec:
    names: tuple[str, ...]
    parse_config: Callable[[dict, str], ModelConfig]
    build: Callable[[ModelConfig], Model]
    calibration: Calibration = field(default_factory=Calibration)
    # The dtype a CUDA load picks when the caller gives none (fp16 unless the family overflows it).
    cuda_dtype: torch.dtype = torch.float16
