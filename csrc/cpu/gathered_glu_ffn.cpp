// dart::gathered_glu_ffn, CPU:
//   y = sum_j act(x . w_gate[idx_j] + b_gate[idx_j]) * (x . w_up[idx_j] + b_up[idx_j]) * w_down_t[idx_j]
//       + b_down
// (biases optional: Llama's mlp_bias). fp32 accumulation, output rounded once to x's dtype.
// Duplicate indices count twice. A padded per-sequence idx [B, kmax] comes with lengths [B]: row b
// sums over its first lengths[b] entries.
#include "common.h"
#include "ffn_kernel.h"

#include <torch/library.h>

namespace dart {
namespace cpu {
namespace {

constexpr const char* kOp = "gathered_glu_ffn";

at::Tensor gathered_glu_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate,
                                const at::Tensor& w_up, const at::Tensor& w_down_t,
                                const at::Tensor& idx, c10::string_view act_name,
                                const c10::optional<at::Tensor>& lengths,
                                const c10::optional<at::Tensor>& b_gate,
                                const c10::optional<at::Tensor>& b_up,
                                const c10::optional<at::Tensor>& b_down) {
  check_float_dtype(x, kOp, "x");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., d], got a 0-D tensor");
  const int64_t d = x.size(-1);
  check_weight(w_gate, x, kOp, "w_gate", d);
  check_weight(w_up, x, kOp, "w_up", d);
  check_weight(w_down_t, x, kOp, "w_down_t", d);
  const int64_t N = w_gate.size(0);
  TORCH_CHECK(w_up.size(0) == N, kOp, ": w_up has N = ", w_up.size(0),
              " rows but w_gate has N = ", N);
  TORCH_CHECK(w_down_t.size(0) == N, kOp, ": w_down_t has N = ", w_down_t.size(0),
              " rows but w_gate has N = ", N);
  check_bias(b_gate, x, kOp, "b_gate", N, "N");
  check_bias(b_up, x, kOp, "b_up", N, "N");
  check_bias(b_down, x, kOp, "b_down", d, "d");
  const Act act = parse_act(std::string(act_name), kOp);
  const Indices ix = check_idx(idx, lengths, x, N, kOp);

  at::Tensor xf = x_as_f32_2d(x);  // [M, d]
  at::Tensor yf = at::zeros_like(xf);
  if (xf.numel() == 0) return yf.to(x.scalar_type()).reshape(x.sizes());
  const at::Tensor bg = kept_bias(b_gate, ix), bu = kept_bias(b_up, ix);
  const FfnArgs a{w_gate.data_ptr(),   w_gate.stride(0), w_up.data_ptr(),  w_up.stride(0),
                  w_down_t.data_ptr(), w_down_t.stride(0), ptr_or_null(bg), ptr_or_null(bu),
                  act,                 elem_of(x),         2};
  ffn_run(xf, a, ix, yf);
  if (b_down.has_value()) yf.add_(b_down->to(at::kFloat));
  return yf.to(x.scalar_type()).reshape(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("gathered_glu_ffn", &gathered_glu_ffn_cpu); }

}  // namespace cpu
}  // namespace dart
