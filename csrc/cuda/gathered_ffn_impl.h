// Shared glue of dart::gathered_glu_ffn (GLU = true) and dart::gathered_mlp (GLU = false).
// Chooses by shape: the fused split-K decode kernels (csrc/kernels/gathered_ffn.cuh) for up to
// kDecodeMaxTokens tokens per index set, else gather the kept rows into compact temporaries and
// run cuBLAS GEMMs (tensor cores). No host sync anywhere: safe inside CUDA graphs.
#pragma once

#include "../kernels/gather_rows.cuh"
#include "../kernels/gathered_ffn.cuh"
#include "utils.h"

namespace dart {
namespace cuda {

struct FfnArgs {
  const char* op;
  const at::Tensor* x;
  const at::Tensor* w1;  // w_gate / w_in
  const char* w1_name;
  const at::Tensor* w2;  // w_up (GLU) or nullptr
  const at::Tensor* wo;  // w_down_t / w_out_t
  const char* wo_name;
  const at::Tensor* b1;  // b_in or nullptr
  const at::Tensor* bo;  // b_out or nullptr
  const at::Tensor* idx;
  c10::string_view act;
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
  if (a.b1 != nullptr) {
    check_cuda_tensor(*a.b1, x, op, "b_in");
    check_same_dtype(*a.b1, x, op, "b_in", "x");
    TORCH_CHECK(a.b1->dim() == 1 && a.b1->size(0) == N, op, ": b_in must be 1-D [N] = [", N,
                "], got shape ", a.b1->sizes());
  }
  if (a.bo != nullptr) {
    check_cuda_tensor(*a.bo, x, op, "b_out");
    check_same_dtype(*a.bo, x, op, "b_out", "x");
    TORCH_CHECK(a.bo->dim() == 1 && a.bo->size(0) == d, op, ": b_out must be 1-D [d] = [", d,
                "], got shape ", a.bo->sizes());
  }
  const at::Tensor idx = prepare_idx(*a.idx, x, op);
  const bool per_seq = idx.dim() == 2;
  if (per_seq) {
    TORCH_CHECK(x.dim() == 3, op, ": a per-sequence idx [B, k] needs x [B, T, d], got x ",
                x.sizes());
    TORCH_CHECK(idx.size(0) == x.size(0), op, ": idx has B = ", idx.size(0),
                " rows but x has batch size ", x.size(0));
    TORCH_CHECK(x.size(0) <= 65535, op, ": at most 65535 sequences per call with a per-sequence idx");
  }
  const int64_t k = idx.size(-1);

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
        Mc <= kernels::kDecodeMaxTokens
            ? kernels::plan_ffn_decode<T>(static_cast<int>(G), static_cast<int>(Mc), d, k, vec_ok,
                                          sms, max_smem_optin())
            : kernels::FfnPlan{};
    if (plan.ok) {
      // ---------------- decode: fused split-K kernels ----------------
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
      p.bo = bo.defined() ? bo.data_ptr() : nullptr;
      p.idx = idx.data_ptr<int64_t>();
      p.idx_group_stride = per_seq ? k : 0;
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
      return;
    }
    // ---------------- prefill: gather kept rows + cuBLAS ----------------
    const int64_t S = GLU ? 3 : 2;
    at::Tensor buf = per_seq ? at::empty({G, S * k, d}, xc.options())
                             : at::empty({S * k, d}, xc.options());
    {
      kernels::GatherParams gp{};
      const at::Tensor* srcs[3] = {&w1, GLU ? &w2 : &wo, &wo};
      const int64_t es = static_cast<int64_t>(sizeof(T));
      gp.nsrc = static_cast<int>(S);
      for (int s = 0; s < gp.nsrc; ++s) {
        gp.src[s] = static_cast<const char*>(srcs[s]->data_ptr());
        gp.src_row_stride[s] = srcs[s]->stride(0) * es;
        gp.src_rows[s] = N;
      }
      gp.out = static_cast<char*>(buf.data_ptr());
      gp.out_row_stride = d * es;
      gp.out_group_stride = per_seq ? S * k * d * es : 0;
      gp.s_base = 0;
      gp.idx = idx.data_ptr<int64_t>();
      gp.idx_group_stride = per_seq ? k : 0;
      gp.k = k;
      gp.groups = G;
      gp.row_bytes = d * es;
      check_launch(kernels::launch_gather_rows(gp, stream), op);
    }
    const int64_t in_rows = GLU ? 2 * k : k;  // gate+up (GLU) or in (MLP)
    at::Tensor pre;  // [.., in_rows]
    at::Tensor w_out_k;
    if (per_seq) {
      const at::Tensor x3 = xc.view({G, Mc, d});
      pre = at::bmm(x3, buf.narrow(1, 0, in_rows).transpose(1, 2)).contiguous();
      w_out_k = buf.narrow(1, in_rows, k);
    } else {
      const at::Tensor x2 = xc.view({M, d});
      pre = at::mm(x2, buf.narrow(0, 0, in_rows).t()).contiguous();
      w_out_k = buf.narrow(0, in_rows, k);
    }
    at::Tensor h;
    if (GLU) {
      h = at::empty(per_seq ? std::vector<int64_t>{G, Mc, k} : std::vector<int64_t>{M, k},
                    xc.options());
      check_launch(kernels::launch_glu_act_mul<T>(static_cast<const T*>(pre.data_ptr()), 2 * k,
                                                  static_cast<T*>(h.data_ptr()), M, k, act, sms,
                                                  stream),
                   op);
    } else {
      h = pre;
      check_launch(kernels::launch_mlp_bias_act<T>(
                       static_cast<T*>(h.data_ptr()), M, k,
                       b1.defined() ? static_cast<const T*>(b1.data_ptr()) : nullptr,
                       idx.data_ptr<int64_t>(), per_seq ? k : 0, Mc, N, act, sms, stream),
                   op);
    }
    at::Tensor out = per_seq ? at::bmm(h, w_out_k) : at::mm(h, w_out_k);  // fresh, contiguous
    if (bo.defined()) out.add_(bo);
    y = out.view(x.sizes());
  });
  return y;
}

}  // namespace cuda
}  // namespace dart
