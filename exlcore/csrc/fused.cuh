// Fused kernels for the parts of a decode step that are many small ops in PyTorch: RMSNorm, rotary
// embedding, gated activation, single-query attention. T is half, __nv_bfloat16 or float.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, in fp32, for rows of `dim` elements.
template <typename T>
cudaError_t rms_norm(const T* x, const float* w, T* out, int rows, int dim, float eps, cudaStream_t stream);

// In place on x (tokens, heads, dim) with rotate-half layout; cos/sin (positions, dim) fp32 tables.
template <typename T>
cudaError_t rotary(T* x, const float* cos, const float* sin, const int64_t* positions, int tokens, int heads,
                   int dim, cudaStream_t stream);

// out = act(gate) * up elementwise; act 0 = SiLU, 1 = tanh-approximated GELU.
template <typename T>
cudaError_t act_mul(const T* gate, const T* up, T* out, int64_t n, int act, cudaStream_t stream);

// One query per sequence: q, out (B, H, D); k, v caches (B, KVH, S, D) of which the first kv_len keys are
// read; key j is visible when j <= position[b] and (window == 0 or j > position[b] - window).
template <typename T>
cudaError_t decode_attention(const T* q, const T* k, const T* v, T* out, const int64_t* positions, int B, int H,
                             int KVH, int S, int D, int kv_len, int window, float scale, float softcap,
                             cudaStream_t stream);
