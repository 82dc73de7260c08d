// Shared glue of dart::gathered_glu_ffn (GLU = true) and dart::gathered_mlp (GLU = false).
// Chooses by shape: the fused split-K decode kernels (csrc/kernels/gathered_ffn.cuh) below
// gemm_min_tokens() tokens per index set, else gather the kept rows into compact temporaries and
// run cuBLAS GEMMs (tensor cores). No host sync anywhere: safe inside CUDA graphs.
#pragma once

#include <algorithm>
#include <cstdlib>

#include "../kernels/gather_rows.cuh"
#include "../kernels/gathered_ffn.cuh"
#include "utils.h"

namespace dart {
namespace cuda {

// Tokens per index set from which the gather + cuBLAS path runs instead of the decode kernels
// (env DART_CUDA_GEMM_MIN_TOKENS, read once; at most kDecodeMaxTokens + 1). The default 8 is an
// estimate, not a measurement: from 8 tokens the FP32 FMAs of the CUDA-core kernels (T per
// weight element) approach what an H100/H200 can issue at HBM rate, while tensor cores are idle.
// bench/ops.py measures both sides of it (scripts/gpu_check.sh runs it with the value raised).
inline int64_t gemm_min_tokens() {
  static const int64_t v = [] {
    const char* e = std::getenv("DART_CUDA_GEMM_MIN_TOKENS");
    const int64_t n = e ? std::atoll(e) : int64_t(8);
    return std::min<int64_t>(std::max<int64_t>(1, n), kernels::kDecodeMaxTokens + 1);
  }();
  return v;
}

// Bytes of gathered weight rows the per-sequence GEMM path holds at once: sequences are processed
// in chunks of this size (at batch 8, keep 0.5, Llama-3.1-8B shapes one sequence's rows alone
// are 176 MB; all of them at once were 1.4 GB).
constexpr int64_t kPrefillGatherBytes = int64_t(256) << 20;

struct FfnArgs {
  const char* op;
  const at::Tensor* x;
  const at::Tensor* w1;  // w_gate / w_in
  const char* w1_name;
  const at::Tensor* w2;  // w_up (GLU) or nullptr
  const at::Tensor* wo;  // w_down_t / w_out_t
  const char* wo_name;
  const at::Tensor* b1;  // b_in (MLP) / b_gate (GLU) or nullptr
  const at::Tensor* b2;  // b_up (GLU) or nullptr
  const at::Tensor* bo;  // b_out (MLP) / b_down (GLU) or nullptr
  const at::Tensor* idx;
  c10::string_view act;
  const std::optional<at::Tensor>* lengths;  // per-row lengths of a padded idx [B, kmax]
};

inline void check_weight(const at::Tensor& w, const at::Tensor& x, int64_t N, int64_t d,
                         const char* op, const char* name, const char* w1_name) {
  check_cuda_tensor(w, x, op, name);
  check_same_dtype(w, x, op, name, "x");
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D [N, d], got shape ", w.sizes());
  TORCH_CHECK(w.size(1) == d, op, ": ", name, " must be [N, d] with d = ", d,
              " (x's last dim), got ", w.sizes());
  TORCH_CHECK(w.size(0) == N, op, ": ", name, " has N = ", w.size(0), " rows but ", w1_name,
              " has N = ", N);
  TORCH_CHECK(w.size(1) <= 1 || w.stride(1) == 1, op, ": ", name,
              " must have unit stride in its last dim, got strides ", w.strides());
}

// The fused split-K decode kernels.
template <typename T, bool GLU>
void launch_decode(const kernels::FfnPlan& plan, const at::Tensor& xc, const at::Tensor& w1,
                   const at::Tensor& w2, const at::Tensor& wo, const at::Tensor& b1,
                   const at::Tensor& b2, const at::Tensor& bo, const at::Tensor& idx,
                   const at::Tensor& lens,
                   at::Tensor& y, int64_t N,
                   int64_t d, int64_t k, int64_t G, int64_t Mc, kernels::Act act, int sms,
                   cudaStream_t stream, const char* op) {
  at::Tensor ws = at::empty({static_cast<int64_t>(plan.ws_bytes)}, xc.options().dtype(at::kByte));
  char* base = static_cast<char*>(ws.data_ptr());
  kernels::FfnParams p{};
  p.x = xc.data_ptr();
  p.w1 = w1.data_ptr();
  p.w1_stride = w1.stride(0);
  p.w2 = GLU ? w2.data_ptr() : nullptr;
  p.w2_stride = GLU ? w2.stride(0) : 0;
  p.wo = wo.data_ptr();
  p.wo_stride = wo.stride(0);
  p.b1 = b1.defined() ? b1.data_ptr() : nullptr;
  p.b2 = b2.defined() ? b2.data_ptr() : nullptr;
  p.bo = bo.defined() ? bo.data_ptr() : nullptr;
  p.idx = idx.data_ptr();
  p.idx_int32 = idx.scalar_type() == at::kInt;
  p.idx_group_stride = idx.dim() == 2 ? k : 0;
  p.lens = lens.defined() ? lens.data_ptr() : nullptr;
  p.lens_int32 = lens.defined() && lens.scalar_type() == at::kInt;
  p.y = y.data_ptr();
  p.N = N;
  p.d = d;
  p.k = k;
  p.G = static_cast<int>(G);
  p.Mc = static_cast<int>(Mc);
  p.act = act;
  p.h = reinterpret_cast<float*>(base + plan.h_off);
  p.partial = reinterpret_cast<float*>(base + plan.partial_off);
  p.counters = reinterpret_cast<int*>(base + plan.counters_off);
  check_launch(kernels::launch_ffn_decode<T, GLU>(p, plan, sms, stream), op);
}

// Gather the kept rows of groups [g0, g0 + groups) (one group for a shared idx) into `buf`
// (zero rows past a group's length with lens64).
template <typename T, bool GLU>
void gather_kept_rows(at::Tensor& buf, const at::Tensor& w1, const at::Tensor& w2,
                      const at::Tensor& wo, const at::Tensor& idx64, const at::Tensor& lens64,
                      int64_t g0, int64_t groups,
                      int64_t N, int64_t d, int64_t k, cudaStream_t stream, const char* op) {
  constexpr int64_t S = GLU ? 3 : 2;
  const int64_t es = static_cast<int64_t>(sizeof(T));
  const at::Tensor* srcs[3] = {&w1, GLU ? &w2 : &wo, &wo};
  kernels::GatherParams gp{};
  gp.nsrc = static_cast<int>(S);
  for (int s = 0; s < gp.nsrc; ++s) {
    gp.src[s] = static_cast<const char*>(srcs[s]->data_ptr());
    gp.src_row_stride[s] = srcs[s]->stride(0) * es;
    gp.src_rows[s] = N;
  }
  gp.out = static_cast<char*>(buf.data_ptr());
  gp.out_row_stride = d * es;
  gp.out_group_stride = S * k * d * es;
  gp.s_base = 0;
  gp.idx = idx64.data_ptr<int64_t>() + (idx64.dim() == 2 ? g0 * k : 0);
  gp.idx_group_stride = idx64.dim() == 2 ? k : 0;
  gp.lens = lens64.defined() ? lens64.data_ptr<int64_t>() + g0 : nullptr;
  gp.k = k;
  gp.groups = groups;
  gp.row_bytes = d * es;
  check_launch(kernels::launch_gather_rows(gp, stream), op);
}

// Gather the kept rows + cuBLAS GEMMs. A per-sequence idx is processed in chunks of sequences
// whose gathered rows fit in kPrefillGatherBytes (one buffer, reused in stream order).
template <typename T, bool GLU>
void prefill(const at::Tensor& xc, const at::Tensor& w1, const at::Tensor& w2,
             const at::Tensor& wo, const at::Tensor& b1, const at::Tensor& b2,
             const at::Tensor& bo, const at::Tensor& idx64, const at::Tensor& lens64, at::Tensor& y, int64_t N,
             int64_t d, int64_t k, int64_t G,
             int64_t Mc, kernels::Act act, int sms, cudaStream_t stream, const char* op) {
  constexpr int64_t S = GLU ? 3 : 2;
  const bool per_seq = idx64.dim() == 2;
  const int64_t group_bytes = S * k * d * static_cast<int64_t>(sizeof(T));
  const int64_t chunk = per_seq ? std::max<int64_t>(1, kPrefillGatherBytes / group_bytes) : 1;
  const int64_t in_rows = GLU ? 2 * k : k;  // gate+up (GLU) or in (MLP)
  const int64_t bufs = std::min(chunk, G);
  at::Tensor buf = at::empty({bufs, S * k, d}, xc.options());
  at::Tensor h = at::empty({bufs, Mc, GLU ? k : in_rows}, xc.options());
  at::Tensor pre = GLU ? at::empty({bufs, Mc, in_rows}, xc.options()) : h;
  const at::Tensor x3 = xc.view({G, Mc, d});
  at::Tensor y3 = y.view({G, Mc, d});
  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t n = std::min(chunk, G - g0);
    at::Tensor bn = buf.narrow(0, 0, n);
    at::Tensor hn = h.narrow(0, 0, n);
    at::Tensor pn = pre.narrow(0, 0, n);
    gather_kept_rows<T, GLU>(bn, w1, w2, wo, idx64, lens64, g0, n, N, d, k, stream, op);
    const at::Tensor xn = x3.narrow(0, g0, n);
    at::bmm_out(pn, xn, bn.narrow(1, 0, in_rows).transpose(1, 2));
    const int64_t rows = n * Mc;
    // biases are indexed through the chunk's own index rows (padding entries give h = 0)
    const int64_t* idx_chunk = idx64.data_ptr<int64_t>() + (per_seq ? g0 * k : 0);
    const int64_t* lens_chunk = lens64.defined() ? lens64.data_ptr<int64_t>() + g0 : nullptr;
    if (GLU) {
      kernels::GluBias<T> gb{b1.defined() ? static_cast<const T*>(b1.data_ptr()) : nullptr,
                          b2.defined() ? static_cast<const T*>(b2.data_ptr()) : nullptr,
                          idx_chunk, per_seq ? k : 0, lens_chunk, Mc, N};
      check_launch(kernels::launch_glu_act_mul<T>(static_cast<const T*>(pn.data_ptr()), 2 * k,
                                                  static_cast<T*>(hn.data_ptr()), rows, k, act,
                                                  gb, sms, stream),
                   op);
    } else {
      check_launch(kernels::launch_mlp_bias_act<T>(
                       static_cast<T*>(hn.data_ptr()), rows, k,
                       b1.defined() ? static_cast<const T*>(b1.data_ptr()) : nullptr, idx_chunk,
                       per_seq ? k : 0, lens_chunk, Mc, N, act, sms, stream),
                   op);
    }
    at::Tensor yn = y3.narrow(0, g0, n);
    at::bmm_out(yn, hn, bn.narrow(1, in_rows, k));
  }
  if (bo.defined()) y.add_(bo);
}

template <bool GLU>
at::Tensor gathered_ffn_cuda(const FfnArgs& a) {
  const char* op = a.op;
  const at::Tensor& x = *a.x;
  const kernels::Act act = parse_act(a.act, op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-d tensor");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t d = x.size(-1);
  check_cuda_tensor(*a.w1, x, op, a.w1_name);
  check_same_dtype(*a.w1, x, op, a.w1_name, "x");
  TORCH_CHECK(a.w1->dim() == 2, op, ": ", a.w1_name, " must be 2-D [N, d], got shape ",
              a.w1->sizes());
  const int64_t N = a.w1->size(0);
  check_weight(*a.w1, x, N, d, op, a.w1_name, a.w1_name);
  if constexpr (GLU) check_weight(*a.w2, x, N, d, op, "w_up", a.w1_name);
  check_weight(*a.wo, x, N, d, op, a.wo_name, a.w1_name);
  auto check_bias = [&](const at::Tensor* b, const char* name, int64_t n, const char* what) {
    if (b == nullptr) return;
    check_cuda_tensor(*b, x, op, name);
    check_same_dtype(*b, x, op, name, "x");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", name, " must be 1-D [", what,
                "] = [", n, "], got shape ", b->sizes());
  };
  check_bias(a.b1, GLU ? "b_gate" : "b_in", N, "N");
  check_bias(a.b2, "b_up", N, "N");
  check_bias(a.bo, GLU ? "b_down" : "b_out", d, "d");
  // int32 indices reach the decode kernels as they are (no widening kernel per call); the
  // GEMM path's row gather widens them
  check_cuda_tensor(*a.idx, x, op, "idx");
  TORCH_CHECK(a.idx->scalar_type() == at::kLong || a.idx->scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", a.idx->scalar_type());
  TORCH_CHECK(a.idx->dim() == 1 || a.idx->dim() == 2, op,
              ": idx must be 1-D [k] or 2-D [B, k], got shape ", a.idx->sizes());
  const at::Tensor idx = a.idx->contiguous();
  const bool per_seq = idx.dim() == 2;
  if (per_seq) {
    TORCH_CHECK(x.dim() == 3, op, ": a per-sequence idx [B, k] needs x [B, T, d], got x ",
                x.sizes());
    TORCH_CHECK(idx.size(0) == x.size(0), op, ": idx has B = ", idx.size(0),
                " rows but x has batch size ", x.size(0));
    TORCH_CHECK(x.size(0) <= 65535, op, ": at most 65535 sequences per call with a per-sequence idx");
  }
  const int64_t k = idx.size(-1);
  // int32 lengths reach the decode kernels as they are; the GEMM path widens them
  const at::Tensor lens = prepare_lengths(*a.lengths, idx, op);

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous();
  const int64_t M = d > 0 ? xc.numel() / d : 0;
  at::Tensor y = at::empty(x.sizes(), xc.options());
  if (M == 0 || d == 0) return y;
  const at::Tensor bo = a.bo != nullptr ? a.bo->contiguous() : at::Tensor();
  if (k == 0) {
    y.zero_();
    if (bo.defined()) y.add_(bo);
    return y;
  }
  // unit last-dim stride was checked; d == 1 may have any stride: make it contiguous
  const at::Tensor w1 = rows_view(*a.w1);
  const at::Tensor w2 = GLU ? rows_view(*a.w2) : at::Tensor();
  const at::Tensor wo = rows_view(*a.wo);
  const at::Tensor b1 = a.b1 != nullptr ? a.b1->contiguous() : at::Tensor();
  const at::Tensor b2 = a.b2 != nullptr ? a.b2->contiguous() : at::Tensor();
  const int64_t G = per_seq ? x.size(0) : 1;
  const int64_t Mc = M / G;
  const int sms = num_sms();

  dispatch_float(xc.scalar_type(), op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int64_t kAlignElems = 16 / static_cast<int64_t>(sizeof(T));
    auto al = [](const at::Tensor& t) {
      return !t.defined() || kernels::host_aligned(t.data_ptr(), 16);
    };
    const bool vec_ok = d % kAlignElems == 0 && al(xc) && al(y) && al(w1) && al(wo) &&
                        w1.stride(0) % kAlignElems == 0 && wo.stride(0) % kAlignElems == 0 &&
                        (!GLU || (al(w2) && w2.stride(0) % kAlignElems == 0));
    const kernels::FfnPlan plan =
        Mc < gemm_min_tokens()
            ? kernels::plan_ffn_decode<T>(static_cast<int>(G), static_cast<int>(Mc), d, k, vec_ok,
                                          sms, max_smem_optin())
            : kernels::FfnPlan{};
    if (plan.ok) {
      launch_decode<T, GLU>(plan, xc, w1, w2, wo, b1, b2, bo, idx, lens, y, N, d, k, G, Mc,
                            act, sms, stream, op);
    } else {
      const at::Tensor lens64 = lens.defined() ? lens.to(at::kLong) : lens;
      prefill<T, GLU>(xc, w1, w2, wo, b1, b2, bo, idx.to(at::kLong), lens64, y, N, d, k, G, Mc,
                      act, sms, stream, op);
    }
  });
  return y;
}

}  // namespace cuda
}  // namespace dart
