// The fused per-token FFN ops on CPU (issue 26; references: dart_ext/per_token.py, whose
// semantics these follow exactly; hot loops: per_token_core.inc):
//   gate_first_glu_ffn    per token: act(gate . x) of every candidate neuron (all N, or the
//                         superset idx), then up dot and down accumulation only for the neurons
//                         whose |act(gate)| * scale passes the threshold
//   gate_first_glu_ffn_q  the same over quantised gate / up / down_t rows (q8, q4, q4m)
//   input_sparse_glu_ffn  per token: the columns of x with |x_j| >= x_threshold; gate and up
//                         read only those columns (column-sparse GEMV; with gate / up stored
//                         input-major, each kept column is one contiguous row), then down only
//                         the rows with |h_i| >= h_threshold
// Each returns (y, read): read [...] fp32 = weight entries the token read.
//
// Batches (policy): "token" chooses for every token of x on its own (a per-sequence choice at
// decode, one token per sequence): each token's y is its own choice's and its read counts its
// own choice; "union" chooses one set for all tokens of the call (the union of their choices),
// computed for every token, and every token reports the call's reads. Either way the kernels
// stream the union of the tokens' rows once per call (under "token" with zero coefficients for
// the tokens that did not keep a row), so a batch step reads each weight byte at most once.
//
// Threads: the candidate gate rows, the neurons of g / u and the columns of y are split across
// threads (each output computed whole by one thread); the kept neurons of the gate-first stream
// are cut into a number of chunks that depends on the shape only, each into its own partial
// output, summed in chunk order. The result is bitwise identical for any thread count.
#include "common.h"
#include "ffn_kernel.h"
#include "per_token_core.h"
#include "quant_checks.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

namespace dart {
namespace cpu {

const PerTokenKernels& per_token_kernels() {
  static const PerTokenKernels& k = []() -> const PerTokenKernels& {
    const std::string name = core_kernels().name;
#if DART_CPU_DISPATCH
    if (name == "avx512") return kPerTokenAvx512;
    if (name == "avx2") return kPerTokenAvx2;
#endif
    return kPerTokenDefault;
  }();
  return k;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks (messages name the op and the argument)

// A 0-dim float threshold on x's device, as a float.
float check_threshold(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  return t.item<float>();
}

bool parse_policy(c10::string_view policy, const char* op) {
  TORCH_CHECK(policy == "token" || policy == "union", op, ": policy must be 'token' or 'union', got '",
              std::string(policy), "'");
  return policy == "union";
}

// The optional candidate superset idx [k] (1-D, values in [0, N)): a private copy.
Indices check_candidates(const c10::optional<at::Tensor>& idx, const at::Tensor& x, int64_t N,
                         const char* op) {
  if (!idx.has_value()) return Indices{};
  TORCH_CHECK(idx->dim() == 1, op, ": idx (the candidate neurons) must be 1-D [k], got shape ",
              idx->sizes());
  return check_indices(*idx, c10::nullopt, x.device(), N, op);
}

// scale [N] fp32 contiguous (any float dtype accepted).
at::Tensor check_scale(const at::Tensor& s, const at::Tensor& x, int64_t N, const char* op) {
  TORCH_CHECK(s.device() == x.device(), op, ": scale is on ", s.device(), " but x is on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(s.scalar_type()), op, ": scale must be a float tensor, got ",
              s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == N, op, ": scale must be 1-D [N] = [", N,
              "], got shape ", s.sizes());
  return s.to(at::kFloat).contiguous();
}

// gate / up of the input-sparse op: [N, d], neuron-major (last-dim stride 1) or input-major
// (the [N, d] view of a contiguous [d, N] tensor: first-dim stride 1). Returns whether
// input-major.
bool check_in_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name,
                     int64_t d) {
  TORCH_CHECK(w.device() == x.device(), op, ": ", name, " is on ", w.device(), " but x is on ",
              x.device());
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

// The entries of v [M, L] that some token keeps (|v| >= threshold), in order, into *kept; own[t]
// += how many token t keeps itself. Returns the tokens' values there [M, kept]: a token's own
// choice ("token": 0 where it did not keep the entry) or every kept value (unite).
std::vector<float> kept_entries(const float* v, int64_t M, int64_t L, float threshold, bool unite,
                                std::vector<int64_t>* kept, int64_t* own) {
  for (int64_t j = 0; j < L; ++j) {
    bool any = false;
    for (int64_t t = 0; t < M; ++t) {
      const bool k = std::fabs(v[t * L + j]) >= threshold;
      own[t] += k;
      any = any || k;
    }
    if (any) kept->push_back(j);
  }
  const int64_t nk = static_cast<int64_t>(kept->size());
  std::vector<float> out(M * nk);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t c = 0; c < nk; ++c) {
      const float x = v[t * L + (*kept)[c]];
      out[t * nk + c] = unite || std::fabs(x) >= threshold ? x : 0.0f;
    }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Threading helpers

// Runs body(b, e) over [0, n) split by at::parallel_for (outputs of each index written by one
// thread only: deterministic).
template <class F>
void split(int64_t n, int64_t grain, const F& body) {
  if (n <= 0) return;
  if (n <= grain || at::in_parallel_region()) return body(0, n);
  at::parallel_for(0, n, grain, body);
}

// y [m, d] += the sum over the list [0, k) of chunk(j0, j1, y_c), with a number of chunks that
// depends on (k, m, d, work per item) only and the partials summed in chunk order.
template <class F>
void chunked(int64_t k, int64_t m, int64_t d, int64_t macs_per_item, float* y, const F& chunk) {
  if (k == 0 || m == 0) return;
  const int64_t macs = k * macs_per_item * m;
  const int64_t nchunks =
      macs < 65536 ? 1 : std::min<int64_t>({kMaxChunks, std::max<int64_t>(1, k / 16)});
  std::vector<float> part(nchunks > 1 ? (nchunks - 1) * m * d : 0, 0.0f);
  auto run = [&](int64_t c) {
    chunk(k * c / nchunks, k * (c + 1) / nchunks, c == 0 ? y : part.data() + (c - 1) * m * d);
  };
  const int64_t nthr = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nthr <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < nchunks; ++c) run(c);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
      for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) run(c);
    });
  }
  for (int64_t c = 1; c < nchunks; ++c) {
    const float* p = part.data() + (c - 1) * m * d;
    for (int64_t i = 0; i < m * d; ++i) y[i] += p[i];
  }
}

