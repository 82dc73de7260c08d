// dart::gathered_mlp, CPU: h_j = act(x . w_in[idx_j] + b_in[idx_j]);
// y = sum_j h_j * w_out_t[idx_j] + b_out. fp32 accumulation, output rounded once to x's dtype.
// A padded per-sequence idx [B, kmax] comes with lengths [B] (see gathered_glu_ffn.cpp).
#include "common.h"
#include "ffn_kernel.h"

#include <torch/library.h>

namespace dart {
namespace cpu {
namespace {

constexpr const char* kOp = "gathered_mlp";

at::Tensor gathered_mlp_cpu(const at::Tensor& x, const at::Tensor& w_in,
                            const c10::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                            const c10::optional<at::Tensor>& b_out, const at::Tensor& idx,
                            c10::string_view act_name, const c10::optional<at::Tensor>& lengths) {
  check_float_dtype(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., d], got a 0-D tensor");
  const int64_t d = x.size(-1);
  check_weight(w_in, x, kOp, "w_in", d);
  check_weight(w_out_t, x, kOp, "w_out_t", d);
  const int64_t N = w_in.size(0);
  TORCH_CHECK(w_out_t.size(0) == N, kOp, ": w_out_t has N = ", w_out_t.size(0),
              " rows but w_in has N = ", N);
  check_bias(b_in, x, kOp, "b_in", N, "N");
  check_bias(b_out, x, kOp, "b_out", d, "d");
  const Act act = parse_act(std::string(act_name), kOp);
  const Indices ix = check_idx(idx, lengths, x, N, kOp);

  at::Tensor xf = x_as_f32_2d(x);
  at::Tensor yf = at::zeros_like(xf);
  if (xf.numel() > 0) {
    const at::Tensor bsel = kept_bias(b_in, ix);
    const FfnArgs a{w_in.data_ptr(), w_in.stride(0), nullptr, 0, w_out_t.data_ptr(),
                    w_out_t.stride(0), ptr_or_null(bsel), nullptr, act, elem_of(x), 1};
    ffn_run(xf, a, ix, yf);
    if (b_out.has_value()) yf.add_(b_out->to(at::kFloat));
  }
  return yf.to(x.scalar_type()).reshape(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("gathered_mlp", &gathered_mlp_cpu); }

}  // namespace cpu
}  // namespace dart
