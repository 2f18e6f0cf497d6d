"""What a persistent decode step could reach: one kernel streams a batch-1 step's packed weights (the Llama-3-8B
matmuls of benchmarks/exl2.py, in model order) with a grid-wide barrier wherever the model has a dependency, and
with the latency of the small kernels between the matmuls (norms, attention) as dependent reads.

    python benchmarks/persist.py

No arithmetic. Two ways to fetch: `cp.async`, each warp streaming its share of each matmul's bytes through its own
ring of STAGES 512-byte slots in shared memory, as the decode kernel fetches now; `bulk`, each block's share
through a ring of STAGES 8 KB slots filled by the copy engine (cp.async.bulk), one thread issuing. After a
matmul's bytes a unit writes a partial result, counts in and reads another's (the split sums), then waits at the
barrier. LOOK is how many phases past the barrier the ring may fetch: 0 is a chain of kernels without programmatic
launch, 1 the next phase's first chunks (about what programmatic launch allows), more streams on through the small
phases. The figures bound a persistent kernel, as benchmarks/floor.py bounds a chain of kernels.
"""

from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from core import COPY_BANDWIDTH
from exl2 import BODY, HEAD, SHAPE
from kernels import graph_time

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstring>

#include "bulk.cuh"

constexpr int MAX_PHASES = 240, CHUNK = 512;

struct Program {
    long long base[MAX_PHASES];  // a weight phase's bytes: warp w's chunks at base + (w * chunks + i) * CHUNK
    int chunks[MAX_PHASES];      // per warp; 0: no weights, `reads` dependent reads only
    int reads[MAX_PHASES];       // dependent round trips before the phase's first use (its gather, or the small kernel)
    int count;
};

// Every block waits here for all of the grid.
__device__ __forceinline__ void grid_barrier(unsigned* sync, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) grid_count(sync, target);
    __syncthreads();
}

template <int N>
__device__ __forceinline__ void wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Chunk `pending` groups back has landed: cp.async.wait_group takes a constant.
template <int STAGES>
__device__ __forceinline__ void wait_pending(int pending) {
    if constexpr (STAGES > 1) {
        if (pending >= STAGES - 1) return wait_group<STAGES - 1>();
        wait_pending<STAGES - 1>(pending);
    } else {
        wait_group<0>();
    }
}

template <int STAGES>
__global__ void __launch_bounds__(128) step(const __grid_constant__ Program pr, const char* __restrict__ w,
                                            unsigned* sync, int* scratch, int look, int barriers, int* out) {
    extern __shared__ int4 smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gw = blockIdx.x * 4 + warp, warps = gridDim.x * 4;
    const unsigned ring = shared_address(smem + warp * STAGES * (CHUNK / 16));
    int fp = 0, fi = 0, fetched = 0, used = 0;
    unsigned acc = lane;
    auto top_up = [&](int limit) {  // fill free slots with the next chunks of phases up to `limit`
        while (fetched - used < STAGES) {
            while (fp < pr.count && fi >= pr.chunks[fp]) fp++, fi = 0;
            if (fp >= pr.count || fp > limit) return;
            const char* src = w + pr.base[fp] + ((size_t)gw * pr.chunks[fp] + fi) * CHUNK + 16 * lane;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(ring + (fetched % STAGES) * CHUNK + 16 * lane),
                         "l"(src));
            asm volatile("cp.async.commit_group;");
            fi++, fetched++;
        }
    };
    for (int p = 0; p < pr.count; p++) {
        const int limit = min(p + look, pr.count - 1);
        top_up(limit);
        for (int r = 0; r < pr.reads[p]; r++)  // a dependent round trip: what another warp wrote before the barrier
            acc ^= __ldcg(scratch + (size_t)((gw * 7 + acc + r) % warps) * 32 + lane);
        for (int i = 0; i < pr.chunks[p]; i++) {
            wait_pending<STAGES>(fetched - used - 1);
            __syncwarp();
            const int4 v = reinterpret_cast<const int4*>(smem)[(warp * STAGES + used % STAGES) * (CHUNK / 16) + lane];
            acc = (acc ^ v.x ^ v.y ^ v.z ^ v.w) % warps;
            __syncwarp();
            used++;
            top_up(limit);
        }
        if (pr.chunks[p] > 0) {  // the partial sums, a counter, and the sum of another warp's
            __stcg(scratch + (size_t)gw * 32 + lane, int(acc));
            int ticket = 0;
            if (lane == 0) ticket = atomicAdd(reinterpret_cast<int*>(sync) + 1 + (gw & 63), 1);
            ticket = __shfl_sync(0xFFFFFFFFu, ticket, 0);
            acc = (acc ^ __ldcg(scratch + (size_t)((gw + ticket) % warps) * 32 + lane)) % warps;
        }
        if (barriers) grid_barrier(sync, (p + 1) * gridDim.x);
    }
    if (acc == 0x7fffffffu) out[0] = int(acc);
}

