// Quantized matmul kernels. The decode kernel gives each warp one work item: 64 output columns (two per lane,
// 8-byte loads, 256 contiguous bytes per warp per packed row) over one slice of the matrix's chunks. Codes
// become fp16 pairs with the 0x6400 exponent trick (1024 + code, or code << S scaled back by an exact fma),
// are centred and scaled exactly as the reference dequantizes them, and are multiplied in half2 within a chunk,
// summed in fp32 across chunks.
// Slices of one column tile are summed by the last warp to finish (a counter per tile), in slice order, so
// results do not depend on timing, and the output is written once, in fp16.
#include <algorithm>
#include <type_traits>
#include <utility>

#include "launch.cuh"
#include "qmatmul.cuh"

namespace {

constexpr int WARPS = 4;           // warps per block; each is an independent work item
constexpr int MIN_CHUNKS = 2;      // chunks per item at least: a split must pay for its partial sums
constexpr int MAX_CHUNKS = 16;     // chunks per item at most: the item's x fits its shared memory
constexpr int MAX_WORDS = 8;       // packed rows per chunk at most (32 rows of 8 bits)
constexpr int PREFETCH_CHUNKS = 4; // chunks of each item brought into L2 while the kernel before finishes
constexpr uint32_t MAGIC = 0x64006400u;  // two fp16 1024.0: a code in the low mantissa bits reads 1024 + code

struct Plan {
    int splits[QM_MAX_BATCH];
    int first_item[QM_MAX_BATCH + 1];  // the work items of matrix i are first_item[i] .. first_item[i+1]-1
};

int tiles_of(const QMatrix& w) { return (w.N + QM_TILE - 1) / QM_TILE; }

// Cut the matrices' chunks into as many work items as the GPU holds at once (`resident`), never more unless
// MAX_CHUNKS forces it (large matrices): a second, part-filled wave would leave most of the GPU idle.
Plan plan(const QMatrix* mats, int count, int resident) {
    Plan p{};
    int tiles = 0;
    for (int i = 0; i < count; i++) tiles += tiles_of(mats[i]);
    const int want = std::max(1, resident / tiles);
    for (int i = 0; i < count; i++) {
        const int chunks = mats[i].n_chunks;
        const int s = std::max((chunks + MAX_CHUNKS - 1) / MAX_CHUNKS, std::min(want, chunks / MIN_CHUNKS));
        const int per = (chunks + s - 1) / s;
        p.splits[i] = (chunks + per - 1) / per;  // no empty slices
        p.first_item[i + 1] = p.first_item[i] + p.splits[i] * tiles_of(mats[i]);
    }
    return p;
}

struct Batch {
    QMatrix m[QM_MAX_BATCH];
    half* out[QM_MAX_BATCH];
    float* partial[QM_MAX_BATCH];  // (splits, M, N) per matrix split into slices
    Plan plan;
    int count;
};

// f(integral_constant<int, i>) for i = 0 .. N-1, unrolled, so each i is a compile-time constant.
template <typename F, int... I>
__device__ __forceinline__ void unrolled(F&& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
__device__ __forceinline__ void unrolled(F&& f) {
    unrolled(f, std::make_integer_sequence<int, N>{});
}

// The ROWS codes of one chunk column as ROWS/2 pairs, each as two fp16 1024 + (code << S): use(pair, raw bits for
// the two columns, S). Word j's 16-bit halves each hold 16 / BITS codes at bits BITS * t, a pair (low half, high
// half) each; 3, 5 and 6 bits as regrouped at load (exlcore/formats/qmatrix.py), which puts the last pairs in
// the bits the halves leave over. A code masked in place within the 10 mantissa bits is exact (S = its
// position), so one shift per word serves the codes above them.
template <int BITS, int ROWS, typename F>
__device__ __forceinline__ void for_pairs(const uint2* q, F&& use) {
    constexpr uint32_t MASK = ((1u << BITS) - 1) * 0x10001u;
    constexpr int WORDS = ROWS * BITS / 32, PER_HALF = 16 / BITS, FIT = 10 / BITS;
#pragma unroll
    for (int j = 0; j < WORDS; j++) {
        const uint32_t x = q[j].x, y = q[j].y, xh = x >> (BITS * FIT), yh = y >> (BITS * FIT);
        unrolled<PER_HALF>([&](auto t) {
            constexpr int S = BITS * (t < FIT ? t : t - FIT);
            const uint32_t lo = t < FIT ? x : xh, hi = t < FIT ? y : yh;
            use(j * PER_HALF + t, (lo & (MASK << S)) | MAGIC, (hi & (MASK << S)) | MAGIC,
                std::integral_constant<int, S>{});
        });
    }
    if constexpr (BITS == 3 || BITS == 5) {  // the last pair: bit j in bit 15 of word j's halves
        uint32_t x = MAGIC, y = MAGIC;
#pragma unroll
        for (int j = 0; j < BITS; j++) {
            x |= (q[j].x >> (15 - j)) & (0x10001u << j);
            y |= (q[j].y >> (15 - j)) & (0x10001u << j);
        }
        use(ROWS / 2 - 1, x, y, std::integral_constant<int, 0>{});
    } else if constexpr (BITS == 6) {  // pair 2 * WORDS + k: its low 4 bits in bits 12..15 of word k's halves, its
        constexpr int SPARE = 2 * WORDS / 3;  // high 2 bits in word SPARE + k / 2's, at bit 12 + 2 * (k % 2)
#pragma unroll
        for (int k = 0; k < SPARE; k++) {
            const int up = 8 + 2 * (k % 2);
            use(2 * WORDS + k, ((q[k].x >> 12) & 0x000F000Fu) | ((q[SPARE + k / 2].x >> up) & 0x00300030u) | MAGIC,
                ((q[k].y >> 12) & 0x000F000Fu) | ((q[SPARE + k / 2].y >> up) & 0x00300030u) | MAGIC,
                std::integral_constant<int, 0>{});
        }
    }
}

__device__ __forceinline__ half2 as_half2(uint32_t bits) { return *reinterpret_cast<half2*>(&bits); }

// A group's raw parameters for columns n, n + 1: EXL2's scale-code word and q_scale_max, or GPTQ's two (scale,
// 1024 + zero) pairs. Loaded with the chunk's codes, a chunk ahead of its math, so no load waits inside it.
struct GroupRaw {
    uint32_t a, b;
};

__device__ __forceinline__ GroupRaw load_group(const QMatrix& w, int g, int n) {
    if (w.scale_codes != nullptr)
        return {__ldg(w.scale_codes + (size_t)g * (w.N / 8) + n / 8), __half_as_ushort(__ldg(w.scale_max + g))};
    const uint2 sz = __ldg(reinterpret_cast<const uint2*>(w.scale_zero + (size_t)g * w.N + n));
    return {sz.x, sz.y};
}

// One column's group parameters for weights(): the scale, and per code position S = BITS * i below the 10 mantissa
// bits, the offset that centres 1024 + (code << S) once scaled down by 2^S: -(1024 >> S) - zero point. `zero` is
// 1024 + the zero point.
template <int BITS>
struct Centre {
    half2 scale, offset[10 / BITS];
};

template <int BITS>
__device__ __forceinline__ Centre<BITS> centre(half2 scale, half2 zero) {
    Centre<BITS> c{scale, {}};
#pragma unroll
    for (int i = 0; i < 10 / BITS; i++)
        c.offset[i] = __hsub2(__float2half2_rn(float(1024 - (1024 >> (BITS * i)))), zero);
    return c;
}

// Two raw codes 1024 + (code << S) -> their weights, exactly as the reference: half(code - zero) * scale. The code
// is scaled down by 2^S (an exact power of two) and centred in one fma, exact as every value is a small integer.
template <int BITS, int S>
__device__ __forceinline__ half2 weights(uint32_t raw, const Centre<BITS>& c) {
    constexpr uint32_t DOWN = (15u - S) << 10 | (15u - S) << 26;  // fp16 2^-S in both halves
    return __hmul2(__hfma2(as_half2(raw), as_half2(DOWN), c.offset[S / BITS]), c.scale);
}

// The group's parameters for columns n, n + 1, scale and zero point each broadcast to both halves.
template <int BITS>
__device__ __forceinline__ void group_params(const QMatrix& w, GroupRaw raw, int n, Centre<BITS> (&c)[2]) {
    if (w.scale_codes != nullptr) {
        const half unit = __hmul(__ushort_as_half(raw.b), __float2half(1.0f / 256));
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int code = ((raw.a >> (4 * (n % 8 + i))) & 15) + 1;
            c[i] = centre<BITS>(__half2half2(__hmul(__int2half_rn(code * code), unit)),
                                __half2half2(__int2half_rn(1024 + (1 << (BITS - 1)))));
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const half2 sz = as_half2(i == 0 ? raw.a : raw.b);
            c[i] = centre<BITS>(__low2half2(sz), __high2half2(sz));
        }
    }
}

// The packed words of one chunk for columns n, n + 1 (streamed: read once, kept out of the way in L2).
__device__ __forceinline__ void load_chunk(const QMatrix& w, int4 ch, int n, uint2 (&q)[MAX_WORDS]) {
    const int words = (ch.y & 0xFF) * (ch.y >> 8) / 32;
#pragma unroll
    for (int j = 0; j < MAX_WORDS; j++)
        if (j < words) q[j] = __ldcs(reinterpret_cast<const uint2*>(w.q_weight + (size_t)(ch.x + j) * w.N + n));
}

// The same words into L2 only.
__device__ __forceinline__ void prefetch_chunk(const QMatrix& w, int4 ch, int n) {
    const int words = (ch.y & 0xFF) * (ch.y >> 8) / 32;
    for (int j = 0; j < words; j++)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w.q_weight + (size_t)(ch.x + j) * w.N + n));
}

