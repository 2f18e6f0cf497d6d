"""Perplexity, and KL divergence against a reference model, over non-overlapping token windows."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from exlcore.errors import ExlError
from exlcore.model import Model

EVALUATION_TEXT = Path(__file__).parent / "data" / "wiki_eval.utf8"


def windows(ids: list[int], length: int, count: int | None = None) -> torch.Tensor:
    """The first `count` non-overlapping windows of `length` tokens, (count, length)."""
    n = len(ids) // length
    if count is not None:
        n = min(n, count)
    if n == 0:
        raise ExlError(f"the text has {len(ids)} tokens, fewer than one window of {length}; use more text or shorter windows")
    return torch.tensor(ids[: n * length]).view(n, length)


@dataclass
class Evaluation:
    perplexity: float
    kl_divergence: float | None  # mean over predicted positions of KL(p_reference || p_model)
    tokens: int  # predicted positions


@torch.inference_mode()
def evaluate(model: Model, rows: torch.Tensor, reference: Model | None = None, batch: int = 1,
             cache_bits: int = 16) -> Evaluation:
    """Score every next token within each row; with a reference, also the KL divergence from it. cache_bits 8 or 4:
    the model's attention reads its keys and values back from a quantized KV cache, as decoding does."""
    nll, kl, count = 0.0, 0.0, 0
    for i in range(0, rows.shape[0], batch):
        chunk = rows[i:i + batch].to(model.device)
        cache = model.new_cache(chunk.shape[0], chunk.shape[1], cache_bits) if cache_bits < 16 else None
        logp = torch.log_softmax(model.forward(chunk, cache)[:, :-1], dim=-1)
        targets = chunk[:, 1:]
        nll -= float(logp.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        if reference is not None:
            ref = torch.log_softmax(reference.forward(chunk.to(reference.device))[:, :-1], dim=-1).to(logp.device)
            if ref.shape != logp.shape:
                raise ExlError(f"the reference model's vocabulary ({ref.shape[-1]}) differs from the model's "
                               f"({logp.shape[-1]}); compare models of the same tokenizer")
            kl += float((ref.exp() * (ref - logp)).sum())
    return Evaluation(math.exp(nll / count), kl / count if reference is not None else None, count)


def perplexity(model: Model, rows: torch.Tensor, batch: int = 1) -> float:
    return evaluate(model, rows, batch=batch).perplexity
