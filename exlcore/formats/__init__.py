"""Linear storage formats, told apart by the tensors a checkpoint holds for a layer:
<key>.q_weight = EXL2, <key>.qweight = GPTQ, <key>.weight = dense (fp16/bf16/fp32)."""

import torch

from exlcore.errors import ExlError
from exlcore.ext import extension
from exlcore.formats import exl2, gptq
from exlcore.formats.qmatrix import QMatmul, supported
from exlcore.weights import Weights


def format_of(w: Weights, key: str) -> str:
    if f"{key}.q_weight" in w:
        return "exl2"
    if f"{key}.qweight" in w:
        return "gptq"
    return "dense"


def _tensors(w: Weights, key: str, suffixes) -> dict[str, torch.Tensor]:
    return {s: w.get(f"{key}.{s}") for s in suffixes if f"{key}.{s}" in w}


def load_weight(w: Weights, key: str, in_features: int, out_features: int, dtype: torch.dtype):
    """The layer's weight: on CUDA with the extension, EXL2 and GPTQ stay packed (a QMatmul); otherwise a dense
    (out, in) tensor in `dtype`, the pure-PyTorch reference path, which dequantizes once at load."""
    fmt = format_of(w, key)
    if fmt == "dense":
        return w.get(f"{key}.weight", (out_features, in_features), dtype)
    width = w.shape(f"{key}.q_weight" if fmt == "exl2" else f"{key}.qweight")[1]
    # EXL2 pads a head's outputs to a multiple of 32; anything else must match the layer.
    if not out_features <= width < out_features + (32 if fmt == "exl2" else 1):
        raise ExlError(f"{fmt.upper()} tensor {key} has {width} output columns, the layer {out_features}; "
                       "the weights and config.json do not belong together")
    ext = extension() if w.device.type == "cuda" and supported(in_features) else None
    if fmt == "exl2":
        tensors = _tensors(w, key, exl2.SUFFIXES)
        if ext is not None:
            return QMatmul.exl2(ext, tensors, key, in_features, out_features)
        weight = exl2.read(tensors, key, in_features).dequantize()
    else:
        tensors = _tensors(w, key, ("qweight", "qzeros", "scales", "g_idx"))
        v2 = w.quantization_config.get("checkpoint_format") == "gptq_v2"
        packed = QMatmul.gptq(ext, tensors, key, in_features, out_features, v2) if ext is not None else None
        if packed is not None:
            return packed
        weight = gptq.dequantize(tensors, key, in_features, v2)
    # Heads are stored with the output padded to a multiple of 32; the padding rows are never logits.
    return weight[:out_features].to(dtype)

