// Decode attention split over the keys (flash-decoding), with the step's rotary embedding and KV-cache write. A
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
    __shared__ bool last;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int split = blockIdx.x, splits = gridDim.x;
    const int group = H / KVH, slices = (group + GROUP - 1) / GROUP;
    const int b = blockIdx.y / (KVH * slices), kvh = blockIdx.y / slices % KVH, slice = blockIdx.y % slices;
    const int h0 = kvh * group + slice * GROUP, G = min(GROUP, group - slice * GROUP);
    // Positions are written before the step's first kernel, the cache rows before the new one by earlier steps.
    const int64_t pos = positions[b];
    const int end = (int)min((int64_t)kv_len, pos + 1);
    const int begin = window > 0 ? (int)max((int64_t)0, pos - window + 1) : 0;
    const int j0 = split * block_keys, lo = max(begin, j0), hi = min(end, j0 + block_keys);
    T* kb = k + ((size_t)b * KVH + kvh) * S * D;
    T* vb = v + ((size_t)b * KVH + kvh) * S * D;
    const int pieces = D / E;
#pragma unroll 1
    for (int i = tid; i < (hi - lo) * pieces; i += THREADS) {
        const int j = lo + i / pieces, e = i % pieces * E;
        if (j == pos) continue;
        copy16(ks + (j - j0) * D + e, kb + (size_t)j * D + e);
        copy16(vs + (j - j0) * D + e, vb + (size_t)j * D + e);
    }
    asm volatile("cp.async.commit_group;");
    const float *cos_row = nullptr, *sin_row = nullptr;
    if (cos != nullptr) {
#pragma unroll 1
        for (int i = tid; i < D; i += THREADS) {
            table[0][i] = cos[pos * D + i];
            table[1][i] = sin[pos * D + i];
        }
        cos_row = table[0];
        sin_row = table[1];
    }
    __syncthreads();

    dependency_wait();
    dependents_start();
    // The new token: q rotated (rounded to T, as a separate rotary would store it); k rotated and v into the cache
    // by the first block of each KV head, and into the stage by the block whose keys hold the position. Every load
    // is issued before the first store (indices past the end clamped to the last element), so all take one round
    // trip.
    constexpr int PER_THREAD = GROUP * MAX_D / THREADS, PER_ROW = (MAX_D + THREADS - 1) / THREADS;
    const bool rotary = cos_row != nullptr;
    Element qe[PER_THREAD], ke[PER_ROW];
    T ve[PER_ROW];
#pragma unroll
    for (int u = 0; u < PER_THREAD; u++) {
        const int i = min(tid + u * THREADS, G * D - 1);
        qe[u] = load_element(q + ((size_t)b * H + h0 + i / D) * D, i % D, D, rotary);
    }
    const bool writer = split == 0 && slice == 0, staged = pos >= lo && pos < hi;
    const T* kn = k_new + ((size_t)b * KVH + kvh) * D;
    const T* vn = v_new + ((size_t)b * KVH + kvh) * D;
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
            if (writer) {
                kb[(size_t)pos * D + d] = kd;
                vb[(size_t)pos * D + d] = vd;
            }
            if (staged) {
                ks[(pos - j0) * D + d] = kd;
                vs[(pos - j0) * D + d] = vd;
            }
        }
    }
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

    // Partials per (head, split): D sums, then max and sum (rows of D + 4, 16-byte aligned). One split writes the
    // output directly.
    const size_t bh0 = (size_t)b * H + h0;
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

int splits_of(int kv_len, int D, int element) {
    return (kv_len + block_keys_of(kv_len, D, element) - 1) / block_keys_of(kv_len, D, element);
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

size_t decode_attention_workspace(int B, int H, int D, int kv_len, int element) {
    const int splits = splits_of(kv_len, D, element);
    return splits > 1 ? (size_t)B * H * splits * (D + 4) : 0;
}

int decode_attention_counters(int B, int H, int KVH) {
    return B * KVH * ((H / KVH + DA_GROUP - 1) / DA_GROUP);
}

template <typename T>
cudaError_t decode_attention(const T* q, const T* k_new, const T* v_new, T* k, T* v, const float* cos,
                             const float* sin, T* out, const int64_t* positions, int B, int H, int KVH, int S, int D,
                             int kv_len, int window, float scale, float softcap, float* workspace, int* counters,
                             cudaStream_t stream) {
    const int element = sizeof(T), block_keys = block_keys_of(kv_len, D, element);
    const dim3 grid(splits_of(kv_len, D, element), decode_attention_counters(B, H, KVH));
    auto kernel = kernel_for<T>(D, H / KVH);
    // Allowed all the device has (its static shared memory aside): within SHARED_BYTES but for the 32 keys a block
    // takes at least, which fp32 rows of 256 exceed (1 KB a row).
    const int e = once_per_device(reinterpret_cast<const void*>(kernel), [&] {
        int device = 0, most = 0;
        cudaFuncAttributes a{};
        cudaError_t r = cudaGetDevice(&device);
        if (r == cudaSuccess) r = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (r == cudaSuccess) r = cudaFuncGetAttributes(&a, kernel);
        if (r == cudaSuccess)
            r = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     most - (int)a.sharedSizeBytes);
        return int(r);
    });
    if (e != cudaSuccess) return cudaError_t(e);
    return launch(kernel, grid, THREADS, shared_of(D, block_keys, element), stream, q, k_new, v_new, k, v, cos, sin,
                  out, positions, H, KVH, S, D, kv_len, block_keys, window, scale, softcap, workspace, counters);
}

#define INSTANTIATE(T)                                                                                           \
    template cudaError_t decode_attention<T>(const T*, const T*, const T*, T*, T*, const float*, const float*, T*, \
                                             const int64_t*, int, int, int, int, int, int, int, float, float, float*, \
                                             int*, cudaStream_t);
INSTANTIATE(half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
