"""A contiguous key/value cache: one (batch, kv_heads, max_len, head_dim) buffer pair per layer. Each sequence
keeps its own length, so a batch of prompts of different lengths decodes together.

With bits 8 or 4 the rows are stored quantized, as llama.cpp's and ExLlamaV2's quantized caches are: each group of
GROUP elements of a row is rotated by an orthonormal Hadamard matrix (which spreads a channel's outliers over its
group), then rounded to symmetric integer codes of one fp16 scale (absmax / qmax). Codes are stored offset by
qmax + 1, in uint8 rows of head_dim * bits / 8 bytes, two 4-bit codes a byte (the even element in the low nibble);
scales in (batch, kv_heads, max_len, head_dim / GROUP) fp16. quantize and dequantize define the format; the decode
kernel reads it without undoing the rotation (it rotates the query and its result instead: H is its own inverse)."""

import torch

from exlcore.errors import ExlError

BITS = (16, 8, 4)
GROUP = 32
ALIGN = 64  # quantized caches hold a multiple of this many tokens: the decode kernel copies whole tiles of keys


def element_bytes(bits: int) -> float:
    """Bytes a cached element takes: fp16, or its code and its share of the group's fp16 scale."""
    return 2 if bits == 16 else bits / 8 + 2 / GROUP


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Each group of GROUP along the last dimension times the orthonormal Sylvester Hadamard matrix (symmetric, so
    its own inverse), in x's dtype."""
    shape = x.shape
    y = x.reshape(-1, GROUP)
    h = 1
    while h < GROUP:
        y = y.view(-1, GROUP // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(shape) * GROUP**-0.5


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (..., D) -> codes uint8 (..., D * bits / 8) and scales fp16 (..., D / GROUP)."""
    qmax = 2 ** (bits - 1) - 1
    g = hadamard(x.float()).unflatten(-1, (-1, GROUP))
    scales = (g.abs().amax(-1) / qmax).half()
    s = scales.float()[..., None]
    codes = torch.where(s > 0, torch.round(g / torch.where(s > 0, s, 1.0)), 0.0).clamp(-qmax, qmax) + qmax + 1
    codes = codes.to(torch.uint8).flatten(-2)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """What quantize's rows stand for, (..., D) in dtype."""
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    g = (codes.float() - 2 ** (bits - 1)).unflatten(-1, (-1, GROUP)) * scales.float()[..., None]
    return hadamard(g.flatten(-2)).to(dtype)


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, bits: int = 16):
        if bits not in BITS:
            raise ExlError(f"cache bits must be one of {', '.join(map(str, BITS))}, not {bits}")
        if bits < 16 and head_dim % GROUP:
            raise ExlError(f"a quantized ({bits}-bit) KV cache needs a head size that is a multiple of {GROUP}, not "
                           f"{head_dim}; use the 16-bit cache")
        if bits < 16:
            max_len = -(-max_len // ALIGN) * ALIGN
        shape = (batch, kv_heads, max_len, head_dim if bits == 16 else head_dim * bits // 8)
        store = dtype if bits == 16 else torch.uint8
        self.k = [torch.zeros(shape, device=device, dtype=store) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=store) for _ in range(num_layers)]
        scales = (batch, kv_heads, max_len, head_dim // GROUP)
        layers = range(num_layers if bits < 16 else 0)  # no scales at 16 bits
        self.k_scales = [torch.zeros(scales, device=device, dtype=torch.half) for _ in layers]
        self.v_scales = [torch.zeros(scales, device=device, dtype=torch.half) for _ in layers]
        # The decode attention kernel's counters (one per sequence, KV head and slice of 8 query heads, so at
        # most batch * heads), which it leaves at zero; allocated here, once, so CUDA graphs replay the same ones.
        self.counters = torch.zeros(batch * heads, device=device, dtype=torch.int32)
        self.batch, self.max_len, self.bits, self.dtype = batch, max_len, bits, dtype
        self.lengths = [0] * batch  # tokens stored per sequence; the next forward writes each from there

    def check_room(self, tokens: int):
        """Raise unless `tokens` more fit after the longest sequence."""
        if max(self.lengths) + tokens > self.max_len:
            raise ExlError(f"context overflow: {max(self.lengths) + tokens} tokens exceed the cache's "
                           f"{self.max_len}; raise max_seq_len")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Write this step's k/v (B, H, T, D) at each sequence's positions (B, T), a device tensor so a CUDA graph
        can replay the write at a new position; return the first kv_len keys and values."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        for new, store, scales in ((k, self.k, self.k_scales), (v, self.v, self.v_scales)):
            new = new.transpose(1, 2)  # indexed (B, T, H, D): the index dims come first
            if self.bits == 16:
                store[layer][rows, :, positions] = new
            else:
                store[layer][rows, :, positions], scales[layer][rows, :, positions] = quantize(new, self.bits)
        return self.read(layer, kv_len)

    def read(self, layer: int, kv_len: int):
        """The first kv_len keys and values (B, H, kv_len, D) of a layer."""
        if self.bits == 16:
            return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        return tuple(dequantize(store[layer][:, :, :kv_len], scales[layer][:, :, :kv_len], self.bits, self.dtype)
                     for store, scales in ((self.k, self.k_scales), (self.v, self.v_scales)))

    def truncate(self, length: int):
        """Forget every sequence's tokens from `length` on (the buffers are reused)."""
        self.lengths = [min(n, length) for n in self.lengths]
