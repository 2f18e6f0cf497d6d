// Decode attention split over the keys (flash-decoding), with the step's rotary embedding and KV-cache write, in two
// kernels: on tensor cores for fp16 and bf16 rows of up to 128 in multiples of 16, and of 256 from MMA_WIDE_FROM
// keys (decode_attention_mma_kernel, below), and this one for the rest (fp32, other widths), with scalar arithmetic. A
// block takes a run of keys of one KV head for up to DA_GROUP of its query heads, so each key and value row is read
// once per group, not once per query head:
//   stage   the block's cached keys and values copied into shared memory (cp.async) before the kernel waits for
//           the one before it: only the new token's q, k and v come after, rotated here (and the new k and v
//           written to the cache by one block per KV head);
//   scores  four threads per key, each a quarter of its row in 16-byte pieces, dotted with every query head;
//   softmax max and sum over the block's keys, per head;
//   values  each warp sums a quarter of the keys' rows (lanes over dimensions), added up in shared memory.
// Blocks leave their unnormalised output with its max and sum; the last block of a group to finish (a counter
// per group, reset by that block) combines them in split order, so results do not depend on timing. Blocks take
// MIN_KEYS keys and more, for about 16 splits, as many as SHARED_BYTES of shared memory hold (at least 32).
// Each block runs once per step on an SM whose instruction cache does not hold the kernel, so the code is kept short:
// unrolled for the model's heads per KV head (GROUP, a power of two up to DA_GROUP), and loops that run a few times
// at most are not unrolled (unroll 1). Each halving of the code gave 1.5-4% in batch-1 decode.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attention.cuh"
#include "convert.cuh"
#include "counter.cuh"
#include "elementwise.cuh"
#include "launch.cuh"

namespace {

constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int PARTS = 4;                       // threads per key when scoring
constexpr int PASS = THREADS / PARTS;          // keys scored at once
constexpr int MIN_KEYS = 64;                   // keys per block at least, where memory allows: a shorter combine
constexpr int MAX_KEYS = 512;                  // keys per block at most
constexpr int SHARED_BYTES = 90 * 1024;        // a block's shared memory at most (every GPU from 8.0 has 99 KB)
constexpr int BATCH = 8;                       // splits' loads in flight per thread when combining
constexpr int SPLITS = 16;                     // splits to aim for: enough blocks, a short combine

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// Element d (of D) of a head's row and, with rotary tables, its rotary partner (D / 2 away), as loaded.
struct Element {
    float x, partner;
};

template <typename T>
__device__ __forceinline__ Element load_element(const T* row, int d, int D, bool rotary) {
    return {to_float(row[d]), rotary ? to_float(row[d < D / 2 ? d + D / 2 : d - D / 2]) : 0.f};
}

// The element rotated by the position's table rows c, s; as it is without tables.
__device__ __forceinline__ float rotated(Element e, int d, int D, const float* c, const float* s) {
    return c == nullptr ? e.x : rope(e.x, e.partner, c[d], s[d], d < D / 2);
}

// 16-byte asynchronous copy global -> shared.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(src));
}

// A block's job in the launch (blockIdx.y: batch row, KV head and slice of GROUP heads; blockIdx.x: split): query
// heads h0 .. h0 + G - 1 of batch row b over KV head kvh, at position pos, and the keys j0 .. j0 + block_keys - 1,
// of which lo .. hi - 1 are visible. The writer puts the new key and value in the cache; the block whose keys hold
// the position stages them itself.
struct Job {
    int b, kvh, h0, G, j0, lo, hi;
    int64_t pos;
    bool writer, staged;
};

template <int GROUP>
__device__ __forceinline__ Job job_of(const int64_t* positions, int H, int KVH, int kv_len, int block_keys,
                                        int window) {
    Job p;
    const int group = H / KVH, slices = (group + GROUP - 1) / GROUP, slice = blockIdx.y % slices;
    p.b = blockIdx.y / (KVH * slices);
    p.kvh = blockIdx.y / slices % KVH;
    p.h0 = p.kvh * group + slice * GROUP;
    p.G = min(GROUP, group - slice * GROUP);
    // Positions are written before the step's first kernel, the cache rows before the new one by earlier steps.
    p.pos = positions[p.b];
    const int end = (int)min((int64_t)kv_len, p.pos + 1);
    const int begin = window > 0 ? (int)max((int64_t)0, p.pos - window + 1) : 0;
    p.j0 = blockIdx.x * block_keys;
    p.lo = max(begin, p.j0);
    p.hi = min(end, p.j0 + block_keys);
    p.writer = blockIdx.x == 0 && slice == 0;
    p.staged = p.pos >= p.lo && p.pos < p.hi;
    return p;
}

// The position's rows of the rotary tables into table, by the block's threads; whether there are tables.
__device__ __forceinline__ bool rotary_rows(const float* cos, const float* sin, int64_t pos, int D,
                                            float (&table)[2][DA_MAX_D]) {
    if (cos == nullptr) return false;
#pragma unroll 1
    for (int i = threadIdx.x; i < D; i += THREADS) {
        table[0][i] = cos[pos * D + i];
        table[1][i] = sin[pos * D + i];
    }
    return true;
}

