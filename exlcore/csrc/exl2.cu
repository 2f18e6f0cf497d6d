// EXL2 decode kernels. Each block takes one group (a run of stored rows sharing a bit width) and 256 output
// columns; each thread walks its column's bit stream 32 rows at a time: BITS independent 32-bit loads
// (coalesced across the warp), then 32 values at compile-time bit offsets. The act-order gather of x
// happens once per block, into shared memory.
#include "exl2.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int MAX_M = 16;

// The 32 values of a 32-row chunk: value i sits at bit BITS * i of the little-endian stream `words`.
template <int BITS, int ROWS, typename F>
__device__ __forceinline__ void decode_chunk(const int32_t* col, int N, F&& use) {
    constexpr int WORDS = ROWS * BITS / 32;
    uint32_t words[WORDS + 1];
#pragma unroll
    for (int j = 0; j < WORDS; j++) words[j] = __ldg(reinterpret_cast<const uint32_t*>(col + (size_t)j * N));
    words[WORDS] = 0;
#pragma unroll
    for (int i = 0; i < ROWS; i++) {
        constexpr int MASK = (1 << BITS) - 1;
        const int bit = BITS * i, j = bit / 32, s = bit % 32;
        uint32_t v = words[j] >> s;
        if (s + BITS > 32) v |= words[j + 1] << (32 - s);
        use(i, int(v & MASK) - (1 << (BITS - 1)));
    }
}

// Walk one group of `rows` rows for one column, calling use(row, signed code).
template <int BITS, typename F>
__device__ __forceinline__ void walk_group(const int32_t* col, int N, int rows, F&& use) {
    int r = 0;
    for (; r + 32 <= rows; r += 32, col += (size_t)BITS * N)
        decode_chunk<BITS, 32>(col, N, [&](int i, int q) { use(r + i, q); });
    if constexpr (BITS % 2 == 0) {
        if (r + 16 <= rows) decode_chunk<BITS, 16>(col, N, [&](int i, int q) { use(r + i, q); });
    }
}

template <typename F>
__device__ __forceinline__ void walk(int bits, const int32_t* col, int N, int rows, F&& use) {
    switch (bits) {
        case 8: walk_group<8>(col, N, rows, use); break;
        case 6: walk_group<6>(col, N, rows, use); break;
        case 5: walk_group<5>(col, N, rows, use); break;
        case 4: walk_group<4>(col, N, rows, use); break;
        case 3: walk_group<3>(col, N, rows, use); break;
        case 2: walk_group<2>(col, N, rows, use); break;
    }
}

// MAXM is the compile-time row capacity (registers); M <= MAXM the rows actually present.
template <int MAXM>
__global__ void __launch_bounds__(THREADS) gemv_kernel(Exl2Matrix w, const half* __restrict__ x,
                                                       float* __restrict__ out, int M) {
    extern __shared__ float xs[];  // (MAXM, rows of this group), gathered through perm
    const int g = blockIdx.y, n = blockIdx.x * THREADS + threadIdx.x;
    const int first = w.group_row[g], rows = w.group_row[g + 1] - first;
    for (int i = threadIdx.x; i < rows; i += THREADS) {
        const int k = w.perm[first + i];
#pragma unroll
        for (int m = 0; m < MAXM; m++) xs[m * rows + i] = m < M ? __half2float(x[(size_t)m * w.K + k]) : 0.f;
    }
    __syncthreads();
    if (n >= w.N) return;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; m++) acc[m] = 0.f;
    const int32_t* col = w.q_weight + (size_t)w.group_word[g] * w.N + n;
    walk(w.group_bits[g], col, w.N, rows, [&](int i, int q) {
        const float qf = float(q);
#pragma unroll
        for (int m = 0; m < MAXM; m++) acc[m] += qf * xs[m * rows + i];
    });
    // The group's scale is common to all its rows in this column: apply it once.
    const float scale = __half2float(w.scales[(size_t)g * w.N + n]);
#pragma unroll
    for (int m = 0; m < MAXM; m++)
        if (m < M) atomicAdd(out + (size_t)m * w.N + n, acc[m] * scale);
}

__global__ void __launch_bounds__(THREADS) dequantize_kernel(Exl2Matrix w, half* __restrict__ w_t) {
    const int g = blockIdx.y, n = blockIdx.x * THREADS + threadIdx.x;
    if (n >= w.N) return;
    const int first = w.group_row[g], rows = w.group_row[g + 1] - first;
    const half scale = w.scales[(size_t)g * w.N + n];
    const int32_t* col = w.q_weight + (size_t)w.group_word[g] * w.N + n;
    walk(w.group_bits[g], col, w.N, rows, [&](int i, int q) {
        w_t[(size_t)w.perm[first + i] * w.N + n] = __hmul(__int2half_rn(q), scale);
    });
}

template <int MAXM>
cudaError_t launch_gemv(const Exl2Matrix& w, const half* x, float* out, int M, cudaStream_t stream) {
    const dim3 grid((w.N + THREADS - 1) / THREADS, w.G);
    const size_t shared = sizeof(float) * MAXM * w.max_group_rows;
    if (shared > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(gemv_kernel<MAXM>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
        if (e != cudaSuccess) return e;
    }
    gemv_kernel<MAXM><<<grid, THREADS, shared, stream>>>(w, x, out, M);
    return cudaGetLastError();
}

}  // namespace

cudaError_t exl2_gemv(const Exl2Matrix& w, const half* x, float* out, int M, cudaStream_t stream) {
    if (M == 1) return launch_gemv<1>(w, x, out, M, stream);
    if (M == 2) return launch_gemv<2>(w, x, out, M, stream);
    if (M <= 4) return launch_gemv<4>(w, x, out, M, stream);
    if (M <= 8) return launch_gemv<8>(w, x, out, M, stream);
    return launch_gemv<MAX_M>(w, x, out, M, stream);
}

cudaError_t exl2_dequantize(const Exl2Matrix& w, half* w_t, cudaStream_t stream) {
    const dim3 grid((w.N + THREADS - 1) / THREADS, w.G);
    dequantize_kernel<<<grid, THREADS, 0, stream>>>(w, w_t);
    return cudaGetLastError();
}