// Each lane's share of one chunk: acc[m][c] += x[m] . W[column n + c] over the chunk's rows, multiplied in half2.
// xs holds the chunk's x in decode order, row m at xs[m * xs_stride].
template <int BITS, int ROWS, int MAXM>
__device__ __forceinline__ void dot_chunk(const QMatrix& w, GroupRaw g, int n, const uint2 (&q)[MAX_WORDS],
                                          const half2* xs, int xs_stride, int M, float (&acc)[MAXM][2]) {
    Centre<BITS> c[2];
    group_params<BITS>(w, g, n, c);
    half2 h[MAXM][2];
#pragma unroll
    for (int m = 0; m < MAXM; m++) h[m][0] = h[m][1] = __float2half2_rn(0.f);
    for_pairs<BITS, ROWS>(q, [&](int p, uint32_t raw0, uint32_t raw1, auto S) {
        const half2 w0 = weights<BITS, S>(raw0, c[0]), w1 = weights<BITS, S>(raw1, c[1]);
#pragma unroll
        for (int m = 0; m < MAXM; m++) {
            if (m < M) {
                const half2 xp = xs[m * xs_stride + p];
                h[m][0] = __hfma2(w0, xp, h[m][0]);
                h[m][1] = __hfma2(w1, xp, h[m][1]);
            }
        }
    });
#pragma unroll
    for (int m = 0; m < MAXM; m++)
#pragma unroll
        for (int c = 0; c < 2; c++) acc[m][c] += __low2float(h[m][c]) + __high2float(h[m][c]);
}

