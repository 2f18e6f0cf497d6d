// Quantized matmul for EXL2 and GPTQ linears (exlcore/formats/qmatrix.py builds the tables and defines them).
// Launchers over raw pointers, so this part builds (and can be checked) without torch.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

constexpr int QM_MAX_M = 16;      // rows of x the decode kernel takes
constexpr int QM_TILE = 32;       // columns per tile of the lane order (4 per lane, 4 lanes per column)
constexpr int QM_MAX_BATCH = 4;   // matrices sharing one input in one launch (q/k/v, gate/up)
constexpr int QM_MAX_GROUPS = 8;  // groups of slices a matrix's split sums go through first, at most

// One matrix W (N, K) stored as codes in chunks of 32 (or, at the end of an even-width group, 16) rows.
struct QMatrix {
    const uint32_t* q_weight;     // (R, N) packed codes, chunk after chunk, each chunk's words in lane order
                                  // (arrange in exlcore/formats/qmatrix.py)
    const int4* chunks;           // per chunk: first q_weight row, bits | rows << 8, group, first pair
    const uint32_t* pair_rows;    // (K/2,) the input channels of each pair of rows: lo | hi << 16
    const uint32_t* scale_codes;  // EXL2: (G, N/8) 4-bit scale codes - 1 ...
    const half* scale_max;        // ... and (G,) q_scale_max
    const half2* scale_zero;      // GPTQ instead: (G, N) (scale, 1024 + zero point)
    int* counters;                // (1 + QM_MAX_GROUPS, ceil(N / QM_TILE)) zero: slices (or groups of them) finished
                                  // so far, per warp's columns
    int K, N, n_chunks;
};

// out_i (M, N_i) fp16 = x (M, K) @ W_i^T for up to QM_MAX_BATCH matrices sharing x (all EXL2 or all GPTQ), in one
// launch, M <= 16, on tensor cores (compute capability 8.0 on). With `up` (M, K), the input is act(x) * up instead
// (act 0 = SiLU, 1 = tanh GELU), rounded to fp16 as act_mul (fused.cuh) computes it.
// Each packed weight is read once. A matrix's counters are left zero on return; a matrix must not be in two
// launches that run at the same time (two streams).
cudaError_t qm_gemv(const QMatrix* mats, half* const* outs, int count, const half* x, const half* up, int act, int M,
                    float* workspace, int sm_count, cudaStream_t stream);

// The fp32 workspace qm_gemv needs for this batch and M, in floats.
size_t qm_workspace(const QMatrix* mats, int count, int M, int sm_count);

// w_t (K, cols) fp16 = columns n0 .. n0+cols-1 of W^T in input-channel order (prefill: dequantize, then cuBLAS).
cudaError_t qm_dequantize(const QMatrix& w, half* w_t, int n0, int cols, cudaStream_t stream);
