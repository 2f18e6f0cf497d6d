// Python bindings: tensors in, tensors out; the kernels themselves live in the .cu files.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_bf16.h>

#include "attention.cuh"
#include "fused.cuh"
#include "gptq.cuh"
#include "qmatmul.cuh"

namespace {

void check(cudaError_t e, const char* what) {
    TORCH_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
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

// A packed matrix as Python keeps it (exlcore/formats/qmatrix.py): q_weight, chunks, pair_rows, then EXL2's
// q_scale and q_scale_max or GPTQ's (scale, 1024 + zero) pairs and an empty tensor, then the tile counters.
QMatrix qmatrix(const std::vector<torch::Tensor>& t) {
    TORCH_CHECK(t.size() == 6, "a packed matrix is 6 tensors");
    for (const auto& x : t)
        TORCH_CHECK(x.is_contiguous() && (x.numel() == 0 || x.device() == t[0].device()), "qmatrix: layout or device");
    TORCH_CHECK(t[0].dtype() == torch::kInt32 && t[1].dtype() == torch::kInt32 && t[1].size(1) == 4 &&
                    t[2].dtype() == torch::kInt32 && t[5].dtype() == torch::kInt32,
                "qmatrix: dtypes");
    const bool exl2 = t[3].dtype() == torch::kInt32;
    TORCH_CHECK(exl2 ? t[4].dtype() == torch::kHalf : t[3].dtype() == torch::kHalf, "qmatrix: scale dtypes");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t[0].data_ptr()) % 16 == 0 && t[0].size(1) % 8 == 0, "qmatrix: q_weight alignment");
    TORCH_CHECK(t[2].size(0) * 2 <= 65536, "qmatrix: pair_rows holds 16-bit channels, K <= 65536");
    TORCH_CHECK(t[5].numel() >= (1 + QM_MAX_GROUPS) * ((t[0].size(1) + QM_TILE - 1) / QM_TILE),
                "qmatrix: 1 + QM_MAX_GROUPS counters per column tile");
    return QMatrix{reinterpret_cast<const uint32_t*>(t[0].data_ptr()), reinterpret_cast<const int4*>(t[1].data_ptr()),
                   reinterpret_cast<const uint32_t*>(t[2].data_ptr()),
                   exl2 ? reinterpret_cast<const uint32_t*>(t[3].data_ptr()) : nullptr,
                   exl2 ? reinterpret_cast<const half*>(t[4].data_ptr()) : nullptr,
                   exl2 ? nullptr : reinterpret_cast<const half2*>(t[3].data_ptr()), t[5].data_ptr<int32_t>(),
                   (int)t[2].size(0) * 2, (int)t[0].size(1), (int)t[1].size(0)};
}

