"""A persistent batch-1 decode step with its matmul arithmetic: what benchmarks/persist.py bounds (the stream and its
barriers) joined to what benchmarks/stream_gemv.py measured for one matrix (the arithmetic against the stream).

    python benchmarks/persist_step.py

One kernel, one block per SM, runs the Llama-3-8B step's 161 phases: per layer q/k/v, attention, o, gate/up and
down, then the head. A producer warp streams every phase's weights through a ring of 8 KB slots (cp.async.bulk), on
past the barriers, as weights depend on nothing. Consumer warps, per phase: attention's stand-in (dependent reads, as
in persist.py); or a matmul: x read back from the sums of the matmul before (all of it and RMS-normed for q/k/v,
gate/up and the head; the rows the block's slots take for o, and for down as silu(gate) * up) into shared memory,
then the block's slots dequantized and multiplied on tensor cores as the decode kernel does (exlcore/csrc/qmatmul.cu's
for_pairs, centred and mma), each column block's sums added by fp32 atomics; then a grid-wide barrier. Codes are
4-bit and random, with one scale for every group (the real head is 6-bit, the body a 5/4/3-bit mix with group scales:
3.98 GB against 3.75 here); timing only, the sums are not checked. They are zeroed by a memset inside the timed graph.

How the consumers share a slot: all eight warps take a 32-column tile of every slot (session 23), or each warp (or
pair of warps) owns every eighth slot whole. How the blocks share a phase: equal runs of slots, runs weighted by
each block's measured rate, or rounds of 8 slots dealt out in turn so each block's bytes spread over the phase's.

The first table takes the step apart: x staged by loads or not at all; the arithmetic off, as the decode kernel does
it, or on raw codes with the centring left to a constant at the end (fewer instructions a slot); a grid barrier after
every phase, only before the normed matmuls (what a step would wait for if its other dependencies were free), counters
that let each phase wait for just what it reads, or nothing; the consumers alone (no stream); attention twice as long.
Then whether a block's rate is its own from step to step, and a timeline of each phase from %globaltimer stamps.
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

constexpr int MAX_PHASES = 192, SLOT_ROWS = 8, COLS = 256, SLOT_WORDS = SLOT_ROWS * COLS, OWNERS = 8, XB = 8,
              VISITS = 4;
// How the consumer warps share the slots, SHARE: 0, eight warps each take a column tile of 32 columns of every slot
// (8 mma a slot, every warp waiting on every slot); else OWNERS groups of SHARE warps, each group every eighth slot
// whole (its 8 column tiles split between the group's warps: 64 mma a slot), the group's split sums added across
// groups in shared memory at each column block's end. Owned slots need more of them in flight.
template <int SHARE> constexpr int CONSUMERS = SHARE ? OWNERS * SHARE : 8;
template <int SHARE> constexpr int THREADS = CONSUMERS<SHARE> * 32;
template <int SHARE> constexpr int SLOTS = SHARE ? 16 : 12;
enum Kind { NORMED, PLAIN, GATED };  // x: the sums before RMS-normed (q/k/v, gate/up, head), as they are (o), or
                                     // silu(gate) * up (down)
enum Staging { NONE, LOADS };  // x left as it is (wrong values), or read by the consumers' loads into fp16
// Between phases: nothing (wrong values); a grid barrier after every phase, or only before the normed matmuls (as a
// step whose other dependencies were free would wait); or DEPS, owned slots only: each phase waits for just what it
// reads. A matmul waits for the column blocks of the sums before that hold its x rows, counted in as each block adds
// its share (`need` blocks each). The norms' scale moves to the reader of the normed matmul's output (attention,
// down; the head's is left out), which waits for every column block of the norm's input to have added its squares.
// Attention is HEADS blocks, one a head, each waiting for its head's q, k and v and telling o when done.
enum Barriers { NO_BARRIERS, EVERY, NORMS, DEPS };
// Counters in `sync` (zeroed each launch): the grid barrier's, then per column block, per phase (column blocks whose
// squares are in), the phases' sums of squares (fp32), and per layer and head (attention done)
constexpr int HEADS = 32, MAX_BLOCKS = 8192, DONE = 1, SUMMED = DONE + MAX_BLOCKS, SQUARES = SUMMED + MAX_PHASES,
              ATTENDED = SQUARES + MAX_PHASES, COUNTERS = ATTENDED + 64 * HEADS;
// The arithmetic: none (the slot read, wrong values); codes centred as the decode kernel does (an fma a pair); or
// (owned slots) the raw 1024 + (code << S) multiplied as they are, the pairs of each mma fragment chosen with one S,
// and x / 16 for the S = 4 ones, so that what is left is 1024 + zero (or 64 + zero) times x's sum over the rows: a
// constant a column block, not applied here (wrong values, by that constant)
enum Math { NO_MATH, CENTRED, RAW };
enum Probe { FULL, NO_STREAM };  // the step; or the consumers alone, taking whatever the ring holds without waiting
                                 // for it (their own speed)

struct Program {
    long long base[MAX_PHASES];  // a matmul's slots: slot i (column block i / (rows / 8), rows 8 (i % that)) at
                                 // words base + i * SLOT_WORDS
    int src[MAX_PHASES];         // its x: floats of `sums` from here (the matmul before)
    int dst[MAX_PHASES];         // its sums: floats of `sums` from here, zeroed before the launch
    int rows[MAX_PHASES];        // rows of 32-bit words (K / 8); 0: a phase of dependent reads only
    int cols[MAX_PHASES];        // N
    int reads[MAX_PHASES];       // dependent round trips (attention's stand-in)
    int kind[MAX_PHASES];
    int prev[MAX_PHASES];        // DEPS: the phase whose sums are its x (-1: the embedding)
    int norm[MAX_PHASES];        // DEPS: the phase whose squares it needs all of (-1: none)
    int first[MAX_PHASES];       // DEPS: its column blocks' counters from here
    int layer[MAX_PHASES];       // DEPS: attention's and o's layer (-1: other phases)
    int count;
};

// DEPS: until counter c reaches target (one thread). A count that never comes (a bug) sets sink[1] and lets every
// later wait through, so that the step ends and says so.
__device__ __forceinline__ void wait_for(const unsigned* c, unsigned target, int* sink) {
    unsigned v;
    for (int spins = 1;; spins++) {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(c) : "memory");
        if (v >= target) return;
        if (spins % 1024 == 0 && (*(volatile int*)(sink + 1) || spins > (1 << 22))) {
            sink[1] = 1;
            return;
        }
    }
}

// DEPS: the counters a phase waits for, each with its target. Warp 0's lanes poll them at once, a round trip for all
// (one thread polling them in turn made the step 2-4% slower).
struct Waits {
    static constexpr int MAX = 48;
    const unsigned* counter[MAX];
    unsigned target[MAX];
    int n = 0;
    __device__ void add(const unsigned* c, unsigned t, int* sink) {
        if (n == MAX) sink[1] = 1;  // more than it holds: the step would be wrong, so say so
        else counter[n] = c, target[n++] = t;
    }
    __device__ void wait(int lane, int* sink) const {
        for (int i = lane; i < n; i += 32) wait_for(counter[i], target[i], sink);
        __syncwarp();
    }
};

__device__ __forceinline__ unsigned count_up(unsigned* c) {
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
    return old;
}

// silu(g) * up with a fast division. exlcore's gated() divides exactly, and its slow path (zeros, large values) made
// down's staging depend on what the step happened to read, most of all without barriers.
__device__ __forceinline__ float silu_up(float g, float up) { return __fdividef(g, 1.f + __expf(-g)) * up; }

template <int THREADS>
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(THREADS) : "memory"); }

// Every block's consumers wait here for all of the grid.
template <int THREADS>
__device__ __forceinline__ void grid_barrier(unsigned* sync, unsigned target) {
    consumers_sync<THREADS>();
    if (threadIdx.x == 0) grid_count(sync, target);
    consumers_sync<THREADS>();
}

// This block's slots of phase p, in order. A run of them: its share cut[b] .. cut[b + 1] of cut[grid] (equal
// shares, or shares weighted by each SM's speed); or (`rounds`) rounds of OWNERS slots along one column block's rows,
// every grid-th round from round b, so that each block's bytes are spread over the phase's.
struct Work {
    int first, count;
    bool rounds;
    __device__ int slot(int i) const {
        return rounds ? (first + i / OWNERS * gridDim.x) * OWNERS + i % OWNERS : first + i;
    }
};

__device__ __forceinline__ Work work_of(const Program& pr, int p, const int* cut, bool rounds) {
    const long long slots = pr.rows[p] / SLOT_ROWS * (pr.cols[p] / COLS), all = cut[gridDim.x];
    if (rounds) {  // a column block's slots are a multiple of OWNERS
        const int b = blockIdx.x;
        return {b, int((slots / OWNERS - b + gridDim.x - 1) / gridDim.x) * OWNERS, true};
    }
    const int first = cut[blockIdx.x] * slots / all;
    return {first, int(cut[blockIdx.x + 1] * slots / all) - first, false};
}

// The block's slots, phase after phase.
struct Cursor {
    const Program& pr;
    const int* cut;
    bool rounds;
    int p = -1, i = 0;
    Work work{0, 0, false};
    __device__ bool next() {
        while (++i >= work.count) {
            if (++p >= pr.count) return false;
            work = work_of(pr, p, cut, rounds), i = -1;
        }
        return true;
    }
    __device__ const uint32_t* address(const uint32_t* w) const {
        return w + pr.base[p] + (size_t)work.slot(i) * SLOT_WORDS;
    }
};

// Consumer warps (CONSUMERS<SHARE>) and a producer warp.
template <int MATH, int X, int SHARE>
__global__ void __launch_bounds__(THREADS<SHARE> + 32, 1) step(const __grid_constant__ Program pr,
                                                               const uint32_t* __restrict__ w, float* sums,
                                                               unsigned* counters, const int* scratch, const int* cut,
                                                               const int* need, bool rounds, int barriers,
                                                               int probe, unsigned long long* stamps, int* sink) {
    extern __shared__ __align__(128) uint32_t smem[];
    constexpr int CONSUMERS = ::CONSUMERS<SHARE>, THREADS = ::THREADS<SHARE>, SLOTS = ::SLOTS<SHARE>,
                  TILES = SHARE ? 8 / SHARE : 1;  // a warp's column tiles of a slot
    constexpr bool OWN = SHARE > 0;
    auto consumers_sync = [] { ::consumers_sync<THREADS>(); };
    __shared__ __align__(8) unsigned long long bars[2 * SLOTS];  // full, then empty
    __shared__ float squares[CONSUMERS];
    __shared__ float warp_sums[OWN ? VISITS : 1][OWNERS][COLS];  // owned: each group's sums of a column block
    __shared__ int warps_in[VISITS];  // owned: warps done with the column block
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
    const unsigned ring = shared_address(smem), full = shared_address(bars), empty = full + 8 * SLOTS;
    if (threadIdx.x == 0) {
        for (int s = 0; s < SLOTS; s++) {
            barrier_init(full + 8 * s, 1);
            barrier_init(empty + 8 * s, OWN ? SHARE : CONSUMERS);
        }
    }
    if constexpr (OWN) {
        for (int i = threadIdx.x; i < VISITS * OWNERS * COLS; i += blockDim.x) (&warp_sums[0][0][0])[i] = 0.f;
        if (threadIdx.x < VISITS) warps_in[threadIdx.x] = 0;
    }
    __syncthreads();
    if (warp == CONSUMERS) {  // the producer
        if (lane == 0 && probe != NO_STREAM) {
            Cursor fetch{pr, cut, rounds};
            for (int k = 0; fetch.next(); k++) {
                const int s = k % SLOTS;
                if (k >= SLOTS) barrier_wait(empty + 8 * s, (k / SLOTS - 1) & 1);
                expect_bytes(full + 8 * s, SLOT_WORDS * 4);
                bulk_copy(ring + s * SLOT_WORDS * 4, fetch.address(w), SLOT_WORDS * 4, full + 8 * s);
            }
        }
        return;
    }
    half2* xs = reinterpret_cast<half2*>(smem + SLOTS * SLOT_WORDS);  // x in fp16
    const GroupRaw group{};  // EXL2's centring offset is a constant; one scale for all groups, so that sums stay near 1
    unsigned acc = threadIdx.x;
    const bool deps = barriers == DEPS;
    for (int p = 0, k = 0, passed = 0; p < pr.count; p++) {
        auto stamp = [&](int i) {  // thread 0's time at point i of phase p, if asked for
            if (stamps && threadIdx.x == 0) {
                unsigned long long now;
                asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)::"memory");
                stamps[((size_t)blockIdx.x * pr.count + p) * 5 + i] = now;
            }
        };
        stamp(0);
        // column blocks of phase q's sums holding floats from .. to
        auto add_blocks = [&](Waits& list, int q, int from, int to) {
            for (int cb = from / COLS; cb <= (to - 1) / COLS; cb++)
                list.add(counters + DONE + pr.first[q] + cb, need[pr.first[q] + cb], sink);
        };
        auto add_norm = [&](Waits& list) {
            if (const int q = pr.norm[p]; q >= 0) list.add(counters + SUMMED + q, pr.cols[q] / COLS, sink);
        };
        const bool attends = pr.reads[p] && (!deps || blockIdx.x < HEADS);
        if (attends && deps) {  // head b's q, k and v (4 heads a kv head), and its norm's scale
            if (warp == 0) {
                Waits list;
                const int b = blockIdx.x, q = pr.prev[p], kv = HEADS * 128 + b / 4 * 128;
                add_blocks(list, q, b * 128, (b + 1) * 128);
                add_blocks(list, q, kv, kv + 128);
                add_blocks(list, q, kv + HEADS / 4 * 128, kv + HEADS / 4 * 128 + 128);
                add_norm(list);
                list.wait(lane, sink);
            }
            consumers_sync();
        }
        for (int r = 0; attends && r < pr.reads[p]; r++)  // a dependent round trip: what another block wrote before
            acc ^= __ldcg(scratch + (size_t)((blockIdx.x * 7 + acc + r) % gridDim.x) * THREADS + threadIdx.x);
        if (attends && deps) {
            consumers_sync();
            if (threadIdx.x == 0) {
                __threadfence();
                count_up(counters + ATTENDED + pr.layer[p] * HEADS + blockIdx.x);
            }
        }
        const Work work = work_of(pr, p, cut, rounds);
        const int2 run = make_int2(work.first, work.first + work.count);  // with runs
        if (work.count) {
            const int K = pr.rows[p] * 8, per_column = pr.rows[p] / SLOT_ROWS, kind = pr.kind[p];
            // x, in fours: all of it for the norm, else the rows this block's slots take: one run of them, or two
            // where the slots go on into the next column block (the first one's last rows, the next one's first)
            int2 span[2] = {make_int2(0, K / 4), make_int2(0, 0)};
            if ((kind != NORMED || deps) && !rounds) {
                const int a = run.x % per_column * 16, b = ((run.y - 1) % per_column + 1) * 16;
                if (run.x / per_column == (run.y - 1) / per_column) span[0] = make_int2(a, b);
                else if (run.y - run.x < per_column) span[0] = make_int2(a, K / 4), span[1] = make_int2(0, b);
            }
            const float4* x = reinterpret_cast<const float4*>(sums + pr.src[p]);
            if (deps) {  // what x's rows come from: attention's heads (o), or the matmul before's column blocks
                if (warp == 0) {
                    Waits list;
                    for (const int2 r : span)
                        if (r.x < r.y) {
                            if (pr.layer[p] >= 0)
                                for (int h = 4 * r.x / 128; h <= (4 * r.y - 1) / 128; h++)
                                    list.add(counters + ATTENDED + pr.layer[p] * HEADS + h, 1, sink);
                            else if (pr.prev[p] >= 0) {
                                add_blocks(list, pr.prev[p], 4 * r.x, 4 * r.y);
                                if (kind == GATED) add_blocks(list, pr.prev[p], K + 4 * r.x, K + 4 * r.y);
                            }
                        }
                    add_norm(list);
                    list.wait(lane, sink);
                }
                consumers_sync();
            }
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
                                v[j] = make_float4(silu_up(v[j].x, u[j].x), silu_up(v[j].y, u[j].y),
                                                   silu_up(v[j].z, u[j].z), silu_up(v[j].w, u[j].w));
                            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
                            reinterpret_cast<uint2*>(xs)[i] = make_uint2(bits_of(__floats2half2_rn(v[j].x, v[j].y)),
                                                                         bits_of(__floats2half2_rn(v[j].z, v[j].w)));
                        }
                    }
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
            auto pair = [&](int j) { return bits_of(xs[j]); };  // x's pair j as fp16
            stamp(2);
            const bool waits = probe != NO_STREAM;
            if constexpr (OWN) {
                // The group's slots (every eighth of the block's, by k), the warp's tiles of them, its sums kept for
                // one column block at a time
                const int owner = warp / SHARE, tile0 = warp % SHARE * TILES;
                float part[TILES][2][4] = {};
                // The sums of a column block's slots (a run's, or a round's) from every warp that took one of them:
                // the last one in adds them up. Each is `visit` v of VISITS kept at once, with `warps` taking part.
                int unit = -1, column_block = 0, v = 0, warps = 0;
                auto flush = [&]() {
                    if (t == 0)
#pragma unroll
                        for (int tile = 0; tile < TILES; tile++)
#pragma unroll
                            for (int h = 0; h < 2; h++) {
                                float* y = warp_sums[v][owner] + 32 * (tile0 + tile) + 4 * (lane / 4) + 2 * h;
                                y[0] = part[tile][h][0], y[1] = part[tile][h][2];
                                part[tile][h][0] = part[tile][h][1] = part[tile][h][2] = part[tile][h][3] = 0.f;
                            }
                    __threadfence_block();
                    __syncwarp();
                    int before = 0;
                    if (lane == 0) before = atomicAdd(&warps_in[v], 1);
                    before = __shfl_sync(0xFFFFFFFFu, before, 0);
                    if (before != warps - 1) return;
                    __threadfence_block();
                    float* y = sums + pr.dst[p] + column_block * COLS;
                    for (int c = lane; c < COLS; c += 32) {
                        float total = 0.f;
#pragma unroll
                        for (int i = 0; i < OWNERS; i++) total += warp_sums[v][i][c], warp_sums[v][i][c] = 0.f;
                        atomicAdd(y + c, total * scale);
                    }
                    __syncwarp();
                    if (lane == 0) warps_in[v] = 0;
                    if (!deps) return;
                    // The block's share of the column block is in; the last block in adds up its squares
                    unsigned blocks_before = 0;
                    if (lane == 0) {
                        __threadfence();
                        blocks_before = count_up(counters + DONE + pr.first[p] + column_block);
                    }
                    blocks_before = __shfl_sync(0xFFFFFFFFu, blocks_before, 0);
                    if (blocks_before + 1 != unsigned(need[pr.first[p] + column_block])) return;
                    float squares = 0.f;
                    for (int c = lane; c < COLS; c += 32) {
                        const float value = __ldcg(y + c);
                        squares += value * value;
                    }
#pragma unroll
                    for (int o = 16; o; o /= 2) squares += __shfl_xor_sync(0xFFFFFFFFu, squares, o);
                    if (lane == 0) {
                        atomicAdd(reinterpret_cast<float*>(counters + SQUARES + p), squares);
                        __threadfence();
                        count_up(counters + SUMMED + p);
                    }
                };
                for (int i = 0; i < work.count; i++, k++) {
                    if (k % OWNERS != owner) continue;
                    const int slot = work.slot(i), s = k % SLOTS, at = slot % per_column;
                    if (const int u = rounds ? i / OWNERS : slot / per_column; u != unit) {
                        if (unit >= 0) flush();
                        unit = u, column_block = slot / per_column;
                        const int slots = min(run.y, (column_block + 1) * per_column) -
                                          max(run.x, column_block * per_column);
                        v = rounds ? u % VISITS : (column_block - run.x / per_column) % VISITS;
                        warps = SHARE * (rounds ? OWNERS : min(OWNERS, slots));
                    }
                    if (waits) barrier_wait(full + 8 * s, (k / SLOTS) & 1);
                    if constexpr (MATH != NO_MATH) {
                        const uint4* words = reinterpret_cast<const uint4*>(smem + s * SLOT_WORDS) + lane;
#pragma unroll
                        for (int c = 0; c < SLOT_ROWS / 4; c++) {
                            const int j = (at * 2 + c) * 16;
                            const uint32_t b[4] = {pair(j + t), pair(j + 4 + t), pair(j + 8 + t), pair(j + 12 + t)};
                            uint32_t b16[4];  // RAW: x / 16, exactly, for the pairs at S = 4
                            if constexpr (MATH == RAW)
#pragma unroll
                                for (int i = 0; i < 4; i++)
                                    b16[i] = bits_of(__hmul2(as_half2(b[i]), __float2half2_rn(1.f / 16)));
#pragma unroll
                            for (int tile = 0; tile < TILES; tile++) {  // a lane's 4 words of a tile's chunk: one load
                                const uint4 v = words[((tile0 + tile) * 2 + c) * 32];
                                const uint32_t q[4] = {v.x, v.y, v.z, v.w};
                                uint32_t a[16];
                                for_pairs<4, 32>(q, [&](auto i, uint32_t raw, auto S) {
                                    if constexpr (MATH == RAW) a[i] = raw;
                                    else a[i] = centred<4, false, i, S>(raw, group);
                                });
#pragma unroll
                                for (int e = 0; e < 2; e++) {
                                    if constexpr (MATH == RAW) {  // even pairs at S = 0, odd ones at S = 4
                                        const uint32_t even[4] = {a[8 * e], a[8 * e + 2], a[8 * e + 4], a[8 * e + 6]},
                                                       odd[4] = {a[8 * e + 1], a[8 * e + 3], a[8 * e + 5],
                                                                 a[8 * e + 7]};
                                        mma(part[tile][0], even, b[2 * e], b[2 * e + 1]);
                                        mma(part[tile][1], odd, b16[2 * e], b16[2 * e + 1]);
                                    } else {
                                        mma(part[tile][0], a + 8 * e, b[2 * e], b[2 * e + 1]);
                                        mma(part[tile][1], a + 8 * e + 4, b[2 * e], b[2 * e + 1]);
                                    }
                                }
                            }
                        }
                    } else {
                        acc ^= smem[s * SLOT_WORDS + lane];
                    }
                    __syncwarp();
                    if (lane == 0 && waits) barrier_arrive(empty + 8 * s);
                }
                if (unit >= 0) flush();
            } else {
                float part[2][4] = {};
                for (int slot = run.x; slot < run.y; slot++, k++) {
                    const int s = k % SLOTS;
                    if (waits) barrier_wait(full + 8 * s, (k / SLOTS) & 1);
                    if constexpr (MATH != NO_MATH) {  // centred
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
                    if (lane == 0 && waits) barrier_arrive(empty + 8 * s);
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
        }
        stamp(3);
        // A barrier after every phase; or only where the next one needs all of x (a normed matmul), as a step whose
        // other dependencies were free would
        if (barriers == EVERY || (barriers == NORMS && p + 1 < pr.count && pr.kind[p + 1] == NORMED && pr.rows[p + 1]))
            grid_barrier<THREADS>(counters, ++passed * gridDim.x);
        stamp(4);
    }
    if (acc == 0x7fffffffu) sink[0] = int(acc);
}

template <int MATH, int SHARE>
auto pick(int64_t x) {
    return x == LOADS ? step<MATH, LOADS, SHARE> : step<MATH, NONE, SHARE>;
}

template <int SHARE>
auto pick(int64_t math, int64_t x) {
    if constexpr (SHARE == 1)
        if (math == RAW) return pick<RAW, SHARE>(x);
    TORCH_CHECK(math != RAW, "persist_step: raw codes are for slots owned by one warp");
    return math ? pick<CENTRED, SHARE>(x) : pick<NO_MATH, SHARE>(x);
}

void run(torch::Tensor program, torch::Tensor w, torch::Tensor sums, int64_t zero_from, torch::Tensor sync,
         torch::Tensor scratch, torch::Tensor cut, torch::Tensor need, int64_t rounds, int64_t math, int64_t barriers,
         int64_t x,
         int64_t probe, int64_t share, torch::Tensor stamps, torch::Tensor sink) {
    Program pr;
    TORCH_CHECK(program.numel() * 4 == sizeof(Program), "persist_step: the program is not ", sizeof(Program), " bytes");
    std::memcpy(&pr, program.data_ptr(), sizeof(Program));
    const auto s = at::cuda::getCurrentCUDAStream();
    cudaMemsetAsync(sync.data_ptr(), 0, sync.numel() * 4, s);
    cudaMemsetAsync(sums.data_ptr<float>() + zero_from, 0, (sums.numel() - zero_from) * 4, s);
    TORCH_CHECK(share >= 0 && share <= 2, "persist_step: share is 0, 1 or 2");
    TORCH_CHECK(!rounds || share, "persist_step: rounds are for owned slots");
    TORCH_CHECK(barriers != DEPS || (share == 1 && !rounds), "persist_step: DEPS is for owned slots, in runs");
    TORCH_CHECK(sync.numel() >= COUNTERS && sink.numel() >= 2, "persist_step: sync or sink too small");
    auto k = share == 2 ? pick<2>(math, x) : share ? pick<1>(math, x) : pick<0>(math, x);
    const int threads = (share ? OWNERS * share : 8) * 32 + 32;
    int K = 0, sms = 0, per_sm = 0;
    for (int p = 0; p < pr.count; p++) K = std::max(K, pr.rows[p] * 8);
    const int shared = (share ? SLOTS<1> : SLOTS<0>) * SLOT_WORDS * 4 + K * 2;
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, shared);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, shared);
    TORCH_CHECK(per_sm >= 1, "persist_step: a block does not fit on an SM");
    auto* at = stamps.numel() ? reinterpret_cast<unsigned long long*>(stamps.data_ptr<int64_t>()) : nullptr;
    k<<<sms, threads, shared, s>>>(pr, reinterpret_cast<const uint32_t*>(w.data_ptr<int>()), sums.data_ptr<float>(),
                                   reinterpret_cast<unsigned*>(sync.data_ptr<int>()), scratch.data_ptr<int>(),
                                   cut.data_ptr<int>(), need.data_ptr<int>(), rounds, barriers, probe, at,
                                   sink.data_ptr<int>());
}
"""
MAX_PHASES, SLOT_WORDS = 192, 2048
COUNTERS = 1 + 8192 + 2 * MAX_PHASES + 64 * 32  # the kernel's
ROUNDS = "rounds"  # each block every grid-th round of 8 slots of a column block, not a run of slots