// The new token, after the wait: q rotated by the table rows (none: not rotated) and rounded to T (as a separate
// rotary would store it) into qs (G, D) as fp32; k rotated and v into the cache by the writer, and to stage_row(u, d,
// k, v) for dimension d = threadIdx.x + u THREADS in the block that stages them. Every load is issued before the first
// store (indices past the end clamped to the last element), so all take one round trip. kb, vb: the caches of the
// job's KV head. QUANTIZED: the caches are not T rows; stage_row takes the writer's rows too, and writes them.
template <typename T, int MAX_D, int GROUP, bool QUANTIZED = false, typename Staged>
__device__ __forceinline__ void new_token(const T* q, const T* k_new, const T* v_new, T* kb, T* vb, const Job& job,
                                          int H, int KVH, int D, const float (*table)[DA_MAX_D], float* qs,
                                          Staged&& stage_row) {
    constexpr int PER_THREAD = GROUP * MAX_D / THREADS, PER_ROW = (MAX_D + THREADS - 1) / THREADS;
    const int tid = threadIdx.x, G = job.G;
    const T *qb = q + ((size_t)job.b * H + job.h0) * D, *kn = k_new + ((size_t)job.b * KVH + job.kvh) * D;
    const T* vn = v_new + ((size_t)job.b * KVH + job.kvh) * D;
    const int64_t pos = job.pos;
    const bool rotary = table != nullptr, writer = job.writer, staged = job.staged;
    const float *cos_row = rotary ? table[0] : nullptr, *sin_row = rotary ? table[1] : nullptr;
    Element qe[PER_THREAD], ke[PER_ROW];
    T ve[PER_ROW];
#pragma unroll
    for (int u = 0; u < PER_THREAD; u++) {
        const int i = min(tid + u * THREADS, G * D - 1);
        qe[u] = load_element(qb + (size_t)(i / D) * D, i % D, D, rotary);
    }
    if (writer || staged) {
#pragma unroll
        for (int u = 0; u < PER_ROW; u++) {
            const int d = min(tid + u * THREADS, D - 1);
            ke[u] = load_element(kn, d, D, rotary);
            ve[u] = vn[d];
        }
    }
#pragma unroll
    for (int u = 0; u < PER_THREAD; u++) {
        const int i = tid + u * THREADS;
        if (i < G * D) qs[i] = to_float(from_float<T>(rotated(qe[u], i % D, D, cos_row, sin_row)));
    }
    if (writer || staged) {
#pragma unroll
        for (int u = 0; u < PER_ROW; u++) {
            const int d = tid + u * THREADS;
            if (d >= D) break;
            const T kd = from_float<T>(rotated(ke[u], d, D, cos_row, sin_row)), vd = ve[u];
            if (!QUANTIZED && writer) {
                kb[(size_t)pos * D + d] = kd;
                vb[(size_t)pos * D + d] = vd;
            }
            if (QUANTIZED || staged) stage_row(u, d, kd, vd);
        }
    }
}

// The block's end, given the warps' sums (WARPS, GROUP, D) and per head the max score and sum of exponentials of
// its keys: partials per (head, split), D sums, then max and sum (rows of D + 4, 16-byte aligned), and the split
// combine by the last block of the group in; one split writes the output directly. bh0: (b, h0)'s row of q.
template <typename T, int GROUP>
__device__ __forceinline__ void finish(const float* sums, const float* top, const float* total, T* out, float* partial,
                                       int* counters, size_t bh0, int G, int D) {
    __shared__ bool last;
    const int tid = threadIdx.x, split = blockIdx.x, splits = gridDim.x;
    const int row = D + 4;
#pragma unroll 1
    for (int i = tid; i < G * D; i += THREADS) {
        const int g = i / D, d = i % D;
        float o = 0.f;
        for (int w = 0; w < WARPS; w++) o += sums[(w * GROUP + g) * D + d];
        if (splits == 1)
            out[(bh0 + g) * D + d] = from_float<T>(o / total[g]);
        else
            partial[((bh0 + g) * splits + split) * row + d] = o;
    }
    if (splits == 1) return;
    if (tid < G) {
        float* ml = partial + ((bh0 + tid) * splits + split) * row + D;
        ml[0] = top[tid];
        ml[1] = total[tid];
    }
    __syncthreads();  // every thread's partials written before thread 0 counts the split in
    if (tid == 0) last = count_in(counters + blockIdx.y) == splits - 1;
    __syncthreads();  // in the last split, every thread's loads below after thread 0's acquire
    if (!last) return;

    // Four dimensions of one head per thread: the splits in order, BATCH splits' loads in flight at once, rescaled
    // to the largest maximum so far as it grows (a split with no visible key adds nothing). Usually one batch: one
    // round trip to L2.
#pragma unroll 1
    for (int i = tid; i < G * D / 4; i += THREADS) {
        const int g = i / (D / 4), d = i % (D / 4) * 4;
        const float* pg = partial + (bh0 + g) * splits * row;
        float o[4] = {}, top_so_far = -INFINITY, total_so_far = 0.f;
#pragma unroll 1
        for (int t0 = 0; t0 < splits; t0 += BATCH) {
            float4 ot[BATCH];
            float mt[BATCH], lt[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const float* pt = pg + (size_t)(t0 + u) * row;
                const bool in = t0 + u < splits;
                ot[u] = in ? __ldcg(reinterpret_cast<const float4*>(pt + d)) : make_float4(0.f, 0.f, 0.f, 0.f);
                mt[u] = in ? __ldcg(pt + D) : 0.f;
                lt[u] = in ? __ldcg(pt + D + 1) : 0.f;
            }
            float m = top_so_far;
#pragma unroll
            for (int u = 0; u < BATCH; u++)
                if (lt[u] > 0.f) m = fmaxf(m, mt[u]);
            const float r = top_so_far > -INFINITY ? __expf(top_so_far - m) : 0.f;
            total_so_far *= r;
#pragma unroll
            for (int c = 0; c < 4; c++) o[c] *= r;
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const float f = lt[u] > 0.f ? __expf(mt[u] - m) : 0.f;
                total_so_far += f * lt[u];
                o[0] += f * ot[u].x;
                o[1] += f * ot[u].y;
                o[2] += f * ot[u].z;
                o[3] += f * ot[u].w;
            }
            top_so_far = m;
        }
#pragma unroll
        for (int c = 0; c < 4; c++) out[(bh0 + g) * D + d + c] = from_float<T>(o[c] / total_so_far);
    }
    if (tid == 0) counters[blockIdx.y] = 0;  // ready for the next launch (CUDA graphs replay the same counters)
}

