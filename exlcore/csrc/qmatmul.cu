// Quantized matmul kernels. The decode kernel multiplies on tensor cores: a block takes one slice of the matrix's
// chunks for WARPS * ROW output columns, ROW (two column tiles) per warp, and a chunk of 32 rows is two k-steps of
// mma.m16n8k16 for each 16-column subtile, W as A (its 16 rows are output columns) and x as B (its 8 columns are
// rows of x). Lane 4g + t holds the A fragments of columns 4g .. 4g + 3 of a tile at k-slot t: the chunk's words in
// lane order (arrange in exlcore/formats/qmatrix.py), copied row by row into shared memory a few chunks ahead
// (cp.async). Codes become fp16 (code - zero), exactly, with the 0x6400 exponent trick (1024 + code, or code << S
// scaled back by an exact fma); the tensor cores sum their products with x in fp32 over a group, and each group's
// sums are scaled once: a weight is (code - zero) * scale unrounded, where the reference rounds it to fp16.
// Slices of one warp's columns are summed by the last warp to finish (a counter per warp's columns), in a fixed order,
// so results do not depend on timing, and the output is written once, in fp16; at M > 1 with many slices, by groups
// of slices first.
#include <algorithm>
#include <type_traits>
#include <utility>

#include "counter.cuh"
#include "elementwise.cuh"
#include "launch.cuh"
#include "qmatmul.cuh"