// w_t (K, cols) fp16: columns n0 .. n0+cols-1 of W^T.
torch::Tensor dequantized(const QMatrix& w, int64_t n0, int64_t cols, const torch::TensorOptions& options) {
    auto w_t = torch::empty({w.K, cols}, options);
    check(qm_dequantize(w, reinterpret_cast<half*>(w_t.data_ptr<at::Half>()), (int)n0, (int)cols,
                        at::cuda::getCurrentCUDAStream()),
          "qm_dequantize");
    return w_t;
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

// x (M, K) -> [x @ W_i^T (M, N_i)] for matrices sharing x: for fp16 x and M <= 16 one decode launch, else per
// matrix a dequantized copy (a slice of columns at a time, at most 16 MB, in x's dtype) and cuBLAS. bf16 models
// (Gemma) take the second path: the decode kernel multiplies in fp16, where their activations overflow. With `up`,
// the input is act(x) * up (act_mul), which the decode kernel computes as it gathers x.
std::vector<torch::Tensor> qm_matmul(torch::Tensor x, const std::vector<std::vector<torch::Tensor>>& mats,
                                     const std::optional<torch::Tensor>& up, int64_t act) {
    TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.is_cuda(), "x must be contiguous (M, K) on the GPU");
    TORCH_CHECK(!up || (up->is_contiguous() && up->sizes() == x.sizes() && up->dtype() == x.dtype() &&
                        up->device() == x.device()),
                "up must be contiguous, x's shape, dtype and device");
    TORCH_CHECK(!mats.empty() && mats.size() <= QM_MAX_BATCH, "1 to ", QM_MAX_BATCH, " matrices per call");
    const c10::cuda::CUDAGuard guard(x.device());
    std::vector<QMatrix> w;
    std::vector<torch::Tensor> outs;
    std::vector<half*> out_ptrs;
    const int M = (int)x.size(0);
    for (const auto& t : mats) {
        w.push_back(qmatrix(t));
        TORCH_CHECK(x.size(1) == w.back().K, "x has ", x.size(1), " columns, the matrix ", w.back().K, " rows");
        TORCH_CHECK((w.back().scale_codes == nullptr) == (w[0].scale_codes == nullptr),
                    "matrices of one call are all EXL2 or all GPTQ");
        outs.push_back(torch::empty({M, w.back().N}, x.options()));
        out_ptrs.push_back(reinterpret_cast<half*>(outs.back().data_ptr()));  // read only on the fp16 path
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    if (M <= QM_MAX_M && x.dtype() == torch::kHalf) {
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const size_t floats = qm_workspace(w.data(), (int)w.size(), M, sms);
        auto workspace = torch::empty({(int64_t)floats}, x.options().dtype(torch::kFloat));
        check(qm_gemv(w.data(), out_ptrs.data(), (int)w.size(), reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
                      up ? reinterpret_cast<const half*>(up->data_ptr<at::Half>()) : nullptr, (int)act, M,
                      workspace.data_ptr<float>(), sms, stream),
              "qm_gemv");
        return outs;
    }
    if (up) x = act_mul_(x, *up, act);
    for (size_t i = 0; i < w.size(); i++) {
        const int64_t N = w[i].N, step = std::max<int64_t>(QM_TILE, (int64_t(1) << 23) / w[i].K / QM_TILE * QM_TILE);
        const auto half = x.options().dtype(torch::kHalf);
        if (step >= N) {
            at::mm_out(outs[i], x, dequantized(w[i], 0, N, half).to(x.dtype()));
            continue;
        }
        for (int64_t n0 = 0; n0 < N; n0 += step) {
            const int64_t cols = std::min(step, N - n0);
            outs[i].narrow(1, n0, cols).copy_(at::mm(x, dequantized(w[i], n0, cols, half).to(x.dtype())));
        }
    }
    return outs;
}

// W^T (K, N) fp16 in input-channel order (tests).
torch::Tensor qm_weight(const std::vector<torch::Tensor>& mat) {
    const c10::cuda::CUDAGuard guard(mat[0].device());
    const QMatrix w = qmatrix(mat);
    return dequantized(w, 0, w.N, mat[0].options().dtype(torch::kHalf));
}

// The norm in ATen, for rows longer than the kernels take: the same fp32 math.
torch::Tensor rms_norm_aten(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    const auto xf = x.to(torch::kFloat);
    return (xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps) * w).to(x.dtype());
}

torch::Tensor rms_norm_(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    TORCH_CHECK(x.is_contiguous() && w.dtype() == torch::kFloat && w.is_contiguous(), "rms_norm: layout");
    const c10::cuda::CUDAGuard guard(x.device());
    const int dim = (int)x.size(-1);
    if (dim > NORM_MAX_DIM) return rms_norm_aten(x, w, eps);
    auto out = torch::empty_like(x);
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        check(rms_norm<T>(ptr<T>(x), w.data_ptr<float>(), ptr<T>(out), (int)(x.numel() / dim), dim, (float)eps,
                          at::cuda::getCurrentCUDAStream()), "rms_norm");
    });
    return out;
}