template <typename T, int MAX_D, int GROUP>
__global__ void __launch_bounds__(THREADS) decode_attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new, T* __restrict__ k,
    T* __restrict__ v, const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ out,
    const int64_t* __restrict__ positions, int H, int KVH, int S, int D, int kv_len, int block_keys, int window,
    float scale, float softcap, float* __restrict__ partial, int* __restrict__ counters) {
    constexpr int E = 16 / sizeof(T);        // elements per 16-byte piece
    constexpr int DIMS = MAX_D / 32;         // dimensions per lane when summing values
    // keys and values (block_keys, D) each, q (GROUP, D), scores (GROUP, block_keys), sums (WARPS, GROUP, D)
    extern __shared__ int4 smem[];
    T* ks = reinterpret_cast<T*>(smem);
    T* vs = ks + block_keys * D;
    float* qs = reinterpret_cast<float*>(vs + block_keys * D);
    float* ps = qs + GROUP * D;
    float* sums = ps + GROUP * block_keys;
    __shared__ float red[WARPS][GROUP];
    __shared__ float top[GROUP], total[GROUP];  // per head: the block's max score and sum of exponentials
    __shared__ float table[2][DA_MAX_D];              // the position's cos and sin rows

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Job job = job_of<GROUP>(positions, H, KVH, kv_len, block_keys, window);
    const int G = job.G, j0 = job.j0, lo = job.lo, hi = job.hi;
    T* kb = k + ((size_t)job.b * KVH + job.kvh) * S * D;
    T* vb = v + ((size_t)job.b * KVH + job.kvh) * S * D;
    const int pieces = D / E;
#pragma unroll 1
    for (int i = tid; i < (hi - lo) * pieces; i += THREADS) {
        const int j = lo + i / pieces, e = i % pieces * E;
        if (j == job.pos) continue;
        copy16(ks + (j - j0) * D + e, kb + (size_t)j * D + e);
        copy16(vs + (j - j0) * D + e, vb + (size_t)j * D + e);
    }
    asm volatile("cp.async.commit_group;");
    const bool rotary = rotary_rows(cos, sin, job.pos, D, table);
    __syncthreads();

    dependency_wait();
    dependents_start();
    new_token<T, MAX_D, GROUP>(q, k_new, v_new, kb, vb, job, H, KVH, D, rotary ? table : nullptr, qs,
                               [&](int, int d, T kd, T vd) {
                                   ks[(job.pos - j0) * D + d] = kd;
                                   vs[(job.pos - j0) * D + d] = vd;
                               });
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();

    // Scores: key PASS * p + tid / PARTS of the block, 16-byte pieces part, part + PARTS, ... of its row.
    const int part = tid % PARTS;
#pragma unroll 1
    for (int p = 0; p < block_keys / PASS; p++) {
        const int i = p * PASS + tid / PARTS, j = j0 + i;
        const bool valid = j >= lo && j < hi;
        float s[GROUP] = {};
        if (valid) {
            const uint4* row = reinterpret_cast<const uint4*>(ks + i * D);
            for (int piece = part; piece < pieces; piece += PARTS) {
                const uint4 raw = row[piece];
                const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int c = 0; c < E; c++) {
                    const float kd = to_float(e[c]);
                    const int d = piece * E + c;
#pragma unroll
                    for (int g = 0; g < GROUP; g++)
                        if (g < G) s[g] += qs[g * D + d] * kd;
                }
            }
        }
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            s[g] += __shfl_xor_sync(0xFFFFFFFFu, s[g], 1);
            s[g] += __shfl_xor_sync(0xFFFFFFFFu, s[g], 2);
            float x = s[g] * scale;
            if (softcap > 0.f) x = tanhf(x / softcap) * softcap;
            if (part == 0) ps[g * block_keys + i] = valid ? x : -INFINITY;
        }
    }
    __syncthreads();

    // Softmax over the block's keys, each thread's keys tid, tid + THREADS, ...
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        float m = -INFINITY;
#pragma unroll 1
        for (int i = tid; i < block_keys; i += THREADS) m = fmaxf(m, ps[g * block_keys + i]);
        m = warp_max(m);
        if (lane == 0) red[warp][g] = m;
    }
    __syncthreads();
    if (tid < GROUP) {
        float m = red[0][tid];
        for (int w = 1; w < WARPS; w++) m = fmaxf(m, red[w][tid]);
        top[tid] = m;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        float sum = 0.f;
#pragma unroll 1
        for (int i = tid; i < block_keys; i += THREADS) {
            const float x = ps[g * block_keys + i], e = x > -INFINITY ? __expf(x - top[g]) : 0.f;
            ps[g * block_keys + i] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) red[warp][g] = sum;
    }
    __syncthreads();
    if (tid < GROUP) {
        float t = 0.f;
        for (int w = 0; w < WARPS; w++) t += red[w][tid];
        total[tid] = t;
    }

    // Values: each warp a quarter of the block's keys (the visible ones), lanes over dimensions.
    float acc[GROUP][DIMS] = {};
    const int quarter = block_keys / WARPS;
    for (int i = max(lo - j0, warp * quarter); i < min(hi - j0, (warp + 1) * quarter); i++) {
        float vd[DIMS];
#pragma unroll
        for (int u = 0; u < DIMS; u++) vd[u] = lane + 32 * u < D ? to_float(vs[i * D + lane + 32 * u]) : 0.f;
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            if (g >= G) break;
            const float p = ps[g * block_keys + i];
#pragma unroll
            for (int u = 0; u < DIMS; u++) acc[g][u] += p * vd[u];
        }
    }
#pragma unroll
    for (int g = 0; g < GROUP; g++)
#pragma unroll
        for (int i = 0; i < DIMS; i++)
            if (g < G && lane + 32 * i < D) sums[(warp * GROUP + g) * D + lane + 32 * i] = acc[g][i];
    __syncthreads();

    finish<T, GROUP>(sums, top, total, out, partial, counters, (size_t)job.b * H + job.h0, G, D);
}

// fp16 and bf16 rows of up to DA_MAX_D dimensions, in multiples of 16: the same attention with its arithmetic on
// tensor cores, where the kernel above is bound by issuing its scalar math (about 55 warp instructions per key against
// 7 here; at rows of 128, 2.1 times as fast at 8001 keys and 1.2 times at 201; at rows of 256, 2.1 times at 8001
// keys, but 0.8 times at 201, hence MMA_WIDE_FROM). The block's keys stream through a ring of tiles of MMA_TILE
// keys (cp.async, the first `stages` before the wait), each warp taking 16 keys of a tile: scores S = q K^T (mma
// m16n8k16, the block's heads as rows 0..7 of A, rows 8..15 zero), the warp's running max and sum per head in
// registers (online softmax), then O += P V with P rounded to T. Ring rows are padded by 8 elements so that ldmatrix
// reads them without bank conflicts; rows of keys outside the visible run are zero-filled, as a stale row's NaN bits
// would survive a zero weight. The warps' results meet in shared memory at the end, then finish() as above.
constexpr int MMA_TILE = WARPS * 16;   // keys per tile: 16 per warp
constexpr int MMA_STAGES = 3;          // tiles in the ring at most: two in flight while one is used
constexpr int MMA_MIN_SPLITS = 4, MMA_SPLITS = 32;  // splits at least (keys allowing) and at most
constexpr int MMA_BLOCK_KEYS = 128;    // keys per block between the two
constexpr int MMA_WIDE_FROM = 1024;    // kv_len from which rows over 128 take this kernel