namespace {

constexpr int WARPS = 4;           // warps per block: one slice of x and chunk table, ROW columns each
constexpr int MIN_CHUNKS = 8;      // chunks per slice at least: a split must pay for its partial sums
constexpr int MAX_WORDS = 8;       // words per lane and chunk at most (32 rows of 8 bits)
constexpr int HALVES = 2;          // column tiles (QM_TILE, the lane order's unit) per warp
constexpr int ROW = HALVES * QM_TILE;  // words of a chunk row a warp reads: its columns' words, in lane order
constexpr int STAGE = MAX_WORDS * ROW;  // words of a chunk's stage in shared memory
// A warp's chunks in shared memory, all but one in flight. Three at every M: at M = 16 two (one in flight) fit four
// blocks per SM, three fit three, and batch 16 decodes 9.5% faster with three.
constexpr int STAGES = 3;
constexpr uint32_t MAGIC = 0x64006400u;  // two fp16 1024.0: a code in the low mantissa bits reads 1024 + code

struct Plan {
    int splits[QM_MAX_BATCH];
    int first_block[QM_MAX_BATCH + 1];  // the blocks of matrix i are first_block[i] .. first_block[i+1]-1
};

// A block takes one slice of the chunks of WARPS * ROW neighbouring columns, ROW per warp.
int quads_of(const QMatrix& w) { return (w.N + WARPS * ROW - 1) / (WARPS * ROW); }

// Cut the matrices' chunks into slices, for as many blocks as the GPU holds at once (`resident`), never more unless
// max_chunks per slice forces it (large matrices): a second, part-filled wave would leave most of the GPU idle.
Plan plan(const QMatrix* mats, int count, int resident, int max_chunks) {
    Plan p{};
    int quads = 0;
    for (int i = 0; i < count; i++) quads += quads_of(mats[i]);
    const int want = std::max(1, resident / quads);
    for (int i = 0; i < count; i++) {
        const int chunks = mats[i].n_chunks;
        const int s = std::max((chunks + max_chunks - 1) / max_chunks, std::min(want, chunks / MIN_CHUNKS));
        const int per = (chunks + s - 1) / s;
        p.splits[i] = (chunks + per - 1) / per;  // no empty slices
        p.first_block[i + 1] = p.first_block[i] + p.splits[i] * quads_of(mats[i]);
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

// (x & MASK) | MAGIC in one LOP3, written out: left to itself the compiler splits it in two, as LOP3 takes one
// constant operand.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t masked(uint32_t x) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "n"(MASK), "n"(MAGIC));
    return r;
}

// One lane's ROWS / 2 pairs of codes in a chunk, each as two fp16 1024 + (code << S): use(pair, raw bits, S), the
// pair a compile-time constant. Word j's 16-bit halves each hold 16 / BITS codes at bits BITS * t, a pair (low
// half, high half) each; the last pairs of 3, 5 and 6 bits go in the bits the halves leave over (encode in
// exlcore/formats/qmatrix.py). A code masked in place within the 10 mantissa bits is exact (S = its position), so
// one shift per word serves the codes above them.
template <int BITS, int ROWS, typename F>
__device__ __forceinline__ void for_pairs(const uint32_t* q, F&& use) {
    using std::integral_constant;
    constexpr uint32_t MASK = ((1u << BITS) - 1) * 0x10001u;
    constexpr int WORDS = ROWS * BITS / 32, PER_HALF = 16 / BITS, FIT = 10 / BITS;
    unrolled<WORDS>([&](auto j) {
        const uint32_t x = q[j], xh = x >> (BITS * FIT);
        unrolled<PER_HALF>([&](auto t) {
            constexpr int S = BITS * (t < FIT ? t : t - FIT);
            use(integral_constant<int, j * PER_HALF + t>{}, masked<(MASK << S)>(t < FIT ? x : xh),
                integral_constant<int, S>{});
        });
    });
    if constexpr (BITS == 3 || BITS == 5) {  // the last pair: bit j in bit 15 of word j's halves
        uint32_t x = MAGIC;
        unrolled<BITS>([&](auto j) { x |= (q[j] >> (15 - j)) & (0x10001u << j); });
        use(integral_constant<int, ROWS / 2 - 1>{}, x, integral_constant<int, 0>{});
    } else if constexpr (BITS == 6) {  // pair 2 * WORDS + k: its low 4 bits in bits 12..15 of word k's halves, its
        constexpr int SPARE = 2 * WORDS / 3;  // high 2 bits in word SPARE + k / 2's, at bit 12 + 2 * (k % 2)
        unrolled<SPARE>([&](auto k) {
            constexpr int UP = 8 + 2 * (k % 2);
            use(integral_constant<int, 2 * WORDS + k>{},
                masked<0x000F000Fu>(q[k] >> 12) | ((q[SPARE + k / 2] >> UP) & 0x00300030u),
                integral_constant<int, 0>{});
        });
    }
}

__device__ __forceinline__ half2 as_half2(uint32_t bits) { return *reinterpret_cast<half2*>(&bits); }
__device__ __forceinline__ uint32_t bits_of(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// The fp16 bits of the integer v (|v| < 2048, so exact), at compile time.
constexpr uint32_t fp16_bits(int v) {
    const uint32_t m = v < 0 ? -v : v;
    int e = 0;
    while ((m >> e) > 1) e++;
    return v == 0 ? 0 : (v < 0 ? 0x8000u : 0u) | uint32_t(e + 15) << 10 | ((m << (10 - e)) & 0x3FFu);
}

// A group's parameters for the lane's columns n .. n + 3, as loaded: EXL2's word of 8 4-bit scale codes, q_scale_max
// and the bit where column n's code starts (kept apart so that nothing waits for the load until the scales are
// used, at the group's end); GPTQ's (scale, 1024 + zero point) of each column.
struct GroupRaw {
    uint32_t v[4];
};

template <bool GPTQ>
__device__ __forceinline__ GroupRaw load_group(const QMatrix& w, int group, int n) {
    if constexpr (GPTQ) {
        const uint4 r = __ldg(reinterpret_cast<const uint4*>(w.scale_zero + (size_t)group * w.N + n));
        return {{r.x, r.y, r.z, r.w}};
    } else {
        return {{__ldg(w.scale_codes + (size_t)group * (w.N / 8) + n / 8),
                 __half_as_ushort(__ldg(w.scale_max + group)), uint32_t(4 * (n % 8)), 0}};
    }
}

// Column n + c's scale, as the reference computes it: EXL2's half(code^2) * half(q_scale_max / 256).
template <bool GPTQ>
__device__ __forceinline__ half scale_of(const GroupRaw& r, int c) {
    if constexpr (GPTQ) return __low2half(as_half2(r.v[c]));
    const int code = ((r.v[0] >> r.v[2] >> (4 * c)) & 15) + 1;
    return __hmul(__int2half_rn(code * code), __hmul(__ushort_as_half(r.v[1]), __float2half(1.0f / 256)));
}

// Pair p of a chunk as (code - zero) in two fp16, exactly: 1024 + (code << S) scaled down by 2^S and centred in one
// fma (every value a small integer), by -(1024 >> S) - zero: a constant for EXL2 (zero = 2^(BITS - 1)), column
// 2s + h's for GPTQ, p being e * 8 + s * 4 + slot * 2 + h.
template <int BITS, bool GPTQ, int P, int S>
__device__ __forceinline__ uint32_t centred(uint32_t raw, const GroupRaw& g) {
    constexpr uint32_t DOWN = (15u - S) << 10 | (15u - S) << 26;  // fp16 2^-S in both halves
    half2 offset;
    if constexpr (GPTQ) {
        constexpr int c = (P >> 1 & 2) | (P & 1);
        offset = __hsub2(as_half2(fp16_bits(1024 - (1024 >> S)) * 0x10001u), __high2half2(as_half2(g.v[c])));
    } else {
        offset = as_half2(fp16_bits(-(1024 >> S) - (1 << (BITS - 1))) * 0x10001u);
    }
    return bits_of(__hfma2(as_half2(raw), as_half2(DOWN), offset));
}

// d += A B on tensor cores: A the 16 x 16 fp16 fragment a, B the 16 x 8 fp16 fragment (b0, b1), d fp32.
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One chunk of one column tile into its group's fp32 sums: sums[nt][s] += W(subtile s) x^T(rows 8 nt .. 8 nt + 7),
// k-step by k-step. `stage` is the lane's first word in the chunk's stage (rows of ROW words), xb[nt] the lane's row
// of x (row 8 nt + g) in decode order at the chunk's first pair.
template <int BITS, int ROWS, bool GPTQ, int NT>
__device__ __forceinline__ void mma_chunk(const uint32_t* stage, const GroupRaw& g, const half2* const (&xb)[NT],
                                          int t, float (&sums)[NT][2][4]) {
    uint32_t q[ROWS * BITS / 32], a[ROWS / 2];
#pragma unroll
    for (int j = 0; j < ROWS * BITS / 32; j++) q[j] = stage[ROW * j];
    for_pairs<BITS, ROWS>(q, [&](auto p, uint32_t raw, auto S) { a[p] = centred<BITS, GPTQ, p, S>(raw, g); });
#pragma unroll
    for (int e = 0; e < ROWS / 16; e++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint32_t b0 = bits_of(xb[nt][8 * e + t]), b1 = bits_of(xb[nt][8 * e + 4 + t]);
            mma(sums[nt][0], a + 8 * e, b0, b1);
            mma(sums[nt][1], a + 8 * e + 4, b0, b1);
        }
}

// A lane's share of copying one chunk into a stage asynchronously (cp.async, streamed past L1): 16 bytes of rows j,
// j + STEP, .. (j = lane / (ROW / 4)) of the warp's rows of ROW lane-order words, words past N filled with zeros.
constexpr int STEP = 32 / (ROW / 4);  // rows per copy instruction of a warp

struct Fetch {
    uint64_t src;         // the lane's 16 bytes of row j of a chunk starting at q_weight row 0 (global address)
    unsigned step_rows;   // words from row j to row j + STEP
    unsigned dst;         // its place in stage 0 (shared address)
    int j, bytes;
};

__device__ __forceinline__ Fetch fetch_for(const QMatrix& w, int wtile, int lane, const uint32_t* stage0) {
    const int j = lane / (ROW / 4), piece = 4 * (lane % (ROW / 4)), col = wtile * ROW + piece;
    Fetch f{reinterpret_cast<uint64_t>(w.q_weight + (size_t)j * w.N + (col < w.N ? col : 0)), unsigned(STEP * w.N),
            static_cast<unsigned>(__cvta_generic_to_shared(stage0 + j * ROW + piece)), j, col < w.N ? 16 : 0};
    // Kept in registers: left to itself, the compiler recomputes these from the thread index for every chunk.
    asm volatile("" : "+l"(f.src), "+r"(f.dst));
    return f;
}

// The chunk whose first word is `offset` (its row * N) and has `words` rows, into the stage `stage` bytes past
// stage 0. The addresses are one 32 x 32 -> 64-bit multiply-add each.
__device__ __forceinline__ void fetch_chunk(const Fetch& f, unsigned offset, int words, unsigned stage) {
#pragma unroll
    for (int k = 0; k < MAX_WORDS / STEP; k++) {
        if (f.j + STEP * k < words) {
            uint64_t src;
            asm("mad.wide.u32 %0, %1, 4, %2;" : "=l"(src) : "r"(offset + k * f.step_rows), "l"(f.src));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(f.dst + stage + k * STEP * ROW * 4),
                         "l"(src), "r"(f.bytes));
        }
    }
}

__device__ __forceinline__ void fetch_commit() { asm volatile("cp.async.commit_group;"); }

template <int PENDING>
__device__ __forceinline__ void fetch_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(PENDING)); }

