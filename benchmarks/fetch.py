"""How fast the batch-1 matmul's weight fetch can stream, with no arithmetic: the decode kernel's geometry (blocks of
4 warps, 64 columns of 32-bit words per warp, slices of chunks of CR rows) fetched four ways; benchmarks/floor.py
has a plain read of the same bytes.

    python benchmarks/fetch.py

modes: async-rows  cp.async, 16 bytes of a 256-byte row piece per lane, 3 stages (the kernel as it is)
       ldg-rows    the same pieces into registers with ld.global.nc, DEPTH chunks in flight
       ldg-warp    a warp's chunk stored contiguously (CR x 256 bytes), into registers, DEPTH chunks in flight
       async-warp  the contiguous chunk by cp.async, 3 stages
Each call reads its own copy of the bytes in turn (nothing from L2), replayed from a CUDA graph.
"""

import torch
from torch.utils.cpp_extension import load_inline

from core import COPY_BANDWIDTH
from kernels import graph_time

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

__device__ __forceinline__ int4 ldg16(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ void cp16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

// Lane's 16 bytes of copy k of chunk c: rows of N words (MODE 0, 1: row c * CR + lane / 16 + 2k, the warp's 64
// columns), or the warp's chunks stored contiguously (MODE 2, 3). Its place in a stage follows the same order.
template <int MODE, int CR>
__device__ __forceinline__ const uint32_t* piece(const uint32_t* w, int R, int N, int wtile, int c, int lane, int k) {
    return MODE <= 1 ? w + (size_t)(c * CR + lane / 16 + 2 * k) * N + wtile * 64 + 4 * (lane % 16)
                     : w + (size_t)wtile * R * 64 + (size_t)c * CR * 64 + 4 * lane + 128 * k;
}

// MODE 0 async-rows, 1 ldg-rows, 2 ldg-warp, 3 async-warp. CR rows per chunk (even), `per` chunks per slice.
template <int MODE, int CR, int DEPTH>
__global__ void __launch_bounds__(128) fetch(const uint32_t* __restrict__ w, int R, int N, int splits, int per,
                                             int* out) {
    extern __shared__ int4 smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int quad = blockIdx.x / splits, split = blockIdx.x % splits, wtile = quad * 4 + warp;
    const int chunks = R / CR, c0 = split * per, count = min(per, chunks - c0);
    int acc = 0;
    if (MODE == 0 || MODE == 3) {
        constexpr int STAGES = 3, STAGE = CR * 64;  // words
        uint32_t* stages = reinterpret_cast<uint32_t*>(smem) + warp * STAGES * STAGE;
        const unsigned s0 = static_cast<unsigned>(__cvta_generic_to_shared(stages));
        auto issue = [&](int c, int st) {
            if (c < count) {
#pragma unroll
                for (int k = 0; k < CR / 2; k++) {
                    const int at = MODE == 0 ? (lane / 16 + 2 * k) * 64 + 4 * (lane % 16) : 4 * lane + 128 * k;
                    cp16(s0 + (st * STAGE + at) * 4, piece<MODE, CR>(w, R, N, wtile, c0 + c, lane, k));
                }
            }
            asm volatile("cp.async.commit_group;");
        };
        issue(0, 0);
        issue(1, 1);
        for (int c = 0; c < count; c++) {
            asm volatile("cp.async.wait_group 1;");
            __syncwarp();
            issue(c + 2, (c + 2) % STAGES);
            const uint32_t* st = stages + (c % STAGES) * STAGE;
#pragma unroll
            for (int j = 0; j < CR; j++) acc ^= st[64 * j + lane] ^ st[64 * j + 32 + lane];
            __syncwarp();
        }
    } else {
        int4 buf[DEPTH][CR / 2];
        auto load = [&](int c, int4 (&b)[CR / 2]) {
#pragma unroll
            for (int k = 0; k < CR / 2; k++) {
                const auto src = reinterpret_cast<const int4*>(piece<MODE, CR>(w, R, N, wtile, c0 + c, lane, k));
                b[k] = c < count ? ldg16(src) : make_int4(0, 0, 0, 0);
            }
        };
#pragma unroll
        for (int d = 0; d < DEPTH; d++) load(d, buf[d]);
        for (int c = 0; c < count; c += DEPTH) {
#pragma unroll
            for (int d = 0; d < DEPTH; d++) {
#pragma unroll
                for (int k = 0; k < CR / 2; k++) acc ^= buf[d][k].x ^ buf[d][k].y ^ buf[d][k].z ^ buf[d][k].w;
                load(c + d + DEPTH, buf[d]);
            }
        }
    }
    if (acc == 0x7fffffff) out[0] = acc;
}

template <int MODE, int CR>
void run_depth(int depth, dim3 grid, int shared, cudaStream_t s, const uint32_t* w, int R, int N, int splits, int per,
               int* out) {
    auto k = depth == 2 ? fetch<MODE, CR, 2> : depth == 4 ? fetch<MODE, CR, 4> : fetch<MODE, CR, 1>;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    k<<<grid, 128, shared, s>>>(w, R, N, splits, per, out);
}

template <int CR>
void run_cr(int mode, int depth, dim3 grid, int shared, cudaStream_t s, const uint32_t* w, int R, int N, int splits,
            int per, int* out) {
    if (mode == 0) run_depth<0, CR>(depth, grid, shared, s, w, R, N, splits, per, out);
    else if (mode == 1) run_depth<1, CR>(depth, grid, shared, s, w, R, N, splits, per, out);
    else if (mode == 2) run_depth<2, CR>(depth, grid, shared, s, w, R, N, splits, per, out);
    else run_depth<3, CR>(depth, grid, shared, s, w, R, N, splits, per, out);
}

void read_matrix(torch::Tensor buffer, int64_t offset, int64_t R, int64_t N, int64_t cr, int64_t mode, int64_t depth,
                 int64_t splits, int64_t per, int64_t shared, torch::Tensor out) {
    const auto w = reinterpret_cast<const uint32_t*>(static_cast<const char*>(buffer.data_ptr()) + offset);
    const dim3 grid(static_cast<unsigned>(N / 256 * splits));
    const auto s = at::cuda::getCurrentCUDAStream();
    if (cr == 4) run_cr<4>(mode, depth, grid, shared, s, w, R, N, splits, per, out.data_ptr<int>());
    else if (cr == 6) run_cr<6>(mode, depth, grid, shared, s, w, R, N, splits, per, out.data_ptr<int>());
    else run_cr<8>(mode, depth, grid, shared, s, w, R, N, splits, per, out.data_ptr<int>());
}
"""
MODES = {"async-rows": 0, "ldg-rows": 1, "ldg-warp": 2, "async-warp": 3}
# (rows of 32-bit words, words per row, rows per chunk) of the Llama-3-8B matmuls at 4.0 bpw (the head at 6 bits)
SHAPES = {"o": (512, 4096, 4), "gate/up": (512, 28672, 4), "down": (1792, 4096, 4), "head": (768, 128256, 6)}


def main():
    ext = load_inline("exlcore_fetch", cpp_sources="void read_matrix(torch::Tensor buffer, int64_t offset, int64_t R, "
                      "int64_t N, int64_t cr, int64_t mode, int64_t depth, int64_t splits, int64_t per, "
                      "int64_t shared, torch::Tensor out);", cuda_sources=SOURCE, functions=["read_matrix"],
                      extra_cuda_cflags=["-O3", "-arch=sm_90"])
    props = torch.cuda.get_device_properties(0)
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    buffer = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    print("| matrix | MB | blocks/SM | mode | depth | us | TB/s | of 3.0 TB/s |\n|---|---:|---:|---|---:|---:|---:|---:|")
    for name, (R, N, cr) in SHAPES.items():
        size = R * N * 4
        offsets = [k * (size + 65536) for k in range(min(20, len(buffer) // (size + 65536)))]
        for per_sm in (6, 8):
            quads, chunks = N // 256, R // cr
            splits = max(1, min(per_sm * props.multi_processor_count // quads, chunks // 8))
            per = -(-chunks // splits)
            splits = -(-chunks // per)
            shared = (227 << 10) // per_sm - 2048
            for mode, depths in (("async-rows", [0]), ("ldg-rows", [1, 2, 4]), ("ldg-warp", [1, 2, 4]),
                                 ("async-warp", [0])):
                for depth in depths:
                    def calls():
                        for o in offsets:
                            ext.read_matrix(buffer, o, R, N, cr, MODES[mode], depth, splits, per, shared, out)

                    t = graph_time(calls) / len(offsets)
                    print(f"| {name} | {size / 1e6:.1f} | {per_sm} | {mode} | {depth} | {t * 1e6:.1f} | "
                          f"{size / t / 1e12:.2f} | {size / t / COPY_BANDWIDTH:.0%} |", flush=True)


if __name__ == "__main__":
    main()
