"""Can the batch-1 matmul's arithmetic keep up with a weight stream fed by the copy engine? A prototype of the
persistent design benchmarks/persist.py bounds, for one matrix: one block per SM, a producer warp filling a ring of
STAGES 8 KB slots with cp.async.bulk, CONSUMERS warps dequantizing and multiplying on tensor cores as the decode
kernel does (exlcore/csrc/qmatmul.cu's for_pairs, centred and mma, 4-bit codes), each slot handed back through an
mbarrier. The weights are laid out so that a slot (8 rows of 256 columns) is contiguous, and each SM takes an equal
run of slots; the split sums are atomic adds. Timing only: codes are random, the output is not checked.

    python benchmarks/stream_gemv.py

Beside it, the same bytes read by benchmarks/fetch.py's geometry and the decode kernel's own time (benchmarks/kernels.py).
"""

from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from core import COPY_BANDWIDTH
from kernels import graph_time

HERE = Path(__file__).resolve().parent
SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

#include "bulk.cuh"
#include "qmatmul.cu"  // the decode kernel's helpers: for_pairs, centred, mma

constexpr int SLOT_ROWS = 8, COLS = 256, SLOT_WORDS = SLOT_ROWS * COLS;

// ROWS: the weights as stored now, rows of N words, a slot fetched as 8 copies of its rows' 1 KB pieces; else
// slots stored contiguously, one 8 KB copy each.
template <int STAGES, int CONSUMERS, bool ROWS>
__global__ void __launch_bounds__((CONSUMERS + 1) * 32, 1) stream_gemv(const uint32_t* __restrict__ w, int R, int N,
                                                                        const half* __restrict__ x, float* out,
                                                                        int slots) {
    extern __shared__ __align__(128) uint32_t smem[];
    __shared__ __align__(8) unsigned long long bars[2 * STAGES];  // full, then empty
    constexpr int TILES = COLS / 32 / CONSUMERS;  // column tiles per consumer warp
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
    const int first = (long)blockIdx.x * slots / gridDim.x, last = (long)(blockIdx.x + 1) * slots / gridDim.x;
    const int per_column = R / SLOT_ROWS;
    const unsigned ring = shared_address(smem), full = shared_address(bars), empty = full + 8 * STAGES;
    half2* xs = reinterpret_cast<half2*>(smem + STAGES * SLOT_WORDS);
    if (threadIdx.x == 0)
        for (int s = 0; s < STAGES; s++) {
            barrier_init(full + 8 * s, 1);
            barrier_init(empty + 8 * s, CONSUMERS);
        }
    __syncthreads();
    if (warp == CONSUMERS) {  // the producer: starts streaming at once, as x does not gate the weights
        if (lane == 0)
            for (int k = 0; first + k < last; k++) {
                const int s = k % STAGES;
                if (k >= STAGES) barrier_wait(empty + 8 * s, (k / STAGES - 1) & 1);
                const int slot = first + k, column = slot / per_column * COLS, row = slot % per_column * SLOT_ROWS;
                expect_bytes(full + 8 * s, SLOT_WORDS * 4);
                for (int r = 0; r < (ROWS ? SLOT_ROWS : 1); r++)
                    bulk_copy(ring + (s * SLOT_WORDS + r * COLS) * 4,
                              ROWS ? w + (size_t)(row + r) * N + column : w + (size_t)slot * SLOT_WORDS,
                              (ROWS ? COLS : SLOT_WORDS) * 4, full + 8 * s);
            }
        return;
    }
    constexpr int XB = 8;  // x into shared memory by the consumers, 8 loads in flight per thread
    for (int i0 = threadIdx.x; i0 < R * 4; i0 += CONSUMERS * 32 * XB) {
        half2 v[XB];
#pragma unroll
        for (int u = 0; u < XB; u++) {
            const int i = i0 + CONSUMERS * 32 * u;
            v[u] = i < R * 4 ? __ldg(reinterpret_cast<const half2*>(x) + i) : half2{};
        }
#pragma unroll
        for (int u = 0; u < XB; u++)
            if (i0 + CONSUMERS * 32 * u < R * 4) xs[i0 + CONSUMERS * 32 * u] = v[u];
    }
    asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS * 32) : "memory");
    const GroupRaw group{};  // EXL2's centring offset is a constant; the group scales are left out (1)
    float acc[TILES][2][4] = {};
    for (int k = 0; first + k < last; k++) {
        const int s = k % STAGES, slot = first + k, row_slot = slot % per_column;
        barrier_wait(full + 8 * s, (k / STAGES) & 1);
        const uint32_t* words = smem + s * SLOT_WORDS + 32 * TILES * warp + lane;
#pragma unroll
        for (int c = 0; c < SLOT_ROWS / 4; c++) {  // chunks of 4 rows: 32 rows of 4-bit codes
            const half2* xb = xs + (row_slot * 2 + c) * 16;
            const uint32_t b[4] = {bits_of(xb[t]), bits_of(xb[4 + t]), bits_of(xb[8 + t]), bits_of(xb[12 + t])};
#pragma unroll
            for (int h = 0; h < TILES; h++) {
                uint32_t q[4], a[16];
#pragma unroll
                for (int j = 0; j < 4; j++) q[j] = words[(4 * c + j) * COLS + 32 * h];
                for_pairs<4, 32>(q, [&](auto p, uint32_t raw, auto S) { a[p] = centred<4, false, p, S>(raw, group); });
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    mma(acc[h][0], a + 8 * e, b[2 * e], b[2 * e + 1]);
                    mma(acc[h][1], a + 8 * e + 4, b[2 * e], b[2 * e + 1]);
                }
            }
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(empty + 8 * s);
        if (first + k + 1 == last || (slot + 1) % per_column == 0) {  // this column block's split sum
            const int column = slot / per_column * COLS + 32 * TILES * warp + 4 * (lane / 4);
            if (t == 0)
#pragma unroll
                for (int h = 0; h < TILES; h++)
#pragma unroll
                    for (int s2 = 0; s2 < 2; s2++) {
                        atomicAdd(out + column + 32 * h + 2 * s2, acc[h][s2][0]);
                        atomicAdd(out + column + 32 * h + 2 * s2 + 1, acc[h][s2][2]);
                    }
#pragma unroll
            for (int h = 0; h < TILES; h++)
#pragma unroll
                for (int s2 = 0; s2 < 2; s2++)
#pragma unroll
                    for (int i = 0; i < 4; i++) acc[h][s2][i] = 0.f;
        }
    }
}