// The lane's words of one chunk, straight from q_weight (`word` is the lane's word in each row).
__device__ __forceinline__ void load_chunk(const QMatrix& w, int4 ch, int word, uint32_t (&q)[MAX_WORDS]) {
    const int words = (ch.y & 0xFF) * (ch.y >> 8) / 32;
#pragma unroll
    for (int j = 0; j < MAX_WORDS; j++)
        if (j < words) q[j] = __ldg(w.q_weight + (size_t)(ch.x + j) * w.N + word);
}

// f(bits, rows) with both as compile-time constants (std::integral_constant), for the chunk entry's width; GPTQ's
// are all 4-bit.
template <bool GPTQ, typename F>
__device__ __forceinline__ void with_layout(int4 ch, F&& f) {
    using std::integral_constant;
    const bool full = (ch.y >> 8 & 0xFF) == 32;
    if constexpr (GPTQ) {
        full ? f(integral_constant<int, 4>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 4>{}, integral_constant<int, 16>{});
        return;
    }
    switch (ch.y & 0xFF) {
        case 8: full ? f(integral_constant<int, 8>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 8>{}, integral_constant<int, 16>{}); break;
        case 6: full ? f(integral_constant<int, 6>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 6>{}, integral_constant<int, 16>{}); break;
        case 5: f(integral_constant<int, 5>{}, integral_constant<int, 32>{}); break;
        case 4: full ? f(integral_constant<int, 4>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 4>{}, integral_constant<int, 16>{}); break;
        case 3: f(integral_constant<int, 3>{}, integral_constant<int, 32>{}); break;
        case 2: full ? f(integral_constant<int, 2>{}, integral_constant<int, 32>{}) : f(integral_constant<int, 2>{}, integral_constant<int, 16>{}); break;
    }
}

