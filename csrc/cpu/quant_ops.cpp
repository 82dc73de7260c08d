// The quantised-weight ops on CPU (formats of dart_ext/quant.py; hot loops in quant_core.inc):
//   gathered_glu_ffn_q  the gathered GLU FFN of gathered_glu_ffn.cpp over quantised gate, up and
//                       down_t rows (biases optional)
//   gathered_mlp_q      the plain gathered FFN of gathered_mlp.cpp over quantised rows
//   linear_q            y = x @ W^T + bias over quantised rows W [out, in] (attention, LM head)
// Each quantised matrix comes as Tensor[] {data, scales} or {data, scales, mins}, with the call's
// format name and group size. The input dots use x rounded to int8 per block of 32 (both routes:
// the GEMM route of many tokens multiplies the same rounded x with the dequantised rows).
#include "common.h"
#include "ffn_kernel.h"
#include "quant_checks.h"

#include <torch/library.h>

namespace dart {
namespace cpu {
namespace {

// x [..., d]: float, d >= 1 (a multiple of group, checked by parse_format).
int64_t check_x(const at::Tensor& x, const char* op) {
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  return x.size(-1);
}

at::Tensor ffn_q(const char* op, const at::Tensor& x, at::TensorList w1, const char* w1_name,
                 at::TensorList w2, at::TensorList wo, const char* wo_name, c10::string_view fmt,
                 int64_t group, const at::Tensor& idx, c10::string_view act_name,
                 const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& b1,
                 const char* b1_name, const c10::optional<at::Tensor>& b2,
                 const c10::optional<at::Tensor>& bo, const char* bo_name) {
  const bool glu = !w2.empty();
  const int64_t d = check_x(x, op);
  bool has_min = false;
  const QSpec qs = parse_format(fmt, group, d, op, &has_min);
  int64_t N = 0, N2 = 0, No = 0;
  QMat q[3];
  q[0] = check_qmat(w1, w1_name, qs, has_min, d, x, op, &N);
  if (glu) {
    q[1] = check_qmat(w2, "up", qs, has_min, d, x, op, &N2);
    TORCH_CHECK(N2 == N, op, ": up has N = ", N2, " rows but ", w1_name, " has N = ", N);
  }
  q[2] = check_qmat(wo, wo_name, qs, has_min, d, x, op, &No);
  TORCH_CHECK(No == N, op, ": ", wo_name, " has N = ", No, " rows but ", w1_name, " has N = ", N);
  if (!glu) q[1] = q[0];
  check_bias(b1, x, op, b1_name, N, "N");
  check_bias(b2, x, op, "b_up", N, "N");
  check_bias(bo, x, op, bo_name, d, "d");
  const Act act = parse_act(std::string(act_name), op);
  const Indices ix = check_idx(idx, lengths, x, N, op);

  at::Tensor xf = x_as_f32_2d(x);
  at::Tensor yf = at::zeros_like(xf);
  if (xf.numel() == 0) return yf.to(x.scalar_type()).reshape(x.sizes());
  const at::Tensor bk1 = kept_bias(b1, ix), bk2 = kept_bias(b2, ix);
  FfnArgs a{nullptr, 0, nullptr, 0, nullptr, 0, ptr_or_null(bk1), ptr_or_null(bk2),
            act,     elem_of(x), glu ? 2 : 1};
  a.q = q;
  a.qs = qs;
  ffn_run(xf, a, ix, yf);
  if (bo.has_value()) yf.add_(bo->to(at::kFloat));
  return yf.to(x.scalar_type()).reshape(x.sizes());
}

at::Tensor gathered_glu_ffn_q_cpu(const at::Tensor& x, at::TensorList gate, at::TensorList up,
                                  at::TensorList down_t, c10::string_view fmt, int64_t group,
                                  const at::Tensor& idx, c10::string_view act,
                                  const c10::optional<at::Tensor>& lengths,
                                  const c10::optional<at::Tensor>& b_gate,
                                  const c10::optional<at::Tensor>& b_up,
                                  const c10::optional<at::Tensor>& b_down) {
  TORCH_CHECK(!up.empty(), "gathered_glu_ffn_q: up must hold [data, scales(, mins)], got []");
  return ffn_q("gathered_glu_ffn_q", x, gate, "gate", up, down_t, "down_t", fmt, group, idx, act,
               lengths, b_gate, "b_gate", b_up, b_down, "b_down");
}

at::Tensor gathered_mlp_q_cpu(const at::Tensor& x, at::TensorList w_in,
                              const c10::optional<at::Tensor>& b_in, at::TensorList w_out_t,
                              const c10::optional<at::Tensor>& b_out, c10::string_view fmt,
                              int64_t group, const at::Tensor& idx, c10::string_view act,
                              const c10::optional<at::Tensor>& lengths) {
  return ffn_q("gathered_mlp_q", x, w_in, "w_in", {}, w_out_t, "w_out_t", fmt, group, idx, act,
               lengths, b_in, "b_in", c10::nullopt, b_out, "b_out");
}

at::Tensor linear_q_cpu(const at::Tensor& x, at::TensorList w, c10::string_view fmt,
                        int64_t group, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear_q";
  const int64_t d = check_x(x, op);
  bool has_min = false;
  const QSpec qs = parse_format(fmt, group, d, op, &has_min);
  int64_t N = 0;
  const QMat q = check_qmat(w, "w", qs, has_min, d, x, op, &N);
  check_bias(bias, x, op, "bias", N, "N (w's rows)");

  const at::Tensor xf = x_as_f32_2d(x);
  const int64_t M = xf.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor yf = at::empty({M, N}, xf.options());
  if (M > 0 && N > 0) {
    const CoreKernels& core = core_kernels();
    if (M < gemm_min_tokens()) {
      const QuantizedAct xq = quantize_act(core, xf.data_ptr<float>(), M, d);
      const QAct xa = xq.view();
      float* y = yf.data_ptr<float>();
      // each row's dot is computed by one thread alone: the result never depends on the
      // thread count
      at::parallel_for(0, N, std::max<int64_t>(2, 8192 / std::max<int64_t>(d, 1)),
                       [&](int64_t r0, int64_t r1) { core.qdot_rows(xa, M, d, q, qs, r0, r1, y, N); });
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::Tensor xq = fake_quant_act(core, xf);
      const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(64, (int64_t(1) << 18) / d));
      at::Tensor wbuf = at::empty({nb, d}, xf.options());
      for (int64_t r0 = 0; r0 < N; r0 += nb) {
        const int64_t rb = std::min<int64_t>(nb, N - r0);
        float* wp = wbuf.data_ptr<float>();
        at::parallel_for(0, rb, std::max<int64_t>(1, 16384 / d), [&](int64_t b, int64_t e) {
          core.qdequant_rows(q, qs, nullptr, r0 + b, e - b, d, wp + b * d);
        });
        at::Tensor yb = yf.narrow(1, r0, rb);
        at::mm_out(yb, xq, wbuf.narrow(0, 0, rb).t());
      }
    }
  } else {
    yf.zero_();
  }
  if (bias.has_value()) yf.add_(bias->to(at::kFloat));
  return yf.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) {
  m.impl("gathered_glu_ffn_q", &gathered_glu_ffn_q_cpu);
  m.impl("gathered_mlp_q", &gathered_mlp_q_cpu);
  m.impl("linear_q", &linear_q_cpu);
}

}  // namespace cpu
}  // namespace dart
