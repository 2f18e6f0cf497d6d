"""GPTQ into EXL2 groups: beats round-to-nearest on the error that matters (the layer's output on
calibration-like inputs), packs into valid EXL2, and keeps act order."""

import pytest
import torch

from exlcore.formats import exl2
from exlcore import quantize
from exlcore.quantize import gptq, hessian


def correlated_inputs(tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven channel magnitudes, as real activations have
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


def output_error(lin, w, x) -> float:
    """How far the quantized linear's outputs on x are from w's, relative to their size."""
    return float((x @ (lin.dequantize().float().cpu() - w).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("layout", [[(4, 128), (4, 128)], [(8, 32), (6, 32), (4, 64), (3, 64), (2, 64)],
                                    [(3, 128), (2, 128)]])
def test_gptq_beats_rtn_on_output_error(layout):
    k, n = 256, 96
    x = correlated_inputs(2048, k, seed=len(layout))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    h = hessian(x)
    ours = gptq([w], [layout], h)[0]
    rtn = exl2.quantize_rtn(w, layout, perm=ours.perm)  # same act order: the difference is error feedback
    assert output_error(ours, w, x) < 0.9 * output_error(rtn, w, x)  # measured 19-43% lower on these layouts
    assert torch.equal(ours.perm, torch.argsort(h.diagonal(), descending=True))
    packed = ours.pack()
    back = exl2.read(packed, "layer", k)
    assert torch.equal(back.dequantize(), ours.dequantize())


def test_unseen_inputs_and_bad_layout():
    k, n = 64, 32
    x = correlated_inputs(512, k, seed=3)
    x[:, 5] = 0  # a channel calibration never activates
    w = torch.randn(n, k) * 0.05
    lin = gptq([w], [[(4, 64)]], hessian(x))[0]
    assert torch.isfinite(lin.dequantize().float()).all()
    with pytest.raises(exl2.ExlError, match="covers 32 rows, the weight has 64"):
        gptq([w], [[(4, 32)]], hessian(x))


@pytest.mark.parametrize("split", [False, True])
def test_matrices_quantized_together_equal_quantized_alone(split, monkeypatch):
    """Batching matrices (and candidate layouts) as column blocks changes nothing for each of them, nor
    does splitting a batch too wide for memory."""
    if split:
        monkeypatch.setattr(quantize, "MAX_ELEMENTS", 1)
    k = 192
    x = correlated_inputs(1024, k, seed=5)
    h = hessian(x)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(n, k, generator=g) * 0.05 for n in (64, 32, 32)]
    layouts = [exl2.group_layout(k, exl2.parse_option(o)) for o in ("0.25:5b_64g/0.75:4b_32g", "3b_64g", "0.1:8b_32g/0.9:2b_32g")]
    together = gptq(ws, layouts, h)
    for w, layout, lin in zip(ws, layouts, together):
        alone = gptq([w], [layout], h)[0]
        assert torch.equal(lin.codes, alone.codes) and torch.equal(lin.scale_codes, alone.scale_codes)
        assert torch.equal(lin.scale_max, alone.scale_max)
        assert exl2.layout_bits(k, w.shape[0], layout) == sum(t.numel() * t.element_size() * 8
                                                             for t in lin.pack().values())
