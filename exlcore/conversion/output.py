"""Writing the converted model folder: EXL2 tensors for the quantized linears, fp16 for every other tensor
of the source, the source's non-weight files, and config.json with quantization_config, written last so a
folder without it never looks finished."""

import json
import re
import shutil
from pathlib import Path

import torch

from exlcore.conversion.job import replace_atomically, write_json, write_tensors
from exlcore.weights import Weights

SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".tmp")


def module_order(key: str) -> tuple:
    """Embeddings first, then layers by number, the final norm and the head last (as ExLlamaV2 writes them)."""
    m = re.search(r"\.layers\.(\d+)\.", key)
    rank = 0 if "embed" in key else 3 if key.startswith("lm_head") else 1 if m else 2
    return rank, int(m.group(1)) if m else 0, key


def shards(tensors: dict[str, torch.Tensor], limit_mb: int) -> list[dict[str, torch.Tensor]]:
    out, size = [{}], 0
    for key in sorted(tensors, key=module_order):
        t = tensors[key]
        if out[-1] and limit_mb and size + t.numel() * t.element_size() > limit_mb * 2**20:
            out.append({})
            size = 0
        out[-1][key] = t
        size += t.numel() * t.element_size()
    return out


def write_model(src: Path, out: Path, quantized: dict[str, torch.Tensor], replaced: set[str],
                quantization_config: dict, shard_mb: int) -> list[Path]:
    """quantized: the EXL2 tensors by full name; replaced: source tensors they stand for (not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # unfinished from here until the end
    for old in out.glob("output*.safetensors"):
        old.unlink()
    source = Weights(src)
    tensors = dict(quantized)
    for key in source.index:
        if key not in replaced:
            t = source.get(key)
            tensors[key] = t.half() if t.is_floating_point() else t
    parts = shards(tensors, shard_mb)
    names = ["output.safetensors"] if len(parts) == 1 else [
        f"output-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for name, part in zip(names, parts):
        write_tensors(out / name, part)
    source.close()
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIPPED):
            replace_atomically(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = "float16"
    write_json(out / "config.json", config)
    return [out / n for n in names]