// ---------------------------------------------------------------------------------------------
// gate-first

// The gate-first FFN for x [M, d] fp32 (xa: its int8 activations, quantised weights only) into
// y [M, d] (zeroed) and read [M]. cand: the candidate neurons (nullptr: all N).
void gate_first_run(const at::Tensor& xf, const QAct* xa, const PtWeights& w, int64_t N,
                    const Indices& cand, const float* scale, float thr, bool unite, float* y,
                    float* read) {
  const PerTokenKernels& pk = per_token_kernels();
  const int64_t M = xf.size(0), d = xf.size(1);
  const float* x = xf.data_ptr<float>();
  const int64_t* cp = cand.idx.defined() ? cand.idx.data_ptr<int64_t>() : nullptr;
  const int64_t nc = cp ? cand.k : N;
  // 1. the gate: every candidate row once for all M tokens
  std::vector<float> A(M * nc);
  split(nc, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
    if (xa)
      pk.qgate_acts(*xa, M, d, w, cp, b, e, A.data(), nc);
    else
      pk.gate_acts(x, M, d, w, cp, b, e, A.data(), nc);
  });
  // 2. the neurons any token keeps, their up and down rows streamed once for all M tokens.
  // "token": a token's coefficient is 0 where it did not keep the neuron (its y is its own
  // choice's; the zeros cost flops, not bytes); "union": every token over the whole set.
  std::vector<uint8_t> kept(M * nc);
  std::vector<int64_t> nid, own(M, 0);
  for (int64_t j = 0; j < nc; ++j) {
    const float s = scale[cp ? cp[j] : j];
    bool any = false;
    for (int64_t t = 0; t < M; ++t) {
      const bool k = std::fabs(A[t * nc + j]) * s >= thr;
      kept[t * nc + j] = k;
      own[t] += k;
      any = any || k;
    }
    if (any) nid.push_back(j);
  }
  const int64_t nk = static_cast<int64_t>(nid.size());
  std::vector<float> coef(M * nk);
  for (int64_t t = 0; t < M; ++t) {
    for (int64_t i = 0; i < nk; ++i) {
      const int64_t j = nid[i];
      coef[t * nk + i] = unite || kept[t * nc + j] ? A[t * nc + j] : 0.0f;
    }
    read[t] = static_cast<float>(nc * d + 2 * (unite ? nk : own[t]) * d);
  }
  for (int64_t i = 0; i < nk; ++i) nid[i] = cp ? cp[nid[i]] : nid[i];
  chunked(nk, M, d, 2 * d, y, [&](int64_t j0, int64_t j1, float* yc) {
    if (xa)
      pk.qup_down(*xa, M, d, w, nid.data(), coef.data(), nk, j0, j1, yc);
    else
      pk.up_down(x, M, d, w, nid.data(), coef.data(), nk, j0, j1, yc);
  });
}