void run(torch::Tensor w, int64_t offset_words, int64_t R, int64_t N, torch::Tensor x, torch::Tensor out,
         int64_t stages, int64_t rows) {
    const auto s = at::cuda::getCurrentCUDAStream();
    int sms = 0, consumers = 8;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    auto k = stages == 6 ? (rows ? stream_gemv<6, 8, true> : stream_gemv<6, 8, false>)
                         : (rows ? stream_gemv<12, 8, true> : stream_gemv<12, 8, false>);
    const int shared = stages * SLOT_WORDS * 4 + R * 16;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    k<<<sms, (consumers + 1) * 32, shared, s>>>(reinterpret_cast<const uint32_t*>(w.data_ptr<int>()) + offset_words,
                                                 R, N, reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
                                                 out.data_ptr<float>(), R / SLOT_ROWS * (N / COLS));
}
"""
# (rows of 32-bit words, columns) at 4 bits: K / 8 rows
SHAPES = {"o": (512, 4096), "gate/up": (512, 28672), "down": (1792, 4096), "head (4-bit)": (512, 128256)}


def main():
    ext = load_inline("exlcore_stream_gemv", cpp_sources="void run(torch::Tensor w, int64_t offset_words, int64_t R, "
                      "int64_t N, torch::Tensor x, torch::Tensor out, int64_t stages, int64_t rows);",
                      cuda_sources=SOURCE, functions=["run"], extra_include_paths=[str(HERE), str(HERE.parent / "exlcore" / "csrc")],
                      extra_cuda_cflags=["-O3", "-arch=sm_90", "--expt-relaxed-constexpr", "-std=c++17"])
    buffer = torch.randint(-2**31, 2**31 - 1, (1 << 29,), dtype=torch.int32, device="cuda")  # 2 GB of codes
    print("| matrix | MB | stages | layout | us | TB/s | of 3.0 TB/s |\n|---|---:|---:|---|---:|---:|---:|")
    for name, (R, N) in SHAPES.items():
        words = R * N
        copies = min(20, buffer.numel() // words)
        x = torch.randn(R * 8, device="cuda").half()
        out = torch.zeros(N, device="cuda")
        for stages, rows in ((6, 0), (6, 1), (12, 0), (12, 1)):
            def calls():
                for c in range(copies):
                    ext.run(buffer, c * words, R, N, x, out, stages, rows)

            t = graph_time(calls) / copies
            print(f"| {name} | {words * 4 / 1e6:.1f} | {stages} | {'rows, 1 KB copies' if rows else 'slots'} | "
                  f"{t * 1e6:.1f} | "
                  f"{words * 4 / t / 1e12:.2f} | {words * 4 / t / COPY_BANDWIDTH:.0%} |", flush=True)


if __name__ == "__main__":
    main()
