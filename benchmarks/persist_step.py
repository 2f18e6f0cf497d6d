"""A persistent batch-1 decode step with its matmul arithmetic: what benchmarks/persist.py bounds (the stream and its
barriers) joined to what benchmarks/stream_gemv.py measured for one matrix (the arithmetic against the stream).

    python benchmarks/persist_step.py

One kernel, one block per SM, runs the Llama-3-8B step's 161 phases: per layer q/k/v, attention, o, gate/up and
down, then the head. A producer warp streams every phase's weights through a ring of 12 slots of 8 KB
(cp.async.bulk), on past the barriers, as weights depend on nothing. Eight consumer warps, per phase: attention's
stand-in (4 dependent reads, as in persist.py); or a matmul: x read back from the sums of the matmul before (all of
it and RMS-normed for q/k/v, gate/up and the head; the rows the block's slots take for o, and for down as silu(gate)
* up) into shared memory, then the block's run of slots dequantized and multiplied on tensor cores as the decode
kernel does (exlcore/csrc/qmatmul.cu's for_pairs, centred and mma), each column block's sums added by fp32 atomics;
then a grid-wide barrier. Codes are 4-bit and random, with one scale for every group (the real head is 6-bit, the
body a 5/4/3-bit mix with group scales: 3.98 GB against 3.75 here); timing only, the sums are not checked. They are
zeroed by a memset inside the timed graph.

The first table takes the step apart: x staged by loads, by the copy engine or not at all; the arithmetic on or
off; the barriers on or off; and probes (no weights: x, barriers and reads alone). The second is a timeline of each
phase from %globaltimer stamps.
"""

from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from core import COPY_BANDWIDTH
from exl2 import SHAPE
from kernels import graph_time

HERE = Path(__file__).resolve().parent
SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstring>

#include "bulk.cuh"
#include "qmatmul.cu"  // the decode kernel's helpers: for_pairs, centred, mma

constexpr int MAX_PHASES = 192, SLOT_ROWS = 8, COLS = 256, SLOT_WORDS = SLOT_ROWS * COLS, SLOTS = 12,
              CONSUMERS = 8, THREADS = CONSUMERS * 32, XB = 8;
enum Kind { NORMED, PLAIN, GATED };  // x: the sums before RMS-normed (q/k/v, gate/up, head), as they are (o), or
                                     // silu(gate) * up (down)
enum Staging { NONE, LOADS, BULK };  // x left as it is (wrong values); read by the consumers' loads into fp16; or
                                     // copied by the copy engine as fp32, turned into fp16 as the mma reads it
enum Probe { FULL, NO_WEIGHTS, ROWS_ONLY, OWN_X };  // the step; without its weights (x, barriers and reads alone);
    // with the normed matmuls' x read only where the block's slots need it (wrong norms); without its weights, each
    // block reading x from a copy of its own (in the weights' buffer: wrong values)

struct Program {
    long long base[MAX_PHASES];  // a matmul's slots: slot i (column block i / (rows / 8), rows 8 (i % that)) at
                                 // words base + i * SLOT_WORDS
    int src[MAX_PHASES];         // its x: floats of `sums` from here (the matmul before)
    int dst[MAX_PHASES];         // its sums: floats of `sums` from here, zeroed before the launch
    int rows[MAX_PHASES];        // rows of 32-bit words (K / 8); 0: a phase of dependent reads only
    int cols[MAX_PHASES];        // N
    int reads[MAX_PHASES];       // dependent round trips (attention's stand-in)
    int kind[MAX_PHASES];
    int count;
};

__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory"); }

// Every block's consumers wait here for all of the grid.
__device__ __forceinline__ void grid_barrier(unsigned* sync, unsigned target) {
    consumers_sync();
    if (threadIdx.x == 0) grid_count(sync, target);
    consumers_sync();
}

// This block's run of phase p's slots: an equal share of them, in order.
__device__ __forceinline__ int2 run_of(const Program& pr, int p) {
    const long long slots = pr.rows[p] / SLOT_ROWS * (pr.cols[p] / COLS);
    return make_int2(blockIdx.x * slots / gridDim.x, (blockIdx.x + 1) * slots / gridDim.x);
}