constexpr const char* kGateOp = "gate_first_glu_ffn";

std::tuple<at::Tensor, at::Tensor> gate_first_glu_ffn_cpu(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down_t, const at::Tensor& threshold, const at::Tensor& scale,
    c10::string_view act_name, const c10::optional<at::Tensor>& idx, c10::string_view policy) {
  const char* op = kGateOp;
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  const int64_t d = x.size(-1);
  check_weight(w_gate, x, op, "w_gate", d);
  check_weight(w_up, x, op, "w_up", d);
  check_weight(w_down_t, x, op, "w_down_t", d);
  const int64_t N = w_gate.size(0);
  TORCH_CHECK(w_up.size(0) == N, op, ": w_up has N = ", w_up.size(0), " rows but w_gate has N = ",
              N);
  TORCH_CHECK(w_down_t.size(0) == N, op, ": w_down_t has N = ", w_down_t.size(0),
              " rows but w_gate has N = ", N);
  const float thr = check_threshold(threshold, x, op, "threshold");
  const at::Tensor sf = check_scale(scale, x, N, op);
  const Act act = parse_act(std::string(act_name), op);
  const Indices cand = check_candidates(idx, x, N, op);
  const bool unite = parse_policy(policy, op);

  at::Tensor xf = x_as_f32_2d(x);
  at::Tensor yf = at::zeros_like(xf);
  at::Tensor read = at::zeros({xf.size(0)}, xf.options());
  if (xf.size(0) > 0) {
    const PtWeights w{w_gate.data_ptr(),   w_gate.stride(0), w_up.data_ptr(), w_up.stride(0),
                      w_down_t.data_ptr(), w_down_t.stride(0), elem_of(x),     act};
    gate_first_run(xf, nullptr, w, N, cand, sf.data_ptr<float>(), thr, unite,
                   yf.data_ptr<float>(), read.data_ptr<float>());
  }
  return {yf.to(x.scalar_type()).reshape(x.sizes()), read.reshape(x.sizes().slice(0, x.dim() - 1))};
}

// ---------------------------------------------------------------------------------------------
// gate-first over quantised rows (argument checks of quant_checks.h).

constexpr const char* kGateQOp = "gate_first_glu_ffn_q";

std::tuple<at::Tensor, at::Tensor> gate_first_glu_ffn_q_cpu(
    const at::Tensor& x, at::TensorList gate, at::TensorList up, at::TensorList down_t,
    c10::string_view fmt, int64_t group, const at::Tensor& threshold, const at::Tensor& scale,
    c10::string_view act_name, const c10::optional<at::Tensor>& idx, c10::string_view policy) {
  const char* op = kGateQOp;
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  const int64_t d = x.size(-1);
  bool has_min = false;
  const QSpec qs = parse_format(fmt, group, d, op, &has_min);
  int64_t N = 0, Nu = 0, Nd = 0;
  QMat q[3];
  q[0] = check_qmat(gate, "gate", qs, has_min, d, x, op, &N);
  q[1] = check_qmat(up, "up", qs, has_min, d, x, op, &Nu);
  q[2] = check_qmat(down_t, "down_t", qs, has_min, d, x, op, &Nd);
  TORCH_CHECK(Nu == N, op, ": up has N = ", Nu, " rows but gate has N = ", N);
  TORCH_CHECK(Nd == N, op, ": down_t has N = ", Nd, " rows but gate has N = ", N);
  const float thr = check_threshold(threshold, x, op, "threshold");
  const at::Tensor sf = check_scale(scale, x, N, op);
  const Act act = parse_act(std::string(act_name), op);
  const Indices cand = check_candidates(idx, x, N, op);
  const bool unite = parse_policy(policy, op);

  at::Tensor xf = x_as_f32_2d(x);
  at::Tensor yf = at::zeros_like(xf);
  at::Tensor read = at::zeros({xf.size(0)}, xf.options());
  if (xf.size(0) > 0) {
    PtWeights w{nullptr, 0, nullptr, 0, nullptr, 0, elem_of(x), act};
    w.q = q;
    w.qs = qs;
    const QuantizedAct xq = quantize_act(core_kernels(), xf.data_ptr<float>(), xf.size(0), d);
    const QAct xa = xq.view();
    gate_first_run(xf, &xa, w, N, cand, sf.data_ptr<float>(), thr, unite, yf.data_ptr<float>(),
                   read.data_ptr<float>());
  }
  return {yf.to(x.scalar_type()).reshape(x.sizes()), read.reshape(x.sizes().slice(0, x.dim() - 1))};
}

// ---------------------------------------------------------------------------------------------
// input-sparse

constexpr const char* kInputOp = "input_sparse_glu_ffn";

