"""The quantization pass: GPTQ each block's linears with their chosen options, on the hidden states of the
already-quantized model, so each layer corrects for the error of those before it.

Within a block, the stages (its children that hold linears: attention, then the MLP) go in the order the
block calls them; each stage's Hessians are captured after the stages before it are quantized."""

import torch
from torch import nn

from exlcore.conversion.capture import Group, capture, run
from exlcore.conversion.options import layout
from exlcore.formats import exl2
from exlcore.layers import linears
from exlcore.model import Model
from exlcore.quantize import gptq, hessian


def quantize_block(block: nn.Module, model: Model, states: list[torch.Tensor], groups: list[Group],
                   all_experts: bool, strategy: dict[str, str], damp: float
                   ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The block's EXL2 tensors (by full name) and its outputs with every linear quantized."""
    by_key = linears(block)
    packed = {}
    cap, _ = capture(block, model, states, groups, all_experts, first_stage_only=True)
    stage_of = {g.keys[0]: g.stage for g in groups}
    stages = list(dict.fromkeys(stage_of[k] for k in cap.order))
    for n, stage in enumerate(stages):
        members = [g for g in groups if g.stage == stage]
        if n:
            cap, _ = capture(block, model, states, members, all_experts)
        for g in members:
            h = cap.h[g.keys[0]]
            lins = gptq([by_key[k].weight for k in g.keys], [layout(strategy[k], h.shape[0]) for k in g.keys], h, damp)
            for key, lin in zip(g.keys, lins):
                packed.update({f"{key}.{s}": t for s, t in lin.pack().items()})
                by_key[key].weight = lin.dequantize().float()
    return packed, run(block, model, states)


def set_quantized(block: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device):
    """Give the block's linears the weights a finished layer stored (as quantize_block left them)."""
    for key, m in linears(block).items():
        if f"{key}.q_weight" in tensors:
            t = {s: tensors[f"{key}.{s}"].to(device) for s in exl2.SUFFIXES}
            m.weight = exl2.read(t, key, m.in_features).dequantize().float()


def quantize_head(weight: torch.Tensor, normed: list[torch.Tensor], option: str, damp: float
                  ) -> dict[str, torch.Tensor]:
    """lm_head's EXL2 tensors from the final-norm outputs; outputs padded to a multiple of 32 with zeros
    (the loader drops the padding logits)."""
    h = sum(hessian(x) for x in normed)
    pad = -weight.shape[0] % 32
    weight = torch.cat([weight.float(), weight.new_zeros(pad, weight.shape[1], dtype=torch.float32)])
    lin = gptq([weight], [layout(option, weight.shape[1])], h, damp)[0]
    return {f"lm_head.{s}": t for s, t in lin.pack().items()}