// (x + h, rms_norm(x + h)): the sum in x's dtype, the norm in h's; x is h's dtype or fp32.
std::vector<torch::Tensor> add_rms_norm_(const torch::Tensor& x, const torch::Tensor& h, const torch::Tensor& w,
                                         double eps) {
    TORCH_CHECK(x.is_contiguous() && h.is_contiguous() && x.sizes() == h.sizes() && w.dtype() == torch::kFloat &&
                    w.is_contiguous() && w.numel() == x.size(-1),
                "add_rms_norm: layout");
    TORCH_CHECK(x.dtype() == h.dtype() || x.dtype() == torch::kFloat, "add_rms_norm: x is h's dtype or fp32");
    const c10::cuda::CUDAGuard guard(x.device());
    const int dim = (int)x.size(-1);
    if (dim > NORM_MAX_DIM) {
        auto sum = x + h.to(x.dtype());
        return {sum, rms_norm_aten(sum, w, eps).to(h.dtype())};
    }
    auto sum = torch::empty_like(x), out = torch::empty_like(h);
    dispatch(h, [&](auto tag) {
        using H = decltype(tag);
        auto run = [&](auto residual) {
            using R = decltype(residual);
            check(add_rms_norm<R, H>(ptr<R>(x), ptr<H>(h), w.data_ptr<float>(), ptr<R>(sum), ptr<H>(out),
                                     (int)(x.numel() / dim), dim, (float)eps, at::cuda::getCurrentCUDAStream()),
                  "add_rms_norm");
        };
        if (x.dtype() == torch::kFloat) run(float{});
        else run(H{});
    });
    return {sum, out};
}

