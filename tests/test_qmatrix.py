"""The tables the CUDA kernels walk (exlcore/formats/qmatrix.py), checked on the CPU: reading the packed
codes chunk by chunk and pair by pair, as csrc/qmatmul.cu does, rebuilds exactly the reference weight of
every EXL2 bit mix and of GPTQ with and without act order."""

import pytest
import torch

from exlcore.formats import exl2, gptq
from exlcore.formats.qmatrix import QMatmul, pair_order
from test_exl2 import MIXES, random_linear
from test_gptq import make_gptq


def chunk_codes(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """One chunk's (rows, N) codes as for_pairs reads its words: 2, 4 and 8 bits as stored; 3, 5 and 6 bits as
    regrouped at load, pair p of codes (2p, 2p + 1) at bit bits * t of the low and high halves of word j, for
    p = j * (16 // bits) + t, and the pairs left over in the bits the halves leave free."""
    if 16 % bits == 0:
        return exl2.unpack_bits(words, bits, rows)
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(rows, w.shape[1], dtype=torch.int64)
    per_half, mask = 16 // bits, (1 << bits) - 1
    regular = w.shape[0] * per_half
    for p in range(regular):
        j, t = divmod(p, per_half)
        codes[2 * p], codes[2 * p + 1] = w[j] >> bits * t & mask, w[j] >> 16 + bits * t & mask
    if bits in (3, 5):
        for j in range(bits):
            codes[30] |= (w[j] >> 15 & 1) << j
            codes[31] |= (w[j] >> 31 & 1) << j
    if bits == 6:
        spare = 2 * w.shape[0] // 3
        for k in range(spare):
            high = w[spare + k // 2] >> 12 + 2 * (k % 2)
            codes[2 * (regular + k)] = (w[k] >> 12 & 15) | (high & 3) << 4
            codes[2 * (regular + k) + 1] = (w[k] >> 28 & 15) | (high >> 16 & 3) << 4
    return codes


def walk(m: QMatmul) -> torch.Tensor:
    """W (N, K) fp16 as the kernels read it from m's tables."""
    q_weight, chunks, pair_rows, scale_a, scale_b, _ = m.tensors
    w_t = torch.full((pair_rows.numel() * 2, q_weight.shape[1]), float("nan"), dtype=torch.float16)
    for word, bits_rows, group, first_pair in chunks.tolist():
        bits, rows = bits_rows & 255, bits_rows >> 8
        codes = chunk_codes(q_weight[word:word + rows * bits // 32], bits, rows)
        if scale_a.dtype == torch.int32:  # EXL2: 4-bit scale codes and q_scale_max
            scale = exl2.scales(exl2.scale_codes(scale_a[group:group + 1]), scale_b[group:group + 1])[0]
            zero = 1 << (bits - 1)
        else:  # GPTQ: (scale, 1024 + zero point)
            scale, zero = scale_a[group, :, 0], scale_a[group, :, 1].long() - 1024
        channels = pair_rows[first_pair:first_pair + rows // 2].long() & 0xFFFFFFFF
        for (lo, hi), both in zip(pair_order(bits, rows), channels.tolist()):
            w_t[both & 0xFFFF] = (codes[lo] - zero).half() * scale
            w_t[both >> 16] = (codes[hi] - zero).half() * scale
    return w_t.T


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_exl2_tables_rebuild_the_weight(mix):
    lin = random_linear(MIXES[mix], n=40, seed=3)
    m = QMatmul.exl2(None, lin.pack(), "layer", lin.codes.shape[0], 40)
    assert torch.equal(walk(m), lin.dequantize())


@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_tables_rebuild_the_weight(act_order, v2, group):
    tensors = make_gptq(256, 64, group, act_order, v2)[0]
    m = QMatmul.gptq(None, tensors, "layer", 256, 64, v2)
    assert torch.equal(walk(m), gptq.dequantize(tensors, "layer", 256, v2))


def test_gptq_groups_that_are_not_whole_chunks_are_left_to_the_reference():
    tensors = make_gptq(256, 64, 8, False, False)[0]  # 8-row groups
    assert QMatmul.gptq(None, tensors, "layer", 256, 64, False) is None


def test_pair_order_is_the_kernels():
    """Pinned, not derived: csrc/qmatmul.cu's for_pairs masks codes 16 bits apart in one word: as stored for 2, 4
    and 8 bits, neighbouring codes for 3, 5 and 6 bits (regrouped at load)."""
    assert pair_order(4, 32)[:5] == [(0, 4), (1, 5), (2, 6), (3, 7), (8, 12)]
    assert pair_order(2, 16)[:3] == [(0, 8), (1, 9), (2, 10)]
    assert pair_order(8, 32)[:3] == [(0, 2), (1, 3), (4, 6)]
    assert pair_order(5, 32)[:2] == pair_order(6, 16)[:2] == [(0, 1), (2, 3)]


@pytest.mark.parametrize("bits", exl2.BITS)
def test_pair_order_covers_each_row_once(bits):
    for rows in ([16, 32] if bits % 2 == 0 else [32]):
        assert sorted(r for pair in pair_order(bits, rows) for r in pair) == list(range(rows))
