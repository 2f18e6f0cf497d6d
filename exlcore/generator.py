"""Text generation over a Model: prefill, then one token at a time with a KV cache, streaming text.

The cache is kept between calls and reused up to the longest common prefix of token ids, so a chat that
resends its whole history only prefills the new turn."""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from exlcore import graphs
from exlcore.errors import ExlError
from exlcore.model import Model
from exlcore.sampling import SamplingSettings, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "stop_string", "max_new_tokens"

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class _Readback:
    """A (1,) device tensor's value, copied to the host without waiting for work queued after it."""

    def __init__(self, t: torch.Tensor):
        cuda = t.device.type == "cuda"
        self.buffer = torch.empty(1, dtype=t.dtype, pin_memory=cuda)
        self.buffer.copy_(t, non_blocking=cuda)
        self.done = torch.cuda.Event() if cuda else None
        if cuda:
            self.done.record()

    def value(self) -> int:
        if self.done is not None:
            self.done.synchronize()
        return int(self.buffer[0])


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def default_seq_len(config) -> int:
    """The cache a Generator sizes when not told: the model's context, at most 8192 tokens."""
    return min(config.max_position_embeddings, 8192)


class Generator:
    def __init__(self, model: Model, max_seq_len: int | None = None):
        if max_seq_len is not None and max_seq_len < 2:
            raise ExlError(f"max_seq_len must be at least 2 tokens, not {max_seq_len}")
        self.model = model
        self.max_seq_len = max_seq_len or default_seq_len(model.config)
        self.cache = model.new_cache(1, self.max_seq_len)
        self.cached_ids: list[int] = []
        self.graphs = graphs.DecodeGraphs(model, self.cache) if graphs.supported(model) else None
        self.stats = GenerationStats()

    def generate(self, prompt: str | list[int], **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))

    def stream(self, prompt: str | list[int], max_new_tokens: int = 256, stop: list[str | int] | None = None,
               add_bos: bool | None = None, **sampling) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece. `stop` holds strings and/or token ids; the
        model's own end-of-sequence ids always stop. The stop string itself is not returned. `sampling`:
        temperature, top_k, top_p, min_p, repetition_penalty, seed (see `tokens`)."""
        tok = self.model.tokenizer
        ids = tok.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else prompt
        stop_strings = [s for s in stop or [] if isinstance(s, str) and s]
        stop_ids = set(tok.stop_ids) | {s for s in stop or [] if isinstance(s, int)}
        generated: list[int] = []
        emitted = 0
        for token in self.tokens(ids, max_new_tokens, stop_ids=stop_ids, **sampling):
            generated.append(token)
            text = tok.decode(generated)
            hits = [i for i in (text.find(s, max(emitted - len(s), 0)) for s in stop_strings) if i >= 0]
            if hits:
                if min(hits) > emitted:
                    yield text[emitted:min(hits)]
                self.stats.stop_reason = "stop_string"
                return
            # Hold back an unfinished UTF-8 character and anything that may be the start of a stop string.
            end = len(text) - (1 if text.endswith("\ufffd") else _held_back(text, stop_strings))
            if end > emitted:
                yield text[emitted:end]
                emitted = end
        text = tok.decode(generated)
        if len(text) > emitted:
            yield text[emitted:]

    def tokens(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_ids: set[int] | None = None) -> Iterator[int]:
        """Yield new token ids until a stop id (the model's EOS ids when None) or max_new_tokens.
        temperature 0 (or top_k 1) is greedy; a seed makes sampling repeatable."""
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ExlError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise ExlError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise ExlError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed max_seq_len "
                           f"{self.max_seq_len}; shorten the prompt or raise max_seq_len")
        stop_ids = set(self.model.tokenizer.stop_ids) if stop_ids is None else stop_ids
        device = self.model.device
        rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        self.stats = stats = GenerationStats(prompt_tokens=len(ids))

        t0 = time.perf_counter()
        logits = self._prefill(ids)
        seen = torch.tensor([ids], device=device)
        token = sample(logits[:, -1], settings, seen, rng)  # (1,), on the device
        pending = _Readback(token)
        try:
            while True:
                stats.new_tokens += 1
                # Feed the token before reading it when another will be wanted, so the GPU runs the next step while
                # the host reads, checks and yields this one. A stop token fed this way stays in the cache, valid.
                fed = stats.new_tokens < max_new_tokens
                if fed:
                    if settings.repetition_penalty != 1.0:  # the only reader of `seen`
                        seen = torch.cat([seen, token[:, None]], dim=1)
                    logits = self._feed(token)
                    token = sample(logits[:, -1], settings, seen, rng)
                    pending, value = _Readback(token), pending.value()
                else:
                    value = pending.value()
                if stats.new_tokens == 1:  # prefill time includes the first token's sampling
                    stats.prefill_seconds = time.perf_counter() - t0
                    t0 = time.perf_counter()
                if fed:
                    self.cached_ids.append(value)
                if value in stop_ids:
                    stats.stop_reason = "eos"
                    return
                yield value
                if not fed:
                    stats.stop_reason = "max_new_tokens"
                    return
        finally:
            stats.decode_seconds = time.perf_counter() - t0

    def _feed(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token, a (1,) device tensor, to the cache; its (1, 1, vocab) logits."""
        if self.graphs is not None:
            return self.graphs.step(token)
        return self.model.forward(token.view(1, 1), self.cache, last_only=True)

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        # Reuse the cached prefix; always recompute at least the last prompt token to get its logits.
        common = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            common += 1
        self.cache.truncate(common)
        self.cached_ids = self.cached_ids[:common]
        self.stats.cached_tokens = common
        return self._step(ids[common:])

    def _step(self, ids: list[int]) -> torch.Tensor:
        logits = self.model.forward(torch.tensor([ids]), self.cache, last_only=True)
        self.cached_ids.extend(ids)
        return logits
