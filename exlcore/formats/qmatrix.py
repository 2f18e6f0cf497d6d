"""EXL2 and GPTQ linears kept packed on the GPU and multiplied by the extension (exlcore/csrc/qmatmul.cu).

Both formats store codes as a little-endian bit stream down each column, in groups of rows that share a bit
width and per-column scales. The kernels walk them in chunks of 32 rows (16 at the end of an even-width group
whose length is not a multiple of 32), described by two tables built here:

    chunks     int32 (C, 4)  first q_weight row, bits | rows << 8, group, first pair
    pair_rows  int32 (K/2,)  the input channels (lo | hi << 16) of each pair of rows, chunk after chunk

At load, `arrange` rewrites each chunk's words, in place, into the order the tensor-core decode reads them: each
lane of a warp holds the codes it feeds to mma.m16n8k16 for 4 columns, as pairs of codes 16 bits apart in one
word, so that one mask yields a pair as two fp16. GPTQ's act order is turned into EXL2's: rows sorted by group,
with the permutation in pair_rows.
"""

import torch

from exlcore.formats import exl2, gptq

TILE = 32  # columns of one lane-order tile (QM_TILE in csrc/qmatmul.cuh)
COUNTERS = 9  # the decode kernel's counters per tile (1 + QM_MAX_GROUPS in csrc/qmatmul.cuh)


