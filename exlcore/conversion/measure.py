"""The measurement pass: for every quantizable linear and every candidate option, the error quantizing it
would add to its block's output, relative to that output's energy (the residual stream it feeds).

Each linear is quantized under every option at once (GPTQ over one wide matrix, from the unquantized
model's Hessians). The error each option adds to the linear's own output is exact from the Hessian,
tr(dW H dW^T), with no forward pass. How much of a linear's output error reaches the block's output (through
attention, gating, experts, norms) is measured once per linear, by one forward pass with the probe option,
and scales its other options: for the small perturbations of quantization the block responds linearly."""

import torch
from torch import nn

from exlcore.conversion.capture import Group, capture, run
from exlcore.conversion.options import CANDIDATES, PROBE, layout
from exlcore.errors import ExlError
from exlcore.layers import linears
from exlcore.model import Model
from exlcore.quantize import gptq


def measure_block(block: nn.Module, model: Model, states: list[torch.Tensor], groups: list[Group],
                  all_experts: bool, damp: float) -> tuple[dict[str, list[float]], list[torch.Tensor]]:
    """Relative output error per candidate option for each linear of the block, and the block's outputs."""
    cap, ref = capture(block, model, states, groups, all_experts)
    energy = sum(float(y.square().sum()) for y in ref)
    by_key = linears(block)
    errors = {}
    for g in groups:
        h = cap.h.get(g.keys[0])
        if h is None:
            raise ExlError(f"{g.keys[0]}: the block never called this linear on calibration data; its architecture's "
                           "calibration declaration is wrong")
        weights = [by_key[k].weight for k in g.keys]
        quantized = gptq([w for w in weights for _ in CANDIDATES],
                         [layout(o, h.shape[0]) for _ in weights for o in CANDIDATES], h, damp)
        for i, (key, w) in enumerate(zip(g.keys, weights)):
            own, probe = [], None
            for j, lin in enumerate(quantized[i * len(CANDIDATES):(i + 1) * len(CANDIDATES)]):
                dw = lin.dequantize().float() - w
                own.append(float(((dw @ h) * dw).sum()))
                if j == PROBE:
                    probe = w + dw
            by_key[key].weight = probe
            reached = sum(float((a - b).square().sum()) for a, b in zip(run(block, model, states), ref))
            by_key[key].weight = w
            gain = reached / max(own[PROBE], 1e-30)
            errors[key] = [e * gain / energy for e in own]
    return errors, ref
