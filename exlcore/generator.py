"""Text generation over a Model: prefill, then one token at a time with a KV cache, streaming text; or a batch of
prompts of any lengths, decoded together.

The single prompt's cache is kept between calls and reused up to the longest common prefix of token ids, so a
chat that resends its whole history only prefills the new turn."""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from exlcore import graphs
from exlcore.cache import KVCache
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
    """A (B,) device tensor's values, copied to the host without waiting for work queued after it."""

    def __init__(self, t: torch.Tensor):
        cuda = t.device.type == "cuda"
        self.buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        self.buffer.copy_(t, non_blocking=cuda)
        self.done = torch.cuda.Event() if cuda else None
        if cuda:
            self.done.record()

    def values(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.buffer.tolist()


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


Prompt = str | list[int]


def _is_batch(prompt) -> bool:
    return isinstance(prompt, list) and any(not isinstance(p, int) for p in prompt)


def _stops(tokenizer, stop: list[str | int] | None) -> tuple[list[str], set[int]]:
    """The stop strings, and the stop ids with the model's own end-of-sequence ids."""
    return ([s for s in stop or [] if isinstance(s, str) and s],
            set(tokenizer.stop_ids) | {s for s in stop or [] if isinstance(s, int)})


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to its first stop string, and whether it had one."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class Generator:
    def __init__(self, model: Model, max_seq_len: int | None = None, cache_bits: int = 16):
        """cache_bits: 16, or 8 or 4 for a quantized KV cache (exlcore.cache): 1.9 or 3.6 times the tokens in the
        same memory."""
        if max_seq_len is not None and max_seq_len < 2:
            raise ExlError(f"max_seq_len must be at least 2 tokens, not {max_seq_len}")
        self.model, self.cache_bits = model, cache_bits
        self.max_seq_len = max_seq_len or default_seq_len(model.config)
        self.cache = model.new_cache(1, self.max_seq_len, cache_bits)
        self.cached_ids: list[int] = []
        self.graphs = graphs.DecodeGraphs(model, self.cache) if graphs.supported(model) else None
        self.batch: tuple[KVCache, graphs.DecodeGraphs | None] | None = None  # the last batch's cache and graphs
        self.stats: GenerationStats | list[GenerationStats] = GenerationStats()  # a list for a batch

    def generate(self, prompt: Prompt | list[Prompt], **kwargs) -> str | list[str]:
        """The continuation of `prompt`, or of each prompt of a list (texts and/or lists of token ids), decoded
        together as one batch. Options as `stream` takes them."""
        if _is_batch(prompt):
            return self._generate_batch(prompt, **kwargs)
        return "".join(self.stream(prompt, **kwargs))

    def stream(self, prompt: Prompt, max_new_tokens: int = 256, stop: list[str | int] | None = None,
               add_bos: bool | None = None, **sampling) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece. `stop` holds strings and/or token ids; the
        model's own end-of-sequence ids always stop. The stop string itself is not returned. `sampling`:
        temperature, top_k, top_p, min_p, repetition_penalty, seed (see `tokens`)."""
        if _is_batch(prompt):
            raise ExlError("stream takes one prompt; give a list of prompts to generate")
        tok = self.model.tokenizer
        ids = tok.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else prompt
        stop_strings, stop_ids = _stops(tok, stop)
        generated: list[int] = []
        emitted = 0
        for token in self.tokens(ids, max_new_tokens, stop_ids=stop_ids, **sampling):
            generated.append(token)
            text, stopped = _cut(tok.decode(generated), stop_strings)
            if stopped:
                if len(text) > emitted:
                    yield text[emitted:]
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
        self._check([ids], max_new_tokens)
        stop_ids = set(self.model.tokenizer.stop_ids) if stop_ids is None else stop_ids
        self.stats = stats = GenerationStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        steps = self._steps(logits, torch.tensor([ids], device=self.model.device), self.cache, self.graphs, settings,
                            seed, max_new_tokens)
        try:
            for (value,), fed in steps:
                stats.new_tokens += 1
                if stats.new_tokens == 1:  # prefill time includes the first token's sampling
                    stats.prefill_seconds = time.perf_counter() - t0
                    t0 = time.perf_counter()
                if fed:  # a stop token fed this way stays in the cache, valid
                    self.cached_ids.append(value)
                if value in stop_ids:
                    stats.stop_reason = "eos"
                    return
                yield value
            stats.stop_reason = "max_new_tokens"
        finally:
            stats.decode_seconds = time.perf_counter() - t0

    def _generate_batch(self, prompts: list[Prompt], max_new_tokens: int = 256, stop: list[str | int] | None = None,
                        add_bos: bool | None = None, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None) -> list[str]:
        """Prefill the prompts as one padded batch, then decode them together (through the decode graphs, each
        sequence at its own position) until every one has stopped. Each row gets its own GenerationStats."""
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        tok = self.model.tokenizer
        rows = [tok.encode(p, add_bos=add_bos) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
        self._check(rows, max_new_tokens)
        stop_strings, stop_ids = _stops(tok, stop)
        longest = max(map(len, rows))
        cache, decode = self._batch_cache(len(rows), longest + max_new_tokens)
        cache.truncate(0)
        self.stats = stats = [GenerationStats(prompt_tokens=len(r)) for r in rows]
        t0 = time.perf_counter()
        # Rows are padded with their last token: the padding is left out of the cache and adds no new token to
        # what the repetition penalty sees.
        ids = torch.tensor([r + r[-1:] * (longest - len(r)) for r in rows])
        logits = self.model.forward(ids, cache, last_only=True, lengths=[len(r) for r in rows])
        out: list[list[int]] = [[] for _ in rows]
        steps = self._steps(logits, ids.to(self.model.device), cache, decode, settings, seed, max_new_tokens)
        for n, (values, _) in enumerate(steps):
            if n == 0:  # prefill time includes the first tokens' sampling
                prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
            for row, value, st in zip(out, values, stats):
                if st.stop_reason:
                    continue
                st.new_tokens += 1
                if value in stop_ids:
                    st.stop_reason = "eos"
                    continue
                row.append(value)
                if stop_strings and _cut(tok.decode(row), stop_strings)[1]:
                    st.stop_reason = "stop_string"
            if all(st.stop_reason for st in stats):
                break
        decode_seconds = time.perf_counter() - t0
        for st in stats:
            st.prefill_seconds, st.decode_seconds = prefill, decode_seconds
            st.stop_reason = st.stop_reason or "max_new_tokens"
        return [_cut(tok.decode(row), stop_strings)[0] for row in out]

    def _check(self, rows: list[list[int]], max_new_tokens: int):
        if not rows or not all(rows):
            raise ExlError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise ExlError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        longest = max(map(len, rows))
        if longest + max_new_tokens > self.max_seq_len:
            raise ExlError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed max_seq_len "
                           f"{self.max_seq_len}; shorten the prompt or raise max_seq_len")

    def _steps(self, logits: torch.Tensor, seen: torch.Tensor, cache: KVCache, decode: graphs.DecodeGraphs | None,
               settings: SamplingSettings, seed: int | None, max_new_tokens: int) -> Iterator[tuple[list[int], bool]]:
        """From the prompt's logits (B, 1, vocab), yield each step's tokens, one per sequence of `cache` (decoded
        through `decode` when there are graphs), and whether they were fed to the model already. Each step's
        tokens are fed before they are read, when another step will be wanted, so the GPU runs the next step while
        the host reads, checks and uses these."""
        device = self.model.device
        rng = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        token = sample(logits[:, -1], settings, seen, rng)  # (B,), on the device
        pending = _Readback(token)
        for n in range(1, max_new_tokens + 1):
            fed = n < max_new_tokens
            if fed:
                if settings.repetition_penalty != 1.0:  # the only reader of `seen`
                    seen = torch.cat([seen, token[:, None]], dim=1)
                logits = graphs.decode_step(self.model, cache, decode, token)
                token = sample(logits[:, -1], settings, seen, rng)
                pending, values = _Readback(token), pending.values()
            else:
                values = pending.values()
            yield values, fed

    def _batch_cache(self, batch: int, tokens: int) -> tuple[KVCache, graphs.DecodeGraphs | None]:
        """A cache for `batch` sequences of `tokens` (rounded up to a graph bucket, so later batches reuse it and
        its graphs), and decode graphs over it where the model allows them; the last batch's when it fits."""
        if self.batch is None or self.batch[0].batch != batch or self.batch[0].max_len < tokens:
            self.batch = None  # free the old one first
            cache = self.model.new_cache(batch, min(-(-tokens // graphs.BUCKET) * graphs.BUCKET, self.max_seq_len),
                                         self.cache_bits)
            self.batch = cache, graphs.DecodeGraphs(self.model, cache) if graphs.supported(self.model) else None
        return self.batch

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
        logits = self.model.forward(torch.tensor([ids[common:]]), self.cache, last_only=True)
        self.cached_ids.extend(ids[common:])
        return logits