def balanced(bits: list[int], rows: list[int]) -> list[int]:
    """The groups in an order where every run of chunks holds about the average words: the decode kernel cuts a
    matrix into slices of equal chunk counts, and in EXL2's order (widest first) the widest slice of a 5/4/3-bit mix
    cut 7 ways reads 1.30 times the average (1.09 in this order), of an 8/6/4/3-bit mix 1.73 (1.06). Each step takes,
    of the next group of each width, the one that keeps the words so far closest to the average's line."""
    chunks = [-(-r // 32) for r in rows]
    words = [r * b for r, b in zip(rows, bits)]
    per_chunk = sum(words) / sum(chunks)
    pending: dict[int, list[int]] = {}  # width -> its groups, the next last
    for g in reversed(range(len(bits))):
        pending.setdefault(bits[g], []).append(g)
    order, c, w = [], 0, 0
    while pending:
        _, g = min((abs(w + words[g] - per_chunk * (c + chunks[g])), g) for g in (q[-1] for q in pending.values()))
        pending[bits[g]].pop()
        if not pending[bits[g]]:
            del pending[bits[g]]
        order.append(g)
        c, w = c + chunks[g], w + words[g]
    return order


def tables(bits: list[int], rows: list[int], starts: list[int], perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks and pair_rows for groups of the given bit widths, row counts and first q_weight rows, with
    stored row k being input channel perm[k]; the groups in the order of `balanced`, pairs numbered in it."""
    first_row = torch.tensor([0] + rows).cumsum(0).tolist()  # each group's first stored row
    chunks, first, stored = [], 0, []
    for group in balanced(bits, rows):
        b, r, start = bits[group], rows[group], starts[group]
        chunks += [(start + c0 * b // 32, b | min(32, r - c0) << 8, group, (first + c0) // 2) for c0 in range(0, r, 32)]
        first += r
        stored.append(perm[first_row[group]:first_row[group] + r])
    pairs = torch.cat(stored).to(torch.int64).view(-1, 2)
    return (torch.tensor(chunks, dtype=torch.int32, device=perm.device),
            exl2.as_int32(pairs[:, 0] | pairs[:, 1] << 16))


def lane_order(codes: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, C, N) codes of C chunks -> (rows, C, N) in lane order: column tile * 32 + lane holds the 32 (or 16)
    codes lane 4g + t of a warp decodes, as pairs p = e * 8 + s * 4 + slot * 2 + h (codes 2p, 2p + 1): rows
    (2q, 2q + 1), q = 8e + 4 * slot + t, of column 4g + 2s + h. These are the A fragments of mma.m16n8k16 for k-step
    e of the 16-column subtile s (row g + 8h is column 4g + 2s + h), and x pairs 8e + t, 8e + 4 + t are its B."""
    rows, c = codes.shape[:2]
    tiles = -(-n // TILE)
    v = torch.nn.functional.pad(codes, (0, tiles * TILE - n)).view(rows // 16, 2, 4, 2, c, tiles, 8, 2, 2)
    # dims: e, slot, t, b (row 2q + b) | chunk | tile, g, s, h (column 4g + 2s + h)
    v = v.permute(0, 7, 1, 8, 3, 4, 5, 6, 2)  # -> e, s, slot, h, b | chunk | tile, g, t
    return v.reshape(rows, c, tiles * TILE)[..., :n]


def encode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, M) codes -> (rows * bits / 32, M) words as for_pairs (csrc/qmatmul.cu) reads them: pair p (codes 2p,
    2p + 1) at bit bits * t of word j's low and high 16-bit halves, p = j * (16 // bits) + t; the pairs left over
    go in the bits the halves leave free: for 3 and 5 bits, bit 15 of word j's halves holds bit j of the last
    pair; for 6 bits, spare pair k has its low 4 bits at bit 12 of word k's halves and its high 2 bits at bit
    12 + 2 * (k % 2) of word 2 * words / 3 + k // 2's."""
    rows = codes.shape[0]
    n_words, per_half = rows * bits // 32, 16 // bits
    regular = n_words * per_half  # all pairs for 2, 4 and 8 bits
    words = torch.zeros(n_words, codes.shape[1], dtype=torch.int64, device=codes.device)
    for p in range(regular):
        j, t = divmod(p, per_half)
        words[j] |= codes[2 * p] << bits * t | codes[2 * p + 1] << 16 + bits * t
    if bits in (3, 5):
        for j in range(bits):
            words[j] |= (codes[rows - 2] >> j & 1) << 15 | (codes[rows - 1] >> j & 1) << 31
    elif bits == 6:
        spare = 2 * n_words // 3
        for k in range(spare):
            lo, hi = codes[2 * (regular + k)], codes[2 * (regular + k) + 1]
            words[k] |= (lo & 15) << 12 | (hi & 15) << 28
            words[spare + k // 2] |= (lo >> 4) << 12 + 2 * (k % 2) | (hi >> 4) << 28 + 2 * (k % 2)
    return words


def arrange(q: torch.Tensor, chunks: torch.Tensor):
    """Rewrite, in place, the words of every chunk of q_weight (EXL2's bit stream) in lane order, encoded."""
    n = q.shape[1]
    for bits, rows in {(b & 255, b >> 8) for b in chunks[:, 1].tolist()}:
        first = chunks[chunks[:, 1] == bits | rows << 8, 0].to(torch.int64)
        n_words = rows * bits // 32
        for part in first.split(max(1, (1 << 22) // (rows * n))):  # at most 2^22 codes at a time
            index = (part[:, None] + torch.arange(n_words, device=q.device)).T.flatten()  # word j of each chunk
            codes = exl2.unpack_bits(q[index].view(n_words, -1), bits, rows).view(rows, -1, n)
            words = encode(lane_order(codes, n).reshape(rows, -1), bits)
            q[index] = exl2.as_int32(words).view(-1, n)


def supported(in_features: int) -> bool:
    """pair_rows holds 16-bit channel indices."""
    return in_features <= 1 << 16


class QMatmul:
    """x @ W^T for one packed linear: the decode kernel for up to 16 rows of x, dequantize + cuBLAS beyond."""

    def __init__(self, ext, q_weight: torch.Tensor, chunks: torch.Tensor, pair_rows: torch.Tensor,
                 scale_a: torch.Tensor, scale_b: torch.Tensor, out_features: int):
        # The decode kernel's counters per column tile (csrc/qmatmul.cuh); it leaves them at zero.
        counters = torch.zeros(COUNTERS * -(-q_weight.shape[1] // TILE), dtype=torch.int32, device=q_weight.device)
        self.ext, self.out_features = ext, out_features
        self.tensors = [q_weight.contiguous(), chunks, pair_rows, scale_a.contiguous(), scale_b.contiguous(), counters]

    @classmethod
    def exl2(cls, ext, tensors: dict[str, torch.Tensor], key: str, in_features: int, out_features: int):
        bits, rows, starts = exl2.layout(tensors, key, in_features)
        chunks, pair_rows = tables(bits, rows, starts, torch.argsort(tensors["q_invperm"].to(torch.int64)))
        arrange(tensors["q_weight"], chunks)
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
        q_weight = exl2.pack_bits(codes[perm], 4)
        arrange(q_weight, chunks)
        scale_zero = torch.stack([scales.half(), (zeros + 1024).half()], -1)
        return cls(ext, q_weight, chunks, pair_rows, scale_zero,
                   torch.empty(0, dtype=torch.float16, device=codes.device), out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul([self], x)[0]

    def weight(self) -> torch.Tensor:
        """W (out, in) fp16, dequantized by the kernel (for tests)."""
        return self.ext.qm_weight(self.tensors).T[: self.out_features]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> contiguous (M, K)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def matmul(mats: list[QMatmul], x: torch.Tensor, up: torch.Tensor | None = None, act: int = 0) -> list[torch.Tensor]:
    """x @ W^T for several packed linears of one input, in one kernel launch for fp16 decode. With `up`, the input
    is act(x) * up (act 0 = SiLU, 1 = tanh GELU), which fp16 decode computes as it reads x."""
    ys = mats[0].ext.qm_matmul(_rows(x), [m.tensors for m in mats], None if up is None else _rows(up), act)
    return [y.view(*x.shape[:-1], -1)[..., : m.out_features] for m, y in zip(mats, ys)]
