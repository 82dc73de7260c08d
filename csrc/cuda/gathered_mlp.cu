// dart::gathered_mlp on CUDA (glue in gathered_ffn_impl.h, kernels in
// csrc/kernels/gathered_ffn.cuh): y = sum_j act(x.w_in[idx_j] + b_in[idx_j]) * w_out_t[idx_j] + b_out.
#include "gathered_ffn_impl.h"

namespace dart {
namespace cuda {
namespace {

at::Tensor gathered_mlp_cuda(const at::Tensor& x, const at::Tensor& w_in,
                             const std::optional<at::Tensor>& b_in, const at::Tensor& w_out_t,
                             const std::optional<at::Tensor>& b_out, const at::Tensor& idx,
                             c10::string_view act, const std::optional<at::Tensor>& lengths) {
  const at::Tensor* bi = b_in.has_value() && b_in->defined() ? &*b_in : nullptr;
  const at::Tensor* bo = b_out.has_value() && b_out->defined() ? &*b_out : nullptr;
  FfnArgs a{"dart::gathered_mlp", &x, &w_in, "w_in", nullptr, &w_out_t, "w_out_t",
            bi,                   nullptr, bo,    &idx, act,     &lengths};
  return gathered_ffn_cuda<false>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) { m.impl("gathered_mlp", &dart::cuda::gathered_mlp_cuda); }
