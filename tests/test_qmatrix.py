"""The tables and layout the CUDA kernels walk (exlcore/formats/qmatrix.py), checked on the CPU: reading the
packed codes chunk by chunk, lane by lane and pair by pair, as csrc/qmatmul.cu does, rebuilds exactly the
reference weight of every EXL2 bit mix and of GPTQ with and without act order."""

import pytest
import torch

from exlcore.formats import exl2, gptq
from exlcore.formats.qmatrix import TILE, QMatmul, balanced
from test_exl2 import MIXES, random_linear
from test_gptq import make_gptq


def lane_pairs(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """(rows / 2, 2, lanes) codes: pair p of each lane's words as for_pairs decodes it: at bit bits * t of word j's
    low and high 16-bit halves, p = j * (16 // bits) + t; then for 3 and 5 bits the last pair from bit 15 of each
    word's halves, for 6 bits the spare pairs from bits 12..15 of the words."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    per_half, mask = 16 // bits, (1 << bits) - 1
    pairs = torch.zeros(rows // 2, 2, w.shape[1], dtype=torch.int64)
    regular = w.shape[0] * per_half
    for p in range(regular):
        j, t = divmod(p, per_half)
        pairs[p, 0], pairs[p, 1] = w[j] >> bits * t & mask, w[j] >> 16 + bits * t & mask
    if bits in (3, 5):
        for j in range(bits):
            pairs[-1, 0] |= (w[j] >> 15 & 1) << j
            pairs[-1, 1] |= (w[j] >> 31 & 1) << j
    if bits == 6:
        spare = 2 * w.shape[0] // 3
        for k in range(spare):
            high = w[spare + k // 2] >> 12 + 2 * (k % 2)
            pairs[regular + k, 0] = (w[k] >> 12 & 15) | (high & 3) << 4
            pairs[regular + k, 1] = (w[k] >> 28 & 15) | (high >> 16 & 3) << 4
    return pairs


def chunk_codes(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """One chunk's (rows, N) codes from its words in lane order: word tile * 32 + 4g + t of each row is lane
    4g + t's, whose pair p = e * 8 + s * 4 + slot * 2 + h is the A fragment of mma.m16n8k16: rows 2q, 2q + 1 with
    q = 8e + 4 * slot + t, of column tile * 32 + 4g + 2s + h."""
    n = words.shape[1]
    pairs = lane_pairs(words, bits, rows)
    codes = torch.full((rows, n), -1, dtype=torch.int64)
    for word in range(n):
        tile, lane = divmod(word, TILE)
        g, t = divmod(lane, 4)
        for p in range(rows // 2):
            e, s, slot, h = p >> 3, p >> 2 & 1, p >> 1 & 1, p & 1
            q = 8 * e + 4 * slot + t
            codes[2 * q:2 * q + 2, tile * TILE + 4 * g + 2 * s + h] = pairs[p, :, word]
    assert (codes >= 0).all()
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
        for q, both in enumerate(channels.tolist()):
            w_t[both & 0xFFFF] = (codes[2 * q] - zero).half() * scale
            w_t[both >> 16] = (codes[2 * q + 1] - zero).half() * scale
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


@pytest.mark.parametrize("bits, before", [([5] * 8 + [4] * 16 + [3] * 8, 1.25),
                                          ([8] * 3 + [6] * 6 + [4] * 10 + [3] * 13, 1.6)])
def test_slices_of_equal_chunk_counts_read_about_equal_bytes(bits, before):
    """128-row groups cut 7 ways, as the decode kernel cuts gate/up at batch 1: in the groups' own order the widest
    slice reads `before` times the average words per chunk, in `balanced` order at most 1.1 times."""
    def widest(order):
        words = [bits[g] for g in order for _ in range(4)]  # per chunk of 32 rows
        per = -(-len(words) // 7)
        slices = [words[i:i + per] for i in range(0, len(words), per)]
        return max(sum(s) / len(s) for s in slices) / (sum(words) / len(words))

    order = balanced(bits, [128] * len(bits))
    assert sorted(order) == list(range(len(bits)))
    assert widest(range(len(bits))) >= before and widest(order) <= 1.1
