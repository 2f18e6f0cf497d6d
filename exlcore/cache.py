"""A contiguous key/value cache: one (batch, kv_heads, max_len, head_dim) buffer pair per layer."""

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
        self.length = 0  # tokens already stored; the next forward writes from here

    def check_room(self, tokens: int):
        """Raise unless `tokens` more fit."""
        if self.length + tokens > self.max_len:
            raise ExlError(f"context overflow: {self.length + tokens} tokens exceed the cache's {self.max_len}; "
                           "raise max_seq_len")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Write this step's k/v (B, H, T, D) at cache slots `slots` (T,), a device tensor so a CUDA graph can
        replay the write at a new position; return the first kv_len keys and values."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.read(layer, kv_len)

    def read(self, layer: int, kv_len: int):
        """The first kv_len keys and values (B, H, kv_len, D) of a layer."""
        return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]

    def truncate(self, length: int):
        """Forget everything from `length` on (the buffers are reused)."""
        self.length = min(self.length, length)
