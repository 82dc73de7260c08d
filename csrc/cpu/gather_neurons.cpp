// dart::gather_neurons_, CPU: in-place re-slice of kept neuron rows into a persistent buffer.
// Shared idx [k]:      out [S*k, d],    out[s*k + j]    = srcs[s][idx[j]]
// Per-sequence [B, k]: out [B, S*k, d], out[b, s*k + j] = srcs[s][idx[b, j]]
// With lengths [B] (padded idx [B, kmax]): out[b, s*kmax + j] = 0 for j >= lengths[b] (padding
// entries are never read), so a GEMM over the compact buffers sums row b's own neurons only.
// Rows are copied with memcpy, multi-threaded over rows, from a private copy of idx. out must not
// overlap itself, idx or a source (the copy would read rows it already overwrote).
#include "common.h"

#include "alias_checks.h"

#include <torch/library.h>

#include <vector>

namespace dart {
namespace cpu {
namespace {

constexpr const char* kOp = "gather_neurons_";

void gather_neurons_cpu(const at::Tensor& out, at::TensorList srcs, const at::Tensor& idx,
                        const c10::optional<at::Tensor>& lengths) {
  const int64_t S = static_cast<int64_t>(srcs.size());
  TORCH_CHECK(S >= 1, kOp, ": srcs must hold at least one [N, d] tensor");
  TORCH_CHECK(idx.device() == out.device(), kOp, ": idx is on ", idx.device(),
              " but out is on ", out.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, kOp,
              ": idx must be int64 (or int32), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 || idx.dim() == 2, kOp,
              ": idx must be 1-D [k] (shared) or 2-D [B, k] (per sequence), got shape ",
              idx.sizes());
  const bool per_seq = idx.dim() == 2;
  const int64_t B = per_seq ? idx.size(0) : 1;
  const int64_t k = idx.size(-1);
  TORCH_CHECK(out.dim() == (per_seq ? 3 : 2), kOp, ": out must be ",
              per_seq ? "3-D [B, S*k, d] for a per-sequence idx [B, k]"
                      : "2-D [S*k, d] for a shared idx [k]",
              ", got shape ", out.sizes());
  const int64_t d = out.size(-1);
  TORCH_CHECK(!per_seq || out.size(0) == B, kOp, ": out has batch ", out.size(0),
              " but idx has B = ", B);
  TORCH_CHECK(out.size(-2) == S * k, kOp, ": out must have S*k = ", S, "*", k, " = ", S * k,
              " rows, got shape ", out.sizes());
  TORCH_CHECK(out.stride(-1) == 1 || d <= 1, kOp, ": out must have unit stride in its last dim");
  const int64_t N = srcs[0].dim() == 2 ? srcs[0].size(0) : -1;
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& w = srcs[s];
    TORCH_CHECK(w.device() == out.device(), kOp, ": srcs[", s, "] is on ", w.device(),
                " but out is on ", out.device());
    TORCH_CHECK(w.scalar_type() == out.scalar_type(), kOp, ": srcs[", s, "] has dtype ",
                w.scalar_type(), " but out has dtype ", out.scalar_type());
    TORCH_CHECK(w.dim() == 2, kOp, ": srcs[", s, "] must be 2-D [N, d], got shape ", w.sizes());
    TORCH_CHECK(w.size(0) == N, kOp, ": srcs[", s, "] has N = ", w.size(0),
                " rows but srcs[0] has N = ", N);
    TORCH_CHECK(w.size(1) == d, kOp, ": srcs[", s, "] has d = ", w.size(1),
                " but out has d = ", d);
    TORCH_CHECK(w.stride(1) == 1 || d <= 1, kOp, ": srcs[", s,
                "] must have unit stride in its last dim, got strides ", w.strides());
  }
  check_no_internal_overlap(out, kOp, "out");
  check_no_overlap(out, "out", idx, "idx", kOp);
  for (int64_t s = 0; s < S; ++s)
    check_no_overlap(out, "out", srcs[s], "srcs[" + std::to_string(s) + "]", kOp);
  const Indices ix = check_indices(idx, lengths, out.device(), N, kOp);
  const int64_t* ip = ix.idx.data_ptr<int64_t>();
  if (out.numel() == 0) return;

  const int64_t es = out.element_size();
  const size_t row_bytes = static_cast<size_t>(d * es);
  char* obase = static_cast<char*>(out.data_ptr());
  const int64_t ob_stride = per_seq ? out.stride(0) * es : 0;
  const int64_t or_stride = out.stride(-2) * es;
  std::vector<const char*> sbase(S);
  std::vector<int64_t> sstride(S);
  for (int64_t s = 0; s < S; ++s) {
    sbase[s] = static_cast<const char*>(srcs[s].data_ptr());
    sstride[s] = srcs[s].stride(0) * es;
  }
  const int64_t rows = B * S * k;
  const int64_t grain =
      std::max<int64_t>(1, 65536 / std::max<int64_t>(1, static_cast<int64_t>(row_bytes)));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (S * k);
      const int64_t rem = r % (S * k);
      const int64_t s = rem / k, j = rem % k;
      char* dst = obase + b * ob_stride + rem * or_stride;
      if (j < ix.length(b)) {
        std::memcpy(dst, sbase[s] + ip[b * k + j] * sstride[s], row_bytes);
      } else {
        std::memset(dst, 0, row_bytes);  // all-zero bits: +0.0 in every float dtype
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dart, CPU, m) { m.impl("gather_neurons_", &gather_neurons_cpu); }

}  // namespace cpu
}  // namespace dart
