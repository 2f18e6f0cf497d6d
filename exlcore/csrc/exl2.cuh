// EXL2 kernels: launchers over raw pointers, so this part builds (and can be checked) without torch.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

struct Exl2Matrix {
    const int32_t* q_weight;    // (R, N) packed codes, groups one after another
    const half* scales;         // (G, N) per group and column: half(code^2) * half(q_scale_max / 256)
    const int32_t* perm;        // (K,) stored row k is input channel perm[k]
    const int32_t* group_row;   // (G + 1,) first stored row of each group, then K
    const int32_t* group_word;  // (G,) first q_weight row of each group
    const int32_t* group_bits;  // (G,)
    int K, N, G, max_group_rows;
};

// out (M, N) fp32, zeroed by the caller: out += x (M, K) @ W^T. Reads each packed weight once; M <= 16.
cudaError_t exl2_gemv(const Exl2Matrix& w, const half* x, float* out, int M, cudaStream_t stream);

// w_t (K, N) fp16 = W^T in the original input-channel order (for prefill: dequantize, then cuBLAS).
cudaError_t exl2_dequantize(const Exl2Matrix& w, half* w_t, cudaStream_t stream);
