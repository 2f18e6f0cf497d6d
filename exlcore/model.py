"""The decoder: an embedding, a stack of blocks, a final norm and a head, plus loading."""

import torch
from torch import nn

from exlcore.attention import Attention, Step
from exlcore.cache import KVCache
from exlcore.config import ModelConfig
from exlcore.errors import ExlError
from exlcore.layers import Embedding, Head, RMSNorm
from exlcore.weights import Weights


def load_module(module: nn.Module, w: Weights, dtype: torch.dtype):
    """Every component under `module` that defines `load` reads its own tensors and those of its children."""
    for child in module.children():
        if hasattr(child, "load"):
            child.load(w, dtype)
        else:
            load_module(child, w, dtype)


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)), then x += mlp(norm(x)). The optional post-norms make Gemma 2/3's
    sandwich form. A block takes and returns the hidden state as a residual x and a pending h (None for none),
    the state being x + h: each residual add is left to the norm after it, whose add_forward does it in the same
    launch. Architectures with another block shape supply their own module with the same forward (one that
    returns (x, None) hands over a finished state)."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: nn.Module,
                 post_attn_norm: nn.Module | None = None, post_mlp_norm: nn.Module | None = None):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.post_attn_norm, self.post_mlp_norm = post_attn_norm, post_mlp_norm

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        # Each add makes a new x: the caller's (conversion reruns its states) stays intact.
        x, n = self.attn_norm.add_forward(x, h) if h is not None else (x, self.attn_norm(x))
        h = self.attn(n.to(step.dtype), step)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x, h = self.mlp_norm.add_forward(x, h)
        h = self.mlp(h)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x, h


def settled(x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """A block's (x, h) as one hidden state."""
    return x if h is None else x + h.to(x.dtype)


class Model(nn.Module):
    def __init__(self, config: ModelConfig, embed: Embedding, layers: list[nn.Module], norm: RMSNorm, head: Head,
                 residual_fp32_with_fp16: bool = False):
        super().__init__()
        self.config, self.embed, self.layers, self.norm, self.head = config, embed, nn.ModuleList(layers), norm, head
        # Gemma overflows fp16 activations; its residual stream then runs in fp32.
        self.residual_fp32_with_fp16 = residual_fp32_with_fp16
        self.rotaries = list({id(m.rotary): m.rotary for m in self.modules()
                              if isinstance(m, Attention) and m.rotary is not None}.values())
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.tokenizer = None

    def load(self, w: Weights, dtype: torch.dtype):
        self.dtype, self.device = dtype, w.device
        load_module(self, w, dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                lengths: list[int] | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) float32 logits (B, 1, vocab with last_only). With a cache, each
        sequence continues from its own length and its tokens are appended to it. `lengths` gives each row's real
        tokens, its first lengths[b] ids: the rest is padding, left out of the cache's lengths (the next tokens
        overwrite it), and last_only then returns each row's last real token."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        if lengths is not None and (len(lengths) != B or not all(1 <= n <= T for n in lengths)):
            raise ExlError(f"lengths {lengths} do not fit {B} rows of {T} tokens: give each row's count, 1 to {T}")
        starts = cache.lengths if cache is not None else [0] * B
        if cache is not None:
            cache.check_room(T)
        if len(set(starts)) == 1:
            start = starts[0]
            positions = torch.arange(start, start + T, device=self.device).repeat(B, 1)  # contiguous, for kernels
        else:
            start = None
            positions = (torch.tensor(starts)[:, None] + torch.arange(T)).to(self.device, non_blocking=True)
        last = None
        if last_only and lengths is not None and len(set(lengths)) > 1:
            last = (torch.tensor(lengths) - 1).to(self.device, non_blocking=True)  # each row's own last token
        elif last_only:
            last = (lengths or [T])[0] - 1
        logits = self.run(input_ids, Step(positions, cache, max(starts) + T, start, self.dtype), last)
        if cache is not None:
            cache.lengths = [n + added for n, added in zip(starts, lengths or [T] * B)]
        return logits

    def run(self, input_ids: torch.Tensor, step: Step, last: torch.Tensor | int | None = None) -> torch.Tensor:
        """The forward pass proper: logits at every position, or only at position `last`, one for every row or
        each row's (B,). Performs no host synchronisation, so CUDA graphs can capture it."""
        for rotary in self.rotaries:
            rotary.prepare(step.kv_len, self.device)
        residual = torch.float32 if self.residual_fp32_with_fp16 and self.dtype == torch.float16 else self.dtype
        x, h = self.embed(input_ids).to(residual), None
        for layer in self.layers:
            x, h = layer(x, h, step)
        if isinstance(last, int):
            x, h = x[:, last:last + 1], None if h is None else h[:, last:last + 1]
        elif last is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            x, h = x[rows, last][:, None], None if h is None else h[rows, last][:, None]
        normed = self.norm(x) if h is None else self.norm.add_forward(x, h)[1]
        return self.head(normed.to(self.dtype))

    def new_cache(self, batch: int = 1, max_len: int | None = None, bits: int = 16) -> KVCache:
        """A cache for `batch` sequences of up to max_len tokens (default: the model's context), its rows stored in
        `bits` (16, or quantized to 8 or 4: exlcore.cache)."""
        c = self.config
        max_len = max_len or c.max_position_embeddings
        return KVCache(len(self.layers), batch, max_len, c.num_heads, c.num_kv_heads, c.head_dim, self.device,
                       self.dtype, bits)