// f(bits, rows) with both as compile-time constants (std::integral_constant), for the chunk entry's width.
template <typename F>
__device__ __forceinline__ void with_layout(int4 ch, F&& f) {
    using std::integral_constant;
    const bool full = (ch.y >> 8) == 32;
    switch (ch.y & 0xFF) {
        case 8: full ? f(integral_constant<int, 8>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 8>{}, integral_constant<int, 16>{}); break;
        case 6: full ? f(integral_constant<int, 6>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 6>{}, integral_constant<int, 16>{}); break;
        case 5: f(integral_constant<int, 5>{}, integral_constant<int, 32>{}); break;
        case 4: full ? f(integral_constant<int, 4>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 4>{}, integral_constant<int, 16>{}); break;
        case 3: f(integral_constant<int, 3>{}, integral_constant<int, 32>{}); break;
        case 2: full ? f(integral_constant<int, 2>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 2>{}, integral_constant<int, 16>{}); break;
    }
}

__device__ __forceinline__ int4 shfl(int4 v, int lane) {
    return make_int4(__shfl_sync(0xFFFFFFFFu, v.x, lane), __shfl_sync(0xFFFFFFFFu, v.y, lane),
                     __shfl_sync(0xFFFFFFFFu, v.z, lane), __shfl_sync(0xFFFFFFFFu, v.w, lane));
}

