// The per-token FFN ops on CUDA (contracts and references: dart_ext/per_token.py; the CPU kernels
// with the same checks and messages: csrc/cpu/per_token_ops.cpp; kernel cores and launch
// sequences: csrc/kernels/per_token_ffn.cuh):
//   gate_first_glu_ffn    per token: act(gate . x) of every candidate neuron, then up dot and
//                         down accumulation only for the neurons whose |act(gate)| * scale passes
//                         the threshold (candidates idx: their rows are gathered first, a copy of
//                         k rows per call: the superset path is not the decode fast path)
//   input_sparse_glu_ffn  per token: the columns of x with |x_j| >= x_threshold; gate and up read
//                         only those columns, then down only the rows with |h_i| >= h_threshold.
//                         The kernels read gate and up INPUT-major (a kept column is one
//                         contiguous row): pass them as the [N, d] views of contiguous [d, N]
//                         tensors (dart_ext.per_token.input_major; DARTFFN makes them at attach);
//                         neuron-major weights are transposed into a copy on every call.
// Each returns (y, read): read [...] fp32 = weight entries the token read.
//
// Tokens: at most kPtMaxTokens (8) per launch sequence, fewer when x (fp32) would not fit the gate
// kernel's shared memory; more are run in chunks under policy "token" (each token's choice is its
// own, so chunks change nothing). Under "union" the kept set is chosen over all the call's tokens:
// up to one launch's tokens the kernels do it; beyond, the glue computes the contract with ATen
// over the whole matrices (fp32, the union as a mask): the same results and reads, but every
// weight byte is streamed (a batch step of more than 8 sequences under "union").
// Thresholds stay on the device (the kernels read them from memory): no host sync on the decode
// path, so the ops can be captured in CUDA graphs (a candidate idx is checked on the host).
#include <algorithm>

#include "../kernels/per_token_ffn.cuh"
#include "utils.h"

namespace dart {
namespace cuda {
namespace {

// The gate kernel stages the launch's tokens' x in fp32 in shared memory; the launcher takes at
// most this much (its own cap) or the device's opt-in maximum.
constexpr int64_t kPtSmemCap = int64_t(200) << 10;

bool parse_policy(c10::string_view policy, const char* op) {
  TORCH_CHECK(policy == "token" || policy == "union", op,
              ": policy must be 'token' or 'union', got '", std::string(policy), "'");
  return policy == "union";
}

int64_t check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  return x.size(-1);
}

// A 0-dim float threshold on x's device, as fp32 device memory the kernels read.
at::Tensor check_threshold(const at::Tensor& t, const at::Tensor& x, const char* op,
                           const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

// A neuron-major [N, d] weight (each neuron's row contiguous), as the CPU op checks it.
void check_rows(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name,
                int64_t d) {
  check_cuda_tensor(w, x, op, name);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", w.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (weights and x must share a dtype)");
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D [N, d], got ", w.dim(),
              "-D with shape ", w.sizes());
  TORCH_CHECK(w.size(1) == d, op, ": ", name, " must be [N, d] with d = ", d,
              " (x's last dim), got shape ", w.sizes());
  TORCH_CHECK(w.stride(1) == 1 || w.size(1) <= 1, op, ": ", name,
              " must have unit stride in its last dim (each neuron's row contiguous), got "
              "strides ",
              w.strides(),
              "; store it as [N, d] row-major once at load time (e.g. "
              "down_proj.weight.t().contiguous()) and pass that, or its .t().t() view");
}

// gate / up of the input-sparse op: [N, d] neuron-major, or input-major (the [N, d] view of a
// contiguous [d, N] tensor). Returns whether input-major.
bool check_in_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name,
                     int64_t d) {
  check_cuda_tensor(w, x, op, name);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", w.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (weights and x must share a dtype)");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == d, op, ": ", name, " must be [N, d] with d = ", d,
              " (x's last dim), got shape ", w.sizes());
  if (w.stride(1) == 1 || w.size(1) <= 1) return false;
  TORCH_CHECK(w.stride(0) == 1 || w.size(0) <= 1, op, ": ", name,
              " must be neuron-major (unit stride in its last dim) or input-major (the [N, d] "
              "view w_t.t() of a contiguous [d, N] w_t), got strides ",
              w.strides());
  return true;
}

