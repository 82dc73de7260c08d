// The quantised-weight ops on CUDA (formats of dart_ext/quant.py; kernels in
// csrc/kernels/quant_ffn.cuh): gathered_glu_ffn_q, gathered_mlp_q, linear_q.
// Up to kQDecodeMaxTokens tokens per index set: the fused decode kernels (int8 dot products
// against x rounded per block of 32 in shared memory, split-K down projection without float
// atomics). More tokens: x rounded the same way into x's dtype, the kept rows dequantised into
// x's dtype (chunked, like the fp ops' gathered rows) and cuBLAS GEMMs. No host sync anywhere:
// safe inside CUDA graphs. Argument checks and their messages follow csrc/cpu/quant_ops.cpp.
#include <algorithm>

#include "../kernels/quant_ffn.cuh"
#include "utils.h"

namespace dart {
namespace cuda {
namespace {

using kernels::QFmt;
using kernels::QMode;

// Bytes of dequantised rows the GEMM path holds at once (per-sequence chunks, linear_q's row
// blocks).
constexpr int64_t kQPrefillBytes = int64_t(256) << 20;

struct QFormatInfo {
  const char* name;
  QFmt fmt;
  int bits;
  bool has_min;
};
constexpr QFormatInfo kQFormats[] = {
    {"q8", QFmt::kQ8, 8, false}, {"q4", QFmt::kQ4, 4, false}, {"q4m", QFmt::kQ4M, 4, true}};

const QFormatInfo& parse_format(c10::string_view fmt, int64_t group, int64_t d, const char* op) {
  const QFormatInfo* f = nullptr;
  for (const QFormatInfo& c : kQFormats)
    if (fmt == c.name) f = &c;
  TORCH_CHECK(f != nullptr, op, ": unknown quantisation format '", std::string(fmt),
              "'; accepted: q8, q4, q4m");
  TORCH_CHECK(group == 32 || group == 64, op, ": group must be 32 or 64, got ", group);
  TORCH_CHECK(d % group == 0, op, ": group = ", group, " must divide d = ", d,
              " (x's last dim, the rows' length)");
  return *f;
}

// One checked quantised matrix: contiguous parts (the kernels index rows densely; the formats'
// own tensors already are, so this copies nothing for them) and the kernels' view of them.
struct QTensors {
  at::Tensor data, scales, mins;
  int64_t N = 0;
  kernels::QMat mat() const {
    return kernels::QMat{data.data_ptr(), static_cast<const uint16_t*>(scales.data_ptr()),
                         mins.defined() ? static_cast<const uint16_t*>(mins.data_ptr()) : nullptr};
  }
};

QTensors check_qmat(at::TensorList t, const char* name, const QFormatInfo& f, int64_t group,
                    int64_t d, const at::Tensor& x, const char* op) {
  const size_t want = f.has_min ? 3 : 2;
  TORCH_CHECK(t.size() == want, op, ": ", name, " must hold ",
              f.has_min ? "[data, scales, mins]" : "[data, scales]", " for this format, got ",
              t.size(), " tensors");
  const int64_t N = t[0].dim() >= 1 ? t[0].size(0) : 0;
  const int64_t ng = d / group;
  const int64_t width = d * f.bits / 8;
  for (size_t i = 0; i < t.size(); ++i) {
    const char* part = i == 0 ? "data" : i == 1 ? "scales" : "mins";
    const at::Tensor& p = t[i];
    TORCH_CHECK(p.device() == x.device(), op, ": ", name, " ", part, " is on ", p.device(),
                " but x is on ", x.device());
    const at::ScalarType want_dt = i == 0 ? (f.bits == 8 ? at::kChar : at::kByte) : at::kHalf;
    TORCH_CHECK(p.scalar_type() == want_dt, op, ": ", name, " ", part, " must be ", want_dt,
                " for ", f.bits, "-bit rows, got ", p.scalar_type());
    const int64_t cols = i == 0 ? width : ng;
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N && p.size(1) == cols, op, ": ", name, " ", part,
                " must be [N, ", cols, "] = [", N, ", ", cols, "] (d = ", d, ", group = ", group,
                "), got shape ", p.sizes());
    TORCH_CHECK(p.stride(1) == 1 || cols <= 1, op, ": ", name, " ", part,
                " must have unit stride in its last dim, got strides ", p.strides());
  }
  if (f.has_min)
    TORCH_CHECK(t[1].stride(0) == t[2].stride(0), op, ": ", name,
                " scales and mins must share a row stride, got ", t[1].stride(0), " and ",
                t[2].stride(0));
  QTensors q;
  q.N = N;
  // a fresh allocation is 256-byte aligned; a view at an odd offset is copied
  auto own = [](const at::Tensor& p, int64_t align) {
    return p.is_contiguous() && kernels::host_aligned(p.data_ptr(), align) ? p : p.contiguous();
  };
  q.data = own(t[0], 16);
  if (!kernels::host_aligned(q.data.data_ptr(), 16)) q.data = q.data.clone();
  q.scales = own(t[1], 2);
  if (f.has_min) q.mins = own(t[2], 2);
  return q;
}

void check_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x, const char* op,
                const char* name, int64_t n, const char* what) {
  if (!b.has_value()) return;
  check_cuda_tensor(*b, x, op, name);
  check_same_dtype(*b, x, op, name, "x");
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", name, " must be 1-D [", what, "] = [",
              n, "], got shape ", b->sizes());
}

int64_t check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  return x.size(-1);
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

at::Tensor opt_contig(const c10::optional<at::Tensor>& b) {
  return b.has_value() && b->defined() ? b->contiguous() : at::Tensor();
}

// Rounded x (as the decode kernels round it in shared memory) in x's dtype.
template <typename T>
at::Tensor rounded_x(const at::Tensor& xc, int sms, cudaStream_t stream, const char* op) {
  at::Tensor xr = at::empty_like(xc);
  check_launch(kernels::launch_q_round_x<T>(static_cast<const T*>(xc.data_ptr()),
                                            static_cast<T*>(xr.data_ptr()), xc.numel(), sms,
                                            stream),
               op);
  return xr;
}

// Dequantises rows of `srcs` into out [groups, nsrc * k, d] (idx64 null: rows 0..k-1 of srcs[0]).
template <typename T>
void dequant_rows(at::Tensor& out, const QTensors* const* srcs, int nsrc, QFmt fmt, int64_t group,
                  int64_t d, int64_t N, int64_t k, const int64_t* idx, int64_t idx_group_stride,
                  const int64_t* lens, int64_t groups, int sms, cudaStream_t stream,
                  const char* op) {
  kernels::QGatherParams<T> gp{};
  for (int s = 0; s < nsrc; ++s) gp.src[s] = srcs[s]->mat();
  gp.nsrc = nsrc;
  gp.fmt = fmt;
  gp.group = static_cast<int>(group);
  gp.d = d;
  gp.N = N;
  gp.k = k;
  gp.idx = idx;
  gp.idx_group_stride = idx_group_stride;
  gp.lens = lens;
  gp.groups = groups;
  gp.out = static_cast<T*>(out.data_ptr());
  check_launch(kernels::launch_q_dequant_rows<T>(gp, sms, stream), op);
}

template <bool GLU>
at::Tensor ffn_q_cuda(const char* op, const at::Tensor& x, at::TensorList w1l, const char* w1_name,
                      at::TensorList w2l, at::TensorList wol, const char* wo_name,
                      c10::string_view fmt_name, int64_t group, const at::Tensor& idx_in,
                      c10::string_view act_name, const c10::optional<at::Tensor>& lengths,
                      const c10::optional<at::Tensor>& b1o, const char* b1_name,
                      const c10::optional<at::Tensor>& b2o,
                      const c10::optional<at::Tensor>& boo, const char* bo_name) {
  const int64_t d = check_x(x, op);
  const QFormatInfo& f = parse_format(fmt_name, group, d, op);
  const QTensors w1 = check_qmat(w1l, w1_name, f, group, d, x, op);
  const int64_t N = w1.N;
  QTensors w2;
  if constexpr (GLU) {
    w2 = check_qmat(w2l, "up", f, group, d, x, op);
    TORCH_CHECK(w2.N == N, op, ": up has N = ", w2.N, " rows but ", w1_name, " has N = ", N);
  }
  const QTensors wo = check_qmat(wol, wo_name, f, group, d, x, op);
  TORCH_CHECK(wo.N == N, op, ": ", wo_name, " has N = ", wo.N, " rows but ", w1_name,
              " has N = ", N);
  check_bias(b1o, x, op, b1_name, N, "N");
  check_bias(b2o, x, op, "b_up", N, "N");
  check_bias(boo, x, op, bo_name, d, "d");
  const kernels::Act act = parse_act(act_name, op);
  check_cuda_tensor(idx_in, x, op, "idx");
  TORCH_CHECK(idx_in.scalar_type() == at::kLong || idx_in.scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", idx_in.scalar_type());
  TORCH_CHECK(idx_in.dim() == 1 || idx_in.dim() == 2, op,
              ": idx must be 1-D [k] or 2-D [B, k], got shape ", idx_in.sizes());
  const at::Tensor idx = idx_in.contiguous();
  const bool per_seq = idx.dim() == 2;
  if (per_seq) {
    TORCH_CHECK(x.dim() == 3, op, ": a per-sequence idx [B, k] needs x [B, T, d], got x ",
                x.sizes());
    TORCH_CHECK(idx.size(0) == x.size(0), op, ": idx has B = ", idx.size(0),
                " rows but x has batch size ", x.size(0));
    TORCH_CHECK(x.size(0) <= 65535, op,
                ": at most 65535 sequences per call with a per-sequence idx");
  }
  const int64_t k = idx.size(-1);
  const at::Tensor lens = prepare_lengths(lengths, idx, op);

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous();
  const int64_t M = d > 0 ? xc.numel() / d : 0;
  at::Tensor y = at::empty(x.sizes(), xc.options());
  if (M == 0 || d == 0) return y;
  const at::Tensor bo = opt_contig(boo);
  if (k == 0) {
    y.zero_();
    if (bo.defined()) y.add_(bo);
    return y;
  }
  const at::Tensor b1 = opt_contig(b1o);
  const at::Tensor b2 = opt_contig(b2o);
  const int64_t G = per_seq ? x.size(0) : 1;
  const int64_t Mc = M / G;
  const int sms = num_sms();
  const kernels::QPlan plan =
      kernels::plan_q_decode(f.fmt, static_cast<int>(G), static_cast<int>(Mc), d, k, sms,
                             max_smem_optin());

  dispatch_float(xc.scalar_type(), op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (plan.ok) {
      at::Tensor ws =
          at::empty({static_cast<int64_t>(plan.ws_bytes)}, xc.options().dtype(at::kByte));
      char* base = static_cast<char*>(ws.data_ptr());
      kernels::QParams p{};
      p.x = xc.data_ptr();
      p.w1 = w1.mat();
      if (GLU) p.w2 = w2.mat();
      p.wo = wo.mat();
      p.b1 = ptr_or_null(b1);
      p.b2 = ptr_or_null(b2);
      p.bo = ptr_or_null(bo);
      p.idx = idx.data_ptr();
      p.idx_int32 = idx.scalar_type() == at::kInt;
      p.idx_group_stride = per_seq ? k : 0;
      p.lens = ptr_or_null(lens);
      p.lens_int32 = lens.defined() && lens.scalar_type() == at::kInt;
      p.y = y.data_ptr();
      p.N = N;
      p.d = d;
      p.k = k;
      p.G = static_cast<int>(G);
      p.Mc = static_cast<int>(Mc);
      p.group = static_cast<int>(group);
      p.act = act;
      p.h = reinterpret_cast<float*>(base + plan.h_off);
      p.partial = reinterpret_cast<float*>(base + plan.partial_off);
      p.counters = reinterpret_cast<int*>(base + plan.counters_off);
      constexpr QMode mode = GLU ? QMode::kGlu : QMode::kMlp;
      check_launch(kernels::launch_q_decode<T, mode>(p, f.fmt, plan, sms, stream), op);
      return;
    }
    // GEMM path: rounded x, the kept rows dequantised per chunk of sequences, cuBLAS
    const at::Tensor xr = rounded_x<T>(xc, sms, stream, op);
    const at::Tensor idx64 = idx.to(at::kLong);
    const at::Tensor lens64 = lens.defined() ? lens.to(at::kLong) : lens;
    constexpr int S = GLU ? 3 : 2;
    const int64_t group_bytes = S * k * d * static_cast<int64_t>(sizeof(T));
    const int64_t chunk = per_seq ? std::max<int64_t>(1, kQPrefillBytes / group_bytes) : 1;
    const int64_t in_rows = GLU ? 2 * k : k;
    const int64_t bufs = std::min(chunk, G);
    at::Tensor buf = at::empty({bufs, S * k, d}, xc.options());
    at::Tensor h = at::empty({bufs, Mc, k}, xc.options());
    at::Tensor pre = GLU ? at::empty({bufs, Mc, in_rows}, xc.options()) : h;
    const at::Tensor x3 = xr.view({G, Mc, d});
    at::Tensor y3 = y.view({G, Mc, d});
    const QTensors* srcs[3] = {&w1, GLU ? &w2 : &wo, &wo};
    for (int64_t g0 = 0; g0 < G; g0 += chunk) {
      const int64_t n = std::min(chunk, G - g0);
      at::Tensor bn = buf.narrow(0, 0, n);
      at::Tensor hn = h.narrow(0, 0, n);
      at::Tensor pn = pre.narrow(0, 0, n);
      const int64_t* idx_chunk = idx64.data_ptr<int64_t>() + (per_seq ? g0 * k : 0);
      const int64_t* lens_chunk = lens64.defined() ? lens64.data_ptr<int64_t>() + g0 : nullptr;
      dequant_rows<T>(bn, srcs, S, f.fmt, group, d, N, k, idx_chunk, per_seq ? k : 0, lens_chunk,
                      n, sms, stream, op);
      at::bmm_out(pn, x3.narrow(0, g0, n), bn.narrow(1, 0, in_rows).transpose(1, 2));
      const int64_t rows = n * Mc;
      if constexpr (GLU) {
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
                         b1.defined() ? static_cast<const T*>(b1.data_ptr()) : nullptr,
                         idx_chunk, per_seq ? k : 0, lens_chunk, Mc, N, act, sms, stream),
                     op);
      }
      at::Tensor yn = y3.narrow(0, g0, n);
      at::bmm_out(yn, hn, bn.narrow(1, in_rows, k));
    }
    if (bo.defined()) y.add_(bo);
  });
  return y;
}

