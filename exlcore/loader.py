"""exlcore.load: a model folder -> a ready Model with its tokenizer."""

from pathlib import Path

import torch

from exlcore import plugins
from exlcore.config import ModelConfig, architecture_of, read_config
from exlcore.errors import ExlError
from exlcore.model import Model
from exlcore.spec import ArchitectureSpec
from exlcore.tokenizer import Tokenizer
from exlcore.weights import Weights

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype, device: torch.device, cuda_default: torch.dtype) -> torch.dtype:
    if dtype is None:
        # CPUs here run fp16/bf16 matmuls several times slower than fp32, so CPU defaults to fp32.
        return cuda_default if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExlError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ExlError(f"device {device!r} is not valid; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ExlError("device 'cuda' asked for, but no CUDA GPU is available; use device='cpu'")
        if device.index is None:  # compare equal to the devices tensors report
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ExlError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def read_model_config(folder: Path) -> tuple[dict, ArchitectureSpec, ModelConfig]:
    """config.json, the plugin spec for its architecture, and the config as that spec parses it."""
    raw = read_config(folder)
    arch = architecture_of(raw, folder)
    spec = plugins.spec_for(arch)
    return raw, spec, spec.parse_config(raw, arch)


def load(path, device="cuda" if torch.cuda.is_available() else "cpu", dtype=None) -> Model:
    """Load a model folder (config.json, *.safetensors, tokenizer files) of any registered architecture."""
    folder = Path(path)
    raw, spec, cfg = read_model_config(folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, spec.cuda_dtype)
    tokenizer = Tokenizer(folder, raw)  # before the weights: a missing tokenizer should fail fast
    model = spec.build(cfg)
    weights = Weights(folder, device, raw.get("quantization_config"))
    model.load(weights, dtype)
    weights.close()
    model.tokenizer = tokenizer
    model.path = folder
    return model.eval()
