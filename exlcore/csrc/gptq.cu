#include "gptq.cuh"

namespace {

// One thread per column keeps the block's rows of its column in registers; the block's corner of u sits in
// shared memory. Products and differences are rounded separately (no fused multiply-add), as PyTorch's
// separate operations round them, so the CUDA path follows the reference closely.
__global__ void gptq_rows_kernel(const float* __restrict__ w, const float* __restrict__ u,
                                 const float* __restrict__ scale, const float* __restrict__ half,
                                 int16_t* __restrict__ codes, float* __restrict__ err, int K, int C, int b0, int R) {
    __shared__ float us[GPTQ_ROWS][GPTQ_ROWS + 1];
    for (int i = threadIdx.x; i < GPTQ_ROWS * GPTQ_ROWS; i += blockDim.x) {
        const int r = i / GPTQ_ROWS, j = i % GPTQ_ROWS;
        us[r][j] = r < R && j < R ? u[(size_t)(b0 + r) * K + b0 + j] : 0.f;
    }
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const float s = scale[c], h = half[c];
    float x[GPTQ_ROWS];
#pragma unroll
    for (int r = 0; r < GPTQ_ROWS; ++r) x[r] = r < R ? w[(size_t)(b0 + r) * C + c] : 0.f;
#pragma unroll
    for (int r = 0; r < GPTQ_ROWS; ++r) {
        if (r < R) {
            const float q = fminf(fmaxf(rintf(__fdiv_rn(x[r], s)), -h), h - 1.f);
            const float e = __fdiv_rn(__fsub_rn(x[r], __fmul_rn(q, s)), us[r][r]);
#pragma unroll
            for (int j = r + 1; j < GPTQ_ROWS; ++j) x[j] = __fsub_rn(x[j], __fmul_rn(us[r][j], e));
            codes[(size_t)(b0 + r) * C + c] = (int16_t)(q + h);
            err[(size_t)r * C + c] = e;
        }
    }
}

__global__ void scale_errors_kernel(const float* __restrict__ w, const float* __restrict__ scales,
                                    float* __restrict__ err, int rows, int C, float half, float top) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int p = blockIdx.y;
    if (c >= C) return;
    const float s = scales[(size_t)p * C + c];
    float sum = 0.f;
    for (int r = 0; r < rows; ++r) {
        const float v = w[(size_t)r * C + c];
        const float q = fminf(fmaxf(rintf(__fdiv_rn(v, s)), -half), top - half);
        sum += powf(fabsf(__fsub_rn(__fmul_rn(q, s), v)), 3.5f);
    }
    err[(size_t)p * C + c] = sum;
}

}  // namespace

cudaError_t gptq_rows(const float* w, const float* u, const float* scale, const float* half, int16_t* codes,
                      float* err, int K, int C, int b0, int R, cudaStream_t stream) {
    if (R < 1 || R > GPTQ_ROWS) return cudaErrorInvalidValue;
    const int threads = 128;
    gptq_rows_kernel<<<(C + threads - 1) / threads, threads, 0, stream>>>(w, u, scale, half, codes, err, K, C, b0, R);
    return cudaGetLastError();
}

cudaError_t scale_errors(const float* w, const float* scales, float* err, int rows, int C, int P, float half,
                         float top, cudaStream_t stream) {
    const int threads = 128;
    scale_errors_kernel<<<dim3((C + threads - 1) / threads, P), threads, 0, stream>>>(w, scales, err, rows, C, half, top);
    return cudaGetLastError();
}
