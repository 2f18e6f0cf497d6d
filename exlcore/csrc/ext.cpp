// Python bindings: tensors in, tensors out; the kernels themselves live in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "exl2.cuh"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("exl2_matmul", &exl2_matmul, "x @ W^T for an EXL2 matrix");
    m.def("exl2_weight", &exl2_weight, "W^T (K, N) fp16 of an EXL2 matrix, in input-channel order");
}
