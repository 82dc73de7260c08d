// Shared helpers of the CPU kernels (torch-facing side): activation names, argument checks,
// settings and the hot-loop variant (config.cpp). The loops themselves are torch-free
// (kernel_core.h / kernel_core.inc).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <string>

#include "kernel_core.h"

namespace dart {
namespace cpu {

inline Act parse_act(const std::string& name, const char* op) {
  if (name == "silu" || name == "swish") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh" || name == "gelu_new" || name == "gelu_pytorch_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK(false, op, ": unknown act '", name,
              "'; accepted: silu, gelu (erf), gelu_tanh (aliases gelu_new, gelu_pytorch_tanh), "
              "relu");
}

// Element type of a float tensor (fp32, bf16, fp16; callers checked the dtype).
inline Elem elem_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return Elem::BF16;
    case at::kHalf:
      return Elem::F16;
    default:
      return Elem::F32;
  }
}

// Settings (config.cpp): token count from which the FFN ops take the gather + GEMM path
// (DART_CPU_GEMM_MIN_TOKENS), and the hot-loop variant this process runs (DART_CPU_CAPABILITY or
// the best the CPU supports). Both read the environment once; bad values raise a clear error.
int64_t gemm_min_tokens();
const CoreKernels& core_kernels();

// ---------------------------------------------------------------------------------------------
// Argument checks (messages name the op and the argument)

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", st);
}

// A weight matrix [N, d] whose rows are contiguous (last-dim stride 1, any row stride).
inline void check_weight(const at::Tensor& w, const at::Tensor& x, const char* op,
                         const char* name, int64_t d) {
  TORCH_CHECK(w.device() == x.device(), op, ": ", name, " is on ", w.device(),
              " but x is on ", x.device(), " (all tensors must be on one device)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              w.scalar_type(), " but x has dtype ", x.scalar_type(),
              " (weights and x must share a dtype)");
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

// An optional bias: 1-D [n] on x's device with x's dtype (`what` names n, e.g. "N" or "d").
inline void check_bias(const c10::optional<at::Tensor>& b, const at::Tensor& x, const char* op,
                       const char* name, int64_t n, const char* what) {
  if (!b.has_value()) return;
  const at::Tensor& t = *b;
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be 1-D [", what, "] = [", n,
              "], got shape ", t.sizes());
}

// A private int64 contiguous copy of idx: the ops validate and then read this copy, never the
// caller's tensor, which another thread may change while the op runs (ops release the GIL).
inline at::Tensor owned_indices(const at::Tensor& idx) {
  at::Tensor own = at::empty(idx.sizes(), idx.options().dtype(at::kLong));
  own.copy_(idx);
  return own;
}

// The kept-neuron indices an FFN op reads: a private int64 contiguous copy of idx (owned_indices),
// `[k]` shared by all tokens or `[B, kmax]` per sequence, and for a padded per-sequence idx the
// private int64 copy of the per-row lengths `[B]` (row b uses its first lengths[b] entries; the
// rest are never read: their copies are set to 0 so any padding value is safe).
struct Indices {
  at::Tensor idx;
  at::Tensor lens;  // undefined: every row uses all k entries
  bool per_seq = false;
  int64_t k = 0;  // entries per row (kmax with lengths)

  int64_t length(int64_t b) const { return lens.defined() ? lens.data_ptr<int64_t>()[b] : k; }
};

// Validates the optional per-row lengths of a per-sequence idx [B, kmax]: int32/int64 [B] on
// idx's device with values in [0, kmax]. Returns a private int64 copy (undefined if absent).
inline at::Tensor check_lengths(const c10::optional<at::Tensor>& lengths, const at::Tensor& idx,
                                const char* op) {
  if (!lengths.has_value()) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(idx.dim() == 2, op,
              ": lengths need a per-sequence idx [B, kmax] (padded rows), got idx of shape ",
              idx.sizes());
  TORCH_CHECK(l.device() == idx.device(), op, ": lengths is on ", l.device(), " but idx is on ",
              idx.device());
  TORCH_CHECK(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt, op,
              ": lengths must be int64 (or int32), got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == idx.size(0), op, ": lengths must be 1-D [B] = [",
              idx.size(0), "] (one length per idx row), got shape ", l.sizes());
  at::Tensor own = owned_indices(l);
  const int64_t* p = own.data_ptr<int64_t>();
  const int64_t kmax = idx.size(1);
  for (int64_t b = 0; b < own.numel(); ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] <= kmax, op, ": lengths[", b, "] = ", p[b],
                " is not in [0, kmax] with kmax = ", kmax, " (idx's row length)");
  return own;
}

// Validates idx (and its optional per-row lengths) against N: the entries a row uses must lie in
// [0, N); padding entries are never read. Returns the private copies (Indices).
inline Indices check_indices(const at::Tensor& idx, const c10::optional<at::Tensor>& lengths,
                             const at::Device& device, int64_t N, const char* op) {
  TORCH_CHECK(idx.device() == device, op, ": idx is on ", idx.device(), " but x is on ", device);
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 || idx.dim() == 2, op,
              ": idx must be 1-D [k] (shared) or 2-D [B, k] (per sequence), got ", idx.dim(),
              "-D with shape ", idx.sizes());
  Indices ix;
  ix.per_seq = idx.dim() == 2;
  ix.k = idx.size(-1);
  ix.lens = check_lengths(lengths, idx, op);
  ix.idx = owned_indices(idx);
  int64_t* p = ix.idx.data_ptr<int64_t>();
  const int64_t rows = ix.per_seq ? idx.size(0) : 1;
  for (int64_t b = 0; b < rows; ++b) {
    int64_t* row = p + b * ix.k;
    const int64_t used = ix.length(b);
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(row[j] >= 0 && row[j] < N, op,
                  ": idx out of range: values must be in [0, N) with N = ", N, ", got ", row[j],
                  ix.per_seq ? " in row " : "", ix.per_seq ? std::to_string(b) : "");
    for (int64_t j = used; j < ix.k; ++j) row[j] = 0;  // padding: never read, made harmless
  }
  return ix;
}

// check_indices for the FFN ops, whose per-sequence idx [B, k] needs x [B, T, d].
inline Indices check_idx(const at::Tensor& idx, const c10::optional<at::Tensor>& lengths,
                         const at::Tensor& x, int64_t N, const char* op) {
  if (idx.dim() == 2) {
    TORCH_CHECK(x.dim() == 3, op, ": a per-sequence idx [B, k] needs x of shape [B, T, d], got x ",
                "with shape ", x.sizes());
    TORCH_CHECK(idx.size(0) == x.size(0), op, ": idx has B = ", idx.size(0),
                " rows but x has batch size ", x.size(0));
  }
  return check_indices(idx, lengths, x.device(), N, op);
}

// The kept neurons' input bias b [N] as fp32 in idx's layout ([k] or [B, kmax]; padding entries
// of the private idx copy are 0, so they gather a harmless bias nobody reads), or undefined when
// there is no bias or nothing is kept. Tiny: k floats per call.
inline at::Tensor kept_bias(const c10::optional<at::Tensor>& b, const Indices& ix) {
  if (!b.has_value() || ix.k == 0) return at::Tensor();
  return b->to(at::kFloat).index_select(0, ix.idx.reshape({-1})).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// x [..., d] as a contiguous fp32 [M, d] tensor (a no-op for contiguous fp32 x; M from the
// leading dims, so d = 0 works).
inline at::Tensor x_as_f32_2d(const at::Tensor& x) {
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.to(at::kFloat).contiguous().reshape({M, x.size(-1)});
}

}  // namespace cpu
}  // namespace dart
