// C++ kernel checks of the dart ops against naive ATen computations (run by ctest).
// Returns non-zero on failure. Ops are called through the dispatcher, as Python does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <vector>

extern "C" int dart_ops_anchor();

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("[%s] %s\n", ok ? " OK " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

at::Tensor glu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& u, const at::Tensor& dt,
               const at::Tensor& idx, const std::string& act,
               const c10::optional<at::Tensor>& lengths = c10::nullopt,
               const c10::optional<at::Tensor>& b_gate = c10::nullopt,
               const c10::optional<at::Tensor>& b_up = c10::nullopt,
               const c10::optional<at::Tensor>& b_down = c10::nullopt) {
  using Opt = const c10::optional<at::Tensor>&;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dart::gathered_glu_ffn", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, c10::string_view,
                                         Opt, Opt, Opt, Opt)>();
  return op.call(x, g, u, dt, idx, act, lengths, b_gate, b_up, b_down);
}

at::Tensor glu_naive(const at::Tensor& x, const at::Tensor& g, const at::Tensor& u,
                     const at::Tensor& dt, const at::Tensor& idx) {
  auto gs = at::linear(x, g.index_select(0, idx));
  auto us = at::linear(x, u.index_select(0, idx));
  return at::matmul(at::silu(gs) * us, dt.index_select(0, idx));
}

}  // namespace

int main() {
  expect(dart_ops_anchor() == 1, "library linked");
  at::manual_seed(0);
  const int64_t N = 37, d = 19;
  auto g = at::randn({N, d}), u = at::randn({N, d}), dt = at::randn({N, d});
  auto idx = at::tensor(std::vector<int64_t>{5, 0, 36, 5, 11});
  for (int64_t T : {1, 3, 64}) {
    auto x = at::randn({T, d});
    auto y = glu(x, g, u, dt, idx, "silu");
    auto r = glu_naive(x, g, u, dt, idx);
    expect(at::allclose(y, r, 1e-4, 1e-4), "gathered_glu_ffn fp32 T=" + std::to_string(T));
    auto yb = glu(x.to(at::kBFloat16), g.to(at::kBFloat16), u.to(at::kBFloat16),
                  dt.to(at::kBFloat16), idx, "silu");
    auto rb = glu_naive(x.to(at::kBFloat16).to(at::kFloat), g.to(at::kBFloat16).to(at::kFloat),
                        u.to(at::kBFloat16).to(at::kFloat), dt.to(at::kBFloat16).to(at::kFloat),
                        idx);
    expect(at::allclose(yb.to(at::kFloat), rb, 3e-2, 3e-2),
           "gathered_glu_ffn bf16 T=" + std::to_string(T));
  }
  {  // all neurons == dense
    auto x = at::randn({4, d});
    auto y = glu(x, g, u, dt, at::arange(N, at::kLong), "silu");
    auto dense = at::linear(at::silu(at::linear(x, g)) * at::linear(x, u), dt.t());
    expect(at::allclose(y, dense, 1e-4, 1e-4), "gathered_glu_ffn all kept == dense");
    auto bg = at::randn({N}), bu = at::randn({N}), bd = at::randn({d});
    auto yb = glu(x, g, u, dt, idx, "silu", c10::nullopt, bg, bu, bd);
    auto hb = at::silu(at::linear(x, g.index_select(0, idx), bg.index_select(0, idx))) *
              at::linear(x, u.index_select(0, idx), bu.index_select(0, idx));
    expect(at::allclose(yb, at::matmul(hb, dt.index_select(0, idx)) + bd, 1e-4, 1e-4),
           "gathered_glu_ffn biases");
  }
  {  // per-row lengths: row b sums its first lengths[b] entries; padding is never read
    auto x = at::randn({2, 3, d});
    auto padded = at::tensor(std::vector<int64_t>{4, 9, -1, 7, N, N}).view({2, 3});
    auto y = glu(x, g, u, dt, padded, "silu", at::tensor(std::vector<int64_t>{2, 1}));
    auto r0 = glu_naive(x[0], g, u, dt, padded[0].narrow(0, 0, 2));
    auto r1 = glu_naive(x[1], g, u, dt, padded[1].narrow(0, 0, 1));
    expect(at::allclose(y[0], r0, 1e-4, 1e-4) && at::allclose(y[1], r1, 1e-4, 1e-4),
           "gathered_glu_ffn per-row lengths");
  }
  {  // topk: ties -> lower index, NaN -> -inf, ascending output
    auto op = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("dart::topk_indices", "")
                  .typed<at::Tensor(const at::Tensor&, int64_t)>();
    auto s = at::tensor(std::vector<float>{1.f, 3.f, 3.f, NAN, 2.f, 3.f});
    auto t = op.call(s, 3);
    expect(t.scalar_type() == at::kLong && at::equal(t, at::tensor(std::vector<int64_t>{1, 2, 5})),
           "topk_indices ties");
    auto big = at::randn({5, 300});
    auto got = op.call(big, 40);
    auto want = std::get<0>(at::sort(std::get<1>(at::topk(big, 40, -1)), -1));
    expect(at::equal(got, want), "topk_indices vs at::topk");
    bool threw = false;
    try {
      op.call(big, 0);
    } catch (const c10::Error&) {
      threw = true;
    }
    expect(threw, "topk_indices k=0 throws");
  }
  {  // gather_neurons_
    auto op = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("dart::gather_neurons_", "")
                  .typed<void(const at::Tensor&, at::TensorList, const at::Tensor&,
                              const c10::optional<at::Tensor>&)>();
    auto out = at::empty({2 * idx.size(0), d});
    std::vector<at::Tensor> srcs{g, u};
    op.call(out, srcs, idx, c10::nullopt);
    expect(at::equal(out, at::cat({g.index_select(0, idx), u.index_select(0, idx)})),
           "gather_neurons_ shared");
    bool threw = false;
    try {
      op.call(out, srcs, at::tensor(std::vector<int64_t>{0, N}), c10::nullopt);
    } catch (const c10::Error&) {
      threw = true;
    }
    expect(threw, "gather_neurons_ idx out of range throws");
    threw = false;
    try {  // out overlapping a source would read rows it already overwrote
      op.call(g.narrow(0, 0, 2 * idx.size(0)), srcs, idx, c10::nullopt);
    } catch (const c10::Error& e) {
      threw = std::string(e.what()).find("out shares memory with srcs[0]") != std::string::npos;
    }
    expect(threw, "gather_neurons_ out overlapping a source throws");
    threw = false;
    try {  // an expanded out has rows that share memory
      op.call(at::empty({1, d}).expand({2 * idx.size(0), d}), srcs, idx, c10::nullopt);
    } catch (const c10::Error& e) {
      threw = std::string(e.what()).find("out has elements that share memory") != std::string::npos;
    }
    expect(threw, "gather_neurons_ expanded out throws");
  }
  {  // settings as the C++ side parsed them (no tensor arguments: catch-all kernels)
    auto& dispatcher = c10::Dispatcher::singleton();
    auto tokens = dispatcher.findSchemaOrThrow("dart::cpu_gemm_min_tokens", "")
                      .typed<int64_t()>();
    auto cap = dispatcher.findSchemaOrThrow("dart::cpu_capability", "").typed<std::string()>();
    expect(tokens.call() >= 1, "cpu_gemm_min_tokens >= 1");
    const std::string c = cap.call();
    expect(c == "default" || c == "avx2" || c == "avx512", "cpu_capability is " + c);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
