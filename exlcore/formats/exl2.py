"""EXL2: ExLlamaV2's mixed-bitrate linear format (facts: shared/reference/exl2-format.md, section 1).

A linear y = x W^T with W (N, K) is stored transposed and row-permuted (act order: input channels sorted by
falling Hessian diagonal), as contiguous groups of rows each with its own bit width (8, 6, 5, 4, 3 or 2,
never rising), per-(group, column) 4-bit scale codes and a per-group maximum scale:

    <key>.q_weight     int32 (R, N)    each group's codes, an LSB-first bit stream down each column
    <key>.q_groups     int16 (2G,)     (bits, first q_weight row) per group
    <key>.q_scale      int32 (G, N/8)  scale code - 1 in nibble n % 8 of word n // 8
    <key>.q_scale_max  fp16  (G,)
    <key>.q_invperm    int32 (K,)      stored row k is input channel perm[k], perm = argsort(q_invperm)

Dequantized: w = (q - 2^(b-1)) * (code^2 * q_scale_max / 256), computed in fp16 as ExLlamaV2's kernels do.
This module is the format's definition: packing, unpacking and dequantization in plain PyTorch.
"""

import math
from dataclasses import dataclass

import torch

from exlcore.errors import ExlError
from exlcore.ext import on

BITS = (8, 6, 5, 4, 3, 2)
SUFFIXES = ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, N) codes in [0, 2^bits) -> (rows * bits / 32, N) int32: value i of each column at bit offset
    bits * i of a little-endian stream of 32-bit words (values may straddle two words)."""
    rows, n = codes.shape
    if rows * bits % 32:
        raise ExlError(f"EXL2 pack: {rows} rows of {bits} bits do not fill whole 32-bit words")
    offset = torch.arange(rows, device=codes.device) * bits
    word, shift = offset // 32, (offset % 32)[:, None]
    c = codes.to(torch.int64)
    acc = torch.zeros(rows * bits // 32 + 1, n, dtype=torch.int64, device=codes.device)
    acc.index_add_(0, word, (c << shift) & 0xFFFFFFFF)
    acc.index_add_(0, word + 1, c >> (32 - shift))  # the part that spills into the next word (0 if none)
    return as_int32(acc[:-1])


def unpack_bits(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of pack_bits: (rows * bits / 32, N) int32 -> (rows, N) int64 codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=torch.int64, device=w.device)])
    offset = torch.arange(rows, device=w.device) * bits
    word, shift = offset // 32, (offset % 32)[:, None]
    return ((w[word] >> shift) | (w[word + 1] << (32 - shift))) & ((1 << bits) - 1)


def as_int32(x: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of int64 values, reinterpreted as signed int32."""
    return (((x & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


@dataclass
class Exl2Linear:
    """One EXL2 linear, unpacked: codes in stored (permuted) row order and everything needed to rebuild W."""

    codes: torch.Tensor  # (K, N) int64 in [0, 2^bits)
    group_bits: list[int]
    group_rows: list[int]
    scale_codes: torch.Tensor  # (G, N) int64 in [1, 16]
    scale_max: torch.Tensor  # (G,) fp16
    perm: torch.Tensor  # (K,) int64: stored row k is input channel perm[k]

    def pack(self) -> dict[str, torch.Tensor]:
        """The tensors ExLlamaV2 writes for this linear (keys without the '<key>.' prefix)."""
        words, groups, start, first = [], [], 0, 0
        for bits, rows in zip(self.group_bits, self.group_rows):
            words.append(pack_bits(self.codes[first:first + rows], bits))
            groups += [bits, start]
            start += words[-1].shape[0]
            first += rows
        n = self.codes.shape[1]
        nibbles = (self.scale_codes - 1).view(-1, n // 8, 8) << (4 * torch.arange(8, device=self.codes.device))
        return {
            "q_weight": torch.cat(words),
            "q_groups": torch.tensor(groups, dtype=torch.int16),
            "q_scale": as_int32(nibbles.sum(-1)),
            "q_scale_max": self.scale_max.to(torch.float16),
            "q_invperm": torch.argsort(self.perm).to(torch.int32),
        }

    def dequantize(self) -> torch.Tensor:
        """W as (N, K) fp16, in the original input-channel order."""
        rows = torch.tensor(self.group_rows, device=self.codes.device)
        group_of_row = torch.repeat_interleave(torch.arange(len(self.group_rows), device=rows.device), rows)
        half = torch.tensor([1 << (b - 1) for b in self.group_bits], device=rows.device)[group_of_row]
        # fp16 arithmetic in the kernels' order: the scale first, then code * scale.
        w = (self.codes - half[:, None]).half() * scales(self.scale_codes, self.scale_max)[group_of_row]
        return w[torch.argsort(self.perm)].T.contiguous()


def layout(tensors: dict[str, torch.Tensor], key: str, in_features: int) -> tuple[list[int], list[int], list[int]]:
    """Check one linear's tensors (keys as in SUFFIXES) against each other; return per group its bit width,
    its number of rows and its first q_weight row (plus the total, R, at the end)."""
    for suffix in SUFFIXES:
        if suffix not in tensors:
            raise ExlError(f"EXL2 tensor {key}.{suffix} is missing; the checkpoint is incomplete or damaged")
    q_weight, q_groups = tensors["q_weight"], tensors["q_groups"].to(torch.int64)
    n = q_weight.shape[1]
    if q_groups.ndim != 1 or q_groups.numel() % 2 or q_groups.numel() == 0:
        raise ExlError(f"EXL2 tensor {key}.q_groups has shape {tuple(q_groups.shape)}; expected (2 x groups,)")
    bits, starts = q_groups[0::2].tolist(), q_groups[1::2].tolist() + [q_weight.shape[0]]
    g = len(bits)
    rows = []
    for i, b in enumerate(bits):
        if b not in BITS:
            raise ExlError(f"EXL2 tensor {key}.q_groups: group {i} has {b} bits; supported: {', '.join(map(str, BITS))}")
        if i and b > bits[i - 1]:
            raise ExlError(f"EXL2 tensor {key}.q_groups: bit widths must not rise (group {i}: {bits[i - 1]} -> {b})")
        span = starts[i + 1] - starts[i]
        if span <= 0 or span * 32 % b:
            raise ExlError(f"EXL2 tensor {key}.q_groups: group {i} spans {span} q_weight rows, not whole {b}-bit rows")
        rows.append(span * 32 // b)
        if rows[-1] % (16 if b % 2 == 0 else 32):
            raise ExlError(f"EXL2 tensor {key}.q_groups: group {i} has {rows[-1]} rows; EXL2 groups hold a multiple "
                           f"of 32 rows (16 for even bit widths)")
    if sum(rows) != in_features:
        raise ExlError(f"EXL2 tensor {key}.q_groups describes {sum(rows)} input rows; the layer has {in_features}")
    if n % 8:
        raise ExlError(f"EXL2 tensor {key}.q_weight has {n} columns; EXL2 stores a multiple of 8 (32 in practice)")
    expected = {"q_scale": (g, n // 8), "q_scale_max": (g,), "q_invperm": (in_features,)}
    for suffix, shape in expected.items():
        if tuple(tensors[suffix].shape) != shape:
            raise ExlError(f"EXL2 tensor {key}.{suffix} has shape {tuple(tensors[suffix].shape)}, expected {shape}")
    invperm = tensors["q_invperm"].to(torch.int64)
    if not torch.equal(torch.sort(invperm).values, torch.arange(in_features, device=invperm.device)):
        raise ExlError(f"EXL2 tensor {key}.q_invperm is not a permutation of 0..{in_features - 1}")
    return bits, rows, starts


def scale_codes(q_scale: torch.Tensor) -> torch.Tensor:
    """(G, N/8) int32 -> (G, N) scale codes in [1, 16]."""
    nibbles = (q_scale.to(torch.int64)[..., None] >> (4 * torch.arange(8, device=q_scale.device))) & 15
    return nibbles.reshape(q_scale.shape[0], -1) + 1


def scales(codes: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """Per (group, column) fp16 scale, as the kernels compute it: half(code^2) * half(q_scale_max / 256)."""
    return codes.square().half() * (scale_max.half() / 256)[:, None]


def read(tensors: dict[str, torch.Tensor], key: str, in_features: int) -> Exl2Linear:
    """Unpack one linear's tensors (keys as in SUFFIXES), checking that they agree with each other."""
    bits, rows, starts = layout(tensors, key, in_features)
    q_weight = tensors["q_weight"]
    codes = torch.cat([unpack_bits(q_weight[s:e], b, r) for s, e, b, r in zip(starts, starts[1:], bits, rows)])
    perm = torch.argsort(tensors["q_invperm"].to(torch.int64))
    return Exl2Linear(codes, bits, rows, scale_codes(tensors["q_scale"]), tensors["q_scale_max"], perm)


def group_layout(in_features: int, option: list[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """(proportion, bits, group size) per width, widest first -> [(bits, rows)] per group. Each width takes
    ceil(min(K * proportion, rows left) / group size) groups; only the matrix's last group may be short."""
    layout, left = [], in_features
    for proportion, bits, size in option:
        count = math.ceil(min(in_features * proportion, left) / size)
        for _ in range(count):
            rows = min(size, left)
            if rows:
                layout.append((bits, rows))
                left -= rows
    if left:
        layout[-1] = (layout[-1][0], layout[-1][1] + left)
    return layout


def parse_option(text: str) -> list[tuple[float, int, int]]:
    """"0.1:4b_128g/0.9:3b_128g" (or "4b_128g" for one width) -> [(proportion, bits, group size)]."""
    option = []
    for part in text.split("/"):
        prop, _, spec = part.rpartition(":")
        bits, size = spec.rstrip("g").split("b_")
        option.append((float(prop or 1.0), int(bits), int(size)))
    return option


def layout_bits(in_features: int, out_features: int, layout: list[tuple[int, int]]) -> int:
    """Bits a linear of this layout stores: codes, and per group its maximum scale (16), q_groups entry (32)
    and 4-bit column scales, plus the 32-bit permutation. What a bits-per-weight figure counts."""
    groups = len(layout)
    return (sum(rows * bits for bits, rows in layout) * out_features + groups * (48 + 4 * out_features)
            + 32 * in_features)


def group_scales(w: torch.Tensor, bits: int, segment: torch.Tensor | None = None, segments: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ExLlamaV2's scale rule for the rows (rows, C) of one group: per column a 4-bit code on a square-root
    scale of the group maximum, and one factor p per group in [0.7, 1.2], on a grid of step 1/192, chosen to
    minimise the sum of |error|^3.5. The grid is searched coarse to fine (17 points, then the 11 around
    the best) rather than exhaustively: a fifth of the work. Columns may belong to several independent
    groups (`segment` (C,) in [0, segments)), so one call fits every matrix that starts a group of this
    shape at the same row. Returns the scale codes (C,) in [1, 16] and q_scale_max (segments,) fp16."""
    half, top = 1 << (bits - 1), (1 << bits) - 1
    seg = torch.zeros(w.shape[1], dtype=torch.int64, device=w.device) if segment is None else segment
    base = w.abs().amax(0) / (top / 2)
    peak = torch.zeros(segments, device=w.device).scatter_reduce(0, seg, base, "amax").clamp(min=1e-10)
    codes = (16 * (base / peak[seg]).sqrt()).round().clamp(1, 16)
    squares = codes.square().half()
    every = torch.arange(segments, device=w.device)
    ext = on(w)  # one pass over the rows per candidate (csrc/gptq.cu) instead of a chain of big temporaries

    def search(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grid (P, segments) of factors -> the best factor and its q_scale_max per segment."""
        smax = (peak[None] * grid).half()
        s = (squares * (smax / 256)[:, seg]).float()  # (P, C)
        if ext is not None:
            e = ext.scale_errors(w, s, half, top)
        else:
            chunk = max(1, (1 << 24) // w.numel())  # bounded memory for wide batches
            e = torch.cat([((w / s[p0:p0 + chunk, None]).round().clamp(-half, top - half) * s[p0:p0 + chunk, None]
                            - w).abs().pow(3.5).sum(1) for p0 in range(0, len(grid), chunk)])
        err = torch.zeros(grid.shape, device=w.device).index_add_(1, seg, e)
        best = err.argmin(0)  # the first of equal minima
        return grid[best, every], smax[best, every]

    step = 1 / 192
    coarse, _ = search(torch.linspace(0.7, 1.2, 17, device=w.device)[:, None].expand(17, segments))
    fine = (coarse[None] + torch.arange(-5, 6, device=w.device)[:, None] * step).clamp(0.7, 1.2)
    return codes.to(torch.int64), search(fine)[1]


def quantize_rows(w: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 2^bits) for rows (.., N) of one group, rounding to the nearest step of `scale` (N,)."""
    half = 1 << (bits - 1)
    return ((w / scale).round().clamp(-half, half - 1) + half).to(torch.int64)


def quantize_rtn(weight: torch.Tensor, layout: list[tuple[int, int]], perm: torch.Tensor | None = None
                 ) -> Exl2Linear:
    """Round-to-nearest EXL2 quantization of a (N, K) weight, each group scaled by `group_scales`.
    GPTQ (exlcore.quantize) adds error feedback on top."""
    n, k = weight.shape
    perm = torch.arange(k) if perm is None else perm
    rows_t = weight.T.float()[perm]
    codes, scale_codes, scale_max, first = [], [], [], 0
    for bits, rows in layout:
        w = rows_t[first:first + rows]
        first += rows
        c, smax = group_scales(w, bits)
        codes.append(quantize_rows(w, bits, scales(c[None], smax)[0].float()))
        scale_codes.append(c)
        scale_max.append(smax[0])
    return Exl2Linear(torch.cat(codes), [b for b, _ in layout], [r for _, r in layout], torch.stack(scale_codes),
                      torch.stack(scale_max), perm)