// The block's slots, phase after phase.
struct Cursor {
    const Program& pr;
    int p = -1, slot = 0, end = 0;
    __device__ bool next() {
        while (++slot >= end) {
            if (++p >= pr.count) return false;
            const int2 run = run_of(pr, p);
            slot = run.x - 1, end = run.y;
        }
        return true;
    }
    __device__ const uint32_t* address(const uint32_t* w) const { return w + pr.base[p] + (size_t)slot * SLOT_WORDS; }
};

// Eight consumer warps, each a column tile of 32 columns of every slot, and a producer warp.
template <bool MATH, int X>
__global__ void __launch_bounds__(THREADS + 32, 1) step(const __grid_constant__ Program pr,
                                                        const uint32_t* __restrict__ w, float* sums, unsigned* sync,
                                                        const int* scratch, int barriers, int probe,
                                                        unsigned long long* stamps, int* sink) {
    extern __shared__ __align__(128) uint32_t smem[];
    __shared__ __align__(8) unsigned long long bars[2 * SLOTS + 1];  // full, empty, x landed
    __shared__ float squares[CONSUMERS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
    const unsigned ring = shared_address(smem), full = shared_address(bars), empty = full + 8 * SLOTS,
                   xbar = empty + 8 * SLOTS;
    if (threadIdx.x == 0) {
        for (int s = 0; s < SLOTS; s++) {
            barrier_init(full + 8 * s, 1);
            barrier_init(empty + 8 * s, CONSUMERS);
        }
        barrier_init(xbar, 1);
    }
    __syncthreads();
    if (warp == CONSUMERS) {  // the producer
        if (lane == 0 && probe != NO_WEIGHTS && probe != OWN_X) {
            Cursor fetch{pr};
            for (int k = 0; fetch.next(); k++) {
                const int s = k % SLOTS;
                if (k >= SLOTS) barrier_wait(empty + 8 * s, (k / SLOTS - 1) & 1);
                expect_bytes(full + 8 * s, SLOT_WORDS * 4);
                bulk_copy(ring + s * SLOT_WORDS * 4, fetch.address(w), SLOT_WORDS * 4, full + 8 * s);
            }
        }
        return;
    }
    half2* xs = reinterpret_cast<half2*>(smem + SLOTS * SLOT_WORDS);  // LOADS: x in fp16
    float* xf = reinterpret_cast<float*>(xs);                            // BULK: x (and up) in fp32
    const GroupRaw group{};  // EXL2's centring offset is a constant; one scale for all groups, so that sums stay near 1
    unsigned acc = threadIdx.x;
    for (int p = 0, k = 0, staged = 0; p < pr.count; p++) {
        auto stamp = [&](int i) {  // thread 0's time at point i of phase p, if asked for
            if (stamps && threadIdx.x == 0) {
                unsigned long long now;
                asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)::"memory");
                stamps[((size_t)blockIdx.x * pr.count + p) * 5 + i] = now;
            }
        };
        stamp(0);
        for (int r = 0; r < pr.reads[p]; r++)  // a dependent round trip: what another block wrote before the barrier
            acc ^= __ldcg(scratch + (size_t)((blockIdx.x * 7 + acc + r) % gridDim.x) * THREADS + threadIdx.x);
        const int2 run = run_of(pr, p);
        if (run.x < run.y) {
            const int K = pr.rows[p] * 8, per_column = pr.rows[p] / SLOT_ROWS, kind = pr.kind[p];
            // x, in fours: all of it for the norm, else the rows this block's slots take: one run of them, or two
            // where the slots go on into the next column block (the first one's last rows, the next one's first)
            int2 span[2] = {make_int2(0, K / 4), make_int2(0, 0)};
            if (kind != NORMED || probe == ROWS_ONLY) {
                const int a = run.x % per_column * 16, b = ((run.y - 1) % per_column + 1) * 16;
                if (run.x / per_column == (run.y - 1) / per_column) span[0] = make_int2(a, b);
                else if (run.y - run.x < per_column) span[0] = make_int2(a, K / 4), span[1] = make_int2(0, b);
            }
            const float4* x = probe == OWN_X
                                  ? reinterpret_cast<const float4*>(w) + blockIdx.x * (1 << 20) + pr.src[p] / 4
                                  : reinterpret_cast<const float4*>(sums + pr.src[p]);
            float ss = 0.f;
            if constexpr (X == LOADS) {
#pragma unroll
                for (const int2 r : span)
                for (int i0 = r.x + threadIdx.x, hi = r.y; i0 < hi; i0 += THREADS * XB) {  // XB fours a thread
                    float4 v[XB] = {}, u[XB] = {};
#pragma unroll
                    for (int j = 0; j < XB; j++) {  // predicated, not clamped: a clamped index has every block's
                        const int i = i0 + THREADS * j;  // spare lanes load one line, which L2 then serves in turn
                        if (i < hi) v[j] = __ldcg(x + i);
                        if (i < hi && kind == GATED) u[j] = __ldcg(x + K / 4 + i);
                    }
#pragma unroll
                    for (int j = 0; j < XB; j++) {
                        const int i = i0 + THREADS * j;
                        if (i < hi) {  // the activation too: past hi it costs as much
                            if (kind == GATED)
                                v[j] = make_float4(gated(v[j].x, u[j].x, 0), gated(v[j].y, u[j].y, 0),
                                                   gated(v[j].z, u[j].z, 0), gated(v[j].w, u[j].w, 0));
                            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
                            reinterpret_cast<uint2*>(xs)[i] = make_uint2(bits_of(__floats2half2_rn(v[j].x, v[j].y)),
                                                                         bits_of(__floats2half2_rn(v[j].z, v[j].w)));
                        }
                    }
                }
            } else if constexpr (X == BULK) {
                consumers_sync();  // every consumer is done with the last phase's x
                if (threadIdx.x == 0) {
                    asm volatile("fence.proxy.async;" ::: "memory");  // the sums' atomics, x's reads, then the copy
                    const unsigned at = shared_address(xf);
                    const int fours = span[0].y - span[0].x + span[1].y - span[1].x;
                    expect_bytes(xbar, fours * (kind == GATED ? 32 : 16));
#pragma unroll
                    for (const int2 r : span)
                        if (r.x < r.y) {
                            bulk_copy(at + r.x * 16, x + r.x, (r.y - r.x) * 16, xbar);
                            if (kind == GATED)
                                bulk_copy(at + K * 4 + r.x * 16, x + K / 4 + r.x, (r.y - r.x) * 16, xbar);
                        }
                }
                barrier_wait(xbar, staged++ & 1);
                float4* x4 = reinterpret_cast<float4*>(xf);
#pragma unroll
                for (const int2 r : span)
                for (int i = r.x + threadIdx.x; i < r.y; i += THREADS) {
                    float4 v = x4[i];
                    if (kind == GATED) {
                        const float4 u = x4[K / 4 + i];
                        x4[i] = v = make_float4(gated(v.x, u.x, 0), gated(v.y, u.y, 0), gated(v.z, u.z, 0),
                                                gated(v.w, u.w, 0));
                    }
                    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                }
            }
            stamp(1);
            float scale = 1.f / 256;  // every group's scale
            if (kind == NORMED) {  // applied to the sums: the same as to x
#pragma unroll
                for (int o = 16; o; o /= 2) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
                if (lane == 0) squares[warp] = ss;
            }
            consumers_sync();
            if (kind == NORMED) {
                float total = 0.f;
#pragma unroll
                for (int i = 0; i < CONSUMERS; i++) total += squares[i];
                scale *= rsqrtf(total / K + 1e-5f);
            }
            auto pair = [&](int j) {  // x's pair j as fp16
                if constexpr (X == BULK) {
                    const float2 v = reinterpret_cast<const float2*>(xf)[j];
                    return bits_of(__floats2half2_rn(v.x, v.y));
                }
                return bits_of(xs[j]);
            };
            stamp(2);
            float part[2][4] = {};
            for (int slot = run.x; probe != NO_WEIGHTS && probe != OWN_X && slot < run.y; slot++, k++) {
                const int s = k % SLOTS;
                barrier_wait(full + 8 * s, (k / SLOTS) & 1);
                if constexpr (MATH) {
                    const uint32_t* words = smem + s * SLOT_WORDS + 32 * warp + lane;
#pragma unroll
                    for (int c = 0; c < SLOT_ROWS / 4; c++) {  // chunks of 4 word rows: 32 rows of 4-bit codes
                        const int j = (slot % per_column * 2 + c) * 16;
                        const uint32_t b[4] = {pair(j + t), pair(j + 4 + t), pair(j + 8 + t), pair(j + 12 + t)};
                        uint32_t q[4], a[16];
#pragma unroll
                        for (int i = 0; i < 4; i++) q[i] = words[(4 * c + i) * COLS];
                        for_pairs<4, 32>(q, [&](auto i, uint32_t raw, auto S) {
                            a[i] = centred<4, false, i, S>(raw, group);
                        });
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            mma(part[0], a + 8 * e, b[2 * e], b[2 * e + 1]);
                            mma(part[1], a + 8 * e + 4, b[2 * e], b[2 * e + 1]);
                        }
                    }
                } else {
                    acc ^= smem[s * SLOT_WORDS + threadIdx.x];
                }
                __syncwarp();
                if (lane == 0) barrier_arrive(empty + 8 * s);
                if (slot + 1 == run.y || (slot + 1) % per_column == 0) {  // this column block's split sums
                    float* y = sums + pr.dst[p] + slot / per_column * COLS + 32 * warp + 4 * (lane / 4);
                    if (t == 0)
#pragma unroll
                        for (int h = 0; h < 2; h++) {
                            atomicAdd(y + 2 * h, part[h][0] * scale);
                            atomicAdd(y + 2 * h + 1, part[h][2] * scale);
                        }
#pragma unroll
                    for (int h = 0; h < 2; h++)
#pragma unroll
                        for (int i = 0; i < 4; i++) part[h][i] = 0.f;
                }
            }
        }
        stamp(3);
        if (barriers) grid_barrier(sync, (p + 1) * gridDim.x);
        stamp(4);
    }
    if (acc == 0x7fffffffu) sink[0] = int(acc);
}

