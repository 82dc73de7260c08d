// dart::topk_indices, CPU: per row of scores [..., N], the indices of the k largest scores,
// returned sorted ascending (memory order), int64 [..., k].
// Tie rule: among equal scores the lower index wins; NaN counts as -inf. The order
// (score desc, index asc) is a strict total order, so the selected set is unique and the result
// deterministic.
#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace dart {
namespace cpu {
namespace {

constexpr const char* kOp = "topk_indices";

template <typename T>
void topk_rows(const T* s, int64_t rows, int64_t N, int64_t k, int64_t* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)),
                   [&](int64_t r0, int64_t r1) {
                     std::vector<float> key(N);
                     std::vector<int64_t> ord(N);
                     for (int64_t r = r0; r < r1; ++r) {
                       const T* row = s + r * N;
                       for (int64_t i = 0; i < N; ++i) {
                         float v = static_cast<float>(row[i]);
                         key[i] = std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
                         ord[i] = i;
                       }
                       auto better = [&](int64_t a, int64_t b) {
                         return key[a] > key[b] || (key[a] == key[b] && a < b);
                       };
                       if (k < N) std::nth_element(ord.begin(), ord.begin() + k, ord.end(), better);
                       std::sort(ord.begin(), ord.begin() + k);
                       std::copy(ord.begin(), ord.begin() + k, out + r * k);
                     }
                   });
}

at::Tensor topk_indices_cpu(const at::Tensor& scores, int64_t k) {
  check_float_dtype(scores, kOp, "scores");
  TORCH_CHECK(scores.dim() >= 1, kOp, ": scores must be [..., N] with at least 1 dim, got 0-D");
  const int64_t N = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= N, kOp, ": k must satisfy 1 <= k <= N = ", N, ", got k = ", k);
  at::Tensor s = scores.contiguous();
  std::vector<int64_t> oshape(scores.sizes().begin(), scores.sizes().end());
  oshape.back() = k;
  at::Tensor out = at::empty(oshape, scores.options().dtype(at::kLong));
  const int64_t rows = N > 0 ? s.numel() / N : 0;
  if (rows == 0) return out;
  int64_t* op = out.data_ptr<int64_t>();
  switch (s.scalar_type()) {
    case at::kFloat:
      topk_rows(s.data_ptr<float>(), rows, N, k, op);
      break;
    case at::kBFloat16:
      topk_rows(s.data_ptr<at::BFloat16>(), rows, N, k, op);
      break;
    default:
      topk_rows(s.data_ptr<at::Half>(), rows, N, k, op);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("topk_indices", &topk_indices_cpu); }

}  // namespace cpu
}  // namespace dart