at::Tensor gathered_glu_ffn_q_cuda(const at::Tensor& x, at::TensorList gate, at::TensorList up,
                                   at::TensorList down_t, c10::string_view fmt, int64_t group,
                                   const at::Tensor& idx, c10::string_view act,
                                   const c10::optional<at::Tensor>& lengths,
                                   const c10::optional<at::Tensor>& b_gate,
                                   const c10::optional<at::Tensor>& b_up,
                                   const c10::optional<at::Tensor>& b_down) {
  TORCH_CHECK(!up.empty(), "gathered_glu_ffn_q: up must hold [data, scales(, mins)], got []");
  return ffn_q_cuda<true>("gathered_glu_ffn_q", x, gate, "gate", up, down_t, "down_t", fmt,
                          group, idx, act, lengths, b_gate, "b_gate", b_up, b_down, "b_down");
}

at::Tensor gathered_mlp_q_cuda(const at::Tensor& x, at::TensorList w_in,
                               const c10::optional<at::Tensor>& b_in, at::TensorList w_out_t,
                               const c10::optional<at::Tensor>& b_out, c10::string_view fmt,
                               int64_t group, const at::Tensor& idx, c10::string_view act,
                               const c10::optional<at::Tensor>& lengths) {
  return ffn_q_cuda<false>("gathered_mlp_q", x, w_in, "w_in", {}, w_out_t, "w_out_t", fmt, group,
                           idx, act, lengths, b_in, "b_in", c10::nullopt, b_out, "b_out");
}