// The slices summed together first, in about sqrt(splits) groups, where one warp would sum more than 64 slice rows
// (16 KB): at M = 16 the down projection's 33 slices are 8.6 MB, too much for its 64 summing warps. All of them when
// fewer.
__device__ __forceinline__ int group_size(int splits, int M) {
    if (M * splits <= 64) return splits;
    int groups = 1;
    while (groups * groups < splits && groups < QM_MAX_GROUPS) groups++;
    return (splits + groups - 1) / groups;
}

// Whether the warp is the last of `count` in on `counter` (counter.cuh). Every lane calls it, after storing its
// partial sums; the last one in sets the counter back to zero when done, for the next launch (CUDA graphs replay the
// same counters).
__device__ __forceinline__ bool last_in(int* counter, int count, int lane) {
    __syncwarp();
    int done = 0;
    if (lane == 0) done = count_in(counter);
    done = __shfl_sync(0xFFFFFFFFu, done, 0);
    if (done != count - 1) return false;
    __syncwarp();
    return true;
}

// The sum of `count` slices' partial sums (M, N) fp32, slice first + stride * k at partial + (first + stride * k) *
// M * N, for one warp's columns, into `to`: fp32 (M, N) or the fp16 output (the kernels for M > 1). Every lane takes
// 4 columns of ITEMS rows and one half of the slices (even or odd, each in slice order), then adds its neighbour's
// half: a fixed order, whatever the timing. A turn's 8 loads are in flight at once: at M = 16 a lane has 16 rows,
// which one at a time took as many round trips to L2.
template <typename T>
__device__ __forceinline__ void sum_slices(const float* partial, int first, int count, int stride, int M, int N,
                                           int wtile, int lane, T* to) {
    constexpr int GROUPS = ROW / 4, ITEMS = 4, BATCH = 2;
    static_assert(GROUPS * 2 == 32, "a warp's items of one row are its 32 lanes");
    for (int item = lane; item < M * GROUPS * 2; item += 32 * ITEMS) {  // a multiple of 32: every lane takes each turn
        const int half = item & 1, m0 = item / 2 / GROUPS, col = wtile * ROW + item / 2 % GROUPS * 4;
        float4 sum[ITEMS];
#pragma unroll
        for (int i = 0; i < ITEMS; i++) sum[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (col < N) {  // N is a multiple of 8: all 4 columns exist
            const float* p = partial + (size_t)first * M * N + (size_t)m0 * N + col;
            for (int k0 = half; k0 < count; k0 += 2 * BATCH) {
                float4 v[ITEMS][BATCH];
#pragma unroll
                for (int i = 0; i < ITEMS; i++)
#pragma unroll
                    for (int u = 0; u < BATCH; u++) {
                        const int k = k0 + 2 * u;
                        const float* at = p + (size_t)(stride * k) * M * N + (size_t)i * N;
                        v[i][u] = (i == 0 || m0 + i < M) && k < count ? __ldcg(reinterpret_cast<const float4*>(at))
                                                                      : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
#pragma unroll
                for (int i = 0; i < ITEMS; i++)
#pragma unroll
                    for (int u = 0; u < BATCH; u++) {
                        sum[i].x += v[i][u].x;
                        sum[i].y += v[i][u].y;
                        sum[i].z += v[i][u].z;
                        sum[i].w += v[i][u].w;
                    }
            }
        }
#pragma unroll
        for (int i = 0; i < ITEMS; i++) {
            sum[i].x += __shfl_xor_sync(0xFFFFFFFFu, sum[i].x, 1);
            sum[i].y += __shfl_xor_sync(0xFFFFFFFFu, sum[i].y, 1);
            sum[i].z += __shfl_xor_sync(0xFFFFFFFFu, sum[i].z, 1);
            sum[i].w += __shfl_xor_sync(0xFFFFFFFFu, sum[i].w, 1);
            if (half != 0 || col >= N || (i > 0 && m0 + i >= M)) continue;
            T* at = to + (size_t)(m0 + i) * N + col;
            if constexpr (std::is_same_v<T, float>)
                __stcg(reinterpret_cast<float4*>(at), sum[i]);
            else
                *reinterpret_cast<uint2*>(at) = make_uint2(bits_of(__floats2half2_rn(sum[i].x, sum[i].y)),
                                                           bits_of(__floats2half2_rn(sum[i].z, sum[i].w)));
        }
    }
}

// The decode kernel's sizes for up to MAXM rows of x.
template <int MAXM>
struct Shape {
    static constexpr int NT = (MAXM + 7) / 8;  // n-tiles of 8 rows of x
    static constexpr int CHUNKS = 32;          // chunks per slice at most
    static constexpr int XS = CHUNKS * 16;     // pairs of x per row of x
    static constexpr int XS_STRIDE = XS + 4;   // rows of x 4 banks apart: 8 rows' pair t (a B fragment) hit 32 banks
    // per block: the slice's chunk table (CHUNKS int4) and x (MAXM, XS_STRIDE) half2, then per warp STAGES stages
    static constexpr int SHARED = (CHUNKS * 4 + MAXM * XS_STRIDE + WARPS * STAGES * STAGE) * 4;  // bytes
};

// Up to MAXM rows of x (NT n-tiles of 8), ROW columns per warp: HALVES column tiles, the lane's 4 columns of each
// from n[h]. Its sums acc[h][nt][s][i] are column n[h] + 2s + i / 2 and row of x 8 nt + 2t + i % 2, as
// mma.m16n8k16 lays out its D fragment.
template <bool GPTQ, int MAXM>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(const __grid_constant__ Batch b, const half* __restrict__ x,
                                                         const half* __restrict__ up, int act, int M) {
    // The next kernel may launch as soon as every block here has started, so it takes the SMs' slots as these blocks
    // leave them (1.2% in batch-1 decode). Norms and attention doing the same cost 8%: the matmul after them then
    // starts fetching while the one before them still streams.
    dependents_start();
    using Sh = Shape<MAXM>;
    constexpr int NT = Sh::NT, XS = Sh::XS, XS_STRIDE = Sh::XS_STRIDE, THREADS = WARPS * 32;
    extern __shared__ int4 shared[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    if (blockIdx.x >= b.plan.first_block[b.count]) return;
    int mi = 0;
    while (blockIdx.x >= b.plan.first_block[mi + 1]) mi++;
    const QMatrix& w = b.m[mi];
    const int splits = b.plan.splits[mi], local = blockIdx.x - b.plan.first_block[mi];
    const int wtile = local / splits * WARPS + warp, split = local % splits;
    // N is a multiple of 8: a lane's 4 columns of a tile all exist or none do. Lanes past the end read their tile's
    // first lane's parameters (or the matrix's), and write nothing; warps past the end stop once the block's x is in.
    const bool warp_live = wtile * ROW < w.N;
    bool live[HALVES];
    int n[HALVES];
#pragma unroll
    for (int h = 0; h < HALVES; h++) {
        const int tile = wtile * HALVES + h;
        live[h] = tile * QM_TILE + lane < w.N;
        n[h] = live[h] ? tile * QM_TILE + 4 * g : tile * QM_TILE < w.N ? tile * QM_TILE : 0;
    }
    const int per = (w.n_chunks + splits - 1) / splits, c0 = split * per, count = min(per, w.n_chunks - c0);
    int4* table = shared;  // chunk c of the slice: first word, bits | rows << 8 | words << 16, group, first pair
    half2* xs = reinterpret_cast<half2*>(table + Sh::CHUNKS);  // from the slice's
    const uint32_t* stages = reinterpret_cast<const uint32_t*>(xs + MAXM * XS_STRIDE) + warp * STAGES * STAGE;

    // While the kernel before finishes: the slice's chunk table, the input channels of its pairs (all in flight at
    // once) and each warp's first chunks. Then x in decode order, gathered once for the block (act(x) * up with up).
    const int4 first = __ldg(w.chunks + c0), last = __ldg(w.chunks + c0 + count - 1);
    const int pair0 = first.w, pairs = last.w + (last.y >> 9) - pair0;
    if (threadIdx.x < count) {
        const int4 e = __ldg(w.chunks + c0 + threadIdx.x);
        table[threadIdx.x] = make_int4(e.x * w.N, e.y | (e.y & 0xFF) * (e.y >> 8) / 32 << 16, e.z, e.w - pair0);
    }
    constexpr int PER = XS / THREADS;  // pairs of x per thread
    uint32_t r[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int k = threadIdx.x + THREADS * i;
        r[i] = k < pairs ? load_early(w.pair_rows + pair0 + k) : 0;
    }
    __syncthreads();
    const Fetch fetch = fetch_for(w, wtile, lane, stages);
#pragma unroll
    for (int c = 0; c < STAGES - 1; c++) {
        if (warp_live && c < count) fetch_chunk(fetch, table[c].x, table[c].y >> 16, c * STAGE * 4);
        fetch_commit();
    }
    dependency_wait();
    // RB rows of x at a time, every load before the first use, so they take one round trip together (r[i] is
    // channel 0, a load to drop, past the slice's pairs): left to itself the compiler loads up's second channel
    // after the first channel's activation. Four rows in the M <= 4 kernel (down 28.4 -> 22.4 us at M = 4; two rows
    // gained nothing); one in the others: at M = 16, more made the main loop slower (gate/up 56.9 -> 67-79 us).
    constexpr int RB = MAXM == 4 ? 4 : 1;
    for (int m0 = 0; m0 < M; m0 += RB) {
        const half *xm[RB], *um[RB];  // rows past M load the last again, and are not stored
#pragma unroll
        for (int j = 0; j < RB; j++) {
            const int m = RB == 1 ? m0 : min(m0 + j, M - 1);
            xm[j] = x + (size_t)m * w.K;
            um[j] = up + (size_t)m * w.K;
        }
        half2 xv[RB][PER], uv[RB][PER];
#pragma unroll
        for (int j = 0; j < RB; j++)
#pragma unroll
            for (int i = 0; i < PER; i++) xv[j][i] = __halves2half2(xm[j][r[i] & 0xFFFF], xm[j][r[i] >> 16]);
        if (up != nullptr) {
#pragma unroll
            for (int j = 0; j < RB; j++)
#pragma unroll
                for (int i = 0; i < PER; i++) uv[j][i] = __halves2half2(um[j][r[i] & 0xFFFF], um[j][r[i] >> 16]);
#pragma unroll
            for (int j = 0; j < RB; j++)
#pragma unroll
                for (int i = 0; i < PER; i++)
                    xv[j][i] = __floats2half2_rn(gated(__low2float(xv[j][i]), __low2float(uv[j][i]), act),
                                                 gated(__high2float(xv[j][i]), __high2float(uv[j][i]), act));
        }
#pragma unroll
        for (int j = 0; j < RB; j++)
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int k = threadIdx.x + THREADS * i;
                if (k < pairs && (RB == 1 || m0 + j < M)) xs[(m0 + j) * XS_STRIDE + k] = xv[j][i];
            }
    }
    __syncthreads();
    if (!warp_live) return;
    const half2* x_row[NT];  // the lane's B column: row 8 nt + g of x (rows past M repeat the last; never stored)
#pragma unroll
    for (int nt = 0; nt < NT; nt++) x_row[nt] = xs + min(8 * nt + g, M - 1) * XS_STRIDE;

    float acc[HALVES][NT][2][4] = {}, sums[HALVES][NT][2][4] = {};
    int4 ch = table[0];
    // The group's parameters: EXL2's are needed only once its last chunk is in, GPTQ's (zero points) at once.
    GroupRaw group[HALVES];
#pragma unroll
    for (int h = 0; h < HALVES; h++) group[h] = load_group<GPTQ>(w, ch.z, n[h]);
    int stage = 0, stage_fetch = (STAGES - 1) * STAGE * 4;  // chunk c's stage (words), chunk c + STAGES - 1's (bytes)
    for (int c = 0; c < count; c++) {
        // Chunk c has landed (at most STAGES - 2 younger groups pending) and every lane is past reading chunk
        // c - 1's stage, which now takes chunk c + STAGES - 1.
        fetch_wait<STAGES - 2>();
        __syncwarp();
        if (c + STAGES - 1 < count) {
            const int4 f = table[c + STAGES - 1];
            fetch_chunk(fetch, f.x, f.y >> 16, stage_fetch);
        }
        fetch_commit();
        stage_fetch = stage_fetch == (STAGES - 1) * STAGE * 4 ? 0 : stage_fetch + STAGE * 4;
        const half2* xb[NT];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) xb[nt] = x_row[nt] + ch.w;
        with_layout<GPTQ>(ch, [&](auto bits, auto rows) {
#pragma unroll
            for (int h = 0; h < HALVES; h++)
                mma_chunk<bits.value, rows.value, GPTQ, NT>(stages + stage + h * QM_TILE + lane, group[h], xb, t, sums[h]);
        });
        stage = stage == (STAGES - 1) * STAGE ? 0 : stage + STAGE;
        const int4 ch_next = table[min(c + 1, count - 1)];
        if (c + 1 == count || ch_next.z != ch.z) {  // the group's last chunk in this slice: scale its sums
#pragma unroll
            for (int h = 0; h < HALVES; h++) {
                float scale[4];
#pragma unroll
                for (int i = 0; i < 4; i++) scale[i] = __half2float(scale_of<GPTQ>(group[h], i));
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int s = 0; s < 2; s++)
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            acc[h][nt][s][i] += sums[h][nt][s][i] * scale[2 * s + i / 2];
                            sums[h][nt][s][i] = 0.f;
                        }
                group[h] = load_group<GPTQ>(w, ch_next.z, n[h]);
            }
        }
        ch = ch_next;
    }

    // f(row of x, column, its two sums: this column and the next) for each of the lane's sums that exists.
    const auto for_outputs = [&](auto&& f) {
#pragma unroll
        for (int h = 0; h < HALVES; h++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int s = 0; s < 2; s++)
#pragma unroll
                    for (int i = 0; i < 2; i++)
                        if (live[h] && 8 * nt + 2 * t + i < M)
                            f(8 * nt + 2 * t + i, n[h] + 2 * s, acc[h][nt][s][i], acc[h][nt][s][2 + i]);
    };
    half* out = b.out[mi];
    if (splits == 1) {
        for_outputs([&](int m, int col, float v0, float v1) {
            *reinterpret_cast<half2*>(out + (size_t)m * w.N + col) = __floats2half2_rn(v0, v1);
        });
        return;
    }
    float* partial = b.partial[mi];
    for_outputs([&](int m, int col, float v0, float v1) {
        __stcg(reinterpret_cast<float2*>(partial + ((size_t)split * M + m) * w.N + col), make_float2(v0, v1));
    });
    // The slices are summed by the last one in (a counter per warp's columns). At M > 1, with many slices, the last
    // of each group of them first sums its group into the group's first slice, and the last group in sums those.
    if constexpr (MAXM == 1) {  // sum_slices for one row, written out: its address arithmetic cost 0.8% at batch 1
        int* counter = w.counters + wtile;
        if (!last_in(counter, splits, lane)) return;
        constexpr int GROUPS = ROW / 4, BATCH = 8;
        for (int item = lane; item < M * GROUPS * 2; item += 32) {  // a multiple of 32: every lane takes each turn
            const int half = item & 1, m = item / 2 / GROUPS, col = wtile * ROW + item / 2 % GROUPS * 4;
            float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
            if (col < w.N) {  // N is a multiple of 8: all 4 columns exist
                const float* p = partial + (size_t)m * w.N + col;  // slice k's at p + k * M * N
                for (int k0 = half; k0 < splits; k0 += 2 * BATCH) {
                    float4 v[BATCH];
#pragma unroll
                    for (int u = 0; u < BATCH; u++) {
                        const int k = k0 + 2 * u;
                        v[u] = k < splits ? __ldcg(reinterpret_cast<const float4*>(p + (size_t)k * M * w.N))
                                          : make_float4(0.f, 0.f, 0.f, 0.f);
                    }
#pragma unroll
                    for (int u = 0; u < BATCH; u++) {
                        sum.x += v[u].x;
                        sum.y += v[u].y;
                        sum.z += v[u].z;
                        sum.w += v[u].w;
                    }
                }
            }
            sum.x += __shfl_xor_sync(0xFFFFFFFFu, sum.x, 1);
            sum.y += __shfl_xor_sync(0xFFFFFFFFu, sum.y, 1);
            sum.z += __shfl_xor_sync(0xFFFFFFFFu, sum.z, 1);
            sum.w += __shfl_xor_sync(0xFFFFFFFFu, sum.w, 1);
            if (half == 0 && col < w.N)
                *reinterpret_cast<uint2*>(out + (size_t)m * w.N + col) =
                    make_uint2(bits_of(__floats2half2_rn(sum.x, sum.y)), bits_of(__floats2half2_rn(sum.z, sum.w)));
        }
        if (lane == 0) *counter = 0;
        return;
    }
    int total = splits, stride = 1;  // what the last one in sums
    const int size = group_size(splits, M);
    if (size < splits) {
        const int first = split / size * size, n = min(size, splits - first);
        int* counter = w.counters + (1 + split / size) * ((w.N + QM_TILE - 1) / QM_TILE) + wtile;
        if (!last_in(counter, n, lane)) return;
        sum_slices(partial, first, n, 1, M, w.N, wtile, lane, partial + (size_t)first * M * w.N);
        if (lane == 0) *counter = 0;
        total = (splits + size - 1) / size;
        stride = size;
    }
    if (!last_in(w.counters + wtile, total, lane)) return;
    sum_slices(partial, 0, total, stride, M, w.N, wtile, lane, out);
    if (lane == 0) w.counters[wtile] = 0;
}

