"""EXL2 matrices kept packed on the GPU and multiplied by the extension's kernels (exlcore/csrc/exl2.cu)."""

import torch

from exlcore.formats import exl2


class Exl2Matmul:
    """x @ W^T for one EXL2 linear: the decode kernel for up to 16 rows of x, dequantize + cuBLAS beyond."""

    def __init__(self, ext, tensors: dict[str, torch.Tensor], key: str, in_features: int, out_features: int):
        bits, rows, starts = exl2.layout(tensors, key, in_features)
        device = tensors["q_weight"].device
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        self.ext, self.out_features = ext, out_features
        self.args = (
            tensors["q_weight"].contiguous(),
            exl2.scales(exl2.scale_codes(tensors["q_scale"]), tensors["q_scale_max"]).contiguous(),
            torch.argsort(tensors["q_invperm"].to(torch.int64)).to(torch.int32),
            as_int32([0, *torch.tensor(rows).cumsum(0).tolist()]),
            as_int32(starts[:-1]),
            as_int32(bits),
            max(rows),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            # The kernels take fp16 activations; bf16 models (Gemma) would overflow there, so they multiply
            # by a dequantized copy in their own dtype instead (correct, not fast).
            return x @ self.ext.exl2_weight(*self.args)[:, : self.out_features].to(x.dtype)
        y = self.ext.exl2_matmul(x.reshape(-1, x.shape[-1]).contiguous(), *self.args)
        return y.to(x.dtype).view(*x.shape[:-1], -1)[..., : self.out_features]

    def weight(self) -> torch.Tensor:
        """W (out, in) fp16, dequantized by the kernel (for tests and the prefill path's meaning)."""
        return self.ext.exl2_weight(*self.args).T[: self.out_features]