// The candidate superset idx [k] (values checked on the host: this path syncs) as int64.
at::Tensor check_candidates(const at::Tensor& idx, const at::Tensor& x, int64_t N,
                            const char* op) {
  check_cuda_tensor(idx, x, op, "idx");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1, op, ": idx (the candidate neurons) must be 1-D [k], got shape ",
              idx.sizes());
  const at::Tensor i64 = idx.to(at::kLong).contiguous();
  if (i64.numel() > 0) {
    const int64_t lo = i64.min().item<int64_t>(), hi = i64.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < N, op, ": idx out of range: values must be in [0, N) with N = ", N, ", got [", lo, ", ",
                hi, "]");
  }
  return i64;
}

at::Tensor act_aten(const at::Tensor& g, kernels::Act act) {
  switch (act) {
    case kernels::Act::kSiLU:
      return at::silu(g);
    case kernels::Act::kGeLU:
      return at::gelu(g);
    case kernels::Act::kGeLUTanh:
      return at::gelu(g, "tanh");
    default:
      return at::relu(g);
  }
}

// Tokens per launch sequence: kPtMaxTokens, fewer when the gate kernel's fp32 x would overflow
// its shared memory (0: d is too large for even one token).
int64_t tokens_per_launch(int64_t d) {
  const int64_t cap = std::min<int64_t>(static_cast<int64_t>(max_smem_optin()), kPtSmemCap);
  return std::min<int64_t>(kernels::kPtMaxTokens, cap / std::max<int64_t>(d * 4, 1));
}

constexpr const char* kGateOp = "gate_first_glu_ffn";