// One chunk's weights for the lane's columns, exactly as the reference: half(code - zero) * scale. Pairs e * 8 +
// s * 4 + slot * 2 + h of one (e, slot) are columns n .. n + 3 (2s + h) at the same two rows, stored together.
template <int BITS, int ROWS, bool GPTQ>
__device__ __forceinline__ void dequantize_chunk(const QMatrix& w, int4 ch, int word, int n, int t,
                                                 half* __restrict__ w_t, int n0, int cols) {
    uint32_t q[MAX_WORDS];
    load_chunk(w, ch, word, q);
    const GroupRaw group = load_group<GPTQ>(w, ch.z, n);
    half2 scale[4];
#pragma unroll
    for (int i = 0; i < 4; i++) scale[i] = __half2half2(scale_of<GPTQ>(group, i));
    uint32_t a[ROWS / 2];
    for_pairs<BITS, ROWS>(q, [&](auto p, uint32_t raw, auto S) { a[p] = centred<BITS, GPTQ, p, S>(raw, group); });
    unrolled<ROWS / 8>([&](auto i) {
        constexpr int e = i / 2, slot = i % 2, p = e * 8 + slot * 2;
        half2 v[4];  // columns n + c, both rows
#pragma unroll
        for (int c = 0; c < 4; c++) v[c] = __hmul2(as_half2(a[p + (c / 2) * 4 + c % 2]), scale[c]);
        const uint32_t rows = __ldg(w.pair_rows + ch.w + 8 * e + 4 * slot + t);
        *reinterpret_cast<uint2*>(w_t + (size_t)(rows & 0xFFFF) * cols + n - n0) =
            make_uint2(bits_of(__lows2half2(v[0], v[1])), bits_of(__lows2half2(v[2], v[3])));
        *reinterpret_cast<uint2*>(w_t + (size_t)(rows >> 16) * cols + n - n0) =
            make_uint2(bits_of(__highs2half2(v[0], v[1])), bits_of(__highs2half2(v[2], v[3])));
    });
}

