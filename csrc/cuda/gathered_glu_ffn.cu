// dart::gathered_glu_ffn on CUDA (glue in gathered_ffn_impl.h, kernels in
// csrc/kernels/gathered_ffn.cuh): y = sum_j act(x.w_gate[idx_j]) * (x.w_up[idx_j]) * w_down_t[idx_j].
#include "gathered_ffn_impl.h"

namespace dart {
namespace cuda {
namespace {

at::Tensor gathered_glu_ffn_cuda(const at::Tensor& x, const at::Tensor& w_gate,
                                 const at::Tensor& w_up, const at::Tensor& w_down_t,
                                 const at::Tensor& idx, c10::string_view act,
                                 const std::optional<at::Tensor>& lengths) {
  FfnArgs a{"dart::gathered_glu_ffn", &x, &w_gate, "w_gate", &w_up, &w_down_t, "w_down_t",
            nullptr, nullptr, &idx, act, &lengths};
  return gathered_ffn_cuda<true>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) {
  m.impl("gathered_glu_ffn", &dart::cuda::gathered_glu_ffn_cuda);
}
