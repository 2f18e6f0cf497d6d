"""CUDA graphs for single-token decode. One graph per KV-length bucket, replayed with the tokens and their
position written into static input buffers: a decode step costs one graph launch instead of hundreds of
kernel launches, which dominate small-batch decode otherwise. Every sequence of the cache's batch takes one
token per step, all at the same position (the Generator's batch of one; a batch of equal-length prompts)."""

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
        position = self.cache.length
        kv_len = min(-(-(position + 1) // BUCKET) * BUCKET, self.cache.max_len)
        self.ids.copy_(tokens.view(-1, 1))
        self.positions.fill_(position)
        self._check_tables()
        if kv_len not in self.graphs:
            self.graphs[kv_len] = self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        self.cache.length = position + 1
        return logits

    def _capture(self, kv_len: int):
        def run():
            return self.model.run(self.ids, Step(self.positions, self.cache, kv_len, None, self.model.dtype),
                                  last_only=True)

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
