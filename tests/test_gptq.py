"""GPTQ 4-bit: dequantization against a per-element reading of the AutoGPTQ layout (v1 and v2 zero points,
act order), and a whole GPTQ model matching transformers on the same weights."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exlcore
from exlcore.formats import gptq
from tiny import make_tiny, max_error


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """(R, C) 4-bit values -> (R / 8, C) int32, row r in bits 4 * (r % 8): AutoGPTQ's qweight layout."""
    v = values.to(torch.int64).view(-1, 8, values.shape[1])
    word = (v << (4 * torch.arange(8))[None, :, None]).sum(1)
    return (((word & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def make_gptq(k, n, group, act_order, v2, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 16, (groups, n), generator=g)  # the real zero point
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    stored_zeros = zeros if v2 else zeros - 1
    tensors = {"qweight": pack_rows(q), "qzeros": pack_rows(stored_zeros.T).T.contiguous(), "scales": scales}
    if act_order:
        tensors["g_idx"] = g_idx.to(torch.int32)
    return tensors, q, zeros, scales, g_idx


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_dequantize_matches_elementwise_reading(act_order, v2):
    tensors, q, zeros, scales, g_idx = make_gptq(256, 64, 32, act_order, v2)
    w = gptq.dequantize(tensors, "layer", 256, v2)
    assert w.shape == (64, 256) and w.dtype == torch.float16
    for k in [0, 7, 8, 100, 255]:
        for n in [0, 9, 63]:
            gi = int(g_idx[k])
            expected = (int(q[k, n]) - int(zeros[gi, n])) * float(scales[gi, n])
            assert float(w[n, k]) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_gptq_model_matches_transformers_on_its_weights(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    make_tiny("llama", tmp_path / "hf", tiny_tokenizer_dir)
    src = load_file(tmp_path / "hf" / "model.safetensors")
    quantized, dequantized = {}, {}
    for i, (name, t) in enumerate(sorted(src.items())):
        if name.endswith("_proj.weight"):
            key = name.removesuffix(".weight")
            tensors = make_gptq(t.shape[1], t.shape[0], 32, act_order=i % 2 == 0, v2=True, seed=i)[0]
            quantized |= {f"{key}.{s}": v for s, v in tensors.items()}
            dequantized[name] = gptq.dequantize(tensors, key, t.shape[1], v2=True).float()
        else:
            quantized[name] = dequantized[name] = t
    shutil.copytree(tmp_path / "hf", tmp_path / "deq")
    shutil.copytree(tmp_path / "hf", tmp_path / "gptq")
    save_file(dequantized, tmp_path / "deq" / "model.safetensors")
    save_file(quantized, tmp_path / "gptq" / "model.safetensors")
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(cfg))

    model = exlcore.load(tmp_path / "gptq", device="cpu")
    assert model.layers[0].mlp.up.format == "gptq"
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    assert max_error(model.forward(ids), expected) < 1e-4


def test_damaged_gptq_names_the_tensor():
    tensors = make_gptq(128, 32, 32, act_order=False, v2=False)[0]
    with pytest.raises(exlcore.ExlError, match="layer.qweight holds 128 input rows, the layer has 256"):
        gptq.dequantize(tensors, "layer", 256, False)
    del tensors["scales"]
    with pytest.raises(exlcore.ExlError, match="GPTQ tensor layer.scales is missing"):
        gptq.dequantize(tensors, "layer", 128, False)
