// Fused kernels for the parts of a decode step that are many small ops in PyTorch: RMSNorm (with the residual
// add before it), rotary embedding (with the KV-cache write), gated activation; and greedy sampling's argmax. T is
// half, __nv_bfloat16 or float. Decode attention is in attention.cuh.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, in fp32, for rows of `dim` elements, NORM_MAX_DIM at most (a
// thread holds 32 of a row's elements in registers).
constexpr int NORM_MAX_DIM = 32768;
template <typename T>
cudaError_t rms_norm(const T* x, const float* w, T* out, int rows, int dim, float eps, cudaStream_t stream);

// The residual add before a norm: sum[r] = x[r] + h[r] rounded to R, out[r] = rms_norm(sum[r]) as above in H.
// R is H or float (an fp32 residual stream under fp16/bf16 activations).
template <typename R, typename H>
cudaError_t add_rms_norm(const R* x, const H* h, const float* w, R* sum, H* out, int rows, int dim, float eps,
                         cudaStream_t stream);

// In place on x (tokens, heads, dim) with rotate-half layout; cos/sin (positions, dim) fp32 tables.
template <typename T>
cudaError_t rotary(T* x, const float* cos, const float* sin, const int64_t* positions, int tokens, int heads,
                   int dim, cudaStream_t stream);

// Rotary for q and k and the KV-cache write in one launch, positions (B, len). q (B, len, H, D) is rotated in
// place as `rotary` does; k (B, len, KVH, D) rotated the same and v copied into the caches (B, KVH, S, D) at
// slot positions[b][t] for token t of sequence b; k and v themselves are left as they are.
template <typename T>
cudaError_t rotary_cache(T* q, const T* k, const T* v, const float* cos, const float* sin, const int64_t* positions,
                         T* k_cache, T* v_cache, int B, int len, int H, int KVH, int S, int D, cudaStream_t stream);

// out = act(gate) * up elementwise; act 0 = SiLU, 1 = tanh-approximated GELU.
template <typename T>
cudaError_t act_mul(const T* gate, const T* up, T* out, int64_t n, int act, cudaStream_t stream);

// out[r] = the index of row r's largest element (rows of n), as torch.argmax: NaN above all, ties to the lower
// index. `partial` holds argmax_blocks(n) entries per row.
int argmax_blocks(int n);
template <typename T>
cudaError_t argmax(const T* x, int2* partial, int64_t* out, int rows, int n, cudaStream_t stream);