template <bool GPTQ>
__global__ void __launch_bounds__(WARPS * 32) dequantize_kernel(QMatrix w, half* __restrict__ w_t, int n0, int cols) {
    const int c = blockIdx.y * WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int word = n0 + blockIdx.x * QM_TILE + lane;  // n0 is a multiple of QM_TILE
    if (c >= w.n_chunks || word >= n0 + cols) return;
    const int4 ch = __ldg(w.chunks + c);
    with_layout<GPTQ>(ch, [&](auto bits, auto rows) {
        dequantize_chunk<bits.value, rows.value, GPTQ>(w, ch, word, word - lane % 4, lane % 4, w_t, n0, cols);
    });
}

// The decode kernel for up to MAXM rows of x, its shared memory, the blocks the GPU holds at once, and the most
// chunks a slice may have.
struct Kernel {
    void (*fn)(Batch, const half*, const half*, int, int);
    int shared, resident, chunks;
};

// Its shared memory set up and its blocks per SM measured once per device (a CUDA error, negated, if that fails).
template <bool GPTQ, int MAXM>
cudaError_t prepare(int sm_count, Kernel& k) {
    k.fn = gemv_kernel<GPTQ, MAXM>;
    k.shared = Shape<MAXM>::SHARED;
    k.chunks = Shape<MAXM>::CHUNKS;
    const int blocks = once_per_device(reinterpret_cast<const void*>(k.fn), [&] {
        cudaError_t e = k.shared > 48 * 1024
                            ? cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.shared)
                            : cudaSuccess;
        int b = 0;
        if (e == cudaSuccess) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, k.fn, WARPS * 32, k.shared);
        return e == cudaSuccess ? std::max(1, b) : -int(e);
    });
    if (blocks < 0) return cudaError_t(-blocks);
    k.resident = sm_count * blocks;
    return cudaSuccess;
}