template <int MAXM>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(const __grid_constant__ Batch b, const half* __restrict__ x,
                                                         int M) {
    constexpr int XS = MAX_CHUNKS * 16;  // pairs of x per warp and row of x
    extern __shared__ half2 xs_all[];    // (WARPS, MAXM, XS)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int item = blockIdx.x * WARPS + warp;
    if (item >= b.plan.first_item[b.count]) return;
    int mi = 0;
    while (item >= b.plan.first_item[mi + 1]) mi++;
    const QMatrix& w = b.m[mi];
    const int splits = b.plan.splits[mi], local = item - b.plan.first_item[mi];
    const int tile = local / splits, split = local % splits;
    const bool live = tile * QM_TILE + lane * 2 < w.N;  // N is a multiple of 8: both columns or neither
    const int n = live ? tile * QM_TILE + lane * 2 : 0;  // lanes past the end read column 0, write nothing
    const int per = (w.n_chunks + splits - 1) / splits, c0 = split * per, count = min(per, w.n_chunks - c0);

    // While the kernel before finishes: the item's chunk entries (one per lane), the input channels of its pairs
    // (all in flight at once) and its first chunks, into L2. Then x in decode order, gathered once.
    const int4 mine = lane < count ? __ldg(w.chunks + c0 + lane) : make_int4(0, 0, 0, 0);
    const int4 first = shfl(mine, 0), last = shfl(mine, count - 1);
    const int pair0 = first.w, pairs = last.w + (last.y >> 9) - pair0;
    uint32_t r[XS / 32];
#pragma unroll
    for (int i = 0; i < XS / 32; i++) r[i] = lane + 32 * i < pairs ? __ldg(w.pair_rows + pair0 + lane + 32 * i) : 0;
    for (int c = 0; c < min(count, PREFETCH_CHUNKS); c++) prefetch_chunk(w, shfl(mine, c), n);
    dependency_wait();
    dependents_start();
    half2* xs = xs_all + warp * MAXM * XS;
    for (int m = 0; m < M; m++) {
        const half* xm = x + (size_t)m * w.K;
#pragma unroll
        for (int i = 0; i < XS / 32; i++)
            if (lane + 32 * i < pairs) xs[m * XS + lane + 32 * i] = __halves2half2(xm[r[i] & 0xFFFF], xm[r[i] >> 16]);
    }
    __syncwarp();

    float acc[MAXM][2];
#pragma unroll
    for (int m = 0; m < MAXM; m++) acc[m][0] = acc[m][1] = 0.f;
    // The next chunk's loads are issued before this one is decoded.
    uint2 q[MAX_WORDS], next[MAX_WORDS];
    int4 ch = first;
    load_chunk(w, ch, n, q);
    GroupRaw g = load_group(w, ch.z, n), g_next = g;
    for (int c = 0; c < count; c++) {
        const int4 ch_next = shfl(mine, min(c + 1, count - 1));
        if (c + 1 < count) {
            load_chunk(w, ch_next, n, next);
            g_next = load_group(w, ch_next.z, n);
        }
        with_layout(ch, [&](auto bits, auto rows) {
            dot_chunk<bits.value, rows.value, MAXM>(w, g, n, q, xs + ch.w - pair0, XS, M, acc);
        });
#pragma unroll
        for (int j = 0; j < MAX_WORDS; j++) q[j] = next[j];
        ch = ch_next;
        g = g_next;
    }

    half* out = b.out[mi];
    if (splits == 1) {
        if (live)
            for (int m = 0; m < M; m++)
                *reinterpret_cast<half2*>(out + (size_t)m * w.N + n) = __floats2half2_rn(acc[m][0], acc[m][1]);
        return;
    }
    float* partial = b.partial[mi];
    if (live)
        for (int m = 0; m < M; m++)
            __stcg(reinterpret_cast<float2*>(partial + ((size_t)split * M + m) * w.N + n), make_float2(acc[m][0], acc[m][1]));
    __threadfence();  // this slice's sums are visible everywhere before it is counted
    __syncwarp();
    int* counter = w.counters + tile;
    int done = 0;
    if (lane == 0) done = atomicAdd(counter, 1);
    done = __shfl_sync(0xFFFFFFFFu, done, 0);
    if (done != splits - 1) return;
    __syncwarp();
    __threadfence();  // the last slice in: every other slice's sums are visible now
    if (live)
        for (int m = 0; m < M; m++) {
            float2 s = make_float2(0.f, 0.f);
#pragma unroll 8
            for (int k = 0; k < splits; k++) {
                const float2 v = __ldcg(reinterpret_cast<const float2*>(partial + ((size_t)k * M + m) * w.N + n));
                s.x += v.x;
                s.y += v.y;
            }
            *reinterpret_cast<half2*>(out + (size_t)m * w.N + n) = __floats2half2_rn(s.x, s.y);
        }
    if (lane == 0) *counter = 0;  // ready for the next launch (CUDA graphs replay the same counters)
}