// Two floats as T's packed pair (rounded).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
    if constexpr (std::is_same_v<T, half>) {
        const half2 h = __floats2half2_rn(a, b);
        return *reinterpret_cast<const uint32_t*>(&h);
    } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
}

// d += A B: A's rows 0..7 (a0: columns 2t, 2t + 1; a2: 2t + 8, 2t + 9 of row lane / 4), rows 8..15 zero.
template <typename T>
__device__ __forceinline__ void mma_rows8(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, half>)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// Four 8 x 8 matrices of 16-bit elements from shared memory, lanes 8m .. 8m + 7 giving matrix m's row addresses;
// transposed with TRANS.
template <bool TRANS>
__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], const void* row) {
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at));
}

// copy16, or 16 zero bytes when !in (src is then not read).
__device__ __forceinline__ void copy16_or_zero(void* dst, const void* src, bool in) {
    const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(to), "l"(src), "r"(in ? 16 : 0));
}

// Until at most n (0 to 2) of this thread's cp.async commit groups are pending.
__device__ __forceinline__ void wait_pending(int n) {
    if (n <= 0) asm volatile("cp.async.wait_group 0;" ::: "memory");
    else if (n == 1) asm volatile("cp.async.wait_group 1;" ::: "memory");
    else asm volatile("cp.async.wait_group 2;" ::: "memory");
}

// Quantized caches (exlcore/cache.py defines the format): each group of KV_GROUP elements of a row rotated by the
// orthonormal Hadamard matrix H, then rounded to BITS-bit codes (offset by 2^(BITS-1)) of one fp16 scale. The kernel
// dequantizes codes * scale without undoing H: scores use H q (q . k = Hq . Hk), and the values' weighted sum comes
// out as H o, rotated back at the end (H H = 1).
constexpr int KV_GROUP = 32;

// x, one element of a group per lane, times H (fp32, in the order exlcore.cache.hadamard adds).
__device__ __forceinline__ float hadamard32(float x) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 1; m < 32; m <<= 1) {
        const float y = __shfl_xor_sync(0xFFFFFFFFu, x, m);
        x = lane & m ? y - x : x + y;
    }
    return x * 0.17677669529663687f;  // 32^-0.5
}

// A group of 32 times H where a quad's lanes hold 8 elements each, as mma fragments hold a row: v[i] is element
// (i & 1) + 2 t + 8 (i >> 1 & 1) + 16 (i >> 2) of lane t of the quad. A butterfly per bit of the element's index:
// bits 0, 3 and 4 within the lane's registers, bits 1 and 2 across the quad.
__device__ __forceinline__ void hadamard_quad(float (&v)[8]) {
#pragma unroll
    for (int m = 1; m < 8; m <<= 1)
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (!(i & m)) {
                const float a = v[i], b = v[i | m];
                v[i] = a + b;
                v[i | m] = a - b;
            }
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int m = 1; m < 4; m <<= 1)
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float y = __shfl_xor_sync(0xFFFFFFFFu, v[i], m);
            v[i] = t & m ? y - v[i] : v[i] + y;
        }
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] *= 0.17677669529663687f;
}

// This lane's code (offset) of the group the warp's lanes hold one element each, already rotated, and its scale.
template <int BITS>
__device__ __forceinline__ uint32_t quantize32(float x, half& scale) {
    constexpr float QMAX = (1 << (BITS - 1)) - 1;
    scale = __float2half_rn(warp_max(fabsf(x)) / QMAX);
    const float s = __half2float(scale);
    return (uint32_t)((s > 0.f ? fminf(fmaxf(rintf(x / s), -QMAX), QMAX) : 0.f) + QMAX + 1.f);
}

// 16 codes (w: BITS * 2 bytes) times scale s as 16 elements of T in out: exact products, rounded once.
template <typename T, int BITS>
__device__ __forceinline__ void dequantize16(const uint32_t (&w)[BITS / 2], half s, uint32_t (&out)[8]) {
    if constexpr (std::is_same_v<T, half>) {
        // A pair of codes c as the halves 1024 + c (their bits ORed into the mantissas), less 1024 and the offset
        // (exact), times s (rounded once): three instructions a pair.
        const half2 base = __float2half2_rn(1024.f + (1 << (BITS - 1))), s2 = __half2half2(s);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            uint32_t x;
            if constexpr (BITS == 8) {
                x = __byte_perm(w[e / 2], 0x64646464u, e % 2 ? 0x4342 : 0x4140);
            } else {
                const uint32_t b = w[e / 4] >> (8 * (e % 4));
                x = (b & 0xFu) | (b << 12 & 0xF0000u) | 0x64006400u;
            }
            const half2 h = __hmul2(__hsub2(*reinterpret_cast<const half2*>(&x), base), s2);
            out[e] = *reinterpret_cast<const uint32_t*>(&h);
        }
        return;
    }
    // A code c as the float 2^23 + c (its bits ORed into the mantissa), less the offset: exact, and no I2F.
    constexpr float BASE = 8388608.f + (1 << (BITS - 1));
    const float sf = __half2float(s);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        uint32_t c0, c1;
        if constexpr (BITS == 8) {
            c0 = w[e / 2] >> (16 * (e % 2)) & 0xFF;
            c1 = w[e / 2] >> (16 * (e % 2) + 8) & 0xFF;
        } else {
            c0 = w[e / 4] >> (8 * (e % 4)) & 0xF;
            c1 = w[e / 4] >> (8 * (e % 4) + 4) & 0xF;
        }
        out[e] = pack2<T>((__uint_as_float(0x4B000000u | c0) - BASE) * sf,
                          (__uint_as_float(0x4B000000u | c1) - BASE) * sf);
    }
}

