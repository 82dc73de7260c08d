// dart::gather_neurons_ on CUDA: out[(g,) s*k + j, :] = srcs[s][idx[(g,) j], :], in place (zero
// rows past a sequence's length with per-row lengths).
// Vectorised warp-per-row copy (csrc/kernels/gather_rows.cuh); index range checked on device.
// out must not overlap itself, idx or a source (the copy would read what it already overwrote).
#include <string>

#include "../alias_checks.h"
#include "../kernels/gather_rows.cuh"
#include "utils.h"

namespace dart {
namespace cuda {
namespace {

void gather_neurons_cuda(const at::Tensor& out, at::TensorList srcs, const at::Tensor& idx_in,
                         const std::optional<at::Tensor>& lengths) {
  constexpr const char* op = "dart::gather_neurons_";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor");
  TORCH_CHECK(!srcs.empty(), op, ": srcs must hold at least one [N, d] tensor");
  const at::Tensor idx = prepare_idx(idx_in, out, op, "out");
  const at::Tensor lens = prepare_lengths(lengths, idx, op);
  const at::Tensor lens64 = lens.defined() ? lens.to(at::kLong) : lens;
  const int64_t S = static_cast<int64_t>(srcs.size());
  const bool per_seq = idx.dim() == 2;
  const int64_t G = per_seq ? idx.size(0) : 1;
  const int64_t k = idx.size(-1);
  TORCH_CHECK(out.dim() == (per_seq ? 3 : 2), op, ": out must be ",
              per_seq ? "3-D [B, S*k, d] for a 2-D idx [B, k]" : "2-D [S*k, d] for a 1-D idx [k]",
              ", got shape ", out.sizes());
  const int64_t d = out.size(-1);
  if (per_seq) {
    TORCH_CHECK(out.size(0) == G, op, ": out.size(0) = ", out.size(0),
                " must equal idx.size(0) = ", G);
  }
  TORCH_CHECK(out.size(-2) == S * k, op, ": out must have S*k = ", S, "*", k, " = ", S * k,
              " rows in dim -2, got shape ", out.sizes());
  TORCH_CHECK(out.stride(-1) == 1 || d <= 1, op, ": out must have a contiguous last dimension");
  std::vector<at::Tensor> rows;
  rows.reserve(srcs.size());
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& src = srcs[s];
    TORCH_CHECK(src.is_cuda() && src.device() == out.device(), op, ": srcs[", s, "] is on ",
                src.device(), " but out is on ", out.device());
    TORCH_CHECK(src.dim() == 2, op, ": srcs[", s, "] must be 2-D [N, d], got shape ",
                src.sizes());
    TORCH_CHECK(src.size(1) == d, op, ": srcs[", s, "] has d = ", src.size(1),
                " but out has d = ", d);
    TORCH_CHECK(d <= 1 || src.stride(1) == 1, op, ": srcs[", s,
                "] must have unit stride in its last dim, got strides ", src.strides());
    TORCH_CHECK(src.scalar_type() == out.scalar_type(), op, ": srcs[", s, "] has dtype ",
                src.scalar_type(), " but out has dtype ", out.scalar_type());
    rows.push_back(d <= 1 ? src.contiguous() : src);
  }
  check_no_internal_overlap(out, op, "out");
  check_no_overlap(out, "out", idx_in, "idx", op);
  for (int64_t s = 0; s < S; ++s)
    check_no_overlap(out, "out", srcs[s], "srcs[" + std::to_string(s) + "]", op);
  if (G == 0 || k == 0 || d == 0) return;

  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t es = static_cast<int64_t>(out.element_size());
  for (int64_t s0 = 0; s0 < S; s0 += kernels::kGatherMaxSrcs) {
    kernels::GatherParams p{};
    p.nsrc = static_cast<int>(std::min<int64_t>(kernels::kGatherMaxSrcs, S - s0));
    for (int s = 0; s < p.nsrc; ++s) {
      const at::Tensor& src = rows[s0 + s];
      p.src[s] = static_cast<const char*>(src.data_ptr());
      p.src_row_stride[s] = src.stride(0) * es;
      p.src_rows[s] = src.size(0);
    }
    p.out = static_cast<char*>(out.data_ptr());
    p.out_row_stride = out.stride(-2) * es;
    p.out_group_stride = per_seq ? out.stride(0) * es : 0;
    p.s_base = s0;
    p.idx = idx.data_ptr<int64_t>();
    p.idx_group_stride = per_seq ? k : 0;
    p.lens = lens64.defined() ? lens64.data_ptr<int64_t>() : nullptr;
    p.k = k;
    p.groups = G;
    p.row_bytes = d * es;
    check_launch(kernels::launch_gather_rows(p, stream), op);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace dart

TORCH_LIBRARY_IMPL(dart, CUDA, m) { m.impl("gather_neurons_", &dart::cuda::gather_neurons_cuda); }