template <int BITS, int ROWS>
__device__ __forceinline__ void dequantize_chunk(const QMatrix& w, int4 ch, int n, half* __restrict__ w_t, int n0,
                                                 int cols) {
    uint2 q[MAX_WORDS];
    load_chunk(w, ch, n, q);
    Centre<BITS> c[2];
    group_params<BITS>(w, load_group(w, ch.z, n), n, c);
    for_pairs<BITS, ROWS>(q, [&](int p, uint32_t raw0, uint32_t raw1, auto S) {
        const half2 w0 = weights<BITS, S>(raw0, c[0]), w1 = weights<BITS, S>(raw1, c[1]);
        const uint32_t r = __ldg(w.pair_rows + ch.w + p);
        *reinterpret_cast<half2*>(w_t + (size_t)(r & 0xFFFF) * cols + n - n0) = __lows2half2(w0, w1);
        *reinterpret_cast<half2*>(w_t + (size_t)(r >> 16) * cols + n - n0) = __highs2half2(w0, w1);
    });
}

__global__ void __launch_bounds__(WARPS * 32) dequantize_kernel(QMatrix w, half* __restrict__ w_t, int n0, int cols) {
    const int c = blockIdx.y * WARPS + threadIdx.x / 32;
    const int n = n0 + blockIdx.x * QM_TILE + threadIdx.x % 32 * 2;
    if (c >= w.n_chunks || n >= n0 + cols) return;
    const int4 ch = __ldg(w.chunks + c);
    with_layout(ch, [&](auto bits, auto rows) { dequantize_chunk<bits.value, rows.value>(w, ch, n, w_t, n0, cols); });
}

// The decode kernel for up to MAXM rows of x, its shared memory, and the work items the GPU holds at once.
struct Kernel {
    void (*fn)(Batch, const half*, int);
    int shared, resident;
};

// Its shared memory set up and its blocks per SM measured once per device (a CUDA error, negated, if that fails).
template <int MAXM>
cudaError_t prepare(int sm_count, Kernel& k) {
    k.fn = gemv_kernel<MAXM>;
    k.shared = WARPS * MAXM * MAX_CHUNKS * 16 * sizeof(half2);
    const int blocks = once_per_device(reinterpret_cast<const void*>(k.fn), [&] {
        cudaError_t e = k.shared > 48 * 1024
                            ? cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.shared)
                            : cudaSuccess;
        int b = 0;
        if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, k.fn, WARPS * 32, k.shared);
        return e == cudaSuccess ? std::max(1, b) : -int(e);
    });
    if (blocks < 0) return cudaError_t(-blocks);
    k.resident = sm_count * blocks * WARPS;
    return cudaSuccess;
}

cudaError_t kernel_for(int M, int sm_count, Kernel& k) {
    if (M == 1) return prepare<1>(sm_count, k);
    if (M == 2) return prepare<2>(sm_count, k);
    if (M <= 4) return prepare<4>(sm_count, k);
    if (M <= 8) return prepare<8>(sm_count, k);
    return prepare<QM_MAX_M>(sm_count, k);
}

}  // namespace

size_t qm_workspace(const QMatrix* mats, int count, int M, int sm_count) {
    Kernel k{};
    if (kernel_for(M, sm_count, k) != cudaSuccess) return 0;  // qm_gemv reports the error
    const Plan p = plan(mats, count, k.resident);
    size_t floats = 0;
    for (int i = 0; i < count; i++)
        if (p.splits[i] > 1) floats += (size_t)p.splits[i] * M * mats[i].N;
    return floats;
}

cudaError_t qm_gemv(const QMatrix* mats, half* const* outs, int count, const half* x, int M, float* workspace,
                    int sm_count, cudaStream_t stream) {
    Kernel k{};
    const cudaError_t e = kernel_for(M, sm_count, k);
    if (e != cudaSuccess) return e;
    Batch b{};
    b.count = count;
    b.plan = plan(mats, count, k.resident);
    for (int i = 0; i < count; i++) {
        b.m[i] = mats[i];
        b.out[i] = outs[i];
        if (b.plan.splits[i] > 1) {
            b.partial[i] = workspace;
            workspace += (size_t)b.plan.splits[i] * M * mats[i].N;
        }
    }
    return launch(k.fn, (b.plan.first_item[count] + WARPS - 1) / WARPS, WARPS * 32, k.shared, stream, b, x, M);
}

cudaError_t qm_dequantize(const QMatrix& w, half* w_t, int n0, int cols, cudaStream_t stream) {
    const dim3 grid((cols + QM_TILE - 1) / QM_TILE, (w.n_chunks + WARPS - 1) / WARPS);
    dequantize_kernel<<<grid, WARPS * 32, 0, stream>>>(w, w_t, n0, cols);
    return cudaGetLastError();
}
