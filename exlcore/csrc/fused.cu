#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused.cuh"

namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // partial may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out, int dim,
                                float eps) {
    const T* row = x + (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = to_float(row[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[(size_t)blockIdx.x * dim + i] = from_float<T>(to_float(row[i]) * r * w[i]);
}

template <typename T>
__global__ void rotary_kernel(T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                              const int64_t* __restrict__ positions, int heads, int dim) {
    const int token = blockIdx.x / heads, half_dim = dim / 2;
    T* v = x + (size_t)blockIdx.x * dim;
    const size_t p = (size_t)positions[token] * dim;
    for (int i = threadIdx.x; i < half_dim; i += blockDim.x) {
        const float a = to_float(v[i]), b = to_float(v[i + half_dim]);
        v[i] = from_float<T>(a * cos[p + i] - b * sin[p + i]);
        v[i + half_dim] = from_float<T>(b * cos[p + i + half_dim] + a * sin[p + i + half_dim]);
    }
}

template <typename T>
__global__ void act_mul_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n,
                               int act) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = to_float(gate[i]);
        float a;
        if (act == 0) {
            a = g / (1.f + __expf(-g));
        } else {
            a = 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
        }
        out[i] = from_float<T>(a * to_float(up[i]));
    }
}

constexpr int ATTN_THREADS = 256;
constexpr int ATTN_KEYS = 8;    // keys each warp scores at once: their loads are in flight together
constexpr int ATTN_MAX_D = 256;  // head dimensions the kernel takes

// Block per (sequence, query head), over the keys the query can see only. Scores: each warp takes ATTN_KEYS
// keys at a time, its lanes reading each key row together (coalesced) and reducing by shuffles. Output: the
// threads split into key lanes x dimension pairs, each summing its keys for two dimensions, then the key
// lanes' sums are added through shared memory.
template <typename T>
__global__ void __launch_bounds__(ATTN_THREADS) decode_attention_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    const int64_t* __restrict__ positions, int H, int KVH, int S, int D, int kv_len, int window, float scale,
    float softcap) {
    extern __shared__ float smem[];  // D floats of q, kv_len scores, then ATTN_THREADS * 2 partial sums
    float* qs = smem;
    float* scores = smem + D;
    float* partial = scores + kv_len;
    const int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KVH);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int64_t pos = positions[b];
    const int end = (int)min((int64_t)kv_len, pos + 1);
    const int begin = window > 0 ? (int)max((int64_t)0, pos - window + 1) : 0;
    const T* qrow = q + ((size_t)b * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_float(qrow[d]);
    __syncthreads();
    const T* kb = k + ((size_t)b * KVH + kvh) * S * D;
    const T* vb = v + ((size_t)b * KVH + kvh) * S * D;
    float local_max = -INFINITY;
    for (int j0 = begin + warp * ATTN_KEYS; j0 < end; j0 += warps * ATTN_KEYS) {
        float dot[ATTN_KEYS] = {};
#pragma unroll
        for (int e = 0; e < ATTN_MAX_D / 32; e++) {  // unrolled: every load of the ATTN_KEYS keys in flight
            const int d = lane + 32 * e;
            if (d < D) {
                const float qd = qs[d];
#pragma unroll
                for (int u = 0; u < ATTN_KEYS; u++)  // keys past the end read the last one (discarded below)
                    dot[u] += qd * to_float(kb[(size_t)min(j0 + u, end - 1) * D + d]);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; u++) {
            for (int o = 16; o > 0; o >>= 1) dot[u] += __shfl_xor_sync(0xffffffff, dot[u], o);
            if (j0 + u < end) {
                float s = dot[u] * scale;
                if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
                if (lane == 0) scores[j0 + u] = s;
                local_max = fmaxf(local_max, s);
            }
        }
    }
    const float m = block_max(local_max);  // its barriers also publish the scores
    float local_sum = 0.f;
    for (int j = begin + threadIdx.x; j < end; j += blockDim.x) {
        const float e = __expf(scores[j] - m);
        scores[j] = e;
        local_sum += e;
    }
    const float inv = 1.f / block_sum(local_sum);  // and publish the exponentials
    const int pairs = D / 2, key_lanes = blockDim.x / pairs;
    const int kl = threadIdx.x / pairs, d = threadIdx.x % pairs * 2;
    if (kl < key_lanes) {
        float a0[8] = {}, a1[8] = {};  // eight keys' loads in flight together
        int j = begin + kl;
        for (; j + 7 * key_lanes < end; j += 8 * key_lanes) {
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const float p = scores[j + u * key_lanes];
                const T* row = vb + (size_t)(j + u * key_lanes) * D + d;
                a0[u] += p * to_float(row[0]);
                a1[u] += p * to_float(row[1]);
            }
        }
        for (; j < end; j += key_lanes) {
            a0[0] += scores[j] * to_float(vb[(size_t)j * D + d]);
            a1[0] += scores[j] * to_float(vb[(size_t)j * D + d + 1]);
        }
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int u = 0; u < 8; u++) s0 += a0[u], s1 += a1[u];
        partial[kl * D + d] = s0;
        partial[kl * D + d + 1] = s1;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float total = 0.f;
        for (int l = 0; l < key_lanes; l++) total += partial[l * D + i];
        out[((size_t)b * H + h) * D + i] = from_float<T>(total * inv);
    }
}

}  // namespace

