// dart::gathered_glu_ffn on CUDA (glue in gathered_ffn_impl.h, kernels in
// csrc/kernels/gathered_ffn.cuh): y = sum_j act(x.w_gate[idx_j] + b_gate) * (x.w_up[idx_j] + b_up) * w_down_t[idx_j] + b_down.
#include "gathered_ffn_impl.h"

namespace dart {
namespace cuda {
namespace {

at::Tensor gathered_glu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down_t,
                                 const at::Tensor& idx, c10::string_view act,
                                 const std::optional<at::Tensor>& lengths,
                                 const std::optional<at::Tensor>& b_gate,
                                 const std::optional<at::Tensor>& b_up,
                                 const std::optional<at::Tensor>& b_down) {
  auto opt = [](const std::optional<at::Tensor>& b) {
    return b.has_value() && b->defined() ? &*b : nullptr;
  };
  FfnArgs a{"dart::gathered_glu_ffn", &x, &w_gate, "w_gate", &w_up, &w_down_t, "w_down_t",
            opt(b_gate), opt(b_up), opt(b_down), &idx, act, &lengths};
  return gathered_ffn_cuda<true>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) {
  m.impl("gathered_glu_ffn", &dart::cuda::gathered_glu_ffn_cuda);
}
