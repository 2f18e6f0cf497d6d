"""Writing the converted model folder: EXL2 tensors for the quantized linears, fp16 for every other tensor
of the source, the source's non-weight files, and config.json with quantization_config, written last so a
folder without it never looks finished. Tensors are read in one shard at a time, so the RAM a write takes is
one shard's, not the model's."""

import json
import math
import re
import shutil
from pathlib import Path

from exlcore.conversion.job import replace_atomically, write_json, write_tensors
from exlcore.weights import Weights

SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".tmp")
ITEM_BYTES = {"I8": 1, "U8": 1, "BOOL": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}  # floats: fp16


def module_order(key: str) -> tuple:
    """Embeddings first, then layers by number, the final norm and the head last (as ExLlamaV2 writes them)."""
    m = re.search(r"\.layers\.(\d+)\.", key)
    rank = 0 if "embed" in key else 3 if key.startswith("lm_head") else 1 if m else 2
    return rank, int(m.group(1)) if m else 0, key


def shards(sizes: dict[str, int], limit_mb: int) -> list[list[str]]:
    """Tensor names (with their sizes in bytes) in module order, cut into shards of at most limit_mb (0: one)."""
    out, size = [[]], 0
    for key in sorted(sizes, key=module_order):
        if out[-1] and limit_mb and size + sizes[key] > limit_mb * 2**20:
            out.append([])
            size = 0
        out[-1].append(key)
        size += sizes[key]
    return out


def write_model(src: Path, out: Path, quantized: Weights, replaced: set[str], quantization_config: dict,
                shard_mb: int):
    """quantized: the EXL2 tensors by full name; replaced: source tensors they stand for (not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # unfinished from here until the end
    for old in out.glob("output*.safetensors"):
        old.unlink()
    source = Weights(src)
    store = {key: quantized for key in quantized.index} | {key: source for key in source.index if key not in replaced}
    sizes = {}
    for key, weights in store.items():
        info = weights.index[key][1]
        sizes[key] = math.prod(info["shape"]) * ITEM_BYTES.get(info["dtype"], 2)
    parts = shards(sizes, shard_mb)
    names = ["output.safetensors"] if len(parts) == 1 else [
        f"output-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for name, keys in zip(names, parts):
        tensors = {key: store[key].get(key) for key in keys}
        write_tensors(out / name, {k: t.half() if t.is_floating_point() else t for k, t in tensors.items()})
    source.close()
    quantized.close()
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(SKIPPED):
            replace_atomically(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = "float16"
    write_json(out / "config.json", config)