// MAX_D: 128 or 256, the most dimensions the registers hold (the sums: MAX_D / 2 a thread; 155 and 255 registers).
// BITS 8 or 4: a quantized cache, k and v its codes (B, KVH, S, D * BITS / 8) bytes, k_scales and v_scales its
// scales (B, KVH, S, D / KV_GROUP), S a multiple of MMA_TILE.
template <typename T, int MAX_D, int BITS>
__global__ void __launch_bounds__(THREADS) decode_attention_mma_kernel(
    const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new, T* __restrict__ k,
    T* __restrict__ v, const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ out,
    const int64_t* __restrict__ positions, int H, int KVH, int S, int D, int kv_len, int block_keys, int stages,
    int window, float scale, float softcap, float* __restrict__ partial, int* __restrict__ counters,
    half* __restrict__ k_scales, half* __restrict__ v_scales) {
    constexpr int GROUP = DA_GROUP, NT = MAX_D / 8;  // heads a block takes; n-tiles of 8 dimensions at most
    constexpr bool Q = BITS < 16;
    // The ring: `stages` tiles of keys then values, (MMA_TILE, D + 8) each; then q (GROUP, D) in fp32; at the end the
    // warps' sums (WARPS, GROUP, D) over the ring. Quantized, a tile is its codes, keys then values (MMA_TILE, CB)
    // bytes each, then its scales likewise (MMA_TILE, D / KV_GROUP); each warp dequantizes its 16 keys and values
    // into its own (16, D + 8) pair of T after the ring, before q.
    extern __shared__ int4 smem[];
    const int pitch = D + 8, CB = D * BITS / 8, SB = D / KV_GROUP;
    const int slot_bytes = 2 * MMA_TILE * (CB + 2 * SB);
    T* ring = reinterpret_cast<T*>(smem);
    T* warp_tiles = reinterpret_cast<T*>(reinterpret_cast<char*>(smem) + stages * slot_bytes);
    float* qs = reinterpret_cast<float*>(Q ? warp_tiles + WARPS * 2 * 16 * pitch
                                           : ring + (size_t)stages * 2 * MMA_TILE * pitch);
    float* sums = reinterpret_cast<float*>(smem);
    __shared__ float top[GROUP], total[GROUP], warp_top[WARPS][GROUP], warp_total[WARPS][GROUP];
    __shared__ float table[2][DA_MAX_D];  // the position's cos and sin rows

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const Job job = job_of<GROUP>(positions, H, KVH, kv_len, block_keys, window);
    const int G = job.G, j0 = job.j0, lo = job.lo, hi = job.hi;
    const int64_t pos = job.pos;
    // The tiles that hold visible keys: first_tile .. first_tile + tiles - 1 of the block's run.
    const int first_tile = lo < hi ? (lo - j0) / MMA_TILE : 0;
    const int tiles = lo < hi ? (hi - 1 - j0) / MMA_TILE + 1 - first_tile : 0;
    T* kb = k + ((size_t)job.b * KVH + job.kvh) * S * D;
    T* vb = v + ((size_t)job.b * KVH + job.kvh) * S * D;
    const size_t head = (size_t)job.b * KVH + job.kvh;  // the job's rows of a quantized cache
    uint8_t* kq = reinterpret_cast<uint8_t*>(k) + head * S * CB;
    uint8_t* vq = reinterpret_cast<uint8_t*>(v) + head * S * CB;
    half* ksc = k_scales + head * S * SB;
    half* vsc = v_scales + head * S * SB;
    // Tile i into its slot as commit group i (empty past the last tile, so that waits count groups alike): the ring
    // starts full, and tile i - 1's slot takes tile i - 1 + stages once every warp is past it. The new token's row
    // comes from registers. A quantized tile is four runs of bytes (S holds whole tiles), its rows outside the
    // visible run zeroed as they are dequantized.
    const auto stage = [&](int i) {
        if constexpr (Q) {
            if (i < tiles) {
                const int base = j0 + (first_tile + i) * MMA_TILE;
                const int code_pieces = MMA_TILE * CB / 16, scale_pieces = MMA_TILE * SB / 8;
                char* slot = reinterpret_cast<char*>(smem) + (i % stages) * slot_bytes;
                const uint8_t *kf = kq + (size_t)base * CB, *vf = vq + (size_t)base * CB;
#pragma unroll 1
                for (int u = tid; u < code_pieces; u += THREADS) {
                    copy16(slot + 16 * u, kf + 16 * u);
                    copy16(slot + MMA_TILE * CB + 16 * u, vf + 16 * u);
                }
                const half *ksf = ksc + (size_t)base * SB, *vsf = vsc + (size_t)base * SB;
                char* scales = slot + 2 * MMA_TILE * CB;
                for (int u = tid; u < scale_pieces; u += THREADS) {
                    copy16(scales + 16 * u, ksf + 8 * u);
                    copy16(scales + MMA_TILE * SB * 2 + 16 * u, vsf + 8 * u);
                }
            }
        } else if (i < tiles) {
            const int base = j0 + (first_tile + i) * MMA_TILE, pieces = D / 8;
            T* ks = ring + (size_t)(i % stages) * 2 * MMA_TILE * pitch;
#pragma unroll 1
            for (int u = tid; u < MMA_TILE * pieces; u += THREADS) {
                const int r = u / pieces, e = u % pieces * 8, j = base + r;
                if (j == pos) continue;
                const bool in = j >= lo && j < hi;
                const size_t from = (size_t)(in ? j : lo) * D + e;
                copy16_or_zero(ks + r * pitch + e, kb + from, in);
                copy16_or_zero(ks + (MMA_TILE + r) * pitch + e, vb + from, in);
            }
        }
        asm volatile("cp.async.commit_group;");
    };
#pragma unroll 1
    for (int i = 0; i < stages; i++) stage(i);
    const bool rotary = rotary_rows(cos, sin, pos, D, table);
    __syncthreads();

    dependency_wait();
    dependents_start();
    constexpr int PER_ROW = (MAX_D + THREADS - 1) / THREADS;
    T k_row[PER_ROW], v_row[PER_ROW];  // the new token's dimensions tid + u THREADS, for its tile
    // Quantized: its codes (a byte; at 4 bits the even lane's holds its odd neighbour's in the high nibble) and scales.
    uint32_t k_code[Q ? PER_ROW : 1], v_code[Q ? PER_ROW : 1];
    half k_scale[Q ? PER_ROW : 1], v_scale[Q ? PER_ROW : 1];
    if constexpr (Q) {
        new_token<T, MAX_D, GROUP, true>(q, k_new, v_new, kb, vb, job, H, KVH, D, rotary ? table : nullptr, qs,
                                         [&](int u, int d, T kd, T vd) {
            k_code[u] = quantize32<BITS>(hadamard32(to_float(kd)), k_scale[u]);
            v_code[u] = quantize32<BITS>(hadamard32(to_float(vd)), v_scale[u]);
            if constexpr (BITS == 4) {
                k_code[u] |= __shfl_down_sync(0xFFFFFFFFu, k_code[u], 1) << 4;
                v_code[u] |= __shfl_down_sync(0xFFFFFFFFu, v_code[u], 1) << 4;
            }
            if (job.writer && d % (8 / BITS) == 0) {
                kq[(size_t)pos * CB + d * BITS / 8] = (uint8_t)k_code[u];
                vq[(size_t)pos * CB + d * BITS / 8] = (uint8_t)v_code[u];
            }
            if (job.writer && d % KV_GROUP == 0) {
                ksc[(size_t)pos * SB + d / KV_GROUP] = k_scale[u];
                vsc[(size_t)pos * SB + d / KV_GROUP] = v_scale[u];
            }
        });
    } else {
        new_token<T, MAX_D, GROUP>(q, k_new, v_new, kb, vb, job, H, KVH, D, rotary ? table : nullptr, qs,
                                   [&](int u, int, T kd, T vd) {
                                       k_row[u] = kd;
                                       v_row[u] = vd;
                                   });
    }
    __syncthreads();
    uint32_t qa[NT / 2][2];  // q as A fragments, one per 16 dimensions
    if constexpr (Q) {  // H q, a group of 32 (two fragments) at a time
#pragma unroll
        for (int c = 0; c < NT / 4; c++) {
            if (32 * c >= D) break;
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++)
                v[i] = g < G ? qs[g * D + 32 * c + 16 * (i >> 2) + 8 * (i >> 1 & 1) + 2 * t + (i & 1)] : 0.f;
            hadamard_quad(v);
            qa[2 * c][0] = pack2<T>(v[0], v[1]);
            qa[2 * c][1] = pack2<T>(v[2], v[3]);
            qa[2 * c + 1][0] = pack2<T>(v[4], v[5]);
            qa[2 * c + 1][1] = pack2<T>(v[6], v[7]);
        }
    } else {
#pragma unroll
        for (int s = 0; s < NT / 2; s++) {
            qa[s][0] = qa[s][1] = 0u;
            if (g < G && 16 * s < D) {
                const float* row = qs + g * D + 16 * s + 2 * t;
                qa[s][0] = pack2<T>(row[0], row[1]);
                qa[s][1] = pack2<T>(row[8], row[9]);
            }
        }
    }

    // Row g's running max (alike in its four lanes) and this lane's share of its sum; the row's sums, dimensions
    // 8 nt + 2 t and + 1 in o[nt][0..1] (o[nt][2..3] are zero rows' sums).
    float o[NT][4] = {}, top_so_far = -INFINITY, total_so_far = 0.f;
    const int pos_tile = job.staged ? (int)(pos - j0) / MMA_TILE - first_tile : -1, kw = warp * 16;
    const int m = lane / 8, r = lane % 8;  // the matrix and row whose address this lane gives to ldmatrix
    // Quantized: a row's 16-element pieces to row_lanes lanes, lane_rows rows at a time (lanes past them idle).
    const int row_lanes = D / 16, lane_rows = 32 / row_lanes, lane_row = lane / row_lanes, lane_piece = lane % row_lanes;