at::Tensor linear_q_cuda(const at::Tensor& x, at::TensorList wl, c10::string_view fmt_name,
                         int64_t group, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear_q";
  const int64_t d = check_x(x, op);
  const QFormatInfo& f = parse_format(fmt_name, group, d, op);
  const QTensors w = check_qmat(wl, "w", f, group, d, x, op);
  const int64_t N = w.N;
  check_bias(bias, x, op, "bias", N, "N (w's rows)");

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous();
  const int64_t M = d > 0 ? xc.numel() / d : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty({M, N}, xc.options());
  const at::Tensor b = opt_contig(bias);
  if (M == 0 || N == 0) return y.reshape(out_shape);
  if (d == 0) {
    y.zero_();
    if (b.defined()) y.add_(b);
    return y.reshape(out_shape);
  }
  const int sms = num_sms();
  const kernels::QPlan plan =
      kernels::plan_q_decode(f.fmt, 1, static_cast<int>(std::min<int64_t>(M, 1 << 20)), d, 0,
                             sms, max_smem_optin());
  dispatch_float(xc.scalar_type(), op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (plan.ok) {
      kernels::QParams p{};
      p.x = xc.data_ptr();
      p.w1 = w.mat();
      p.b1 = ptr_or_null(b);
      p.y = y.data_ptr();
      p.N = N;
      p.d = d;
      p.G = 1;
      p.Mc = static_cast<int>(M);
      p.group = static_cast<int>(group);
      check_launch(kernels::launch_q_decode<T, QMode::kLinear>(p, f.fmt, plan, sms, stream), op);
      return;
    }
    const at::Tensor xr = rounded_x<T>(xc, sms, stream, op);
    const int64_t nb = std::min<int64_t>(
        N, std::max<int64_t>(256, kQPrefillBytes / (d * static_cast<int64_t>(sizeof(T)))));
    at::Tensor wbuf = at::empty({nb, d}, xc.options());
    const QTensors* srcs[1] = {&w};
    for (int64_t r0 = 0; r0 < N; r0 += nb) {
      const int64_t rb = std::min<int64_t>(nb, N - r0);
      // rows r0.. of w: a view of the format's tensors starting at row r0
      QTensors part;
      part.data = w.data.narrow(0, r0, rb);
      part.scales = w.scales.narrow(0, r0, rb);
      if (w.mins.defined()) part.mins = w.mins.narrow(0, r0, rb);
      part.N = rb;
      srcs[0] = &part;
      at::Tensor wb = wbuf.narrow(0, 0, rb);
      dequant_rows<T>(wb, srcs, 1, f.fmt, group, d, rb, rb, nullptr, 0, nullptr, 1, sms, stream,
                      op);
      at::Tensor yb = y.narrow(1, r0, rb);
      at::mm_out(yb, xr, wb.t());
    }
    if (b.defined()) y.add_(b);
  });
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) {
  m.impl("gathered_glu_ffn_q", &dart::cuda::gathered_glu_ffn_q_cuda);
  m.impl("gathered_mlp_q", &dart::cuda::gathered_mlp_q_cuda);
  m.impl("linear_q", &dart::cuda::linear_q_cuda);
}
