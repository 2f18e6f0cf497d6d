"""Multi-head attention with grouped KV heads, with the variants the architectures need: sliding window,
logit soft-capping, QK norm and a custom query scale. Prefill runs on torch SDPA; single-token decode on CUDA
runs the extension's fused kernel (rotary, cache write and attention in one launch); elsewhere decode and
soft-capped layers take an explicit path that needs no repeated KV heads. Both decode paths capture into CUDA
graphs."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from exlcore.cache import KVCache
from exlcore.layers import Linear, RMSNorm, project
from exlcore.ext import on
from exlcore.rope import Rotary


# The decode kernel's rows: 16-byte pieces, and at most 512 bytes, so 32 keys and values fit any GPU's shared memory.
MAX_FUSED_ROW_BYTES = 512


@dataclass
class Step:
    """What every layer needs to know about one forward pass."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens, contiguous (kernels index it flat)
    cache: KVCache | None
    kv_len: int  # keys to attend over: the cached ones and the new ones, or a CUDA graph's fixed bucket
    start: int | None  # every sequence's first new position; None when they differ or only the device knows (graphs)
    dtype: torch.dtype
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None, is_causal_available: bool) -> torch.Tensor | None:
        """Boolean (B, 1, T, kv_len), True where a query may see a key. None when nothing needs masking: one
        query over exactly its past, or a causal prefill from position 0 where the caller has is_causal."""
        T = self.positions.shape[1]
        exact = self.start is not None and self.kv_len == self.start + T
        if window is None and exact and (T == 1 or self.start == 0 and is_causal_available):
            return None
        if window not in self._masks:
            q = self.positions[:, None, :, None]
            j = torch.arange(self.kv_len, device=q.device)
            allowed = j <= q
            if window is not None:
                allowed = allowed & (j > q - window)
            self._masks[window] = allowed
        return self._masks[window]


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

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, [self.q, self.k, self.v])
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        ext, cache = on(q), step.cache
        row = self.head_dim * q.element_size()
        fused = row <= MAX_FUSED_ROW_BYTES and row % 16 == 0
        if cache is not None and cache.bits < 16:  # the kernel reads quantized caches on tensor cores only
            fused = fused and q.dtype in (torch.float16, torch.bfloat16)
        if cache is not None and T == 1 and ext is not None and fused:
            # One kernel for the decode step's attention, with its rotary and cache write, split over the keys.
            tables = (self.rotary.cos, self.rotary.sin) if self.rotary is not None else (None, None)
            scales = (cache.k_scales[self.layer], cache.v_scales[self.layer]) if cache.bits < 16 else ()
            out = ext.decode_attention(q.reshape(B, self.heads, self.head_dim),
                                       k.reshape(B, self.kv_heads, self.head_dim),
                                       v.reshape(B, self.kv_heads, self.head_dim), cache.k[self.layer],
                                       cache.v[self.layer], *tables, step.positions[:, 0], step.kv_len,
                                       self.window or 0, self.scale, self.softcap or 0.0, cache.counters, *scales)
            return self.o(out.view(B, 1, self.heads * self.head_dim))
        q, k, v = self.rotate_and_store(q, k, v, step)
        sdpa = self.softcap is None and T > 1
        mask = step.mask(self.window, is_causal_available=sdpa)
        if sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                 enable_gqa=self.heads != self.kv_heads)
        else:
            out = explicit_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

    def rotate_and_store(self, q, k, v, step: Step):
        """q, k, v (B, T, heads, D) -> (B, heads, T, D) with q and k rotated; with a cache, k and v are written at
        each sequence's positions and the first kv_len cached keys and values come back. On CUDA, one launch when
        there are both rotary and a cache (in place on q)."""
        cache, ext = step.cache, on(q)
        if ext is not None and self.rotary is not None and cache is not None and cache.bits == 16:
            ext.rotary_cache_(q, k, v, self.rotary.cos, self.rotary.sin, step.positions, cache.k[self.layer],
                              cache.v[self.layer])
            return (q.transpose(1, 2), *cache.read(self.layer, step.kv_len))
        if self.rotary is not None:
            q, k = self.rotary.apply(q, step.positions), self.rotary.apply(k, step.positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, step.positions, step.kv_len)
        return q, k, v


def explicit_attention(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] [masked]) v, in fp32, with each KV head serving its group of
    query heads through a reshape rather than a copy."""
    B, H, T, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    group = H // kv_heads
    scores = (q.reshape(B, kv_heads, group * T, D) @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.view(B, kv_heads, group, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores.view(B, kv_heads, group * T, S), dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, T, D)
