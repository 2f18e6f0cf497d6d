// Decode attention split over the keys (flash-decoding). A block takes 32 to 512 keys of one KV head for up to
// DA_GROUP of its query heads, so each key and value row is read once per group, not once per query head:
//   scores  four threads per key, each a quarter of its row in 16-byte loads, dotted with every query head;
//   softmax max and sum over the block's keys, per head;
//   values  each warp sums a quarter of the keys' rows (lanes over dimensions), added up in shared memory.
// Blocks leave their unnormalised output with its max and sum; the last block of a group to finish (a counter
// per group, reset by that block) combines them in split order, so results do not depend on timing. Blocks take
// 32 to 512 keys, for about 16 splits: many blocks for short contexts, a short combine for long ones.
#include <algorithm>
#include <cmath>

#include "attention.cuh"
#include "convert.cuh"
#include "launch.cuh"

namespace {

constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int PARTS = 4;                       // threads per key when scoring
constexpr int PASS = THREADS / PARTS;          // keys scored at once
constexpr int MAX_KEYS = 4 * THREADS;          // keys per block at most
constexpr int BATCH = 8;                       // loads in flight per thread (scores, combine)
constexpr int SPLITS = 16;                     // splits to aim for: enough blocks, a short combine

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

template <typename T, int MAX_D>
__global__ void __launch_bounds__(THREADS) decode_attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    const int64_t* __restrict__ positions, int H, int KVH, int S, int D, int kv_len, int block_keys, int window,
    float scale, float softcap, float* __restrict__ partial, int* __restrict__ counters) {
    constexpr int E = 16 / sizeof(T);        // elements per 16-byte load
    constexpr int DIMS = MAX_D / 32;         // dimensions per lane when summing values
    extern __shared__ float smem[];          // q (DA_GROUP, D), scores (DA_GROUP, MAX_KEYS), sums (WARPS, DA_GROUP, D)
    float* qs = smem;
    float* ps = qs + DA_GROUP * D;
    float* sums = ps + DA_GROUP * MAX_KEYS;
    __shared__ float red[WARPS][DA_GROUP];
    __shared__ float top[DA_GROUP], total[DA_GROUP];  // per head: the block's max score and sum of exponentials
    __shared__ bool last;

    dependency_wait();
    dependents_start();
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int split = blockIdx.x, splits = gridDim.x;
    const int group = H / KVH, slices = (group + DA_GROUP - 1) / DA_GROUP;
    const int b = blockIdx.y / (KVH * slices), kvh = blockIdx.y / slices % KVH, slice = blockIdx.y % slices;
    const int h0 = kvh * group + slice * DA_GROUP, G = min(DA_GROUP, group - slice * DA_GROUP);
    const int64_t pos = positions[b];
    const int end = (int)min((int64_t)kv_len, pos + 1);
    const int begin = window > 0 ? (int)max((int64_t)0, pos - window + 1) : 0;
    const int j0 = split * block_keys;
    const T* kb = k + ((size_t)b * KVH + kvh) * S * D;
    const T* vb = v + ((size_t)b * KVH + kvh) * S * D;

    for (int i = tid; i < G * D; i += THREADS) qs[i] = to_float(q[((size_t)b * H + h0) * D + i]);
    __syncthreads();

    // Scores: key PASS * p + tid / PARTS of the block, 16-byte pieces part, part + PARTS, ... of its row.
    const int pieces = D / E, part = tid % PARTS;
    for (int p = 0; p < block_keys / PASS; p++) {
        const int i = p * PASS + tid / PARTS, j = j0 + i;
        const bool valid = j >= begin && j < end;
        float s[DA_GROUP] = {};
        if (valid) {
            const uint4* row = reinterpret_cast<const uint4*>(kb + (size_t)j * D);
            for (int p0 = part; p0 < pieces; p0 += PARTS * BATCH) {
                uint4 raw[BATCH];
#pragma unroll
                for (int u = 0; u < BATCH; u++)
                    if (p0 + PARTS * u < pieces) raw[u] = __ldg(row + p0 + PARTS * u);
#pragma unroll
                for (int u = 0; u < BATCH; u++) {
                    if (p0 + PARTS * u >= pieces) break;
                    const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
                    for (int c = 0; c < E; c++) {
                        const float kd = to_float(e[c]);
                        const int d = (p0 + PARTS * u) * E + c;
#pragma unroll
                        for (int g = 0; g < DA_GROUP; g++)
                            if (g < G) s[g] += qs[g * D + d] * kd;
                    }
                }
            }
        }
#pragma unroll
        for (int g = 0; g < DA_GROUP; g++) {
            s[g] += __shfl_xor_sync(0xFFFFFFFFu, s[g], 1);
            s[g] += __shfl_xor_sync(0xFFFFFFFFu, s[g], 2);
            float x = s[g] * scale;
            if (softcap > 0.f) x = tanhf(x / softcap) * softcap;
            if (part == 0) ps[g * MAX_KEYS + i] = valid ? x : -INFINITY;
        }
    }
    __syncthreads();

    // Softmax over the block's keys, each thread's keys tid, tid + THREADS, ...
#pragma unroll
    for (int g = 0; g < DA_GROUP; g++) {
        float m = -INFINITY;
        for (int i = tid; i < block_keys; i += THREADS) m = fmaxf(m, ps[g * MAX_KEYS + i]);
        m = warp_max(m);
        if (lane == 0) red[warp][g] = m;
    }
    __syncthreads();
    if (tid < DA_GROUP) {
        float m = red[0][tid];
        for (int w = 1; w < WARPS; w++) m = fmaxf(m, red[w][tid]);
        top[tid] = m;
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < DA_GROUP; g++) {
        float sum = 0.f;
        for (int i = tid; i < block_keys; i += THREADS) {
            const float x = ps[g * MAX_KEYS + i], e = x > -INFINITY ? __expf(x - top[g]) : 0.f;
            ps[g * MAX_KEYS + i] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) red[warp][g] = sum;
    }
    __syncthreads();
    if (tid < DA_GROUP) {
        float t = 0.f;
        for (int w = 0; w < WARPS; w++) t += red[w][tid];
        total[tid] = t;
    }

    // Values: each warp a quarter of the block's keys (the visible ones), lanes over dimensions.
    float acc[DA_GROUP][DIMS] = {};
    const int quarter = block_keys / WARPS;
    const int lo = max(begin, j0 + warp * quarter), hi = min(end, j0 + (warp + 1) * quarter);
    constexpr int ROWS = 2048 / MAX_D;  // value rows in flight per warp
    for (int j1 = lo; j1 < hi; j1 += ROWS) {
        T vv[ROWS][DIMS];
#pragma unroll
        for (int u = 0; u < ROWS; u++)
#pragma unroll
            for (int i = 0; i < DIMS; i++)
                if (j1 + u < hi && lane + 32 * i < D) vv[u][i] = vb[(size_t)(j1 + u) * D + lane + 32 * i];
#pragma unroll
        for (int u = 0; u < ROWS; u++) {
            if (j1 + u >= hi) break;
#pragma unroll
            for (int g = 0; g < DA_GROUP; g++) {
                if (g >= G) break;
                const float p = ps[g * MAX_KEYS + j1 + u - j0];
#pragma unroll
                for (int i = 0; i < DIMS; i++)
                    if (lane + 32 * i < D) acc[g][i] += p * to_float(vv[u][i]);
            }
        }
    }
#pragma unroll
    for (int g = 0; g < DA_GROUP; g++)
#pragma unroll
        for (int i = 0; i < DIMS; i++)
            if (g < G && lane + 32 * i < D) sums[(warp * DA_GROUP + g) * D + lane + 32 * i] = acc[g][i];
    __syncthreads();

    // Partials per (head, split): D sums, then max and sum. One split writes the output directly.
    const size_t bh0 = (size_t)b * H + h0;
    for (int i = tid; i < G * D; i += THREADS) {
        const int g = i / D, d = i % D;
        float o = 0.f;
        for (int w = 0; w < WARPS; w++) o += sums[(w * DA_GROUP + g) * D + d];
        if (splits == 1)
            out[(bh0 + g) * D + d] = from_float<T>(o / total[g]);
        else
            partial[((bh0 + g) * splits + split) * (D + 2) + d] = o;
    }
    if (splits == 1) return;
    if (tid < G) {
        float* ml = partial + ((bh0 + tid) * splits + split) * (D + 2) + D;
        ml[0] = top[tid];
        ml[1] = total[tid];
    }
    __threadfence();  // this split's partials are visible everywhere before it is counted
    __syncthreads();
    if (tid == 0) last = atomicAdd(counters + blockIdx.y, 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();  // every other split's partials are visible now

    for (int i = tid; i < G * D; i += THREADS) {  // every load of a pass issued before any is used
        const int g = i / D, d = i % D;
        const float* pg = partial + (bh0 + g) * splits * (D + 2);
        float m = -INFINITY;
        for (int t0 = 0; t0 < splits; t0 += BATCH) {
            float mt[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; u++) mt[u] = t0 + u < splits ? __ldcg(pg + (t0 + u) * (D + 2) + D) : -INFINITY;
#pragma unroll
            for (int u = 0; u < BATCH; u++) m = fmaxf(m, mt[u]);
        }
        float o = 0.f, sum = 0.f;
        for (int t0 = 0; t0 < splits; t0 += BATCH) {
            float ot[BATCH], mt[BATCH], lt[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const float* pt = pg + (t0 + u) * (D + 2);
                const bool in = t0 + u < splits;
                ot[u] = in ? __ldcg(pt + d) : 0.f;
                mt[u] = in ? __ldcg(pt + D) : 0.f;
                lt[u] = in ? __ldcg(pt + D + 1) : 0.f;
            }
#pragma unroll
            for (int u = 0; u < BATCH; u++) {
                const float f = lt[u] > 0.f ? __expf(mt[u] - m) : 0.f;  // a split with no visible key adds nothing
                o += f * ot[u];
                sum += f * lt[u];
            }
        }
        out[(bh0 + g) * D + d] = from_float<T>(o / sum);
    }
    if (tid == 0) counters[blockIdx.y] = 0;  // ready for the next launch (CUDA graphs replay the same counters)
}

// Keys per block: a multiple of PASS giving about SPLITS splits, up to MAX_KEYS.
int block_keys_of(int kv_len) {
    return PASS * std::min(MAX_KEYS / PASS, std::max(1, (kv_len + SPLITS * PASS - 1) / (SPLITS * PASS)));
}

int splits_of(int kv_len) { return (kv_len + block_keys_of(kv_len) - 1) / block_keys_of(kv_len); }

}  // namespace

