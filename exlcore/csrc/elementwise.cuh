// Elementwise math shared by the kernels that must agree to the bit where they compute the same thing (a fused
// kernel and the separate launches it replaces). Roundings are spelled out where the compiler could otherwise
// contract differently in each place.
#pragma once

// Rotate-half rotary embedding of one element: x is element d of a head's row, partner element d + D/2 (first
// half) or d - D/2 (second half), c and s the table's cos and sin at d.
__device__ __forceinline__ float rope(float x, float partner, float c, float s, bool first_half) {
    return __fmaf_rn(x, c, __fmul_rn(first_half ? -partner : partner, s));
}

// act(gate) * up, act 0 = SiLU, 1 = tanh-approximated GELU.
__device__ __forceinline__ float gated(float g, float up, int act) {
    float a;
    if (act == 0) {
        a = __fdiv_rn(g, __fadd_rn(1.f, __expf(-g)));
    } else {
        const float inner = __fmul_rn(0.7978845608028654f, __fmaf_rn(__fmul_rn(0.044715f, __fmul_rn(g, g)), g, g));
        a = __fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.f, tanhf(inner)));
    }
    return __fmul_rn(a, up);
}