std::tuple<at::Tensor, at::Tensor> gate_first_glu_ffn_cuda(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down_t, const at::Tensor& threshold, const at::Tensor& scale,
    c10::string_view act_name, const c10::optional<at::Tensor>& idx, c10::string_view policy) {
  const char* op = kGateOp;
  const int64_t d = check_x(x, op);
  check_rows(w_gate, x, op, "w_gate", d);
  check_rows(w_up, x, op, "w_up", d);
  check_rows(w_down_t, x, op, "w_down_t", d);
  int64_t N = w_gate.size(0);
  TORCH_CHECK(w_up.size(0) == N, op, ": w_up has N = ", w_up.size(0), " rows but w_gate has N = ",
              N);
  TORCH_CHECK(w_down_t.size(0) == N, op, ": w_down_t has N = ", w_down_t.size(0),
              " rows but w_gate has N = ", N);
  const at::Tensor thr = check_threshold(threshold, x, op, "threshold");
  check_cuda_tensor(scale, x, op, "scale");
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op, ": scale must be a float tensor, got ",
              scale.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, op, ": scale must be 1-D [N] = [", N,
              "], got shape ", scale.sizes());
  const kernels::Act act = parse_act(act_name, op);
  const bool unite = parse_policy(policy, op);

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor sc = scale.to(at::kFloat).contiguous();
  // gate and up share one row stride in the kernels' arguments
  at::Tensor wg = w_gate, wu = w_up, wd = w_down_t;
  if (idx.has_value() && idx->defined()) {  // the candidates' rows, gathered
    const at::Tensor cand = check_candidates(*idx, x, N, op);
    wg = wg.index_select(0, cand);
    wu = wu.index_select(0, cand);
    wd = wd.index_select(0, cand);
    sc = sc.index_select(0, cand);
    N = cand.numel();
  }
  if (wg.stride(0) != wu.stride(0)) {
    wg = wg.contiguous();
    wu = wu.contiguous();
  }
  wg = rows_view(wg);
  wu = rows_view(wu);
  wd = rows_view(wd);
  const at::Tensor xc = x.contiguous();
  const int64_t M = d > 0 ? xc.numel() / d : 0;
  at::Tensor y = at::empty(x.sizes(), xc.options());
  at::Tensor read = at::empty(x.sizes().slice(0, x.dim() - 1), xc.options().dtype(at::kFloat));
  if (M == 0) return {y, read};
  if (N == 0 || d == 0) {  // nothing to read
    y.zero_();
    read.zero_();
    return {y, read};
  }
  const int64_t per = tokens_per_launch(d);
  TORCH_CHECK(per >= 1, op, ": d = ", d,
              " is too large: one token's x in fp32 does not fit the gate kernel's shared memory");
  if (unite && M > per) {  // the union over more tokens than a launch takes (see the top)
    const at::Tensor xs = xc.view({M, d}).to(at::kFloat);
    const at::Tensor a = act_aten(at::matmul(xs, wg.to(at::kFloat).t()), act);
    const at::Tensor kept = at::ge(a.abs() * sc, thr).any(0).to(at::kFloat);  // [N]
    const at::Tensor h = a * at::matmul(xs, wu.to(at::kFloat).t()) * kept;
    y.copy_(at::matmul(h, wd.to(at::kFloat)).view(x.sizes()));
    read.copy_((kept.sum() * static_cast<double>(2 * d) + static_cast<double>(N * d))
                   .expand(read.sizes()));
    return {y, read};
  }
  const int sms = num_sms();
  dispatch_float(xc.scalar_type(), op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t es = sizeof(T);
    for (int64_t t0 = 0; t0 < M; t0 += per) {
      kernels::PtFfnArgs a{};
      a.x = static_cast<const char*>(xc.data_ptr()) + t0 * d * es;
      a.w_gate = wg.data_ptr();
      a.w_up = wu.data_ptr();
      a.w_stride = wg.stride(0);
      a.w_down_t = wd.data_ptr();
      a.wd_stride = wd.stride(0);
      a.scale = sc.data_ptr<float>();
      a.threshold_ptr = thr.data_ptr<float>();
      a.unite = unite;
      a.N = N;
      a.d = d;
      a.M = static_cast<int>(std::min(per, M - t0));
      a.act = act;
      a.y = static_cast<char*>(y.data_ptr()) + t0 * d * es;
      a.read = read.data_ptr<float>() + t0;
      a.vec_ok = true;  // per matrix, by its alignment (pt_vec_rows)
      a.splits = 0;
      const size_t bytes = kernels::pt_layout<T>(a, false, sms).bytes;
      at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, xc.options().dtype(at::kByte));
      check_launch(kernels::launch_pt_gate_first<T>(a, ws.data_ptr(), sms, stream), op);
    }
  });
  return {y, read};
}

constexpr const char* kInputOp = "input_sparse_glu_ffn";

