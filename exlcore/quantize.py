"""GPTQ for EXL2 (facts: shared/reference/exl2-format.md, sections 1.4-1.6 and 2): input channels in
activation order, groups of mixed bit widths over that order, ExLlamaV2's per-group scale search run on the
error-updated rows as each group starts, and GPTQ's error feedback through the inverse Hessian.

Every matrix that reads the same inputs shares the Hessian, its inverse and the act order, and GPTQ treats
output columns independently, so such matrices (q/k/v, or one matrix under many candidate layouts) are
quantized together as the column blocks of one wide matrix: one pass over the rows serves them all."""

from collections import defaultdict

import torch

from exlcore.errors import ExlError
from exlcore.ext import on
from exlcore.formats.exl2 import Exl2Linear, group_scales, scales

MAX_ELEMENTS = 1 << 28  # columns x rows quantized together (1 GiB of fp32); wider batches are split
ROWS = 32  # rows per step of the row loop; later rows get the step's errors in one matmul (lazy batch update)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X in fp32 from calibration inputs x (..., K)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in fp64; more damping if H is singular."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        try:
            damped = h + damp * 10**attempt * h.diagonal().mean() * eye
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            pass
    raise ExlError("GPTQ: the Hessian is not positive definite even after damping; use more calibration data")


def gptq(weights: list[torch.Tensor], layouts: list[list[tuple[int, int]]], h: torch.Tensor,
         damp: float = 0.01) -> list[Exl2Linear]:
    """Quantize each (N_i, K) weight into the groups of its layout [(bits, rows)], widest first, given the
    Hessian h (K, K) of their common inputs. Returns the unpacked EXL2 linears (pack() gives their tensors),
    on h's device."""
    k = h.shape[0]
    for w, layout in zip(weights, layouts):
        if sum(rows for _, rows in layout) != k or w.shape[1] != k:
            raise ExlError(f"GPTQ: a layout covers {sum(r for _, r in layout)} rows, the weight has {w.shape[1]}, "
                           f"the Hessian {k}")
    if len(weights) > 1 and sum(w.shape[0] for w in weights) * k > MAX_ELEMENTS:
        half = len(weights) // 2
        return gptq(weights[:half], layouts[:half], h, damp) + gptq(weights[half:], layouts[half:], h, damp)
    h = h.double().clone()
    dead = h.diagonal() == 0  # inputs never seen: any weight is as good as another there
    h[dead, dead] = 1
    perm = torch.argsort(h.diagonal(), descending=True)  # activation order: most salient channels first
    u = _inverse_factor(h[perm][:, perm], damp).float().contiguous()
    w = torch.cat([x.T.float() for x in weights], 1)[perm]  # (K, C): all matrices side by side
    w[dead[perm]] = 0
    c = w.shape[1]
    ext = on(w)  # the row loop as one kernel per step (csrc/gptq.cu) instead of ~10 launches per row

    # Which column blocks start a group at which row, batched by the group's shape.
    cols = torch.tensor([0] + [x.shape[0] for x in weights]).cumsum(0).tolist()
    starts = defaultdict(lambda: defaultdict(list))  # row -> (rows, bits) -> [matrix index]
    for i, layout in enumerate(layouts):
        row = 0
        for bits, rows in layout:
            starts[row][rows, bits].append(i)
            row += rows
    bounds = sorted(starts) + [k]

    codes = torch.empty(k, c, dtype=torch.int16, device=w.device)
    scale, half = torch.empty(c, device=w.device), torch.empty(c, device=w.device)
    fitted = [([], []) for _ in weights]  # per matrix: scale codes and scale max of each group
    for b0, b1 in zip(bounds, bounds[1:]):
        for (rows, bits), members in starts[b0].items():
            idx = torch.cat([torch.arange(cols[i], cols[i + 1], device=w.device) for i in members])
            seg = torch.repeat_interleave(torch.arange(len(members), device=w.device),
                                          torch.tensor([cols[i + 1] - cols[i] for i in members], device=w.device))
            sc, smax = group_scales(w[b0:b0 + rows, idx], bits, seg, len(members))
            scale[idx] = scales(sc[None], smax[seg][None])[0].float()
            half[idx] = 1 << (bits - 1)
            for j, i in enumerate(members):
                fitted[i][0].append(sc[seg == j])
                fitted[i][1].append(smax[j])
        for s0 in range(b0, b1, ROWS):
            s1 = min(s0 + ROWS, b1)
            err = torch.empty(s1 - s0, c, device=w.device)
            if ext is not None:
                ext.gptq_rows(w, u, scale, half, codes, err, s0, s1)
            else:
                for r in range(s0, s1):  # each row feeds its error to the rows after it
                    q = torch.clamp((w[r] / scale).round(), -half, half - 1)
                    err[r - s0] = (w[r] - q * scale) / u[r, r]
                    w[r + 1:s1].addr_(u[r, r + 1:s1], err[r - s0], alpha=-1)
                    codes[r] = (q + half).to(torch.int16)
            w[s1:] -= u[s0:s1, s1:].T @ err  # and to every later row at once

    out = []
    for i, layout in enumerate(layouts):
        out.append(Exl2Linear(codes[:, cols[i]:cols[i + 1]].long(), [b for b, _ in layout], [r for _, r in layout],
                              torch.stack(fitted[i][0]), torch.stack(fitted[i][1]), perm))
    return out
