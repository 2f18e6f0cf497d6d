"""A contiguous key/value cache: one (batch, kv_heads, max_len, head_dim) buffer pair per layer. Each sequence
keeps its own length, so a batch of prompts of different lengths decodes together."""

import torch

from exlcore.errors import ExlError


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        # The decode attention kernel's counters (one per sequence, KV head and slice of 8 query heads, so at
        # most batch * heads), which it leaves at zero; allocated here, once, so CUDA graphs replay the same ones.
        self.counters = torch.zeros(batch * heads, device=device, dtype=torch.int32)
        self.batch, self.max_len = batch, max_len
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
        self.k[layer][rows, :, positions] = k.transpose(1, 2)  # indexed (B, T, H, D): the index dims come first
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.read(layer, kv_len)

    def read(self, layer: int, kv_len: int):
        """The first kv_len keys and values (B, H, kv_len, D) of a layer."""
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def truncate(self, length: int):
        """Forget every sequence's tokens from `length` on (the buffers are reused)."""
        self.lengths = [min(n, length) for n in self.lengths]
