"""Token sampling: repetition penalty, temperature, top-k, top-p and min-p, then a draw (or argmax)."""

from dataclasses import dataclass

import torch

from exlcore.errors import ExlError
from exlcore.ext import on


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)")]
        for ok, message in checks:
            if not ok:
                raise ExlError(f"sampling: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style, as transformers does: divide positive logits of seen tokens by the penalty, multiply
    negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filter_logits(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """(B, V) float32 logits -> temperature-scaled logits with filtered-out tokens at -inf."""
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p (> 0): the first always stays.
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= s.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, s: SamplingSettings, seen: torch.Tensor, generator: torch.Generator | None):
    """(B, V) logits -> (B,) token ids."""
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.greedy:
        ext = on(logits)  # torch's argmax over a 128K vocabulary takes 27 us of a 2.8 ms step on an H100
        return ext.argmax(logits.contiguous()) if ext is not None else logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, s), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
