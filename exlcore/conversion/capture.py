"""Calibration rows through one decoder block at a time, and the Hessians GPTQ needs, captured by hooks.

Which linears share an input, and whether every MoE expert must see every token, comes from the
architecture's Calibration declaration; which linears a block has, and in what order it calls them, comes
from the block itself. So any block shape an architecture builds can be converted."""

from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from exlcore.attention import Step
from exlcore.layers import Linear, SparseMoE, linears
from exlcore.model import Model, settled
from exlcore.spec import Calibration

ROW_TOKENS = 16384  # tokens per forward call: large enough to keep the GPU busy, small enough for attention


def chunks(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Calibration rows (rows, length) -> row batches of about ROW_TOKENS tokens."""
    per = max(1, ROW_TOKENS // length)
    return list(ids.split(per))


def run(block: nn.Module, model: Model, states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every batch of hidden states through one block, in fp32 and without a cache."""
    out = []
    for x in states:
        B, T, _ = x.shape
        for rotary in model.rotaries:
            rotary.prepare(T, x.device)
        positions = torch.arange(T, device=x.device).repeat(B, 1)
        out.append(settled(*block(x, None, Step(positions, None, T, 0, x.dtype))))
    return out


@dataclass
class Group:
    """Linears that read the same input, so one Hessian (captured from the first) serves them all."""

    keys: list[str]
    stage: str  # the block's child that holds them: groups of one stage are captured by one forward pass


def quantizable(block: nn.Module, calibration: Calibration) -> dict[str, Linear]:
    return {k: m for k, m in linears(block).items() if not any(frag in k for frag in calibration.keep_unquantized)}


def groups(block: nn.Module, calibration: Calibration) -> list[Group]:
    """The block's quantizable linears grouped by shared input, in declaration order (see `order`)."""
    keys_in = quantizable(block, calibration)
    stage_of = {k: name for name, child in block.named_children() for k in linears(child)}
    out, taken = [], set()
    for patterns in calibration.shared_inputs:
        keys = [k for k in keys_in if k not in taken and any(fnmatch(k, f"*.{p}") for p in patterns)]
        if keys:
            out.append(Group(keys, stage_of[keys[0]]))
            taken.update(keys)
    out += [Group([k], stage_of[k]) for k in keys_in if k not in taken]
    return out


class Capture:
    """While active, sums X^T X of each group's input over every token the block runs (fp32). With
    `all_experts`, each MoE layer also runs every expert on all of its tokens, unweighted, so no expert
    is quantized without data; the routed pass itself is then not captured again. With `first_stage_only`,
    only the groups of the first stage the block calls are summed (the later stages' inputs change once it
    is quantized), though `order` still lists every group called."""

    def __init__(self, block: nn.Module, groups: list[Group], all_experts: bool, first_stage_only: bool = False):
        self.block, self.groups, self.all_experts = block, groups, all_experts
        self.h: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # group leaders in the order the block first calls them
        self._stage_of = {g.keys[0]: g.stage for g in groups}
        self._first_stage_only, self._stage = first_stage_only, None
        self._paused = False
        self._handles = []

    def _summed(self, stage: str) -> bool:
        """Whether this pass sums the Hessians of `stage` (with first_stage_only, the first stage asked about)."""
        if self._first_stage_only and self._stage is None:
            self._stage = stage
        return not self._first_stage_only or stage == self._stage

    def __enter__(self):
        by_key = linears(self.block)
        for g in self.groups:
            self._handles.append(by_key[g.keys[0]].register_forward_pre_hook(self._hook(g.keys[0])))
        if self.all_experts:
            for stage, child in self.block.named_children():
                for m in child.modules():
                    if isinstance(m, SparseMoE):
                        self._handles.append(m.register_forward_pre_hook(self._every_expert(stage)))
                        self._handles.append(m.register_forward_hook(self._resume))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _hook(self, key: str):
        def hook(module, args):
            if self._paused:
                return
            if key not in self.order:
                self.order.append(key)
            if not self._summed(self._stage_of[key]):
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if key not in self.h:
                self.h[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.h[key].addmm_(x.T, x)
        return hook

    def _every_expert(self, stage: str):
        def hook(moe: SparseMoE, args):
            if not self._summed(stage):
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            for expert in moe.experts:
                expert(x)
            self._paused = True
        return hook

    def _resume(self, moe, args, output):
        self._paused = False


def capture(block: nn.Module, model: Model, states: list[torch.Tensor], groups: list[Group], all_experts: bool,
            first_stage_only: bool = False) -> tuple[Capture, list[torch.Tensor]]:
    """One forward pass of the block with the groups' Hessians captured; returns them and the outputs."""
    with Capture(block, groups, all_experts, first_stage_only) as cap:
        out = run(block, model, states)
    return cap, out
