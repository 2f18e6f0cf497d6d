"""Lazy tensor access over a folder of safetensors files, with clear errors for damaged files.

Tensors are indexed from the files' own headers. A model.safetensors.index.json whose files all exist names
the files to use (so stray copies such as a Mistral `consolidated.safetensors` are left alone); otherwise every
`*.safetensors` file is used, which covers single files and shards without an index (as EXL2 writes them, and
as it copies a stale index along).
"""

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from exlcore.errors import ExlError


def read_header(path: Path) -> dict:
    """The safetensors header of one file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExlError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-convert it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ExlError(f"{path}: corrupt or truncated safetensors header; re-download or re-convert it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExlError(f"{path}: corrupt safetensors header (not JSON); re-download or re-convert it") from None
    header.pop("__metadata__", None)
    for key, t in header.items():
        if not (isinstance(t, dict) and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
                and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)):
            raise ExlError(f"{path}: corrupt safetensors header (entry {key!r}); re-download or re-convert it")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ExlError(
            f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size}); re-download or re-convert it"
        )
    return header


def _model_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            named = []
        if named and all(f.is_file() for f in named):
            return named
    return sorted(folder.glob("*.safetensors"))


class Weights:
    """Tensors by name across every safetensors file of a folder, read only when asked for."""

    def __init__(self, folder: Path, device: str | torch.device = "cpu", quantization_config: dict | None = None):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.quantization_config = quantization_config or {}  # config.json's, for formats that depend on it
        files = _model_files(self.folder)
        if not files:
            raise ExlError(f"{self.folder}: no *.safetensors files; download the model's weights into this folder")
        self.index: dict[str, tuple[Path, dict]] = {}
        for path in files:
            for key, info in read_header(path).items():
                if key in self.index:
                    raise ExlError(f"{path}: tensor {key!r} is also in {self.index[key][0].name}; remove the stray file")
                self.index[key] = (path, info)
        self._handles = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.index[key][1]["shape"])

    def get(self, key: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor onto the target device; floats are cast to `dtype` when given."""
        if key not in self.index:
            raise ExlError(f"{self.folder}: tensor {key!r} not found in any *.safetensors file; the checkpoint is incomplete")
        path, info = self.index[key]
        if shape is not None and tuple(info["shape"]) != tuple(shape):
            raise ExlError(
                f"{path.name}: tensor {key!r} has shape {tuple(info['shape'])}, expected {tuple(shape)} "
                f"from config.json; the weights and config.json do not belong together"
            )
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            tensor = self._handles[path].get_tensor(key)
        except SafetensorError as e:  # a dtype this safetensors cannot read, a file changed since its header was read
            raise ExlError(f"{path}: tensor {key!r} cannot be read ({e}); re-download or re-convert it") from None
        tensor = tensor.to(self.device)  # cast after the move: the GPU does it faster
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor

    def close(self):
        self._handles.clear()
