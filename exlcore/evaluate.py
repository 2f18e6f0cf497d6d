"""Perplexity over non-overlapping token windows."""

import math

import torch

from exlcore.errors import ExlError
from exlcore.model import Model


def windows(ids: list[int], length: int, count: int | None = None) -> torch.Tensor:
    """The first `count` non-overlapping windows of `length` tokens, (count, length)."""
    n = len(ids) // length
    if count is not None:
        n = min(n, count)
    if n == 0:
        raise ExlError(f"the text has {len(ids)} tokens, fewer than one window of {length}; use more text or shorter windows")
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.inference_mode()
def perplexity(model: Model, rows: torch.Tensor, batch: int = 1) -> float:
    """exp(mean negative log-likelihood) of each next token within each row."""
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        chunk = rows[i:i + batch].to(model.device)
        logits = model.forward(chunk)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
