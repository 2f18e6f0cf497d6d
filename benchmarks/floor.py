"""The floor under a batch-1 decode step: how long a plain streaming read of each matmul's packed bytes takes on
this GPU, alone and as the step's chain (each layer's q/k/v, o, gate/up and down, then the head) in stream order,
with no arithmetic, no dependencies between kernels, and no attention or norms. Next to benchmarks/kernels.py it
shows what the kernels add to their reads; the chain is about the least a step built of one kernel per matmul takes.

    python benchmarks/floor.py

Each read kernel runs at its best of a few grid sizes and unrolls, calls taking turns over many copies of their
bytes (so nothing is served from L2), replayed from a CUDA graph.
"""

import torch
from torch.utils.cpp_extension import load_inline

from core import COPY_BANDWIDTH
from exl2 import BODY, HEAD, SHAPE, random_exl2
from kernels import graph_time

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

// Reads n 16-byte words from p, U loads in flight per thread, past L1; writes only if the data says so (never).
template <int U>
__global__ void __launch_bounds__(256) stream_read(const int4* __restrict__ p, long n, int* out) {
    int acc = 0;
    for (long i = (long)blockIdx.x * blockDim.x * U + threadIdx.x; i + (U - 1) * blockDim.x < n;
         i += (long)gridDim.x * blockDim.x * U) {
        int4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(p + i + u * blockDim.x));
#pragma unroll
        for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x7fffffff) out[0] = acc;
}

void read_bytes(torch::Tensor buffer, int64_t offset, int64_t bytes, int64_t blocks, int64_t unroll,
                torch::Tensor out) {
    const auto p = reinterpret_cast<const int4*>(static_cast<const char*>(buffer.data_ptr()) + offset);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(blocks));
    if (unroll == 2) stream_read<2><<<grid, 256, 0, stream>>>(p, bytes / 16, out.data_ptr<int>());
    else if (unroll == 4) stream_read<4><<<grid, 256, 0, stream>>>(p, bytes / 16, out.data_ptr<int>());
    else stream_read<8><<<grid, 256, 0, stream>>>(p, bytes / 16, out.data_ptr<int>());
}
"""
ALIGN = 1 << 16


def main():
    ext = load_inline("exlcore_floor", cpp_sources="void read_bytes(torch::Tensor buffer, int64_t offset, int64_t "
                      "bytes, int64_t blocks, int64_t unroll, torch::Tensor out);", cuda_sources=SOURCE,
                      functions=["read_bytes"], extra_cuda_cflags=["-O3"])
    gen = torch.Generator("cuda").manual_seed(0)
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    groups = {"q/k/v": [(q, h), (kv, h), (kv, h)], "o": [(h, q)], "gate/up": [(i, h), (i, h)], "down": [(h, i)],
              "head": [(SHAPE["vocab_size"], h)]}
    sizes = {}
    for name, shapes in groups.items():  # the packed bytes each matmul reads, as benchmarks/kernels.py counts them
        tensors = [random_exl2(n, k, HEAD if name == "head" else BODY, gen) for n, k in shapes]
        sizes[name] = sum(t.numel() * t.element_size() for ts in tensors for t in ts.values()) // ALIGN * ALIGN
        del tensors
    layers = SHAPE["num_hidden_layers"]
    step_bytes = layers * sum(v for k, v in sizes.items() if k != "head") + sizes["head"]
    buffer = torch.empty(step_bytes + ALIGN * (4 * layers + 1), dtype=torch.uint8, device="cuda")
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def reads(name, offsets, blocks, unroll):
        """Seconds per read of `name`'s bytes at each of `offsets` in turn."""
        def calls():
            for o in offsets:
                ext.read_bytes(buffer, o, sizes[name], blocks, unroll, out)

        return graph_time(calls) / len(offsets)

    print("| read | MB | us | TB/s | of 3.0 TB/s |\n|---|---:|---:|---:|---:|")
    best = {}
    for name, size in sizes.items():
        offsets = [k * (size + ALIGN) for k in range(min(20, len(buffer) // (size + ALIGN)))]
        t, blocks, unroll = min((reads(name, offsets, b * sms, u), b * sms, u) for b in (2, 4, 8) for u in (2, 4, 8))
        best[name] = blocks, unroll
        print(f"| {name} alone | {size / 1e6:.1f} | {t * 1e6:.1f} | {size / t / 1e12:.2f} | "
              f"{size / t / COPY_BANDWIDTH:.0%} |", flush=True)
    chain, offset = [], 0
    for name in [*(n for _ in range(layers) for n in ("q/k/v", "o", "gate/up", "down")), "head"]:
        chain.append((offset, sizes[name], *best[name]))
        offset += sizes[name] + ALIGN

    def step():
        for read in chain:
            ext.read_bytes(buffer, *read, out)

    t = graph_time(step)
    print(f"| the step: {layers} layers and the head, in stream order | {step_bytes / 1e6:.0f} | {t * 1e6:.0f} | "
          f"{step_bytes / t / 1e12:.2f} | {step_bytes / t / COPY_BANDWIDTH:.0%} |")


if __name__ == "__main__":
    main()