template <bool MATH>
auto pick(int64_t x) { return x == BULK ? step<MATH, BULK> : x == LOADS ? step<MATH, LOADS> : step<MATH, NONE>; }

void run(torch::Tensor program, torch::Tensor w, torch::Tensor sums, int64_t zero_from, torch::Tensor sync,
         torch::Tensor scratch, int64_t math, int64_t barriers, int64_t x, int64_t probe, torch::Tensor stamps,
         torch::Tensor sink) {
    Program pr;
    TORCH_CHECK(program.numel() * 4 == sizeof(Program), "persist_step: the program is not ", sizeof(Program), " bytes");
    std::memcpy(&pr, program.data_ptr(), sizeof(Program));
    const auto s = at::cuda::getCurrentCUDAStream();
    cudaMemsetAsync(sync.data_ptr(), 0, sync.numel() * 4, s);
    cudaMemsetAsync(sums.data_ptr<float>() + zero_from, 0, (sums.numel() - zero_from) * 4, s);
    auto k = math ? pick<true>(x) : pick<false>(x);
    int K = 0, sms = 0, per_sm = 0;
    for (int p = 0; p < pr.count; p++) K = std::max(K, pr.rows[p] * 8);
    const int shared = SLOTS * SLOT_WORDS * 4 + (x == BULK ? 2 * K * 4 : K * 2);
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, THREADS + 32, shared);
    TORCH_CHECK(per_sm >= 1, "persist_step: a block does not fit on an SM");
    auto* at = stamps.numel() ? reinterpret_cast<unsigned long long*>(stamps.data_ptr<int64_t>()) : nullptr;
    k<<<sms, THREADS + 32, shared, s>>>(pr, reinterpret_cast<const uint32_t*>(w.data_ptr<int>()),
                                        sums.data_ptr<float>(), reinterpret_cast<unsigned*>(sync.data_ptr<int>()),
                                        scratch.data_ptr<int>(), barriers, probe, at, sink.data_ptr<int>());
}
"""
MAX_PHASES, SLOT_WORDS = 192, 2048


def program():
    """The step's phases (rows of words, columns, dependent reads, how x is made) and where their x and sums live: the
    first hidden_size floats of the sums hold the embedding, each matmul's sums follow in order."""
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    normed, plain, gated = 0, 1, 2
    layer = [(h // 8, q + 2 * kv, 0, normed), (0, 0, 4, plain), (q // 8, h, 0, plain), (h // 8, 2 * i, 0, normed),
             (i // 8, h, 0, gated)]
    phases = layer * SHAPE["num_hidden_layers"] + [(h // 8, SHAPE["vocab_size"], 0, normed)]
    fields = {f: [] for f in ("base", "src", "dst", "rows", "cols", "reads", "kind")}
    words, src, dst = 0, 0, h
    for rows, cols, reads, kind in phases:
        for f, v in zip(fields, (words, src, dst, rows, cols, reads, kind)):
            fields[f].append(v)
        if rows:
            words += rows * cols
            src, dst = dst, dst + cols
    pad = [0] * (MAX_PHASES - len(phases))
    flat = torch.tensor(fields.pop("base") + pad, dtype=torch.int64).view(torch.int32).tolist()
    for v in fields.values():
        flat += v + pad
    flat += [len(phases), 0]  # count, then the struct's padding to 8 bytes
    return torch.tensor(flat, dtype=torch.int32), words, dst, len(phases)


def main():
    ext = load_inline("exlcore_persist_step", cpp_sources="void run(torch::Tensor program, torch::Tensor w, "
                      "torch::Tensor sums, int64_t zero_from, torch::Tensor sync, torch::Tensor scratch, int64_t math, "
                      "int64_t barriers, int64_t x, int64_t probe, torch::Tensor stamps, torch::Tensor sink);",
                      cuda_sources=SOURCE, functions=["run"],
                      extra_include_paths=[str(HERE), str(HERE.parent / "exlcore" / "csrc")],
                      extra_cuda_cflags=["-O3", "-arch=sm_90", "--expt-relaxed-constexpr", "-std=c++17"])
    prog, words, floats, count = program()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    h = SHAPE["hidden_size"]
    w = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
    sums = torch.zeros(floats, device="cuda")
    sums[:h] = torch.randn(h, device="cuda")
    sync = torch.zeros(1, dtype=torch.int32, device="cuda")
    scratch = torch.zeros(sms * 256, dtype=torch.int32, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    none = torch.empty(0, dtype=torch.int64, device="cuda")
    print(f"{count} phases, {words * 4 / 1e9:.2f} GB of 4-bit codes; bound at {COPY_BANDWIDTH / 1e12:.1f} TB/s: "
          f"{words * 4 / COPY_BANDWIDTH * 1e6:.0f} us")
    print("| x | arithmetic | barriers | probe | us | TB/s | of 3.0 TB/s |\n|---|---|---|---|---:|---:|---:|")
    stagings = ("not staged (wrong values)", "loads, as fp16", "copy engine, as fp32")
    probes = ("", "no weights", "x only where needed", "no weights, each block its own x")
    runs = [(x, m, b, 0) for x in range(3) for m in (0, 1) for b in (0, 1)]
    runs += [(x, 0, 1, 1) for x in range(3)] + [(1, 1, b, 2) for b in (0, 1)] + [(x, 0, 1, 3) for x in (1, 2)]
    for x, math, barriers, probe in runs:
        t = graph_time(lambda: ext.run(prog, w, sums, h, sync, scratch, math, barriers, x, probe, none, sink))
        rate = "| |" if probe in (1, 3) else f"{words * 4 / t / 1e12:.2f} | {words * 4 / t / COPY_BANDWIDTH:.0%} |"
        print(f"| {stagings[x]} | {'yes' if math else 'no'} | {'grid' if barriers else 'none'} | {probes[probe]} | "
              f"{t * 1e6:.0f} | {rate}", flush=True)
    names = ("q/k/v", "attention", "o", "gate/up", "down")
    print("\nEach block's thread 0, us (median over blocks and layers; in brackets the median of each phase's slowest "
          "block): from the phase's start to x staged in its own loads, to all consumers' x staged, to its slots done, "
          "to the grid barrier passed\n\n| x | weights | phase | x, own | x, all | slots | barrier |\n"
          "|---|---|---|---:|---:|---:|---:|")
    for x, probe in ((1, 0), (1, 1), (0, 0)):
        stamps = torch.zeros(sms, count, 5, dtype=torch.int64, device="cuda")
        ext.run(prog, w, sums, h, sync, scratch, 1, 1, x, probe, stamps, sink)
        torch.cuda.synchronize()
        d = (stamps[:, :, 1:] - stamps[:, :, :-1]).double() / 1e3
        d[:, 1:count - 1:5, :3] = 0  # attention's phases: reads, then the barrier
        d[:, 1:count - 1:5, 3] = (stamps[:, 1:count - 1:5, 4] - stamps[:, 1:count - 1:5, 0]).double() / 1e3
        for i, name in enumerate(names + ("head",)):
            ph = d[:, i:count - 1:5] if i < 5 else d[:, count - 1:]
            med = ph.flatten(0, 1).median(0).values.tolist()
            top = ph.max(0).values.median(0).values.tolist()
            print(f"| {stagings[x]} | {'no' if probe else 'yes'} | {name} | " +
                  " | ".join(f"{a:.2f} ({b:.2f})" for a, b in zip(med, top)) + " |", flush=True)


if __name__ == "__main__":
    main()