template <typename T>
cudaError_t rms_norm(const T* x, const float* w, T* out, int rows, int dim, float eps, cudaStream_t stream) {
    const int threads = dim >= 1024 ? 1024 : ((dim + 31) / 32) * 32;
    rms_norm_kernel<T><<<rows, threads, 0, stream>>>(x, w, out, dim, eps);
    return cudaGetLastError();
}

template <typename T>
cudaError_t rotary(T* x, const float* cos, const float* sin, const int64_t* positions, int tokens, int heads,
                   int dim, cudaStream_t stream) {
    rotary_kernel<T><<<tokens * heads, ((dim / 2 + 31) / 32) * 32, 0, stream>>>(x, cos, sin, positions, heads, dim);
    return cudaGetLastError();
}

template <typename T>
cudaError_t act_mul(const T* gate, const T* up, T* out, int64_t n, int act, cudaStream_t stream) {
    const int threads = 256;
    const int64_t blocks = (n + threads - 1) / threads < 65535 ? (n + threads - 1) / threads : 65535;
    act_mul_kernel<T><<<(int)blocks, threads, 0, stream>>>(gate, up, out, n, act);
    return cudaGetLastError();
}

template <typename T>
cudaError_t decode_attention(const T* q, const T* k, const T* v, T* out, const int64_t* positions, int B, int H,
                             int KVH, int S, int D, int kv_len, int window, float scale, float softcap,
                             cudaStream_t stream) {
    const size_t shared = sizeof(float) * (D + kv_len + 2 * ATTN_THREADS);  // callers keep this within 48 KB
    if (shared > 48 * 1024 || D % 2 || D > ATTN_MAX_D) return cudaErrorInvalidValue;
    decode_attention_kernel<T><<<B * H, ATTN_THREADS, shared, stream>>>(q, k, v, out, positions, H, KVH, S, D, kv_len,
                                                                       window, scale, softcap);
    return cudaGetLastError();
}

#define INSTANTIATE(T)                                                                                            \
    template cudaError_t rms_norm<T>(const T*, const float*, T*, int, int, float, cudaStream_t);                \
    template cudaError_t rotary<T>(T*, const float*, const float*, const int64_t*, int, int, int, cudaStream_t); \
    template cudaError_t act_mul<T>(const T*, const T*, T*, int64_t, int, cudaStream_t);                         \
    template cudaError_t decode_attention<T>(const T*, const T*, const T*, T*, const int64_t*, int, int, int, int, \
                                             int, int, int, float, float, cudaStream_t);
INSTANTIATE(half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
