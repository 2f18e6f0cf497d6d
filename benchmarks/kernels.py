"""Time of each decode kernel on its own, for the Llama-3-8B shapes of benchmarks/exl2.py: where a decode step's
time goes, and how close each quantized matmul comes to the bandwidth bound.

    python benchmarks/kernels.py

Each kernel is captured 50 times into a CUDA graph and the graph replayed, so launch gaps are as in decode. Decode
attention runs for these heads and for Gemma 2's (16 heads of 256 over 8 KV heads).
GB/s counts the packed tensors each matmul reads (codes, scales, tables) and the visible keys and values
attention reads; the bound is the 3.0 TB/s copy bandwidth.
"""

import torch

from core import COPY_BANDWIDTH
from exl2 import BODY, HEAD, SHAPE, random_exl2

from exlcore.cache import element_bytes, quantize
from exlcore.ext import extension
from exlcore.formats.qmatrix import QMatmul, matmul
from exlcore.rope import RopeConfig, Rotary

REPEATS = 50


def matmul_groups() -> dict[str, list[tuple[int, int]]]:
    """The decode step's matmul launches for SHAPE, as (N, K) of the matrices each one multiplies."""
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    return {"q/k/v": [(q, h), (kv, h), (kv, h)], "o": [(h, q)], "gate/up": [(i, h), (i, h)], "down": [(h, i)],
            "head": [(SHAPE["vocab_size"], h)]}


def graph_time(fn) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of REPEATS calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * REPEATS)


def main():
    ext = extension()
    gen = torch.Generator("cuda").manual_seed(0)
    h, d = SHAPE["hidden_size"], SHAPE["head_dim"]

    def packed(n, k, option):
        t = random_exl2(n, k, option, gen)
        return QMatmul.exl2(ext, t, "bench", k, n), sum(v.numel() * v.element_size() for v in t.values())

    print("| kernel | M | us | GB/s | of 3.0 TB/s |\n|---|---:|---:|---:|---:|")
    for name, shapes in matmul_groups().items():
        mats = [packed(n, k, HEAD if name == "head" else BODY) for n, k in shapes]
        size = sum(b for _, b in mats)
        for m in (1, 4, 16):
            x = torch.randn(m, shapes[0][1], device="cuda", generator=gen).half()
            t = graph_time(lambda: matmul([mm for mm, _ in mats], x))
            print(f"| {name} | {m} | {t * 1e6:.1f} | {size / t / 1e9:.0f} | {size / t / COPY_BANDWIDTH:.0%} |", flush=True)
    # Attention of this shape's heads, and of Gemma 2's (16 heads of 256 over 8 KV heads); this shape's over 8-
    # and 4-bit caches too.
    counters = torch.zeros(32, dtype=torch.int32, device="cuda")
    heads_of = [(SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"], d, bits,
                 f", {bits}-bit cache" if bits < 16 else "") for bits in (16, 8, 4)]
    heads_of.append((16, 8, 256, 16, ", heads of 256"))
    for heads, kv_heads, dim, bits, label in heads_of:
        for kv_len, position in ((256, 200), (2048, 2000), (8192, 8000)):
            qh = torch.randn(1, heads, dim, device="cuda").half()
            kv_new = torch.randn(2, 1, kv_heads, dim, device="cuda").half()
            rows = torch.randn(2, 1, kv_heads, kv_len, dim, device="cuda").half()
            if bits == 16:
                caches, scales = (rows[0], rows[1]), ()
            else:
                codes, s = quantize(rows, bits)
                caches, scales = (codes[0], codes[1]), (s[0], s[1])
            rotary = Rotary(RopeConfig(theta=500000.0), dim)
            rotary.prepare(kv_len, torch.device("cuda"))
            pos = torch.tensor([position], device="cuda")
            t = graph_time(lambda: ext.decode_attention(qh, kv_new[0], kv_new[1], *caches, rotary.cos, rotary.sin, pos,
                                                        kv_len, 0, dim**-0.5, 0.0, counters, *scales))
            size = 2 * kv_heads * (position + 1) * dim * element_bytes(bits)  # the visible keys and values
            print(f"| decode attention, {position + 1} keys{label} | 1 | {t * 1e6:.1f} | {size / t / 1e9:.0f} | "
                  f"{size / t / COPY_BANDWIDTH:.0%} |")
    x = torch.randn(1, 1, h, device="cuda").half()
    w = torch.ones(h, device="cuda")
    print(f"| rms_norm | 1 | {graph_time(lambda: ext.rms_norm(x, w, 1e-5)) * 1e6:.1f} | | |")


if __name__ == "__main__":
    main()