// The same with the weights fetched by the copy engine (cp.async.bulk, TMA): a ring of STAGES slots of BULK bytes
// per block, an mbarrier each, thread 0 issuing; the dependent reads and barriers stay on the SM's load path, past
// no queue of weight loads.
constexpr int BULK = 8192;

template <int STAGES>
__global__ void __launch_bounds__(128) step_bulk(const __grid_constant__ Program pr, const char* __restrict__ w,
                                                 unsigned* sync, int* scratch, int look, int barriers, int* out) {
    extern __shared__ int4 smem[];
    __shared__ __align__(8) unsigned long long bars[STAGES];
    const int units = gridDim.x, u = blockIdx.x;
    const unsigned ring = shared_address(smem), bar0 = shared_address(bars);
    if (threadIdx.x == 0)
        for (int s = 0; s < STAGES; s++) barrier_init(bar0 + 8 * s, 1);
    __syncthreads();
    int fp = 0, fi = 0, fetched = 0, used = 0;
    unsigned acc = threadIdx.x;
    auto top_up = [&](int limit) {  // thread 0: fill free slots with the next chunks of phases up to `limit`
        while (fetched - used < STAGES) {
            while (fp < pr.count && fi >= pr.chunks[fp]) fp++, fi = 0;
            if (fp >= pr.count || fp > limit) return;
            const char* src = w + pr.base[fp] + ((size_t)u * pr.chunks[fp] + fi) * BULK;
            const unsigned slot = fetched % STAGES;
            expect_bytes(bar0 + 8 * slot, BULK);
            bulk_copy(ring + slot * BULK, src, BULK, bar0 + 8 * slot);
            fi++, fetched++;
        }
    };
    for (int p = 0; p < pr.count; p++) {
        const int limit = min(p + look, pr.count - 1);
        if (threadIdx.x == 0) top_up(limit);
        for (int r = 0; r < pr.reads[p]; r++)
            acc ^= __ldcg(scratch + (size_t)((u * 7 + acc + r) % units) * 128 + threadIdx.x);
        for (int i = 0; i < pr.chunks[p]; i++) {
            const unsigned slot = used % STAGES;
            barrier_wait(bar0 + 8 * slot, (used / STAGES) & 1);
            const int4* v = smem + slot * (BULK / 16) + threadIdx.x;
#pragma unroll
            for (int k = 0; k < BULK / 16 / 128; k++) acc ^= v[128 * k].x ^ v[128 * k].y ^ v[128 * k].z ^ v[128 * k].w;
            acc %= units;
            __syncthreads();
            used++;
            if (threadIdx.x == 0) {
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                top_up(limit);
            }
        }
        if (pr.chunks[p] > 0) {
            __stcg(scratch + (size_t)u * 128 + threadIdx.x, int(acc));
            __shared__ int ticket;
            if (threadIdx.x == 0) ticket = atomicAdd(reinterpret_cast<int*>(sync) + 1 + (u & 63), 1);
            __syncthreads();
            acc = (acc ^ __ldcg(scratch + (size_t)((u + ticket) % units) * 128 + threadIdx.x)) % units;
        }
        if (barriers) grid_barrier(sync, (p + 1) * gridDim.x);
    }
    if (acc == 0x7fffffffu) out[0] = int(acc);
}

