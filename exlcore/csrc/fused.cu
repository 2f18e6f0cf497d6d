#include <climits>
#include <type_traits>

#include "convert.cuh"
#include "elementwise.cuh"
#include "fused.cuh"
#include "launch.cuh"

namespace {

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

// A row's norm with each thread holding PER of its elements (i = threadIdx.x + u * blockDim.x) in registers, so the
// row is read once. The weights are loaded before the wait (no kernel writes them): in a decode step their load
// overlaps the kernel before instead of adding a round trip to memory after the sum of squares.
template <int PER>
__device__ __forceinline__ void load_weights(const float* __restrict__ w, int dim, float (&wr)[PER]) {
#pragma unroll
    for (int u = 0; u < PER; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        wr[u] = i < dim ? __uint_as_float(load_early(w + i)) : 0.f;
    }
}

// out[i] = v[i] * rsqrt(mean(v^2) + eps) * w[i], v zero past dim.
template <typename T, int PER>
__device__ __forceinline__ void write_normed(const float (&v)[PER], const float (&wr)[PER], T* __restrict__ out,
                                             int dim, float eps) {
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < PER; u++) ss += v[u] * v[u];
    const float r = rsqrtf(block_sum(ss) / dim + eps);
#pragma unroll
    for (int u = 0; u < PER; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i < dim) out[i] = from_float<T>(v[u] * r * wr[u]);
    }
}

template <typename T, int PER>
__device__ __forceinline__ void rms_norm_row(const T* __restrict__ x, const float* __restrict__ w,
                                             T* __restrict__ out, int dim, float eps) {
    float wr[PER], v[PER];
    load_weights(w, dim, wr);
    dependency_wait();
    dependents_start();
    const size_t row = (size_t)blockIdx.x * dim;
#pragma unroll
    for (int u = 0; u < PER; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        v[u] = i < dim ? to_float(x[row + i]) : 0.f;
    }
    write_normed(v, wr, out + row, dim, eps);
}

// rms_norm_row on the rounded sums, with the same threads and order of summation: the same bits as the add and
// the norm run apart.
template <typename R, typename H, int PER>
__device__ __forceinline__ void add_rms_norm_row(const R* __restrict__ x, const H* __restrict__ h,
                                                 const float* __restrict__ w, R* __restrict__ sum, H* __restrict__ out,
                                                 int dim, float eps) {
    float wr[PER], v[PER];
    load_weights(w, dim, wr);
    dependency_wait();
    dependents_start();
    const size_t row = (size_t)blockIdx.x * dim;
    float hv[PER];  // every load in flight before the first store: the compiler keeps loads after stores
#pragma unroll
    for (int u = 0; u < PER; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        v[u] = i < dim ? to_float(x[row + i]) : 0.f;
        hv[u] = i < dim ? to_float(h[row + i]) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < PER; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        const R s = from_float<R>(v[u] + hv[u]);
        v[u] = to_float(s);
        if (i < dim) sum[row + i] = s;
    }
    write_normed(v, wr, out + row, dim, eps);
}

// The norm kernels. Those for rows past 8K elements (16 or 32 per thread) are built for 1024 threads (launch bounds),
// which holds them to the 64 registers a thread then has, or they would not launch; the others are left as the
// compiler has them (the decode step's, as measured).
constexpr int NORM_THREADS = 1024, WIDE_PER = 16;

template <typename T, int PER>
__global__ void rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out, int dim,
                                float eps) {
    rms_norm_row<T, PER>(x, w, out, dim, eps);
}

template <typename T, int PER>
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_wide_kernel(const T* __restrict__ x,
                                                                      const float* __restrict__ w, T* __restrict__ out,
                                                                      int dim, float eps) {
    rms_norm_row<T, PER>(x, w, out, dim, eps);
}

template <typename R, typename H, int PER>
__global__ void add_rms_norm_kernel(const R* __restrict__ x, const H* __restrict__ h, const float* __restrict__ w,
                                    R* __restrict__ sum, H* __restrict__ out, int dim, float eps) {
    add_rms_norm_row<R, H, PER>(x, h, w, sum, out, dim, eps);
}

template <typename R, typename H, int PER>
__global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_wide_kernel(const R* __restrict__ x,
                                                                          const H* __restrict__ h,
                                                                          const float* __restrict__ w,
                                                                          R* __restrict__ sum, H* __restrict__ out,
                                                                          int dim, float eps) {
    add_rms_norm_row<R, H, PER>(x, h, w, sum, out, dim, eps);
}

// Rotate-half rotation of one head's row by table rows c, s, read from src and written to dst (may be src).
template <typename T>
__device__ __forceinline__ void rotate(const T* src, T* dst, const float* c, const float* s, int half_dim) {
    for (int i = threadIdx.x; i < half_dim; i += blockDim.x) {
        const float a = to_float(src[i]), b = to_float(src[i + half_dim]);
        dst[i] = from_float<T>(rope(a, b, c[i], s[i], true));
        dst[i + half_dim] = from_float<T>(rope(b, a, c[i + half_dim], s[i + half_dim], false));
    }
}

