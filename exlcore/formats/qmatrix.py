"""EXL2 and GPTQ linears kept packed on the GPU and multiplied by the extension (exlcore/csrc/qmatmul.cu).

Both formats store codes as a little-endian bit stream down each column, in groups of rows that share a bit
width and per-column scales. The kernels walk them in chunks of 32 rows (16 at the end of an even-width group
whose length is not a multiple of 32), described by two tables built here:

    chunks     int32 (C, 4)  first q_weight row, bits | rows << 8, group, first pair
    pair_rows  int32 (K/2,)  the input channels (lo | hi << 16) of each pair of codes the kernel decodes together

A pair is two codes 16 bits apart in one word, so one mask gives both as fp16: as stored for 2, 4 and 8 bits,
and for 3, 5 and 6 bits once `regroup` has rearranged each chunk's words (QMatmul.exl2 does it, in place, at
load; walking the stored stream cost the kernel about twice the bit operations). GPTQ's act order is turned
into EXL2's: rows sorted by group, with the permutation in pair_rows.
"""

from functools import cache

import torch

from exlcore.formats import exl2, gptq


@cache
def pair_order(bits: int, rows: int) -> list[tuple[int, int]]:
    """The rows (within a chunk of `rows` rows) of each pair of codes, in the order the kernel decodes them."""
    if 16 % bits == 0:
        per_word = 32 // bits
        return [(j * per_word + t, j * per_word + t + per_word // 2)
                for j in range(rows * bits // 32) for t in range(per_word // 2)]
    return [(2 * p, 2 * p + 1) for p in range(rows // 2)]


def tables(bits: list[int], rows: list[int], starts: list[int], perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks and pair_rows for groups of the given bit widths, row counts and first q_weight rows, with
    stored row k being input channel perm[k]."""
    chunks, pairs, first = [], [], 0
    for group, (b, r, start) in enumerate(zip(bits, rows, starts)):
        for c0 in range(0, r, 32):
            n = min(32, r - c0)
            chunks.append((start + c0 * b // 32, b | n << 8, group, (first + c0) // 2))
            pairs += [(first + c0 + lo, first + c0 + hi) for lo, hi in pair_order(b, n)]
        first += r
    index = perm.to(torch.int64)[torch.tensor(pairs, device=perm.device)]
    return (torch.tensor(chunks, dtype=torch.int32, device=perm.device),
            exl2.as_int32(index[:, 0] | index[:, 1] << 16))


def regroup(q: torch.Tensor, chunks: torch.Tensor):
    """Rearrange, in place, the words of each 3-, 5- and 6-bit chunk of q_weight as the kernel reads them (for_pairs
    in csrc/qmatmul.cu). Pair p is codes (2p, 2p + 1); word j's low and high 16-bit halves hold pair j * (16 // bits)
    + t at bit bits * t, and the pairs left over go in the bits the halves leave free: for 3 and 5 bits, bit 15 of
    word j's halves holds bit j of the last pair; for 6 bits, spare pair k has its low 4 bits at bit 12 of word
    k's halves and its high 2 bits at bit 12 + 2 * (k % 2) of word 2 * words / 3 + k // 2's."""
    for bits, rows in ((3, 32), (5, 32), (6, 16), (6, 32)):
        first = chunks[chunks[:, 1] == bits | rows << 8, 0].to(torch.int64)
        n_words = rows * bits // 32
        per_half = 16 // bits
        regular = n_words * per_half
        for part in first.split(max(1, (1 << 22) // (rows * q.shape[1]))):  # at most 2^22 codes at a time
            # word j of every chunk, j-major
            index = (part[:, None] + torch.arange(n_words, device=q.device)).T.flatten()
            codes = exl2.unpack_bits(q[index].view(n_words, -1), bits, rows)  # (rows, chunks * N)
            words = torch.zeros(n_words, codes.shape[1], dtype=torch.int64, device=q.device)
            for p in range(regular):
                j, t = divmod(p, per_half)
                words[j] |= codes[2 * p] << bits * t | codes[2 * p + 1] << 16 + bits * t
            if bits < 6:
                for j in range(bits):
                    words[j] |= (codes[30] >> j & 1) << 15 | (codes[31] >> j & 1) << 31
            else:
                spare = 2 * n_words // 3
                for k in range(spare):
                    lo, hi = codes[2 * (regular + k)], codes[2 * (regular + k) + 1]
                    words[k] |= (lo & 15) << 12 | (hi & 15) << 28
                    words[spare + k // 2] |= (lo >> 4) << 12 + 2 * (k % 2) | (hi >> 4) << 28 + 2 * (k % 2)
            q[index] = exl2.as_int32(words).view(-1, q.shape[1])


def supported(in_features: int) -> bool:
    """pair_rows holds 16-bit channel indices."""
    return in_features <= 1 << 16


class QMatmul:
    """x @ W^T for one packed linear: the decode kernel for up to 16 rows of x, dequantize + cuBLAS beyond."""

    def __init__(self, ext, q_weight: torch.Tensor, chunks: torch.Tensor, pair_rows: torch.Tensor,
                 scale_a: torch.Tensor, scale_b: torch.Tensor, out_features: int):
        # One counter per column tile of QM_TILE (64) columns (csrc/qmatmul.cuh); the kernel leaves them at zero.
        counters = torch.zeros(-(-q_weight.shape[1] // 64), dtype=torch.int32, device=q_weight.device)
        self.ext, self.out_features = ext, out_features
        self.tensors = [q_weight.contiguous(), chunks, pair_rows, scale_a.contiguous(), scale_b.contiguous(), counters]

    @classmethod
    def exl2(cls, ext, tensors: dict[str, torch.Tensor], key: str, in_features: int, out_features: int):
        bits, rows, starts = exl2.layout(tensors, key, in_features)
        chunks, pair_rows = tables(bits, rows, starts, torch.argsort(tensors["q_invperm"].to(torch.int64)))
        regroup(tensors["q_weight"], chunks)
        return cls(ext, tensors["q_weight"], chunks, pair_rows, tensors["q_scale"], tensors["q_scale_max"].half(),
                   out_features)

    @classmethod
    def gptq(cls, ext, tensors: dict[str, torch.Tensor], key: str, in_features: int, out_features: int, v2: bool):
        """None when the groups cannot be walked in 16-row chunks (then the caller dequantizes)."""
        codes, zeros, scales, g_idx = gptq.read(tensors, key, in_features, v2)
        perm = torch.argsort(g_idx, stable=True)  # rows sorted by group: EXL2's act order
        rows = torch.bincount(g_idx, minlength=scales.shape[0]).tolist()
        if any(r % 16 for r in rows):
            return None
        starts = [r // 8 for r in torch.tensor([0] + rows).cumsum(0).tolist()]
        chunks, pair_rows = tables([4] * len(rows), rows, starts, perm)
        scale_zero = torch.stack([scales.half(), (zeros + 1024).half()], -1)
        return cls(ext, exl2.pack_bits(codes[perm], 4), chunks, pair_rows, scale_zero,
                   torch.empty(0, dtype=torch.float16, device=codes.device), out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul([self], x)[0]

    def weight(self) -> torch.Tensor:
        """W (out, in) fp16, dequantized by the kernel (for tests)."""
        return self.ext.qm_weight(self.tensors).T[: self.out_features]


def matmul(mats: list[QMatmul], x: torch.Tensor) -> list[torch.Tensor]:
    """x @ W^T for several packed linears of one input, in one kernel launch for fp16 decode."""
    ys = mats[0].ext.qm_matmul(x.reshape(-1, x.shape[-1]).contiguous(), [m.tensors for m in mats])
    return [y.view(*x.shape[:-1], -1)[..., : m.out_features] for m, y in zip(mats, ys)]