#pragma unroll 1
    for (int i = 0; i < tiles; i++) {
        const int base = j0 + (first_tile + i) * MMA_TILE;
        T* ks = ring + (size_t)(i % stages) * 2 * MMA_TILE * pitch;
        T* vs = ks + MMA_TILE * pitch;
        uint8_t* slot = reinterpret_cast<uint8_t*>(smem) + (i % stages) * slot_bytes;
        half* slot_scales = reinterpret_cast<half*>(slot + 2 * MMA_TILE * CB);
        wait_pending(i == 0 ? stages - 1 : stages - 2);  // tile i is group i: the last of those in
        if (i == pos_tile)
#pragma unroll
            for (int u = 0; u < PER_ROW; u++) {
                const int d = tid + u * THREADS;
                if (d >= D) break;
                if constexpr (Q) {
                    if (d % (8 / BITS) == 0) {
                        slot[(pos - base) * CB + d * BITS / 8] = (uint8_t)k_code[u];
                        slot[(MMA_TILE + pos - base) * CB + d * BITS / 8] = (uint8_t)v_code[u];
                    }
                    if (d % KV_GROUP == 0) {
                        slot_scales[(pos - base) * SB + d / KV_GROUP] = k_scale[u];
                        slot_scales[(MMA_TILE + pos - base) * SB + d / KV_GROUP] = v_scale[u];
                    }
                } else {
                    ks[(pos - base) * pitch + d] = k_row[u];
                    vs[(pos - base) * pitch + d] = v_row[u];
                }
            }
        __syncthreads();  // the tile is in, and every warp is past the tile before (whose slot is refilled next)
        if (i > 0) stage(i - 1 + stages);
        // The warp's 16 keys and values: in the ring, or dequantized into the warp's own pair of tiles.
        T* kt = Q ? warp_tiles + warp * 2 * 16 * pitch : ks + kw * pitch;
        T* vt = Q ? kt + 16 * pitch : vs + kw * pitch;
        if constexpr (Q) {  // 16 elements a lane at a time: rows of keys then values, row_lanes lanes a row
            constexpr int BATCH = 4;  // rows whose loads are in flight together
            __syncwarp();  // every lane past the last tile's ldmatrix
            if (lane_row < lane_rows)
#pragma unroll 1
                for (int r0 = lane_row; r0 < 32; r0 += BATCH * lane_rows) {
                    uint32_t codes[BATCH][BITS / 2];
                    half scales[BATCH];
#pragma unroll
                    for (int b = 0; b < BATCH; b++) {
                        const int rr = min(r0 + b * lane_rows, 31), row = rr / 16 * MMA_TILE + kw + rr % 16;
                        const uint8_t* from = slot + row * CB + lane_piece * 2 * BITS;
                        if constexpr (BITS == 8) *reinterpret_cast<uint4*>(codes[b]) = *reinterpret_cast<const uint4*>(from);
                        else *reinterpret_cast<uint2*>(codes[b]) = *reinterpret_cast<const uint2*>(from);
                        scales[b] = slot_scales[row * SB + lane_piece / 2];
                    }
#pragma unroll
                    for (int b = 0; b < BATCH; b++) {
                        const int rr = r0 + b * lane_rows, key = rr % 16, j = base + kw + key;
                        if (rr >= 32) break;
                        uint32_t w[8];
                        dequantize16<T, BITS>(codes[b], scales[b], w);
                        if (j < lo || j >= hi) w[0] = w[1] = w[2] = w[3] = w[4] = w[5] = w[6] = w[7] = 0u;
                        uint4* to = reinterpret_cast<uint4*>((rr < 16 ? kt : vt) + key * pitch + 16 * lane_piece);
                        to[0] = make_uint4(w[0], w[1], w[2], w[3]);
                        to[1] = make_uint4(w[4], w[5], w[6], w[7]);
                    }
                }
            __syncwarp();
        }

        // Scores of keys kw + 8 nt + 2 t + c: matrices (keys 0..7, dims lo), (0..7, hi), (8..15, lo), (8..15, hi).
        float s[2][4] = {};
#pragma unroll
        for (int u = 0; u < NT / 2; u++) {
            if (16 * u >= D) break;
            uint32_t kf[4];
            load_matrices<false>(kf, kt + (8 * (m / 2) + r) * pitch + 16 * u + 8 * (m % 2));
            mma_rows8<T>(s[0], qa[u][0], qa[u][1], kf[0], kf[1]);
            mma_rows8<T>(s[1], qa[u][0], qa[u][1], kf[2], kf[3]);
        }
        float x[2][2], most = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int j = base + kw + 8 * nt + 2 * t + c;
                float e = s[nt][c] * scale;
                if (softcap > 0.f) e = tanhf(e / softcap) * softcap;
                x[nt][c] = j >= lo && j < hi ? e : -INFINITY;
                most = fmaxf(most, x[nt][c]);
            }
        most = fmaxf(most, __shfl_xor_sync(0xFFFFFFFFu, most, 1));
        most = fmaxf(most, __shfl_xor_sync(0xFFFFFFFFu, most, 2));
        const float now = fmaxf(top_so_far, most);
        const float rescale = top_so_far > -INFINITY ? __expf(top_so_far - now) : 0.f;
        float p[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int c = 0; c < 2; c++) p[nt][c] = x[nt][c] > -INFINITY ? __expf(x[nt][c] - now) : 0.f;
        total_so_far = total_so_far * rescale + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
        top_so_far = now;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            o[nt][0] *= rescale;
            o[nt][1] *= rescale;
        }

        // Values: P (row g, keys 2t.. in pa0, 2t + 8.. in pa2) times V; matrices (keys 0..7, dims lo), (8..15, lo),
        // (0..7, hi), (8..15, hi), transposed.
        const uint32_t pa0 = pack2<T>(p[0][0], p[0][1]), pa2 = pack2<T>(p[1][0], p[1][1]);
