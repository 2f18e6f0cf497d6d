"""Files made by ExLlamaV2 0.3.2 itself (tests/fixtures/exllamav2, made on a GPU by
tests/fixtures/make_exllamav2.py): exlcore reads them exactly as exllamav2 does, writes them back
bit-identically, and runs them like transformers runs the same weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import exlcore
from exlcore.formats import exl2
from tiny import max_error

FIXTURES = Path(__file__).parent / "fixtures" / "exllamav2"
MODELS = ["llama", "mixtral", "gemma2"]


def linears(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors = load_file(folder / "output.safetensors")
    keys = {k.removesuffix(".q_weight") for k in tensors if k.endswith(".q_weight")}
    return {key: {s: tensors[f"{key}.{s}"] for s in exl2.SUFFIXES} for key in sorted(keys)}


@pytest.mark.parametrize("name", MODELS)
def test_dequantized_weights_equal_exllamav2s(name):
    theirs = load_file(FIXTURES / name / "exllamav2_dq.safetensors")
    ours = linears(FIXTURES / name)
    assert set(ours) == set(theirs) and len(ours) > 10
    for key, tensors in ours.items():
        w = exl2.read(tensors, key, theirs[key].shape[0]).dequantize()  # (N, K)
        expected = theirs[key].T
        assert w.shape == expected.shape
        assert max_error(w, expected) < 1e-3, (key, max_error(w, expected))


@pytest.mark.parametrize("name", MODELS)
def test_repacking_reproduces_exllamav2s_bytes(name):
    for key, tensors in linears(FIXTURES / name).items():
        k = tensors["q_invperm"].shape[0]
        packed = exl2.read(tensors, key, k).pack()
        for suffix, t in tensors.items():
            assert torch.equal(packed[suffix], t), (key, suffix)


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers_and_exllamav2(name, tmp_path):
    from transformers import AutoModelForCausalLM

    src = FIXTURES / name
    # transformers on exllamav2's own dequantized weights plus the file's unquantized tensors.
    shutil.copytree(src, tmp_path / "hf", ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("quantization_config")
    dq = load_file(src / "exllamav2_dq.safetensors")
    tensors = {k: t.float() for k, t in load_file(src / "output.safetensors").items()
               if not k.removesuffix("." + k.split(".")[-1]) in dq}
    tensors |= {f"{k}.weight": w.T.float().contiguous() for k, w in dq.items()}
    if cfg.get("tie_word_embeddings"):  # the quantized head differs from the embedding it was made from
        cfg["tie_word_embeddings"] = False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")

    saved = load_file(src / "exllamav2_logits.safetensors")
    ids = saved["ids"]
    got = exlcore.load(src, device="cpu").forward(ids)
    with torch.no_grad():
        expected = ref.eval()(ids).logits
    assert max_error(got, expected) < 1e-4
    if name == "llama":
        # exllamav2's own forward (fp16, GPU) agrees too. Its Mixtral and Gemma 2 logits for these tiny
        # configs agree with neither transformers nor exlcore (which agree with each other on the same
        # weights), so they are kept in the fixtures but not asserted on.
        theirs = saved["logits"]
        assert max_error(got, theirs) < 1e-2
