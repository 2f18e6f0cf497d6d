// Python bindings: tensors in, tensors out; the kernels themselves live in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_bf16.h>

#include "exl2.cuh"
#include "fused.cuh"
#include "gptq.cuh"

namespace {

void check(cudaError_t e, const char* what) {
    TORCH_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

Exl2Matrix matrix(const torch::Tensor& q_weight, const torch::Tensor& scales, const torch::Tensor& perm,
                  const torch::Tensor& group_row, const torch::Tensor& group_word, const torch::Tensor& group_bits,
                  int64_t max_group_rows) {
    TORCH_CHECK(q_weight.is_cuda() && q_weight.dtype() == torch::kInt32 && q_weight.is_contiguous(), "q_weight");
    TORCH_CHECK(scales.dtype() == torch::kHalf && scales.is_contiguous(), "scales must be contiguous fp16");
    return Exl2Matrix{q_weight.data_ptr<int32_t>(), reinterpret_cast<const half*>(scales.data_ptr<at::Half>()),
                      perm.data_ptr<int32_t>(), group_row.data_ptr<int32_t>(), group_word.data_ptr<int32_t>(),
                      group_bits.data_ptr<int32_t>(), (int)perm.size(0), (int)q_weight.size(1),
                      (int)group_bits.size(0), (int)max_group_rows};
}

// x (M, K) fp16 -> x @ W^T: (M, N) fp32 from the decode kernel for M <= 16, else fp16 through a dequantized
// copy of W and cuBLAS.
torch::Tensor exl2_matmul(const torch::Tensor& x, const torch::Tensor& q_weight, const torch::Tensor& scales,
                          const torch::Tensor& perm, const torch::Tensor& group_row, const torch::Tensor& group_word,
                          const torch::Tensor& group_bits, int64_t max_group_rows) {
    TORCH_CHECK(x.dtype() == torch::kHalf && x.is_contiguous() && x.dim() == 2, "x must be contiguous (M, K) fp16");
    const c10::cuda::CUDAGuard guard(x.device());
    auto w = matrix(q_weight, scales, perm, group_row, group_word, group_bits, max_group_rows);
    TORCH_CHECK(x.size(1) == w.K, "x has ", x.size(1), " columns, the matrix ", w.K, " rows");
    auto stream = at::cuda::getCurrentCUDAStream();
    const int M = (int)x.size(0);
    if (M <= 16) {
        auto out = torch::zeros({M, w.N}, x.options().dtype(torch::kFloat));
        check(exl2_gemv(w, reinterpret_cast<const half*>(x.data_ptr<at::Half>()), out.data_ptr<float>(), M, stream),
              "exl2_gemv");
        return out;
    }
    auto w_t = torch::empty({w.K, w.N}, x.options());
    check(exl2_dequantize(w, reinterpret_cast<half*>(w_t.data_ptr<at::Half>()), stream), "exl2_dequantize");
    return torch::matmul(x, w_t);
}

torch::Tensor exl2_weight(const torch::Tensor& q_weight, const torch::Tensor& scales, const torch::Tensor& perm,
                          const torch::Tensor& group_row, const torch::Tensor& group_word,
                          const torch::Tensor& group_bits, int64_t max_group_rows) {
    const c10::cuda::CUDAGuard guard(q_weight.device());
    auto w = matrix(q_weight, scales, perm, group_row, group_word, group_bits, max_group_rows);
    auto w_t = torch::empty({w.K, w.N}, scales.options());
    check(exl2_dequantize(w, reinterpret_cast<half*>(w_t.data_ptr<at::Half>()), at::cuda::getCurrentCUDAStream()),
          "exl2_dequantize");
    return w_t;
}

// Call f(pointer type tag) for the tensor's dtype: half, bfloat16 or float.
template <typename F>
void dispatch(const torch::Tensor& t, F&& f) {
    if (t.dtype() == torch::kHalf) f(half{});
    else if (t.dtype() == torch::kBFloat16) f(__nv_bfloat16{});
    else if (t.dtype() == torch::kFloat) f(float{});
    else TORCH_CHECK(false, "unsupported dtype ", t.dtype());
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

torch::Tensor rms_norm_(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    TORCH_CHECK(x.is_contiguous() && w.dtype() == torch::kFloat && w.is_contiguous(), "rms_norm: layout");
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = torch::empty_like(x);
    const int dim = (int)x.size(-1);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        check(rms_norm<T>(ptr<T>(x), w.data_ptr<float>(), ptr<T>(out), (int)(x.numel() / dim), dim, (float)eps,
                          at::cuda::getCurrentCUDAStream()), "rms_norm");
    });
    return out;
}

// In place on x (B, T, heads, D), contiguous; positions (B, T) int64.
void rotary_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& positions) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 4 && positions.is_contiguous() && cos.is_contiguous(), "rotary: layout");
    const c10::cuda::CUDAGuard guard(x.device());
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        check(rotary<T>(ptr<T>(x), cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
                        (int)(x.size(0) * x.size(1)), (int)x.size(2), (int)x.size(3), at::cuda::getCurrentCUDAStream()),
              "rotary");
    });
}