#pragma unroll
        for (int u = 0; u < NT / 2; u++) {
            if (16 * u >= D) break;
            uint32_t vf[4];
            load_matrices<true>(vf, vt + (8 * (m % 2) + r) * pitch + 16 * u + 8 * (m / 2));
            mma_rows8<T>(o[2 * u], pa0, pa2, vf[0], vf[1]);
            mma_rows8<T>(o[2 * u + 1], pa0, pa2, vf[2], vf[3]);
        }
    }

    // The warps' results to one max and sum per head, their sums rescaled to it.
    total_so_far += __shfl_xor_sync(0xFFFFFFFFu, total_so_far, 1);
    total_so_far += __shfl_xor_sync(0xFFFFFFFFu, total_so_far, 2);
    if (t == 0) {
        warp_top[warp][g] = top_so_far;
        warp_total[warp][g] = total_so_far;
    }
    __syncthreads();  // every warp is past the ring, where the sums go
    float most = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; w++) most = fmaxf(most, warp_top[w][g]);
    const float f = top_so_far > -INFINITY ? __expf(top_so_far - most) : 0.f;
    if constexpr (Q) {  // the sums of H v: H again gives v's
#pragma unroll
        for (int c = 0; c < NT / 4; c++) {
            if (32 * c >= D) break;
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = o[4 * c + (i >> 1)][i & 1];
            hadamard_quad(v);
#pragma unroll
            for (int i = 0; i < 8; i++) o[4 * c + (i >> 1)][i & 1] = v[i];
        }
    }
    if (g < G)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            if (8 * nt >= D) break;
            sums[(warp * GROUP + g) * D + 8 * nt + 2 * t] = o[nt][0] * f;
            sums[(warp * GROUP + g) * D + 8 * nt + 2 * t + 1] = o[nt][1] * f;
        }
    if (warp == 0 && t == 0) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++)
            if (warp_top[w][g] > -INFINITY) sum += __expf(warp_top[w][g] - most) * warp_total[w][g];
        top[g] = most;
        total[g] = sum;
    }
    __syncthreads();
    finish<T, GROUP>(sums, top, total, out, partial, counters, (size_t)job.b * H + job.h0, G, D);
}

// Shared memory for D and block_keys: the staged keys and values, then q, scores and the warps' sums in fp32 (for
// DA_GROUP heads, the most a block takes).
size_t shared_of(int D, int block_keys, int element) {
    return (size_t)2 * block_keys * D * element + (DA_GROUP * D + DA_GROUP * block_keys + WARPS * DA_GROUP * D) * 4;
}

// Keys per block: a multiple of PASS giving about SPLITS splits, MIN_KEYS at least, as many as SHARED_BYTES hold,
// MAX_KEYS at most.
int block_keys_of(int kv_len, int D, int element) {
    const int fit = (SHARED_BYTES - (int)shared_of(D, 0, element)) / (2 * D * element + DA_GROUP * 4) / PASS;
    const int most = std::max(1, std::min(MAX_KEYS / PASS, fit));
    return PASS * std::min(most, std::max(MIN_KEYS / PASS, (kv_len + SPLITS * PASS - 1) / (SPLITS * PASS)));
}