def program(reads=4):
    """The step's phases (rows of words, columns, dependent reads, how x is made) and where their x and sums live: the
    first hidden_size floats of the sums hold the embedding, each matmul's sums follow in order. Attention is `reads`
    dependent round trips."""
    h, i, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["head_dim"]
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d
    normed, plain, gated = 0, 1, 2
    layer = [(h // 8, q + 2 * kv, 0, normed), (0, 0, reads, plain), (q // 8, h, 0, plain), (h // 8, 2 * i, 0, normed),
             (i // 8, h, 0, gated)]
    phases = layer * SHAPE["num_hidden_layers"] + [(h // 8, SHAPE["vocab_size"], 0, normed)]
    fields = {f: [] for f in ("base", "src", "dst", "rows", "cols", "reads", "kind", "prev", "norm", "first", "layer")}
    words, src, dst, blocks = 0, 0, h, 0
    for p, (rows, cols, reads, kind) in enumerate(phases):
        at = p % 5 if p < len(phases) - 1 else -1  # its place in a layer (-1: the head)
        prev = p - 2 if at == 2 else p - 1  # o's x is q/k/v's sums (attention's stand-in writes none)
        norm = p - 2 if at in (1, 4) else -1  # attention: the down before q/k/v; down: o
        layer = p // 5 if at in (1, 2) else -1
        for f, v in zip(fields, (words, src, dst, rows, cols, reads, kind, prev, norm, blocks, layer)):
            fields[f].append(v)
        if rows:
            words += rows * cols
            src, dst, blocks = dst, dst + cols, blocks + cols // 256
    pad = [0] * (MAX_PHASES - len(phases))
    flat = torch.tensor(fields.pop("base") + pad, dtype=torch.int64).view(torch.int32).tolist()
    for v in fields.values():
        flat += v + pad
    flat += [len(phases), 0]  # count, then the struct's padding to 8 bytes
    return torch.tensor(flat, dtype=torch.int32), words, dst, len(phases), phases


def needs(phases, sms):
    """DEPS: how many blocks add to each column block of each matmul (equal runs of slots), in `first` order."""
    need, b = [], torch.arange(sms)
    for rows, cols, _, _ in phases:
        if rows:
            slots, per_column = rows // 8 * cols // 256, rows // 8
            start, end = b * slots // sms, (b + 1) * slots // sms
            lo = torch.arange(cols // 256)[:, None] * per_column
            need += ((start < lo + per_column) & (end > lo) & (end > start)).sum(1).tolist()
    return torch.tensor(need, dtype=torch.int32)


def main():
    ext = load_inline("exlcore_persist_step", cpp_sources="void run(torch::Tensor program, torch::Tensor w, "
                      "torch::Tensor sums, int64_t zero_from, torch::Tensor sync, torch::Tensor scratch, "
                      "torch::Tensor cut, torch::Tensor need, int64_t rounds, int64_t math, int64_t barriers, "
                      "int64_t x, int64_t probe, int64_t share, torch::Tensor stamps, torch::Tensor sink);",
                      cuda_sources=SOURCE, functions=["run"],
                      extra_include_paths=[str(HERE), str(HERE.parent / "exlcore" / "csrc")],
                      extra_cuda_cflags=["-O3", "-arch=sm_90", "--expt-relaxed-constexpr", "-std=c++17"])
    prog, words, floats, count, phases = program()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    h = SHAPE["hidden_size"]
    w = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda")
    sums = torch.zeros(floats, device="cuda")
    sums[:h] = torch.randn(h, device="cuda")
    sync = torch.zeros(COUNTERS, dtype=torch.int32, device="cuda")
    need = needs(phases, sms).cuda()
    scratch = torch.zeros(sms * 512, dtype=torch.int32, device="cuda")
    sink = torch.zeros(2, dtype=torch.int32, device="cuda")
    none = torch.empty(0, dtype=torch.int64, device="cuda")
    print(f"{count} phases, {words * 4 / 1e9:.2f} GB of 4-bit codes; bound at {COPY_BANDWIDTH / 1e12:.1f} TB/s: "
          f"{words * 4 / COPY_BANDWIDTH * 1e6:.0f} us")
    equal = torch.arange(sms + 1, dtype=torch.int32, device="cuda")
    stagings = ("not staged (wrong values)", "loads, as fp16")
    probes = ("", "consumers alone (no stream)")
    shares = ("all warps", "a warp each", "two warps each")

    def run(share, x, math, barriers, probe, cut, stamps=none, phases=prog):
        """cut: each block's share of every phase's slots as a run (cumulative, sms + 1), or ROUNDS."""
        rounds = isinstance(cut, str)
        ext.run(phases, w, sums, h, sync, scratch, equal if rounds else cut, need, rounds, math, barriers, x, probe,
                share, stamps, sink)

    def timed(share, x, math, barriers, probe, cut, name, phases=prog):
        t = graph_time(lambda: run(share, x, math, barriers, probe, cut, phases=phases))
        if sink[1].item():  # a wait that timed out: the counts are wrong, and so is the row
            print("| a dependency never came: the next row is not the step |")
            sink[1] = 0
        rate = f"{words * 4 / t / 1e12:.2f} | {words * 4 / t / COPY_BANDWIDTH:.0%} |"
        print(f"| {shares[share]} | {name} | {stagings[x]} | {('no', 'centred', 'raw codes')[math]} | "
              f"{('none', 'grid', 'grid, before norms only', 'per dependency')[barriers]} | {probes[probe]} | "
              f"{t * 1e6:.0f} | {rate}",
              flush=True)

    matmuls = torch.ones(count, dtype=torch.bool)
    matmuls[1:count - 1:5] = False

    def timeline(share, cut, barriers=1):
        """Each block's phases from one step (loads, arithmetic, grid barriers unless said): the four intervals between
        its stamps, us, with attention's phases as one interval (its reads and barrier)."""
        stamps = torch.zeros(sms, count, 5, dtype=torch.int64, device="cuda")
        run(share, 1, 1, barriers, 0, cut, stamps)
        torch.cuda.synchronize()
        d = (stamps[:, :, 1:] - stamps[:, :, :-1]).double().cpu() / 1e3
        d[:, ~matmuls, :3] = 0
        d[:, ~matmuls, 3] = (stamps[:, ~matmuls, 4] - stamps[:, ~matmuls, 0]).double().cpu() / 1e3
        return d

    def weighted(cut, busy):
        """Shares in proportion to the blocks' rates (their shares over their time in the matmuls)."""
        r = (cut[1:] - cut[:-1]).double().cpu() / busy.sum(1)
        c = torch.cumsum(r / r.sum() * (1 << 20), 0).round().int()
        return torch.cat([torch.zeros(1, dtype=torch.int32), c]).cuda()

    print("| slots | shares | x | arithmetic | barriers | probe | us | TB/s | of 3.0 TB/s |\n"
          "|---|---|---|---|---|---|---:|---:|---:|")
    timed(1, 0, 0, 0, 0, equal, "equal")
    timed(1, 0, 0, 1, 0, equal, "equal")
    timed(1, 0, 1, 0, 1, equal, "equal")
    for share in (0, 1):
        for barriers in (0, 1):
            timed(share, 1, 1, barriers, 0, equal, "equal")
    timed(2, 1, 1, 1, 0, equal, "equal")
    for share in (0, 1):
        timed(share, 1, 1, 2, 0, equal, "equal")
    timed(1, 0, 2, 0, 1, equal, "equal")
    for barriers in (0, 1, 2, 3):
        timed(1, 1, 2, barriers, 0, equal, "equal")
    timed(1, 1, 1, 3, 0, equal, "equal")
    slow = program(reads=8)[0]  # attention as long as the decode kernel's (about 6 us a layer, not 3)
    for x, math, barriers in ((0, 0, 0), (1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1), (1, 2, 2), (1, 2, 3)):
        timed(1, x, math, barriers, 0, equal, "equal, attention 8 reads", slow)
    for x, math, barriers in ((0, 0, 1), (1, 1, 0), (1, 1, 1)):
        timed(1, x, math, barriers, 0, ROUNDS, ROUNDS)
    timed(1, 1, 1, 1, 0, ROUNDS, ROUNDS + ", attention 8 reads", slow)
    # Whether a block's speed is its own (the same in two steps), over the step or in each phase; then shares weighted
    # by it
    a, b = timeline(1, equal)[:, matmuls, 2], timeline(1, equal)[:, matmuls, 2]
    rate = (1 / a.sum(1)) / (1 / a.sum(1)).mean()

    def corr(u, v):
        return torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()

    print(f"\nBlocks' rates over a step (a warp each, equal shares): {rate.min():.3f} to {rate.max():.3f} of the mean;"
          f" correlation between two steps {corr(a.sum(1), b.sum(1)):.2f}; of each block's time in each phase, less "
          f"the phase's mean, {corr(a - a.mean(0), b - b.mean(0)):.2f}\n")
    cut = weighted(equal, a)
    timed(1, 1, 1, 1, 0, cut, "weighted")
    timed(1, 0, 0, 1, 0, cut, "weighted")

    names = ("q/k/v", "attention", "o", "gate/up", "down")
    print("\nEach block's thread 0, us (median over blocks and layers; in brackets the median of each phase's slowest "
          "block): from the phase's start to x staged in its own loads, to all consumers' x staged, to its slots done, "
          "to the grid barrier passed\n\n| slots | shares | phase | x, own | x, all | slots | barrier |\n"
          "|---|---|---|---:|---:|---:|---:|")
    for share, c, name, barriers in ((0, equal, "equal", 1), (1, equal, "equal", 1), (1, ROUNDS, ROUNDS, 1),
                                     (1, equal, "equal, per dependency", 3)):
        d = timeline(share, c, barriers)
        for i, phase in enumerate(names + ("head",)):
            ph = d[:, i:count - 1:5] if i < 5 else d[:, count - 1:]
            med = ph.flatten(0, 1).median(0).values.tolist()
            top = ph.max(0).values.median(0).values.tolist()
            print(f"| {shares[share]} | {name} | {phase} | " +
                  " | ".join(f"{a:.2f} ({b:.2f})" for a, b in zip(med, top)) + " |", flush=True)

if __name__ == "__main__":
    main()