template <bool GPTQ>
cudaError_t kernel_for(int M, int sm_count, Kernel& k) {
    if (M == 1) return prepare<GPTQ, 1>(sm_count, k);
    if (M <= 4) return prepare<GPTQ, 4>(sm_count, k);
    if (M <= 8) return prepare<GPTQ, 8>(sm_count, k);
    return prepare<GPTQ, QM_MAX_M>(sm_count, k);
}

cudaError_t kernel_for(const QMatrix& w, int M, int sm_count, Kernel& k) {
    return w.scale_codes != nullptr ? kernel_for<false>(M, sm_count, k) : kernel_for<true>(M, sm_count, k);
}

}  // namespace

size_t qm_workspace(const QMatrix* mats, int count, int M, int sm_count) {
    Kernel k{};
    if (kernel_for(mats[0], M, sm_count, k) != cudaSuccess) return 0;  // qm_gemv reports the error
    const Plan p = plan(mats, count, k.resident, k.chunks);
    size_t floats = 0;
    for (int i = 0; i < count; i++)
        if (p.splits[i] > 1) floats += (size_t)p.splits[i] * M * mats[i].N;
    return floats;
}

cudaError_t qm_gemv(const QMatrix* mats, half* const* outs, int count, const half* x, const half* up, int act, int M,
                    float* workspace, int sm_count, cudaStream_t stream) {
    Kernel k{};
    const cudaError_t e = kernel_for(mats[0], M, sm_count, k);
    if (e != cudaSuccess) return e;
    Batch b{};
    b.count = count;
    b.plan = plan(mats, count, k.resident, k.chunks);
    for (int i = 0; i < count; i++) {
        b.m[i] = mats[i];
        b.out[i] = outs[i];
        if (b.plan.splits[i] > 1) {
            b.partial[i] = workspace;
            workspace += (size_t)b.plan.splits[i] * M * mats[i].N;
        }
    }
    return launch(k.fn, b.plan.first_block[count], WARPS * 32, k.shared, stream, b, x, up, act, M);
}

cudaError_t qm_dequantize(const QMatrix& w, half* w_t, int n0, int cols, cudaStream_t stream) {
    const dim3 grid((cols + QM_TILE - 1) / QM_TILE, (w.n_chunks + WARPS - 1) / WARPS);
    if (w.scale_codes != nullptr)
        dequantize_kernel<false><<<grid, WARPS * 32, 0, stream>>>(w, w_t, n0, cols);
    else
        dequantize_kernel<true><<<grid, WARPS * 32, 0, stream>>>(w, w_t, n0, cols);
    return cudaGetLastError();
}