// Whether decode_attention_mma_kernel takes the launch: T fp16 or bf16 (element 2); always for quantized caches.
bool mma_takes(int kv_len, int D, int element, int bits) {
    return bits < 16 || (element == 2 && D % 16 == 0 && (D <= 128 || (D <= DA_MAX_D && kv_len >= MMA_WIDE_FROM)));
}

// Its keys per block (whole tiles): MMA_BLOCK_KEYS, within MMA_MIN_SPLITS .. MMA_SPLITS splits (measured at 201, 2001
// and 8001 keys: 4 splits of 64, 16 of 128, 32 of 256); the tiles in its ring; its shared memory: the ring (and for
// a quantized cache the warps' tiles), then q in fp32.
int mma_block_keys(int kv_len) {
    const int splits = std::clamp((kv_len + MMA_BLOCK_KEYS - 1) / MMA_BLOCK_KEYS, MMA_MIN_SPLITS, MMA_SPLITS);
    return MMA_TILE * std::max(1, (kv_len + splits * MMA_TILE - 1) / (splits * MMA_TILE));
}
int mma_stages(int kv_len) { return std::min(MMA_STAGES, mma_block_keys(kv_len) / MMA_TILE); }
size_t mma_shared(int kv_len, int D, int bits) {
    const size_t q = (size_t)DA_GROUP * D * 4, stages = mma_stages(kv_len);
    if (bits == 16) return stages * 2 * MMA_TILE * (D + 8) * 2 + q;
    return stages * 2 * MMA_TILE * (D * bits / 8 + 2 * D / KV_GROUP) + (size_t)WARPS * 2 * 16 * (D + 8) * 2 + q;
}

int splits_of(int kv_len, int D, int element, int bits) {
    const int keys = mma_takes(kv_len, D, element, bits) ? mma_block_keys(kv_len) : block_keys_of(kv_len, D, element);
    return (kv_len + keys - 1) / keys;
}

// The largest dynamic shared memory `kernel` may take allowed, once per device: all the device has, its static
// shared memory aside (fp32 rows of 256 take 90 KB, three tiles of the mma kernel 108 KB, at rows of 256 211 KB).
cudaError_t allow_shared(const void* kernel) {
    return cudaError_t(once_per_device(kernel, [&] {
        int device = 0, most = 0;
        cudaFuncAttributes a{};
        cudaError_t r = cudaGetDevice(&device);
        if (r == cudaSuccess) r = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (r == cudaSuccess) r = cudaFuncGetAttributes(&a, kernel);
        if (r == cudaSuccess)
            r = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     most - (int)a.sharedSizeBytes);
        return int(r);
    }));
}

// The kernel for head size D and `group` query heads per KV head: the smallest GROUP that holds them (see above).
template <typename T, int MAX_D>
auto kernel_for(int group) {
    return group <= 1 ? decode_attention_kernel<T, MAX_D, 1> : group <= 2 ? decode_attention_kernel<T, MAX_D, 2>
         : group <= 4 ? decode_attention_kernel<T, MAX_D, 4> : decode_attention_kernel<T, MAX_D, DA_GROUP>;
}

template <typename T>
auto kernel_for(int D, int group) {
    return D <= 128 ? kernel_for<T, 128>(group) : kernel_for<T, DA_MAX_D>(group);
}

}  // namespace

size_t decode_attention_workspace(int B, int H, int D, int kv_len, int element, int bits) {
    const int splits = splits_of(kv_len, D, element, bits);
    return splits > 1 ? (size_t)B * H * splits * (D + 4) : 0;
}

int decode_attention_counters(int B, int H, int KVH) {
    return B * KVH * ((H / KVH + DA_GROUP - 1) / DA_GROUP);
}

template <typename T, int BITS>
auto mma_kernel_for(int D) {
    return D <= 128 ? decode_attention_mma_kernel<T, 128, BITS> : decode_attention_mma_kernel<T, DA_MAX_D, BITS>;
}

template <typename T>
cudaError_t decode_attention(const T* q, const T* k_new, const T* v_new, T* k, T* v, const float* cos,
                             const float* sin, T* out, const int64_t* positions, int B, int H, int KVH, int S, int D,
                             int kv_len, int window, float scale, float softcap, float* workspace, int* counters,
                             int bits, half* k_scales, half* v_scales, cudaStream_t stream) {
    const int element = sizeof(T);
    const dim3 grid(splits_of(kv_len, D, element, bits), decode_attention_counters(B, H, KVH));
    if constexpr (!std::is_same_v<T, float>) {
        if (mma_takes(kv_len, D, element, bits)) {
            auto kernel = bits == 8 ? mma_kernel_for<T, 8>(D) : bits == 4 ? mma_kernel_for<T, 4>(D)
                                                                          : mma_kernel_for<T, 16>(D);
            if (const cudaError_t e = allow_shared(reinterpret_cast<const void*>(kernel)); e != cudaSuccess) return e;
            return launch(kernel, grid, THREADS, mma_shared(kv_len, D, bits), stream, q, k_new, v_new, k, v, cos, sin,
                          out, positions, H, KVH, S, D, kv_len, mma_block_keys(kv_len), mma_stages(kv_len), window,
                          scale, softcap, workspace, counters, k_scales, v_scales);
        }
    }
    const int block_keys = block_keys_of(kv_len, D, element);
    auto kernel = kernel_for<T>(D, H / KVH);
    if (const cudaError_t e = allow_shared(reinterpret_cast<const void*>(kernel)); e != cudaSuccess) return e;
    return launch(kernel, grid, THREADS, shared_of(D, block_keys, element), stream, q, k_new, v_new, k, v, cos, sin,
                  out, positions, H, KVH, S, D, kv_len, block_keys, window, scale, softcap, workspace, counters);
}

#define INSTANTIATE(T)                                                                                           \
    template cudaError_t decode_attention<T>(const T*, const T*, const T*, T*, T*, const float*, const float*, T*, \
                                             const int64_t*, int, int, int, int, int, int, int, float, float, float*, \
                                             int*, int, half*, half*, cudaStream_t);
INSTANTIATE(half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