template <typename T>
__global__ void rotary_kernel(T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                              const int64_t* __restrict__ positions, int heads, int dim) {
    T* v = x + (size_t)blockIdx.x * dim;
    const size_t p = (size_t)positions[blockIdx.x / heads] * dim;
    rotate(v, v, cos + p, sin + p, dim / 2);
}

// Block per (token, head) over each token's H query heads, then its KVH key/value heads.
template <typename T>
__global__ void rotary_cache_kernel(T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                    const float* __restrict__ cos, const float* __restrict__ sin,
                                    const int64_t* __restrict__ positions, T* __restrict__ k_cache,
                                    T* __restrict__ v_cache, int len, int H, int KVH, int S, int D) {
    dependency_wait();
    dependents_start();
    const int token = blockIdx.x / (H + KVH), head = blockIdx.x % (H + KVH);
    const size_t p = (size_t)positions[token] * D;
    if (head < H) {
        T* row = q + ((size_t)token * H + head) * D;
        rotate(row, row, cos + p, sin + p, D / 2);
        return;
    }
    const int kvh = head - H;
    const size_t src = ((size_t)token * KVH + kvh) * D;
    const size_t dst = (((size_t)(token / len) * KVH + kvh) * S + positions[token]) * D;
    rotate(k + src, k_cache + dst, cos + p, sin + p, D / 2);
    for (int i = threadIdx.x; i < D; i += blockDim.x) v_cache[dst + i] = v[src + i];
}

template <typename T>
__global__ void act_mul_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n,
                               int act) {
    dependency_wait();
    dependents_start();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = from_float<T>(gated(to_float(gate[i]), to_float(up[i]), act));
}

// Argmax over rows in two launches: blocks of ARGMAX_THREADS each take ARGMAX_SPAN elements of a row, then one warp
// per row picks among the blocks' winners (4 us for one 128K-vocab row on an H100, where torch's reduction takes 27).
// NaN ranks above every number and ties go to the lower index, as in torch.argmax.
constexpr int ARGMAX_THREADS = 256, ARGMAX_SPAN = 4096;

struct Best {
    float v;
    int i;
};

__device__ __forceinline__ bool ranks_above(Best a, Best b) {
    const bool an = isnan(a.v), bn = isnan(b.v);
    if (an != bn) return an;
    if (!an && a.v != b.v) return a.v > b.v;
    return a.i < b.i;
}

__device__ __forceinline__ Best warp_best(Best b) {
    for (int o = 16; o > 0; o >>= 1) {
        const Best other{__shfl_xor_sync(0xffffffff, b.v, o), __shfl_xor_sync(0xffffffff, b.i, o)};
        if (ranks_above(other, b)) b = other;
    }
    return b;
}

template <typename T>
__global__ void argmax_blocks_kernel(const T* __restrict__ x, int2* __restrict__ partial, int n) {
    dependency_wait();
    dependents_start();
    const T* row = x + (size_t)blockIdx.y * n;
    const int end = min(n, (blockIdx.x + 1) * ARGMAX_SPAN);
    Best b{-INFINITY, INT_MAX};
#pragma unroll 4
    for (int i = blockIdx.x * ARGMAX_SPAN + threadIdx.x; i < end; i += ARGMAX_THREADS) {
        const Best c{to_float(row[i]), i};
        if (ranks_above(c, b)) b = c;
    }
    __shared__ Best warps[ARGMAX_THREADS / 32];
    b = warp_best(b);
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = b;
    __syncthreads();
    if (threadIdx.x >= 32) return;
    b = warp_best(threadIdx.x < ARGMAX_THREADS / 32 ? warps[threadIdx.x] : Best{-INFINITY, INT_MAX});
    if (threadIdx.x == 0) partial[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = make_int2(__float_as_int(b.v), b.i);
}

__global__ void argmax_rows_kernel(const int2* __restrict__ partial, int64_t* __restrict__ out, int blocks) {
    dependency_wait();
    dependents_start();
    Best b{-INFINITY, INT_MAX};
    for (int k = threadIdx.x; k < blocks; k += 32) {
        const int2 p = partial[(size_t)blockIdx.x * blocks + k];
        const Best c{__int_as_float(p.x), p.y};
        if (ranks_above(c, b)) b = c;
    }
    b = warp_best(b);
    if (threadIdx.x == 0) out[blockIdx.x] = b.i;
}

// Threads for a row of `dim`: rms_norm and add_rms_norm must agree, so their sums of squares match.
int norm_threads(int dim) { return dim >= NORM_THREADS ? NORM_THREADS : ((dim + 31) / 32) * 32; }

// f(integral_constant<int, PER>()): the norm kernel whose threads hold PER elements each, enough for a row of dim.
template <typename F>
cudaError_t with_row_share(int dim, F&& f) {
    using std::integral_constant;
    const int per = (dim + norm_threads(dim) - 1) / norm_threads(dim);
    if (per <= 1) return f(integral_constant<int, 1>{});
    if (per <= 2) return f(integral_constant<int, 2>{});
    if (per <= 4) return f(integral_constant<int, 4>{});
    if (per <= 8) return f(integral_constant<int, 8>{});
    if (per <= 16) return f(integral_constant<int, 16>{});
    if (per <= 32) return f(integral_constant<int, 32>{});
    return cudaErrorInvalidValue;  // rows of more than NORM_MAX_DIM elements
}

}  // namespace

