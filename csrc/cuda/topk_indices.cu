// dart::topk_indices on CUDA: radix select + stable compaction, one CTA per row
// (csrc/kernels/topk.cuh). Output int64 [..., k], indices ascending.
#include <climits>

#include "../kernels/topk.cuh"
#include "utils.h"

namespace dart {
namespace cuda {
namespace {

at::Tensor topk_indices_cuda(const at::Tensor& scores, int64_t k) {
  constexpr const char* op = "dart::topk_indices";
  TORCH_CHECK(scores.is_cuda(), op, ": scores must be a CUDA tensor");
  TORCH_CHECK(scores.dim() >= 1, op, ": scores must have at least 1 dimension [..., N], got a 0-d tensor");
  TORCH_CHECK(is_float_dtype(scores.scalar_type()), op,
              ": scores must be float32, bfloat16 or float16, got ", scores.scalar_type());
  const int64_t N = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= N, op, ": k must satisfy 1 <= k <= N (N = scores.size(-1) = ", N,
              "), got k = ", k);
  TORCH_CHECK(N <= kernels::kTopkMaxN, op, ": rows longer than ", kernels::kTopkMaxN,
              " scores are not supported, got N = ", N);

  c10::cuda::CUDAGuard guard(scores.device());
  std::vector<int64_t> out_sizes = scores.sizes().vec();
  out_sizes.back() = k;
  at::Tensor out = at::empty(out_sizes, scores.options().dtype(at::kLong));
  const int64_t rows = scores.numel() / N;
  if (rows == 0) return out;
  TORCH_CHECK(rows <= INT_MAX, op, ": more than INT_MAX rows are not supported");
  const at::Tensor s = scores.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(s.scalar_type(), op, "scores", [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(kernels::launch_topk_indices<T>(static_cast<const T*>(s.data_ptr()), rows,
                                                 static_cast<int>(N), static_cast<int>(k),
                                                 out.data_ptr<int64_t>(), num_sms(), stream),
                 op);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) { m.impl("topk_indices", &dart::cuda::topk_indices_cuda); }