// (rows, n) -> (rows,) int64: greedy sampling's torch.argmax(x, -1).
torch::Tensor argmax_(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "argmax: a contiguous (rows, n) tensor, n > 0");
    const c10::cuda::CUDAGuard guard(x.device());
    const int rows = (int)x.size(0), n = (int)x.size(1);
    auto out = torch::empty({rows}, x.options().dtype(torch::kLong));
    auto partial = torch::empty({rows, argmax_blocks(n), 2}, x.options().dtype(torch::kInt));
    dispatch(x, [&](auto tag) {
        using T = decltype(tag);
        check(argmax<T>(ptr<T>(x), reinterpret_cast<int2*>(partial.data_ptr()), out.data_ptr<int64_t>(), rows, n,
                        at::cuda::getCurrentCUDAStream()),
              "argmax");
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

// Writes q (B, T, H, D), rotated in place, and the caches (B, KVH, S, D): k (B, T, KVH, D) rotated and v at each
// sequence's slots positions[b]; positions (B, T) int64.
void rotary_cache_(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                   const torch::Tensor& sin, const torch::Tensor& positions, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache) {
    for (const auto* t : {&q, &k, &v, &cos, &sin, &positions, &k_cache, &v_cache})
        TORCH_CHECK(t->is_contiguous() && t->device() == q.device(), "rotary_cache: layout or device");
    for (const auto* t : {&q, &k, &v, &k_cache, &v_cache})
        TORCH_CHECK(t->dtype() == q.dtype() && t->dim() == 4, "rotary_cache: q, k, v and the caches 4-d, one dtype");
    const int64_t B = q.size(0), len = q.size(1), D = q.size(3);
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == len && k.size(3) == D && D % 2 == 0 &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(1) == k.size(2) &&
                    k_cache.size(3) == D,
                "rotary_cache: q (B, T, H, D), k and v (B, T, KVH, D), caches (B, KVH, S, D), D even");
    TORCH_CHECK(cos.dtype() == torch::kFloat && sin.dtype() == torch::kFloat && cos.dim() == 2 && cos.size(1) == D &&
                    sin.sizes() == cos.sizes() && positions.dtype() == torch::kLong && positions.dim() == 2 &&
                    positions.size(0) == B && positions.size(1) == len,
                "rotary_cache: fp32 (positions, D) tables, (B, T) int64 positions");
    const c10::cuda::CUDAGuard guard(q.device());
    dispatch(q, [&](auto tag) {
        using T = decltype(tag);
        check(rotary_cache<T>(ptr<T>(q), ptr<T>(k), ptr<T>(v), cos.data_ptr<float>(), sin.data_ptr<float>(),
                              positions.data_ptr<int64_t>(), ptr<T>(k_cache), ptr<T>(v_cache), (int)B, (int)len,
                              (int)q.size(2), (int)k.size(2), (int)k_cache.size(2), (int)D,
                              at::cuda::getCurrentCUDAStream()),
              "rotary_cache");
    });
}

// q (B, H, D) one query per sequence, k_new and v_new (B, KVH, D) its key and value, written to the caches k, v
// (B, KVH, S, D) at positions (B,) int64, q and k_new rotated first when the fp32 tables cos, sin are given;
// counters int32, zero (left zero), B * H of them at most needed. With k_scales and v_scales (B, KVH, S, D / 32)
// fp16 the caches are quantized (exlcore/cache.py): k and v uint8 (B, KVH, S, D * bits / 8), bits 8 or 4.
torch::Tensor decode_attention_(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                                const torch::Tensor& k, const torch::Tensor& v, const std::optional<torch::Tensor>& cos,
                                const std::optional<torch::Tensor>& sin, const torch::Tensor& positions, int64_t kv_len,
                                int64_t window, double scale, double softcap, const torch::Tensor& counters,
                                const std::optional<torch::Tensor>& k_scales,
                                const std::optional<torch::Tensor>& v_scales) {
    for (const auto* t : {&q, &k_new, &v_new, &k, &v, &positions, &counters})
        TORCH_CHECK(t->is_contiguous() && t->device() == q.device(), "decode_attention: layout or device");
    for (const auto* t : {&k_new, &v_new}) TORCH_CHECK(t->dtype() == q.dtype(), "decode_attention: one dtype");
    TORCH_CHECK(k_scales.has_value() == v_scales.has_value(), "decode_attention: both scales or neither");
    const int B = (int)q.size(0), H = (int)q.size(1), KVH = (int)k.size(1), D = (int)q.size(2);
    const int bits = k_scales ? (int)(k.size(3) * 8 / D) : 16;
    TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                    k.size(3) == (bits == 16 ? D : (int64_t)D * bits / 8) &&
                    q.size(1) % k.size(1) == 0 && k_new.sizes() == v_new.sizes() && k_new.dim() == 3 &&
                    k_new.size(0) == q.size(0) && k_new.size(1) == k.size(1) && k_new.size(2) == q.size(2) &&
                    kv_len >= 1 && kv_len <= k.size(2),
                "decode_attention: q (B, H, D), k_new and v_new (B, KVH, D), caches (B, KVH, S, D) with H a multiple "
                "of KVH, 1 <= kv_len <= S");
    TORCH_CHECK(D <= DA_MAX_D && D * q.element_size() % 16 == 0 && D % 2 == 0, "decode_attention: head_dim up to ",
                DA_MAX_D, ", a multiple of 16 bytes");
    if (bits == 16) {
        for (const auto* t : {&k, &v}) TORCH_CHECK(t->dtype() == q.dtype(), "decode_attention: one dtype");
    } else {
        TORCH_CHECK((bits == 8 || bits == 4) && k.dtype() == torch::kUInt8 && v.dtype() == torch::kUInt8 &&
                        q.element_size() == 2 && D % 32 == 0 && k.size(2) % 64 == 0,
                    "decode_attention: a quantized cache holds 8- or 4-bit uint8 codes of fp16 or bf16 rows, head_dim "
                    "a multiple of 32, S of 64");
        for (const auto* t : {&*k_scales, &*v_scales})
            TORCH_CHECK(t->is_contiguous() && t->device() == q.device() && t->dtype() == torch::kHalf &&
                            t->dim() == 4 && t->size(0) == B && t->size(1) == KVH && t->size(2) == k.size(2) &&
                            t->size(3) == D / 32,
                        "decode_attention: fp16 scales (B, KVH, S, head_dim / 32)");
    }
    TORCH_CHECK(positions.dtype() == torch::kLong && positions.dim() == 1 && positions.size(0) == B,
                "decode_attention: (B,) int64 positions");
    TORCH_CHECK(counters.dtype() == torch::kInt32 && counters.numel() >= decode_attention_counters(B, H, KVH),
                "decode_attention: int32 counters (B * H of them suffice)");
    TORCH_CHECK(cos.has_value() == sin.has_value(), "decode_attention: both rotary tables or neither");
    if (cos) {
        for (const auto* t : {&*cos, &*sin})
            TORCH_CHECK(t->is_contiguous() && t->device() == q.device() && t->dtype() == torch::kFloat &&
                            t->dim() == 2 && t->size(1) == D && t->sizes() == cos->sizes(),
                        "decode_attention: fp32 (positions, D) rotary tables");
    }
    const c10::cuda::CUDAGuard guard(q.device());
    auto out = torch::empty_like(q);
    auto workspace = torch::empty({(int64_t)decode_attention_workspace(B, H, D, (int)kv_len, (int)q.element_size(),
                                                                        bits)},
                                  q.options().dtype(torch::kFloat));
    dispatch(q, [&](auto tag) {
        using T = decltype(tag);
        check(decode_attention<T>(ptr<T>(q), ptr<T>(k_new), ptr<T>(v_new), static_cast<T*>(k.data_ptr()),
                                  static_cast<T*>(v.data_ptr()),
                                  cos ? cos->data_ptr<float>() : nullptr, sin ? sin->data_ptr<float>() : nullptr,
                                  ptr<T>(out), positions.data_ptr<int64_t>(), B, H, KVH, (int)k.size(2), D,
                                  (int)kv_len, (int)window, (float)scale, (float)softcap, workspace.data_ptr<float>(),
                                  counters.data_ptr<int32_t>(), bits,
                                  k_scales ? static_cast<half*>(k_scales->data_ptr()) : nullptr,
                                  v_scales ? static_cast<half*>(v_scales->data_ptr()) : nullptr,
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
    m.def("qm_matmul", &qm_matmul, "x @ W^T for packed EXL2/GPTQ matrices sharing x");
    m.def("qm_weight", &qm_weight, "W^T (K, N) fp16 of a packed matrix, in input-channel order");
    m.def("rms_norm", &rms_norm_, "RMSNorm over the last dimension, fp32 math");
    m.def("add_rms_norm", &add_rms_norm_, "(x + h, RMSNorm(x + h)): the residual add before a norm, one launch");
    m.def("rotary_", &rotary_, "rotary embedding in place, rotate-half layout");
    m.def("rotary_cache_", &rotary_cache_, "rotary on q in place and on k into the KV cache beside v, one launch");
    m.def("act_mul", &act_mul_, "act(gate) * up; act 0 = SiLU, 1 = tanh GELU");
    m.def("argmax", &argmax_, "argmax over the last dimension of a (rows, n) tensor, as torch.argmax");
    m.def("decode_attention", &decode_attention_,
          "single-query attention over a KV cache, split over keys, with the step's rotary and cache write",
          py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"),
          py::arg("positions"), py::arg("kv_len"), py::arg("window"), py::arg("scale"), py::arg("softcap"),
          py::arg("counters"), py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none());
    m.def("gptq_rows", &gptq_rows_, "GPTQ over a block of up to 32 rows, in place");
    m.def("scale_errors", &scale_errors_, "EXL2 scale search: summed |error|^3.5 per candidate scale");
}
