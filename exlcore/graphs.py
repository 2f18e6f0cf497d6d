"""CUDA graphs for single-token decode. One graph per KV-length bucket, replayed with the tokens and their
positions written into static input buffers: a decode step costs one graph launch instead of hundreds of
kernel launches, which dominate small-batch decode otherwise. Every sequence of the cache's batch takes one
token per step, each at its own position (the Generator's batch of one; a batch of prompts of any lengths)."""

import torch

from exlcore.attention import Step
from exlcore.cache import KVCache
from exlcore.errors import ExlError
from exlcore.model import Model

BUCKET = 256  # a graph attends over keys up to its bucket's end (positions beyond are masked or skipped)


def supported(model: Model) -> bool:
    return (model.device.type == "cuda" and all(getattr(m, "graph_safe", True) for m in model.modules())
            and all(r.cfg.type != "dynamic" for r in model.rotaries))


class DecodeGraphs:
    def __init__(self, model: Model, cache: KVCache):
        if not supported(model):
            raise ExlError("this model decodes without CUDA graphs (CPU, MoE or dynamic rope): use model.forward")
        self.model, self.cache = model, cache
        self.ids = torch.zeros((cache.batch, 1), dtype=torch.long, device=model.device)
        self.positions = torch.zeros((cache.batch, 1), dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.tables = None  # the rope table versions the graphs were captured with
        self.held: list[int] | None = None  # the positions self.positions holds, as the host last set them

    def _check_tables(self):
        """Size the rope tables for the whole cache before any capture, and drop the graphs if something
        (a longer eager forward, another Generator) has replaced a table they read."""
        for rotary in self.model.rotaries:
            rotary.prepare(self.cache.max_len, self.model.device)
        tables = [r.version for r in self.model.rotaries]
        if tables != self.tables:
            self.graphs.clear()
            self.tables = tables

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence, a (batch,) device tensor, to the cache and return their (batch, 1, vocab)
        logits, which the next step overwrites. Nothing waits for the GPU: the tokens may still be being sampled."""
        if tokens.numel() != self.cache.batch:
            raise ExlError(f"{tokens.numel()} tokens for a cache of {self.cache.batch} sequences: give one per "
                           "sequence")
        self.cache.check_room(1)
        lengths = self.cache.lengths
        kv_len = min(-(-(max(lengths) + 1) // BUCKET) * BUCKET, self.cache.max_len)
        self.ids.copy_(tokens.view(-1, 1))
        self._set_positions(lengths)
        self._check_tables()
        if kv_len not in self.graphs:
            self.graphs[kv_len] = self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        self.cache.lengths = [n + 1 for n in lengths]
        return logits

    def _set_positions(self, lengths: list[int]):
        """Write each sequence's position without waiting for the GPU: one value for all, or the last step's plus
        one; other positions (a new batch of prompts of different lengths) are copied from the host."""
        if len(set(lengths)) == 1:
            self.positions.fill_(lengths[0])
        elif self.held is not None and lengths == [n + 1 for n in self.held]:
            self.positions.add_(1)
        elif lengths != self.held:
            self.positions.copy_(torch.tensor(lengths).view(-1, 1))
        self.held = list(lengths)

    def _capture(self, kv_len: int):
        def run():
            return self.model.run(self.ids, Step(self.positions, self.cache, kv_len, None, self.model.dtype))

        # Warm up on a side stream first (lazy cuBLAS setup must not happen during capture). The warm-up
        # writes this token's k/v into its cache slot, the same values the replay writes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.pool = graph.pool()
        return graph, logits


def decode_step(model: Model, cache: KVCache, decode: DecodeGraphs | None, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per sequence, a (batch,) device tensor, to `cache` and return their (batch, 1, vocab)
    logits: through `decode`, the decode graphs over that cache, when there are some, else a plain forward."""
    if decode is not None:
        return decode.step(tokens)
    return model.forward(tokens.view(-1, 1), cache, last_only=True)
