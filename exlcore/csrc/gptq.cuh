// Kernels for conversion (exlcore/quantize.py and formats/exl2.group_scales define their meaning): GPTQ's
// row-by-row loop over a block of up to 32 rows, and the error of each candidate scale for EXL2's scale search.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

constexpr int GPTQ_ROWS = 32;

// For rows b0 .. b0+R-1 (R <= GPTQ_ROWS) of w (K, C) fp32, each column independently: quantize the row
// with the column's scale and half-range (codes in [0, 2*half)), feed the scaled error err = (w - q) / u[r][r]
// to the later rows of the block through u (K, K), the upper Cholesky factor of the inverse Hessian.
// Writes codes (K, C) int16 rows and err (R, C); w's rows are left stale (the caller never reads them).
cudaError_t gptq_rows(const float* w, const float* u, const float* scale, const float* half, int16_t* codes,
                      float* err, int K, int C, int b0, int R, cudaStream_t stream);

// err (P, C) = sum over the rows of w (rows, C) of |clamp(rint(w / s), -half, top - half) * s - w|^3.5,
// with s = scales (P, C).
cudaError_t scale_errors(const float* w, const float* scales, float* err, int rows, int C, int P, float half,
                         float top, cudaStream_t stream);
