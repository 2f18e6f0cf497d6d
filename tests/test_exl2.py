"""EXL2 format: bit-exact packing for every width and mix, the dequantization formula, checks on damaged
tensors, and whole EXL2 models loading and matching transformers on the same weights."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exlcore
from exlcore.cli import main
from exlcore.formats import exl2
from tiny import make_tiny, max_error

MIXES = {
    "all widths": [(8, 32), (6, 64), (5, 32), (4, 96), (3, 64), (2, 64)],
    "4/3 g128": [(4, 128), (4, 128), (3, 128), (3, 96)],
    "one 6-bit group": [(6, 352)],
    "2-bit g16": [(2, 16)] * 22,
    "16-row tails": [(8, 48), (6, 80), (4, 16), (2, 48)],
}


def random_linear(layout, n=96, seed=0) -> exl2.Exl2Linear:
    g = torch.Generator().manual_seed(seed)
    k = sum(r for _, r in layout)
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=g) for b, r in layout])
    return exl2.Exl2Linear(codes, [b for b, _ in layout], [r for _, r in layout],
                           torch.randint(1, 17, (len(layout), n), generator=g),
                           (torch.rand(len(layout), generator=g) * 0.05 + 0.001).half(), torch.randperm(k, generator=g))


@pytest.mark.parametrize("bits", exl2.BITS)
def test_pack_unpack_bits_round_trip(bits):
    rows = 96 if bits in (3, 5) else 64  # whole 32-bit words
    codes = torch.randint(0, 1 << bits, (rows, 40), generator=torch.Generator().manual_seed(bits))
    words = exl2.pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows * bits // 32, 40)
    assert torch.equal(exl2.unpack_bits(words, bits, rows), codes)
    assert torch.equal(exl2.pack_bits(exl2.unpack_bits(words, bits, rows), bits), words)


def test_bit_layout_matches_the_spec():
    """3-bit: value 10 straddles words 0/1 (bits 30..32), value 21 words 1/2 (bits 63..65)."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10], codes[21], codes[0] = 0b111, 0b101, 0b011
    words = exl2.pack_bits(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert words[:, 0].tolist() == [(0b11 << 30) | 0b011, 0b1 | (0b1 << 31), 0b10]


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_linear_round_trip_is_bit_exact(mix):
    lin = random_linear(MIXES[mix])
    packed = lin.pack()
    assert packed["q_weight"].dtype == torch.int32 and packed["q_groups"].dtype == torch.int16
    assert packed["q_scale"].shape == (len(MIXES[mix]), 96 // 8) and packed["q_invperm"].dtype == torch.int32
    back = exl2.read(packed, "layer", lin.codes.shape[0])
    assert torch.equal(back.codes, lin.codes) and torch.equal(back.scale_codes, lin.scale_codes)
    assert back.group_bits == lin.group_bits and back.group_rows == lin.group_rows
    assert torch.equal(back.perm, lin.perm) and torch.equal(back.scale_max, lin.scale_max)
    repacked = back.pack()
    assert all(torch.equal(repacked[k], packed[k]) for k in packed)


def test_dequantize_formula():
    lin = random_linear(MIXES["all widths"], n=16, seed=5)
    w = lin.dequantize()  # (N, K)
    g = torch.repeat_interleave(torch.arange(6), torch.tensor(lin.group_rows))
    for k_stored in [0, 31, 32, 100, 200, 351]:
        channel = int(lin.perm[k_stored])
        bits = lin.group_bits[g[k_stored]]
        for col in [0, 7, 15]:
            code = int(lin.codes[k_stored, col])
            scale = (int(lin.scale_codes[g[k_stored], col]) ** 2 * lin.scale_max[g[k_stored]].float() / 256)
            expected = (code - 2 ** (bits - 1)) * float(scale)
            assert float(w[col, channel]) == pytest.approx(expected, rel=2e-3, abs=1e-6)


def test_group_layout_follows_the_option_table():
    # The spec's worked example: 0.1:4b_128g/0.9:3b_128g on K=4096.
    layout = exl2.group_layout(4096, [(0.1, 4, 128), (0.9, 3, 128)])
    assert layout == [(4, 128)] * 4 + [(3, 128)] * 28
    lin = exl2.quantize_rtn(torch.randn(64, 4096), layout)
    groups = lin.pack()["q_groups"].tolist()
    assert groups[:10] == [4, 0, 4, 16, 4, 32, 4, 48, 3, 64] and groups[-2:] == [3, 388]


def test_rtn_error_is_within_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    lin = exl2.quantize_rtn(w, [(8, 64), (4, 96), (2, 96)], perm=torch.randperm(256))
    # Each weight, in stored row order, is within half its group's step of the weight clamped to the group's codes
    # (code - 2^(bits-1)) * step, code in [0, 2^bits): rounding to the nearest code, clamping outside them.
    group = torch.repeat_interleave(torch.arange(3), torch.tensor([64, 96, 96]))
    step = exl2.scales(lin.scale_codes, lin.scale_max).float()[group]
    half = torch.tensor([128, 8, 2])[group, None]
    stored = w.T[lin.perm]
    nearest = torch.minimum(torch.maximum(stored, -half * step), (half - 1) * step)
    err = (lin.dequantize().float().T[lin.perm] - nearest).abs()
    assert (err <= step / 2 + 1e-3 * stored.abs()).all()  # fp16's rounding of the product on top
    assert (err / step).mean() > 0.2  # a real rounding error (uniform in [0, 1/2] has mean 1/4), not exact values


def to_exl2(folder, out, bits_layout=lambda k: [(4, k // 2), (3, k - k // 2)]):
    """Quantize every linear of an HF folder by RTN into an EXL2 folder; also write the dequantized weights
    as an HF folder (for transformers). Returns the dequantized folder."""
    tensors = load_file(folder / "model.safetensors")
    out.mkdir()
    deq_dir = out.parent / (out.name + "-dequantized")
    shutil.copytree(folder, deq_dir)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("tie_word_embeddings"):  # EXL2 always stores a quantized lm_head, even for tied models
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        cfg["tie_word_embeddings"] = False
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        key = name.removesuffix(".weight")
        if name.endswith("_proj.weight") or name.startswith("lm_head") or ".experts." in name:
            lin = exl2.quantize_rtn(t, bits_layout(t.shape[1]), perm=torch.randperm(t.shape[1]))
            quantized |= {f"{key}.{s}": v for s, v in lin.pack().items()}
            dequantized[name] = lin.dequantize().float()
        else:
            quantized[name] = t.half()
            dequantized[name] = t.half().float()
    save_file(quantized, out / "output.safetensors")
    save_file(dequantized, deq_dir / "model.safetensors")
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg["quantization_config"] = {"quant_method": "exl2", "bits": 3.5, "head_bits": 6}
    (out / "config.json").write_text(json.dumps(cfg))
    (deq_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    return deq_dir


@pytest.mark.parametrize("name", ["llama_tied_llama3", "mixtral", "gemma2"])
def test_exl2_model_matches_transformers_on_its_weights(name, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    make_tiny(name, tmp_path / "hf", tiny_tokenizer_dir)
    deq = to_exl2(tmp_path / "hf", tmp_path / "exl2")
    ref = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32, attn_implementation="eager").eval()
    model = exlcore.load(tmp_path / "exl2", device="cpu")
    assert model.layers[0].attn.q.format == "exl2"
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    got = model.forward(ids)
    assert max_error(got, expected) < 1e-4


def test_exl_info_reports_real_bits(tmp_path, tiny_tokenizer_dir, capsys):
    make_tiny("llama", tmp_path / "hf", tiny_tokenizer_dir)
    to_exl2(tmp_path / "hf", tmp_path / "exl2", lambda k: [(8, 32), (4, k - 32)])
    assert main(["info", "-m", str(tmp_path / "exl2")]) == 0
    out = capsys.readouterr().out
    assert "format        exl2\n" in out
    # q_proj, K = N = 64: 32 rows x 8 + 32 rows x 4 bits per column, 2 groups of scales (16 + 32 + 4N bits),
    # and q_invperm (32 bits per row), over K x N weights.
    bits = (64 * (32 * 8 + 32 * 4) + 2 * (16 + 32) + 2 * 64 * 4 + 64 * 32) / (64 * 64)
    assert f"self_attn.q_proj {bits:.2f}" in out


def damage(key, change):
    def apply(folder):
        t = load_file(folder / "output.safetensors")
        change(t, key)
        save_file(t, folder / "output.safetensors")
    return apply


BAD = {
    "missing q_invperm": (lambda t, k: t.pop(f"{k}.q_invperm"), r"q_proj.q_invperm is missing"),
    "unsupported width": (lambda t, k: t[f"{k}.q_groups"].__setitem__(0, 7), r"q_groups: group 0 has 7 bits"),
    "rising widths": (lambda t, k: t.__setitem__(f"{k}.q_groups", torch.tensor([3, 0, 4, 6], dtype=torch.int16)),
                      r"bit widths must not rise"),
    "rows do not add up": (lambda t, k: t[f"{k}.q_groups"].__setitem__(0, 8),
                           r"q_groups describes 48 input rows; the layer has 64"),
    "truncated q_weight": (lambda t, k: t.__setitem__(f"{k}.q_weight", t[f"{k}.q_weight"][:-4]),
                           r"q_groups: group 1 spans -1 q_weight rows"),
    "odd group rows": (lambda t, k: t.__setitem__(f"{k}.q_groups", torch.tensor([4, 0, 3, 5], dtype=torch.int16)),
                       r"group 0 has 40 rows; EXL2 groups hold a multiple of 32 rows"),
    "narrow q_weight": (lambda t, k: t.__setitem__(f"{k}.q_weight", t[f"{k}.q_weight"][:, :32].clone()),
                        r"EXL2 tensor model.layers.1.self_attn.q_proj has 32 output columns, the layer 64"),
    "scale shape": (lambda t, k: t.__setitem__(f"{k}.q_scale", t[f"{k}.q_scale"][:, :2].clone()),
                    r"q_proj.q_scale has shape"),
}


@pytest.fixture(scope="module")
def tiny_exl2(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("tiny-exl2")
    make_tiny("llama", root / "hf", tiny_tokenizer_dir)
    to_exl2(root / "hf", root / "exl2", lambda k: [(4, k // 2), (3, k // 2)])
    return root / "exl2"


@pytest.mark.parametrize("case", sorted(BAD))
def test_damaged_exl2_names_the_tensor(case, tmp_path, tiny_exl2):
    folder = tmp_path / "exl2"
    shutil.copytree(tiny_exl2, folder)
    change, message = BAD[case]
    damage("model.layers.1.self_attn.q_proj", change)(folder)
    with pytest.raises(exlcore.ExlError, match=message):
        exlcore.load(folder, device="cpu")
