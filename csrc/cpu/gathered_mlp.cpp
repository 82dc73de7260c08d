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

void check_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x, const char* name,
                int64_t n, const char* what) {
  if (!b.has_value()) return;
  const at::Tensor& t = *b;
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kOp, ": ", name, " must be 1-D [", what, "] = [",
              n, "], got shape ", t.sizes());
}

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
  check_bias(b_in, x, "b_in", N, "N");
  check_bias(b_out, x, "b_out", d, "d");
  const Act act = parse_act(std::string(act_name), kOp);
  const Indices ix = check_idx(idx, lengths, x, N, kOp);

  at::Tensor xf = x_as_f32_2d(x);
  at::Tensor yf = at::zeros_like(xf);
  if (xf.numel() > 0) {
    // Kept biases, gathered once per call in idx's layout ([k] or [B, kmax]; padding entries of
    // the private idx copy are 0, so they gather a harmless bias nobody reads); tiny.
    at::Tensor bsel;
    if (b_in.has_value() && ix.k > 0)
      bsel = b_in->to(at::kFloat).index_select(0, ix.idx.reshape({-1})).contiguous();
    const float* bp = bsel.defined() ? bsel.data_ptr<float>() : nullptr;
    const FfnArgs a{w_in.data_ptr(), w_in.stride(0), nullptr, 0, w_out_t.data_ptr(),
                    w_out_t.stride(0), bp, act, elem_of(x), 1};
    ffn_run(xf, a, ix, yf);
    if (b_out.has_value()) yf.add_(b_out->to(at::kFloat));
  }
  return yf.to(x.scalar_type()).reshape(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("gathered_mlp", &gathered_mlp_cpu); }

}  // namespace cpu
}  // namespace dart