std::tuple<at::Tensor, at::Tensor> input_sparse_glu_ffn_cuda(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down_t, const at::Tensor& x_threshold, const at::Tensor& h_threshold,
    c10::string_view act_name, c10::string_view policy) {
  const char* op = kInputOp;
  const int64_t d = check_x(x, op);
  const bool gate_t = check_in_weight(w_gate, x, op, "w_gate", d);
  const bool up_t = check_in_weight(w_up, x, op, "w_up", d);
  TORCH_CHECK(gate_t == up_t, op, ": w_gate is ", gate_t ? "input-major" : "neuron-major",
              " but w_up is ", up_t ? "input-major" : "neuron-major",
              " (store both alike: the column-sparse loop reads them together)");
  check_rows(w_down_t, x, op, "w_down_t", d);
  const int64_t N = w_gate.size(0);
  TORCH_CHECK(w_up.size(0) == N, op, ": w_up has N = ", w_up.size(0), " rows but w_gate has N = ",
              N);
  TORCH_CHECK(w_down_t.size(0) == N, op, ": w_down_t has N = ", w_down_t.size(0),
              " rows but w_gate has N = ", N);
  const at::Tensor tx = check_threshold(x_threshold, x, op, "x_threshold");
  const at::Tensor th = check_threshold(h_threshold, x, op, "h_threshold");
  const kernels::Act act = parse_act(act_name, op);
  const bool unite = parse_policy(policy, op);

  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous();
  const int64_t M = d > 0 ? xc.numel() / d : 0;
  at::Tensor y = at::empty(x.sizes(), xc.options());
  at::Tensor read = at::empty(x.sizes().slice(0, x.dim() - 1), xc.options().dtype(at::kFloat));
  if (M == 0) return {y, read};
  if (N == 0 || d == 0) {
    y.zero_();
    read.zero_();
    return {y, read};
  }
  if (unite && M > kernels::kPtMaxTokens) {  // the union over more tokens than a launch takes
    const at::Tensor xs = xc.view({M, d}).to(at::kFloat);
    const at::Tensor kx = at::ge(xs.abs(), tx).any(0).to(at::kFloat);  // [d]
    const at::Tensor xk = xs * kx;
    const at::Tensor h = act_aten(at::matmul(xk, w_gate.to(at::kFloat).t()), act) *
                         at::matmul(xk, w_up.to(at::kFloat).t());
    const at::Tensor kh = at::ge(h.abs(), th).any(0).to(at::kFloat);  // [N]
    y.copy_(at::matmul(h * kh, w_down_t.to(at::kFloat)).view(x.sizes()));
    read.copy_((kx.sum() * static_cast<double>(2 * N) + kh.sum() * static_cast<double>(d))
                   .expand(read.sizes()));
    return {y, read};
  }
  // the kernels' [d, N] input-major rows: a view of an input-major w, else a transposed copy
  at::Tensor gt = gate_t ? w_gate.t() : w_gate.t().contiguous();
  at::Tensor ut = up_t ? w_up.t() : w_up.t().contiguous();
  if (gt.stride(0) != ut.stride(0)) {
    gt = gt.contiguous();
    ut = ut.contiguous();
  }
  const at::Tensor wd = rows_view(w_down_t);
  const int sms = num_sms();
  dispatch_float(xc.scalar_type(), op, "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t es = sizeof(T);
    for (int64_t t0 = 0; t0 < M; t0 += kernels::kPtMaxTokens) {
      kernels::PtFfnArgs a{};
      a.x = static_cast<const char*>(xc.data_ptr()) + t0 * d * es;
      a.w_gate = gt.data_ptr();
      a.w_up = ut.data_ptr();
      a.w_stride = gt.stride(0);
      a.w_down_t = wd.data_ptr();
      a.wd_stride = wd.stride(0);
      a.threshold_ptr = tx.data_ptr<float>();
      a.h_threshold_ptr = th.data_ptr<float>();
      a.unite = unite;
      a.N = N;
      a.d = d;
      a.M = static_cast<int>(std::min<int64_t>(kernels::kPtMaxTokens, M - t0));
      a.act = act;
      a.y = static_cast<char*>(y.data_ptr()) + t0 * d * es;
      a.read = read.data_ptr<float>() + t0;
      a.vec_ok = true;
      a.splits = 0;
      const size_t bytes = kernels::pt_layout<T>(a, true, sms).bytes;
      at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, xc.options().dtype(at::kByte));
      check_launch(kernels::launch_pt_input_sparse<T>(a, ws.data_ptr(), sms, stream), op);
    }
  });
  return {y, read};
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) {
  m.impl("gate_first_glu_ffn", &dart::cuda::gate_first_glu_ffn_cuda);
  m.impl("input_sparse_glu_ffn", &dart::cuda::input_sparse_glu_ffn_cuda);
}
