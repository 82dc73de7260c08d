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

// A private int64 contiguous copy of idx: the ops validate and then read this copy, never the
// caller's tensor, which another thread may change while the op runs (ops release the GIL).
inline at::Tensor owned_indices(const at::Tensor& idx) {
  at::Tensor own = at::empty(idx.sizes(), idx.options().dtype(at::kLong));
  own.copy_(idx);
  return own;
}

// Validates idx against N; returns a private int64 contiguous copy (owned_indices). per_seq is
// set for idx [B, k].
inline at::Tensor check_idx(const at::Tensor& idx, const at::Tensor& x, int64_t N,
                            const char* op, bool* per_seq) {
  TORCH_CHECK(idx.device() == x.device(), op, ": idx is on ", idx.device(), " but x is on ",
              x.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 || idx.dim() == 2, op,
              ": idx must be 1-D [k] (shared) or 2-D [B, k] (per sequence), got ", idx.dim(),
              "-D with shape ", idx.sizes());
  *per_seq = idx.dim() == 2;
  if (*per_seq) {
    TORCH_CHECK(x.dim() == 3, op, ": a per-sequence idx [B, k] needs x of shape [B, T, d], got x ",
                "with shape ", x.sizes());
    TORCH_CHECK(idx.size(0) == x.size(0), op, ": idx has B = ", idx.size(0),
                " rows but x has batch size ", x.size(0));
  }
  at::Tensor out = owned_indices(idx);
  const int64_t* p = out.data_ptr<int64_t>();
  int64_t n = out.numel();
  int64_t lo = 0, hi = 0;
  if (n > 0) {
    lo = p[0];
    hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
    TORCH_CHECK(lo >= 0 && hi < N, op, ": idx out of range: values must be in [0, N) with N = ",
                N, ", got min ", lo, " and max ", hi);
  }
  return out;
}

// x [..., d] as a contiguous fp32 [M, d] tensor (a no-op for contiguous fp32 x; M from the
// leading dims, so d = 0 works).
inline at::Tensor x_as_f32_2d(const at::Tensor& x) {
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return x.to(at::kFloat).contiguous().reshape({M, x.size(-1)});
}

}  // namespace cpu
}  // namespace dart
