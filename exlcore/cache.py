"""A contiguous key/value cache: one (batch, kv_heads, max_len, head_dim) buffer pair per layer."""

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored; the next forward writes from here

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k/v (B, H, T, D) after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int):
        """Forget everything from `length` on (the buffers are reused)."""
        self.length = min(self.length, length)
