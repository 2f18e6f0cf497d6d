// Single-query attention over a KV cache (decode), split over the keys. T is half, __nv_bfloat16 or float.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

constexpr int DA_GROUP = 8;       // query heads per block (one KV head's group, in slices of this many)
constexpr int DA_MAX_D = 256;     // head dimensions the kernel takes (a multiple of 16 bytes of T)

// q, out (B, H, D); k_new, v_new (B, KVH, D) the new token's key and value; k, v caches (B, KVH, S, D), of which
// the first kv_len keys are read. q and k_new are rotated (rotate-half) by cos and sin (positions, D) fp32 tables at
// position[b] (not rotated when they are null), and the rotated k_new and v_new are written to the caches at
// position[b]. Key j is visible to sequence b when j <= position[b] and (window == 0 or j > position[b] - window).
// workspace: the floats decode_attention_workspace asks for; counters: decode_attention_counters ints, zero (left
// zero on return). bits 8 or 4: the caches are quantized (exlcore/cache.py), k and v their codes (B, KVH, S,
// D * bits / 8) bytes, k_scales and v_scales (B, KVH, S, D / 32); T half or __nv_bfloat16, D a multiple of 32, S of 64.
template <typename T>
cudaError_t decode_attention(const T* q, const T* k_new, const T* v_new, T* k, T* v, const float* cos,
                             const float* sin, T* out, const int64_t* positions, int B, int H, int KVH, int S, int D,
                             int kv_len, int window, float scale, float softcap, float* workspace, int* counters,
                             int bits, half* k_scales, half* v_scales, cudaStream_t stream);

size_t decode_attention_workspace(int B, int H, int D, int kv_len, int element, int bits);
int decode_attention_counters(int B, int H, int KVH);