torch::Tensor act_mul_(const torch::Tensor& gate, const torch::Tensor& up, int64_t act) {
    TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(), "act_mul: layout");
    const c10::cuda::CUDAGuard guard(gate.device());
    auto out = torch::empty_like(gate);
    dispatch(gate, [&](auto tag) {
        using T = decltype(tag);
        check(act_mul<T>(ptr<T>(gate), ptr<T>(up), ptr<T>(out), gate.numel(), (int)act,
                         at::cuda::getCurrentCUDAStream()), "act_mul");
    });
    return out;
}

// q (B, H, D) one query per sequence; k, v (B, KVH, S, D) caches; positions (B,) int64.
torch::Tensor decode_attention_(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& positions, int64_t kv_len, int64_t window, double scale,
                                double softcap) {
    TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && positions.is_contiguous(),
                "decode_attention: layout");
    const c10::cuda::CUDAGuard guard(q.device());
    auto out = torch::empty_like(q);
    dispatch(q, [&](auto tag) {
        using T = decltype(tag);
        check(decode_attention<T>(ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(out), positions.data_ptr<int64_t>(),
                                  (int)q.size(0), (int)q.size(1), (int)k.size(1), (int)k.size(2), (int)q.size(2),
                                  (int)kv_len, (int)window, (float)scale, (float)softcap,
                                  at::cuda::getCurrentCUDAStream()),
              "decode_attention");
    });
    return out;
}

// GPTQ over rows b0 .. b1-1 (at most GPTQ_ROWS) of w (K, C); see gptq.cuh.
void gptq_rows_(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& scale, const torch::Tensor& half,
                const torch::Tensor& codes, const torch::Tensor& err, int64_t b0, int64_t b1) {
    for (const auto* t : {&w, &u, &scale, &half, &err})
        TORCH_CHECK(t->is_cuda() && t->dtype() == torch::kFloat && t->is_contiguous(), "gptq_rows: fp32 layout");
    TORCH_CHECK(codes.dtype() == torch::kInt16 && codes.is_contiguous() && codes.sizes() == w.sizes(), "gptq_rows: codes");
    const c10::cuda::CUDAGuard guard(w.device());
    check(gptq_rows(w.data_ptr<float>(), u.data_ptr<float>(), scale.data_ptr<float>(), half.data_ptr<float>(),
                    codes.data_ptr<int16_t>(), err.data_ptr<float>(), (int)w.size(0), (int)w.size(1), (int)b0,
                    (int)(b1 - b0), at::cuda::getCurrentCUDAStream()),
          "gptq_rows");
}

// w (rows, C), scales (P, C) fp32 -> (P, C) summed |error|^3.5; see gptq.cuh.
torch::Tensor scale_errors_(const torch::Tensor& w, const torch::Tensor& scales, int64_t half, int64_t top) {
    TORCH_CHECK(w.is_cuda() && w.dtype() == torch::kFloat && scales.dtype() == torch::kFloat && w.dim() == 2 &&
                    scales.dim() == 2 && scales.size(1) == w.size(1),
                "scale_errors: fp32 (rows, C) and (P, C)");
    const c10::cuda::CUDAGuard guard(w.device());
    auto wc = w.contiguous(), sc = scales.contiguous();
    auto err = torch::empty_like(sc);
    check(scale_errors(wc.data_ptr<float>(), sc.data_ptr<float>(), err.data_ptr<float>(), (int)w.size(0),
                       (int)w.size(1), (int)sc.size(0), (float)half, (float)top, at::cuda::getCurrentCUDAStream()),
          "scale_errors");
    return err;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("exl2_matmul", &exl2_matmul, "x @ W^T for an EXL2 matrix");
    m.def("exl2_weight", &exl2_weight, "W^T (K, N) fp16 of an EXL2 matrix, in input-channel order");
    m.def("rms_norm", &rms_norm_, "RMSNorm over the last dimension, fp32 math");
    m.def("rotary_", &rotary_, "rotary embedding in place, rotate-half layout");
    m.def("act_mul", &act_mul_, "act(gate) * up; act 0 = SiLU, 1 = tanh GELU");
    m.def("decode_attention", &decode_attention_, "single-query attention over a KV cache");
    m.def("gptq_rows", &gptq_rows_, "GPTQ over a block of up to 32 rows, in place");
    m.def("scale_errors", &scale_errors_, "EXL2 scale search: summed |error|^3.5 per candidate scale");
}
