"""GPTQ 4-bit linears as AutoGPTQ writes them (facts: shared/reference/exl2-format.md, section 1.9).

    <key>.qweight  int32 (K/8, N)  input row k in bits 4*(k % 8) of word k // 8
    <key>.qzeros   int32 (G, N/8)  zero point - 1 (checkpoint format v1) in nibble n % 8; v2 stores it as is
    <key>.scales   fp16  (G, N)
    <key>.g_idx    int32 (K,)      group of each input row (act order); absent or trivial: row // group size

Dequantized: w[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n].
"""

import torch

from exlcore.errors import ExlError


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """(R, C) int32 -> (R, C, 8) int64 nibbles, nibble i from bits 4i..4i+3."""
    return (words.to(torch.int64)[..., None] >> (4 * torch.arange(8, device=words.device))) & 15


def read(tensors: dict[str, torch.Tensor], key: str, in_features: int, v2: bool):
    """Unpack one linear, checking its tensors against each other: codes (K, N), zero points (G, N) (as used,
    v1's offset applied), scales (G, N) fp16 and each row's group g_idx (K,), all on the tensors' device."""
    for suffix in ("qweight", "qzeros", "scales"):
        if suffix not in tensors:
            raise ExlError(f"GPTQ tensor {key}.{suffix} is missing; the checkpoint is incomplete or damaged")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"].half()
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if k != in_features:
        raise ExlError(f"GPTQ tensor {key}.qweight holds {k} input rows, the layer has {in_features}; "
                       "only 4-bit GPTQ is supported")
    groups = scales.shape[0]
    if tuple(qzeros.shape) != (groups, n // 8) or scales.shape[1] != n:
        raise ExlError(f"GPTQ tensors {key}.qzeros {tuple(qzeros.shape)} / scales {tuple(scales.shape)} "
                       f"do not match qweight {tuple(qweight.shape)}")
    q = _nibbles(qweight).transpose(1, 2).reshape(k, n)
    zeros = _nibbles(qzeros).reshape(groups, n) + (0 if v2 else 1)
    g_idx = tensors.get("g_idx")
    if g_idx is None or not g_idx.any():
        size = 1  # the smallest power of two with size * groups >= k, as ExLlamaV2 infers it
        while size * groups < k:
            size *= 2
        g_idx = torch.arange(k, device=q.device) // size
    g_idx = g_idx.to(torch.int64)
    if g_idx.shape != (k,) or int(g_idx.max()) >= groups or int(g_idx.min()) < 0:
        raise ExlError(f"GPTQ tensor {key}.g_idx does not map {k} rows into {groups} groups")
    return q, zeros, scales, g_idx


def dequantize(tensors: dict[str, torch.Tensor], key: str, in_features: int, v2: bool) -> torch.Tensor:
    """The linear's weight as (N, K) fp16."""
    q, zeros, scales, g_idx = read(tensors, key, in_features, v2)
    return ((q - zeros[g_idx]).half() * scales[g_idx]).T.contiguous()
