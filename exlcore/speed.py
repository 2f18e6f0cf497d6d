"""How fast a loaded model runs on its device, as `exl bench` reports it: prefill and decode tokens/s, and peak
memory on CUDA. Token ids are random (speed does not depend on them), and each figure follows a warm-up run,
which also captures the CUDA graphs."""

import time
from dataclasses import dataclass

import torch

from exlcore import graphs
from exlcore.errors import ExlError
from exlcore.model import Model


@dataclass
class Speed:
    prefill_tokens_per_second: float
    decode_steps_per_second: dict[int, float]  # per batch size: tokens/s of each sequence
    peak_bytes: int | None  # CUDA only


def _seconds(model: Model, fn) -> float:
    """Wall time of fn() with the device's queue drained before and after."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _ids(model: Model, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def prefill_rate(model: Model, tokens: int, cache_bits: int = 16) -> float:
    """Tokens/s of one `tokens`-long forward into an empty cache."""
    ids = _ids(model, 1, tokens).to(model.device)
    seconds = [_seconds(model, lambda: model.forward(ids, model.new_cache(1, tokens, cache_bits), last_only=True))
               for _ in range(2)]  # the first warms up
    return tokens / seconds[-1]


@torch.inference_mode()
def decode_rate(model: Model, batch: int, prompt: int, steps: int, cache_bits: int = 16) -> float:
    """Steps/s of single-token decode for `batch` sequences after a `prompt`-token prefill: through the decode
    CUDA graphs where the model allows them (graphs.DecodeGraphs), else plain forwards."""
    cache = model.new_cache(batch, prompt + steps, cache_bits)
    ids = _ids(model, batch, prompt).to(model.device)
    tokens = ids[:, 0]
    graphed = graphs.DecodeGraphs(model, cache) if graphs.supported(model) else None

    def decode():
        for _ in range(steps):
            graphs.decode_step(model, cache, graphed, tokens)

    seconds = []
    for _ in range(2):  # the first warms up and captures the graphs
        cache.truncate(0)
        model.forward(ids, cache, last_only=True)
        seconds.append(_seconds(model, decode))
    return steps / seconds[-1]


def measure(model: Model, prompt: int = 512, steps: int = 128, batches: tuple[int, ...] = (1,),
            cache_bits: int = 16) -> Speed:
    """Prefill of `prompt` tokens, then decode of `steps` tokens per sequence at each batch size, with a KV cache
    of cache_bits."""
    if prompt < 1 or steps < 1 or min(batches, default=0) < 1:
        raise ExlError("the prompt, the new tokens and every batch size must be at least 1")
    if prompt + steps > model.config.max_position_embeddings:
        raise ExlError(f"{prompt} prompt + {steps} new tokens exceed the model's context of "
                       f"{model.config.max_position_embeddings}; ask for fewer")
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    speed = Speed(prefill_rate(model, prompt, cache_bits),
                  {b: decode_rate(model, b, prompt, steps, cache_bits) for b in batches}, None)
    if cuda:
        speed.peak_bytes = torch.cuda.max_memory_allocated(model.device)
    return speed
