"""The quantized KV cache: its format against an independent construction, and a model's logits and tokens with
it against the same model's 16-bit cache (CPU; tests/test_cuda_kernels.py holds the decode kernel to it)."""

import re

import pytest
import torch

import exlcore
from exlcore.cache import GROUP, dequantize, quantize
from exlcore.cli import main
from tiny import make_tiny, max_error


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


@pytest.mark.parametrize("bits", [8, 4])
def test_format_is_rotated_groups_of_symmetric_codes(bits):
    """Each group of 32 is H x (H the orthonormal Sylvester Hadamard matrix) rounded to codes of one fp16 scale,
    absmax / qmax, stored offset by qmax + 1 (4-bit: two a byte, the even element low); dequantize undoes it."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 5, 96, generator=g)
    x[..., 7] *= 30  # an outlier channel: the rotation spreads it over its group
    x[0, 0, 0, 32:64] = 0  # an all-zero group: scale 0, codes at the offset
    codes, scales = quantize(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 5, 96 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (2, 3, 5, 96 // GROUP)

    qmax = 2 ** (bits - 1) - 1
    rotated = (x.double().unflatten(-1, (-1, GROUP)) @ sylvester(GROUP)).float()
    want_scales = (rotated.abs().amax(-1) / qmax).half()
    assert torch.equal(scales, want_scales)
    unpacked = codes.long() if bits == 8 else torch.stack((codes & 15, codes >> 4), -1).flatten(-2).long()
    levels = (unpacked - qmax - 1).unflatten(-1, (-1, GROUP))
    assert levels.abs().max() <= qmax and levels.abs().amax(-1).min() == 0  # the zero group
    s = want_scales.float()[..., None]
    near = (levels - rotated / torch.where(s > 0, s, 1)).abs()
    assert near[s.expand_as(near) > 0].max() <= 0.5 + 1e-3  # rounded to the nearest level (the fp16 scale may clip)

    back = dequantize(codes, scales, bits, torch.float32)
    want = ((levels * s).double() @ sylvester(GROUP)).flatten(-2).float()
    assert torch.allclose(back, want, atol=1e-5)
    assert max_error(back, x) < {8: 0.01, 4: 0.15}[bits]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_tokenizer_dir):
    folder = tmp_path_factory.mktemp("llama")
    make_tiny("llama", folder, tiny_tokenizer_dir, head_dim=32)
    return folder, exlcore.load(folder, device="cpu")


@pytest.mark.parametrize("bits,tolerance", [(8, 0.03), (4, 0.3)])
def test_quantized_cache_decodes_close_to_the_16_bit_one(model, bits, tolerance):
    """A prefill then single-token steps over a quantized cache give the 16-bit cache's logits within the
    format's error, and what one prefill over the whole sequence gives (both read every key back from the cache;
    a code may round the other way where the projections' sums differ in their last bit). The cache holds whole
    tiles of 64 tokens."""
    _, m = model
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    runs = {}
    for b in (16, bits):
        cache = m.new_cache(2, 50, b)
        prefill = m.forward(ids[:, :30], cache)
        runs[b] = torch.cat([prefill] + [m.forward(ids[:, t:t + 1], cache) for t in range(30, 40)], 1)
    assert cache.max_len == 64 and cache.k[0].dtype == torch.uint8
    assert 0 < max_error(runs[bits], runs[16]) < tolerance
    whole = m.forward(ids, m.new_cache(2, 50, bits))
    assert max_error(whole[:, 30:], runs[bits][:, 30:]) < 1e-3


def test_generator_and_eval_take_cache_bits(model, capsys):
    folder, m = model
    gen = exlcore.Generator(m, max_seq_len=100, cache_bits=8)
    assert gen.cache.bits == 8 and len(gen.generate("Once upon a time", max_new_tokens=8, temperature=0)) > 0
    ppl = {}
    for bits in (16, 4):
        assert main(["eval", "ppl", "--device", "cpu", "-m", str(folder), "-l", "64", "--rows", "4",
                     "--cache-bits", str(bits)]) == 0
        ppl[bits] = float(re.search(r"perplexity ([\d.]+)", capsys.readouterr().out).group(1))
    assert ppl[4] != ppl[16] and ppl[4] == pytest.approx(ppl[16], rel=0.05)


def test_bad_cache_bits_are_refused(model, tmp_path, tiny_tokenizer_dir, capsys):
    _, m = model
    with pytest.raises(exlcore.ExlError, match="cache bits must be one of 16, 8, 4, not 6"):
        m.new_cache(1, 64, 6)
    make_tiny("llama", tmp_path, tiny_tokenizer_dir, head_dim=24)
    with pytest.raises(exlcore.ExlError, match=r"quantized \(8-bit\) KV cache needs a head size that is a multiple of "
                                               r"32, not 24; use the 16-bit cache"):
        exlcore.load(tmp_path, device="cpu").new_cache(1, 64, 8)
    capsys.readouterr()
    assert main(["generate", "-m", str(tmp_path), "--device", "cpu", "-p", "Hi", "--cache-bits", "8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 32, not 24; use the 16-bit cache" in err[0]
    with pytest.raises(SystemExit, match="2"):  # argparse: one line naming the option and its choices
        main(["chat", "-m", str(tmp_path), "--cache-bits", "6"])
