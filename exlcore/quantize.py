"""GPTQ for EXL2 (facts: shared/reference/exl2-format.md, sections 1.4-1.6 and 2): input channels in
activation order, groups of mixed bit widths over that order, ExLlamaV2's per-group scale search run on the
error-updated rows as each group starts, and GPTQ's error feedback through the inverse Hessian."""

import torch

from exlcore.errors import ExlError
from exlcore.formats.exl2 import Exl2Linear, group_scales, quantize_rows, scales


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X in fp32 from calibration inputs x (..., K)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x


def gptq(weight: torch.Tensor, h: torch.Tensor, layout: list[tuple[int, int]], damp: float = 0.01,
         block: int = 128) -> Exl2Linear:
    """Quantize a (N, K) weight given the Hessian h (K, K) of its inputs into the groups of `layout`
    [(bits, rows)], widest first. Returns the unpacked EXL2 linear (pack() gives its tensors)."""
    n, k = weight.shape
    if sum(rows for _, rows in layout) != k:
        raise ExlError(f"GPTQ: the group layout covers {sum(r for _, r in layout)} rows, the weight has {k}")
    h = h.double().clone()
    dead = h.diagonal() == 0  # inputs never seen: any weight is as good as another there
    h[dead, dead] = 1
    perm = torch.argsort(h.diagonal(), descending=True)  # activation order: most salient channels first
    w = weight.T.double()[perm].clone()
    w[dead[perm]] = 0
    h = h[perm][:, perm]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise ExlError("GPTQ: the Hessian is not positive definite even after damping; use more calibration "
                       "data or a larger damping") from None

    starts = torch.tensor([0] + [r for _, r in layout]).cumsum(0).tolist()
    group_of_row = [g for g, (_, rows) in enumerate(layout) for _ in range(rows)]
    codes = torch.empty(k, n, dtype=torch.int64, device=w.device)
    scale_codes, scale_max, scale = [], [], None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = torch.zeros(b1 - b0, n, dtype=w.dtype, device=w.device)
        for i in range(b0, b1):
            g = group_of_row[i]
            bits = layout[g][0]
            if i == starts[g]:  # a group begins: its scales come from its rows as updated so far
                c, smax = group_scales(w[i:starts[g + 1]].float(), bits)
                scale_codes.append(c)
                scale_max.append(smax)
                scale = scales(c[None], smax[None])[0].double()
            codes[i] = quantize_rows(w[i], bits, scale)
            e = (w[i] - (codes[i] - (1 << (bits - 1))) * scale) / inv[i, i]
            w[i + 1:b1] -= inv[i, i + 1:b1, None] * e  # feed the error forward within the block
            err[i - b0] = e
        w[b1:] -= inv[b0:b1, b1:].T @ err  # and to every later row at once
    return Exl2Linear(codes.cpu(), [b for b, _ in layout], [r for _, r in layout], torch.stack(scale_codes).cpu(),
                      torch.stack(scale_max).cpu(), perm.cpu())