size_t decode_attention_workspace(int B, int H, int D, int kv_len) {
    const int splits = splits_of(kv_len);
    return splits > 1 ? (size_t)B * H * splits * (D + 2) : 0;
}

int decode_attention_counters(int B, int H, int KVH) {
    return B * KVH * ((H / KVH + DA_GROUP - 1) / DA_GROUP);
}

template <typename T>
cudaError_t decode_attention(const T* q, const T* k, const T* v, T* out, const int64_t* positions, int B, int H,
                             int KVH, int S, int D, int kv_len, int window, float scale, float softcap,
                             float* workspace, int* counters, cudaStream_t stream) {
    const dim3 grid(splits_of(kv_len), decode_attention_counters(B, H, KVH));
    auto shared_for = [](int d) {
        return int((DA_GROUP * d + DA_GROUP * MAX_KEYS + WARPS * DA_GROUP * d) * sizeof(float));
    };
    const bool small = D <= 128;
    auto kernel = small ? decode_attention_kernel<T, 128> : decode_attention_kernel<T, DA_MAX_D>;
    // Allowed the most the kernel can ask for, even under 48 KB: its static shared memory counts there too.
    const int e = once_per_device(reinterpret_cast<const void*>(kernel), [&] {
        return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        shared_for(small ? 128 : DA_MAX_D)));
    });
    if (e != cudaSuccess) return cudaError_t(e);
    const size_t shared = shared_for(D);
    return launch(kernel, grid, THREADS, shared, stream, q, k, v, out, positions, H, KVH, S, D, kv_len,
                  block_keys_of(kv_len), window, scale, softcap, workspace, counters);
}

#define INSTANTIATE(T)                                                                                           \
    template cudaError_t decode_attention<T>(const T*, const T*, const T*, T*, const int64_t*, int, int, int, int, \
                                             int, int, int, float, float, float*, int*, cudaStream_t);
INSTANTIATE(half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