void run(torch::Tensor program, torch::Tensor weights, torch::Tensor sync, torch::Tensor scratch, int64_t blocks,
         int64_t stages, int64_t look, int64_t barriers, int64_t bulk, torch::Tensor out) {
    Program pr;
    std::memcpy(&pr, program.data_ptr(), sizeof(Program));
    const auto s = at::cuda::getCurrentCUDAStream();
    cudaMemsetAsync(sync.data_ptr(), 0, sync.numel() * 4, s);
    auto k = bulk ? (stages == 6 ? step_bulk<6> : stages == 12 ? step_bulk<12> : step_bulk<24>)
                  : (stages == 4 ? step<4> : step<16>);
    const int shared = bulk ? stages * BULK : 4 * stages * CHUNK;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    int per_sm = 0, sms = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, 128, shared);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    TORCH_CHECK(per_sm * sms >= blocks, "persist: ", blocks, " blocks are not all resident (", per_sm, " per SM)");
    k<<<blocks, 128, shared, s>>>(pr, static_cast<const char*>(weights.data_ptr()),
                                  reinterpret_cast<unsigned*>(sync.data_ptr()), scratch.data_ptr<int>(), look, barriers,
                                  out.data_ptr<int>());
}
"""
MAX_PHASES, CHUNK, BULK = 240, 512, 8192


def packed_bytes(n: int, k: int, option) -> int:
    from exlcore.formats.exl2 import group_layout

    return sum(r * b // 32 for b, r in group_layout(k, option)) * n * 4


def program(units: int, chunk: int, fused: bool, weights: bool = True):
    """The step's phases as (bytes, dependent reads): per layer the attention norm, q/k/v, attention (4 round trips),
    o, the MLP's norm, gate/up and down; then the final norm and the head. A matmul's one read is its gather of x.
    fused: each norm folded into the matmul after it (its gather then two round trips), 161 phases instead of 226.
    Each of `units` (warps or blocks) takes chunks of `chunk` bytes. Without weights, only the reads and barriers."""
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    norm = [] if fused else [(0, 1)]
    gather = 2 if fused else 1
    layer = [*norm, (packed_bytes(q + 2 * kv, h, BODY), gather), (0, 4), (packed_bytes(h, q, BODY), 1), *norm,
             (packed_bytes(2 * i, h, BODY), gather), (packed_bytes(h, i, BODY), 1)]
    phases = layer * SHAPE["num_hidden_layers"] + [*norm, (packed_bytes(SHAPE["vocab_size"], h, HEAD), gather)]
    base, chunks, reads, offset = [], [], [], 0
    for size, r in phases:
        c = -(-size // (units * chunk)) if weights else 0
        base.append(offset)
        chunks.append(c)
        reads.append(r)
        offset += c * units * chunk
    pad = MAX_PHASES - len(phases)
    words = torch.tensor(base + [0] * pad, dtype=torch.int64).view(torch.int32).tolist()
    words += chunks + [0] * pad + reads + [0] * pad + [len(phases), 0]
    return torch.tensor(words, dtype=torch.int32), offset, len(phases)


def main():
    ext = load_inline("exlcore_persist", cpp_sources="void run(torch::Tensor program, torch::Tensor weights, "
                      "torch::Tensor sync, torch::Tensor scratch, int64_t blocks, int64_t stages, int64_t look, "
                      "int64_t barriers, int64_t bulk, torch::Tensor out);", cuda_sources=SOURCE, functions=["run"],
                      extra_include_paths=[str(Path(__file__).resolve().parent)], extra_cuda_cflags=["-O3", "-arch=sm_90"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    sync = torch.zeros(65, dtype=torch.int32, device="cuda")
    scratch = torch.zeros(32 * 4 * 8 * sms, dtype=torch.int32, device="cuda")
    weights = torch.empty(9 << 29, dtype=torch.uint8, device="cuda")  # the largest program, rounded up per unit
    print("| fetch | blocks/SM | stages | look | barrier | phases | us | TB/s | of 3.0 TB/s | barriers and reads alone, us |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for bulk, per_sm, stages in ((0, 4, 16), (0, 4, 4), (1, 4, 6), (1, 2, 12), (1, 1, 24), (1, 1, 12)):
        blocks = per_sm * sms
        units, chunk = (blocks, BULK) if bulk else (4 * blocks, CHUNK)
        for fused in (False, True):
            def time(look, barrier, with_weights):
                prog, size, count = program(units, chunk, fused, with_weights)
                return graph_time(lambda: ext.run(prog, weights, sync, scratch, blocks, stages, look, barrier, bulk,
                                                  out)), size, count

            alone = time(0, 1, False)[0]
            for look, barrier in ((MAX_PHASES, 0), (0, 1), (1, 1), (MAX_PHASES, 1)):
                if fused and barrier == 0:
                    continue
                t, size, count = time(look, barrier, True)
                print(f"| {'bulk' if bulk else 'cp.async'} | {per_sm} | {stages} | {look} | "
                      f"{'grid' if barrier else 'none'} | {count} | {t * 1e6:.0f} | {size / t / 1e12:.2f} | "
                      f"{size / t / COPY_BANDWIDTH:.0%} | {alone * 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