std::tuple<at::Tensor, at::Tensor> input_sparse_glu_ffn_cpu(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down_t, const at::Tensor& x_threshold, const at::Tensor& h_threshold,
    c10::string_view act_name, c10::string_view policy) {
  const char* op = kInputOp;
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., d], got a 0-D tensor");
  const int64_t d = x.size(-1);
  const bool gate_t = check_in_weight(w_gate, x, op, "w_gate", d);
  const bool up_t = check_in_weight(w_up, x, op, "w_up", d);
  TORCH_CHECK(gate_t == up_t, op, ": w_gate is ", gate_t ? "input-major" : "neuron-major",
              " but w_up is ", up_t ? "input-major" : "neuron-major",
              " (store both alike: the column-sparse loop reads them together)");
  check_weight(w_down_t, x, op, "w_down_t", d);
  const int64_t N = w_gate.size(0);
  TORCH_CHECK(w_up.size(0) == N, op, ": w_up has N = ", w_up.size(0), " rows but w_gate has N = ",
              N);
  TORCH_CHECK(w_down_t.size(0) == N, op, ": w_down_t has N = ", w_down_t.size(0),
              " rows but w_gate has N = ", N);
  const float tx = check_threshold(x_threshold, x, op, "x_threshold");
  const float th = check_threshold(h_threshold, x, op, "h_threshold");
  const Act act = parse_act(std::string(act_name), op);
  const bool unite = parse_policy(policy, op);

  at::Tensor xf = x_as_f32_2d(x);
  const int64_t M = xf.size(0);
  at::Tensor yf = at::zeros_like(xf);
  at::Tensor read = at::zeros({M}, xf.options());
  const PerTokenKernels& pk = per_token_kernels();
  // input-major: row c of gate_t is column c of the [N, d] view (stride(1) apart)
  const PtWeights w{w_gate.data_ptr(),   gate_t ? w_gate.stride(1) : w_gate.stride(0),
                    w_up.data_ptr(),     up_t ? w_up.stride(1) : w_up.stride(0),
                    w_down_t.data_ptr(), w_down_t.stride(0),
                    elem_of(x),          act};
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  float* rp = read.data_ptr<float>();
  // The columns (then rows) any token keeps are streamed once for all M tokens; under "token"
  // a token's value is 0 where it did not keep the column (row), so its result is its own
  // choice's (the zeros cost flops, not bytes); under "union" every token uses the whole set.
  if (M > 0 && d > 0) {
    // 1. the kept columns and the tokens' values there
    std::vector<int64_t> cols, rows, own(M, 0), own_h(M, 0);
    const std::vector<float> xv = kept_entries(xp, M, d, tx, unite, &cols, own.data());
    const int64_t nk = static_cast<int64_t>(cols.size());
    // 2. g, u [M, N] over the kept columns; h = act(g) * u in g
    std::vector<float> g(M * N, 0.0f), u(M * N, 0.0f);
    split(N, std::max<int64_t>(64, 65536 / std::max<int64_t>(nk * M, 1)),
          [&](int64_t b, int64_t e) {
            if (gate_t)
              pk.colsparse_t(xv.data(), M, cols.data(), nk, w, b, e, g.data(), u.data(), N);
            else
              pk.colsparse_rows(xv.data(), M, cols.data(), nk, w, b, e, g.data(), u.data(), N);
          });
    for (int64_t i = 0; i < M * N; ++i) g[i] = apply_act(act, g[i]) * u[i];
    // 3. the kept rows of h, then y over them, split by columns of y
    const std::vector<float> hv = kept_entries(g.data(), M, N, th, unite, &rows, own_h.data());
    const int64_t nr = static_cast<int64_t>(rows.size());
    split(d, std::max<int64_t>(64, 65536 / std::max<int64_t>(nr * M, 1)),
          [&](int64_t b, int64_t e) {
            pk.rows_axpy(hv.data(), M, rows.data(), nr, w, b, e, yp, d);
          });
    for (int64_t t = 0; t < M; ++t)
      rp[t] = static_cast<float>(unite ? 2 * N * nk + d * nr : 2 * N * own[t] + d * own_h[t]);
  }
  return {yf.to(x.scalar_type()).reshape(x.sizes()), read.reshape(x.sizes().slice(0, x.dim() - 1))};
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) {
  m.impl("gate_first_glu_ffn", &gate_first_glu_ffn_cpu);
  m.impl("gate_first_glu_ffn_q", &gate_first_glu_ffn_q_cpu);
  m.impl("input_sparse_glu_ffn", &input_sparse_glu_ffn_cpu);
}

}  // namespace cpu
}  // namespace dart