template <typename T>
cudaError_t rms_norm(const T* x, const float* w, T* out, int rows, int dim, float eps, cudaStream_t stream) {
    return with_row_share(dim, [&](auto per) {
        if constexpr (per.value >= WIDE_PER)
            return launch(rms_norm_wide_kernel<T, per.value>, rows, norm_threads(dim), 0, stream, x, w, out, dim, eps);
        else
            return launch(rms_norm_kernel<T, per.value>, rows, norm_threads(dim), 0, stream, x, w, out, dim, eps);
    });
}

template <typename R, typename H>
cudaError_t add_rms_norm(const R* x, const H* h, const float* w, R* sum, H* out, int rows, int dim, float eps,
                         cudaStream_t stream) {
    return with_row_share(dim, [&](auto per) {
        if constexpr (per.value >= WIDE_PER)
            return launch(add_rms_norm_wide_kernel<R, H, per.value>, rows, norm_threads(dim), 0, stream, x, h, w, sum,
                          out, dim, eps);
        else
            return launch(add_rms_norm_kernel<R, H, per.value>, rows, norm_threads(dim), 0, stream, x, h, w, sum, out,
                          dim, eps);
    });
}

int argmax_blocks(int n) { return (n + ARGMAX_SPAN - 1) / ARGMAX_SPAN; }

template <typename T>
cudaError_t argmax(const T* x, int2* partial, int64_t* out, int rows, int n, cudaStream_t stream) {
    const int blocks = argmax_blocks(n);
    cudaError_t e = launch(argmax_blocks_kernel<T>, dim3(blocks, rows), ARGMAX_THREADS, 0, stream, x, partial, n);
    return e != cudaSuccess ? e : launch(argmax_rows_kernel, rows, 32, 0, stream, partial, out, blocks);
}

template <typename T>
cudaError_t rotary(T* x, const float* cos, const float* sin, const int64_t* positions, int tokens, int heads,
                   int dim, cudaStream_t stream) {
    rotary_kernel<T><<<tokens * heads, ((dim / 2 + 31) / 32) * 32, 0, stream>>>(x, cos, sin, positions, heads, dim);
    return cudaGetLastError();
}

template <typename T>
cudaError_t rotary_cache(T* q, const T* k, const T* v, const float* cos, const float* sin, const int64_t* positions,
                         T* k_cache, T* v_cache, int B, int len, int H, int KVH, int S, int D, cudaStream_t stream) {
    return launch(rotary_cache_kernel<T>, B * len * (H + KVH), ((D / 2 + 31) / 32) * 32, 0, stream, q, k, v, cos,
                  sin, positions, k_cache, v_cache, len, H, KVH, S, D);
}

template <typename T>
cudaError_t act_mul(const T* gate, const T* up, T* out, int64_t n, int act, cudaStream_t stream) {
    const int threads = 256;
    const int64_t blocks = (n + threads - 1) / threads < 65535 ? (n + threads - 1) / threads : 65535;
    return launch(act_mul_kernel<T>, (int)blocks, threads, 0, stream, gate, up, out, n, act);
}

#define INSTANTIATE(T)                                                                                            \
    template cudaError_t rms_norm<T>(const T*, const float*, T*, int, int, float, cudaStream_t);                \
    template cudaError_t rotary<T>(T*, const float*, const float*, const int64_t*, int, int, int, cudaStream_t); \
    template cudaError_t rotary_cache<T>(T*, const T*, const T*, const float*, const float*, const int64_t*, T*, T*, \
                                         int, int, int, int, int, int, cudaStream_t);                           \
    template cudaError_t add_rms_norm<T, T>(const T*, const T*, const float*, T*, T*, int, int, float, cudaStream_t); \
    template cudaError_t act_mul<T>(const T*, const T*, T*, int64_t, int, cudaStream_t);                          \
    template cudaError_t argmax<T>(const T*, int2*, int64_t*, int, int, cudaStream_t);
INSTANTIATE(half)
INSTANTIATE(__nv_bfloat16)
INSTANTIATE(float)
template cudaError_t add_rms_norm<float, half>(const float*, const half*, const float*, float*, half*, int, int, float,
                                               cudaStream_t);
template cudaError_t add_rms_norm<float, __nv_bfloat16>(const float*, const __nv_bfloat16*, const float*, float*,
                                                        __nv_bfloat16*, int, int, float, cudaStream_t);
