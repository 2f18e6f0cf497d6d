"""Rotary position embeddings: default, linear, dynamic NTK, llama3 and yarn frequency schedules."""

import math
from dataclasses import dataclass

import torch

from exlcore.ext import on


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    position_scale: float = 1.0  # positions divided by this on top of the type's own scaling (exl convert -rs)


def inv_frequencies(cfg: RopeConfig, dim: int, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in fp32 and the factor cos/sin are scaled by."""
    base = cfg.theta
    if cfg.type == "dynamic" and cfg.original_max_position and seq_len > cfg.original_max_position:
        # NTK-aware: grow the base once the sequence outruns the trained context.
        ratio = cfg.factor * seq_len / cfg.original_max_position - (cfg.factor - 1)
        base = base * ratio ** (dim / (dim - 2))
    inv, attn = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0
    if cfg.type == "linear":
        inv = inv / cfg.factor
    elif cfg.type == "llama3":
        inv = _llama3(inv, cfg)
    elif cfg.type == "yarn":
        inv, attn = _yarn(inv, cfg, dim)
    return inv / cfg.position_scale, attn


def _llama3(inv: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    orig = cfg.original_max_position
    low_wavelen = orig / cfg.low_freq_factor
    high_wavelen = orig / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (orig / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(inv: torch.Tensor, cfg: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    orig = cfg.original_max_position
    attn = cfg.attention_factor if cfg.attention_factor is not None else 0.1 * math.log(cfg.factor) + 1.0

    def correction(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction(cfg.beta_fast)), 0)
    high = min(math.ceil(correction(cfg.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    return inv / cfg.factor * (1 - extrapolate) + inv * extrapolate, float(attn)


class Rotary:
    """cos/sin tables for one rope schedule. `prepare` sizes them from host-known lengths, so the per-layer
    lookup never syncs with the GPU and replays inside CUDA graphs."""

    def __init__(self, cfg: RopeConfig, dim: int):
        self.cfg, self.dim = cfg, dim
        self.cos = self.sin = None
        self._seq_len = 0  # the sequence length a dynamic table was computed for
        self.version = 0  # bumped whenever the tables are replaced (captured CUDA graphs hold the old ones)

    def prepare(self, seq_len: int, device: torch.device):
        if self.cfg.type == "dynamic":
            # The frequencies themselves depend on the sequence length, as in the reference.
            if seq_len != self._seq_len or self.cos is None or self.cos.device != device:
                self._build(seq_len, seq_len, device)
        elif self.cos is None or self.cos.shape[0] < seq_len or self.cos.device != device:
            self._build(max(seq_len, 4096), 0, device)

    def _build(self, size: int, seq_len: int, device: torch.device):
        inv, scale = inv_frequencies(self.cfg, self.dim, seq_len)
        freqs = torch.arange(size, device=device).float()[:, None] * inv.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin, self._seq_len = emb.cos() * scale, emb.sin() * scale, seq_len
        self.version += 1

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, heads, dim) by positions (B, T); in place through the extension on CUDA."""
        ext = on(x)
        if ext is not None:
            ext.rotary_(x, self.cos, self.sin, positions)
            return x
        cos, sin = self.cos[positions][:, :, None].to(x.dtype), self.sin[positions][:, :, None].to(x.dtype)
        return apply_rotary(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
