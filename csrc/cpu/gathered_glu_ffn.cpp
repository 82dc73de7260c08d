// dart::gathered_glu_ffn, CPU: y = sum_j act(x . w_gate[idx_j]) * (x . w_up[idx_j]) * w_down_t[idx_j]
// fp32 accumulation, output rounded once to x's dtype. Duplicate indices count twice.
#include "common.h"
#include "ffn_kernel.h"

#include <torch/library.h>

namespace dart {
namespace cpu {
namespace {

constexpr const char* kOp = "gathered_glu_ffn";

at::Tensor gathered_glu_ffn_cpu(const at::Tensor& x, const at::Tensor& w_gate,
                                const at::Tensor& w_up, const at::Tensor& w_down_t,
                                const at::Tensor& idx, c10::string_view act_name) {
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
  const Act act = parse_act(std::string(act_name), kOp);
  bool per_seq = false;
  at::Tensor ix = check_idx(idx, x, N, kOp, &per_seq);

  at::Tensor xf = x_as_f32_2d(x);  // [M, d]
  at::Tensor yf = at::zeros_like(xf);
  if (xf.numel() == 0) return yf.to(x.scalar_type()).reshape(x.sizes());
  const FfnArgs a{w_gate.data_ptr(), w_gate.stride(0), w_up.data_ptr(), w_up.stride(0),
                  w_down_t.data_ptr(), w_down_t.stride(0), nullptr, act, elem_of(x), 2};
  const int64_t k = ix.size(-1);
  const int64_t* ip = ix.data_ptr<int64_t>();
  if (!per_seq) {
    ffn_dispatch(xf, a, ip, k, yf);
  } else {
    const int64_t B = x.size(0), T = x.size(1);
    for (int64_t b = 0; b < B; ++b) {
      at::Tensor xb = xf.narrow(0, b * T, T);
      at::Tensor yb = yf.narrow(0, b * T, T);
      ffn_dispatch(xb, a, ip + b * k, k, yb);
    }
  }
  return yf.to(x.scalar_type()).reshape(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("gathered_glu_ffn", &gathered_glu_ffn_cpu); }

}  // namespace cpu
}  // namespace dart
