"""Multi-head attention with grouped KV heads on torch SDPA, with the variants the architectures need:
sliding window, logit soft-capping (which SDPA cannot express, so it takes an explicit path), QK norm and
a custom query scale."""

import torch
import torch.nn.functional as F
from torch import nn

from exlcore.cache import KVCache
from exlcore.layers import Linear, RMSNorm
from exlcore.rope import Rotary, apply_rotary


class Attention(nn.Module):
    def __init__(self, key: str, layer: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rotary: Rotary | None, bias: bool = False, out_bias: bool = False, scale: float | None = None,
                 sliding_window: int | None = None, softcap: float | None = None,
                 qk_norm_eps: float | None = None, qk_norm_offset: float = 0.0):
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, num_heads, num_kv_heads, head_dim
        self.rotary, self.window, self.softcap = rotary, sliding_window, softcap
        self.scale = scale if scale is not None else head_dim**-0.5
        self.q = Linear(f"{key}.q_proj", hidden, num_heads * head_dim, bias)
        self.k = Linear(f"{key}.k_proj", hidden, num_kv_heads * head_dim, bias)
        self.v = Linear(f"{key}.v_proj", hidden, num_kv_heads * head_dim, bias)
        self.o = Linear(f"{key}.o_proj", num_heads * head_dim, hidden, out_bias)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(f"{key}.q_norm", head_dim, qk_norm_eps, qk_norm_offset)
            self.k_norm = RMSNorm(f"{key}.k_norm", head_dim, qk_norm_eps, qk_norm_offset)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v(x).view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(self.layer, k, v)
        out = self.attend(q, k, v, start)
        return self.o(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def mask(self, T: int, S: int, start: int, device) -> torch.Tensor | None:
        """Boolean (T, S) mask, True where query i (at position start + i) may see key j."""
        if T == 1 and (self.window is None or S <= self.window):
            return None  # one new token sees everything cached
        i = torch.arange(T, device=device)[:, None] + start
        j = torch.arange(S, device=device)[None]
        allowed = j <= i
        if self.window is not None:
            allowed &= j > i - self.window
        return allowed

    def attend(self, q, k, v, start: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        mask = self.mask(T, S, start, q.device)
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.heads != self.kv_heads)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v
