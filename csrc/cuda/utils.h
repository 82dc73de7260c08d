// Shared glue for the TORCH_LIBRARY_IMPL(dart, CUDA, m) files: argument checks with messages
// that name the op and the argument, dtype dispatch to the torch-free kernels, device facts.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "../kernels/common.cuh"

namespace dart {
namespace cuda {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<float>), f(Tag<__half>) or f(Tag<__nv_bfloat16>) for the tensor dtype.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, const char* name, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", st);
  }
}

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

inline kernels::Act parse_act(c10::string_view act, const char* op) {
  const std::string a(act.data(), act.size());
  if (a == "silu" || a == "swish") return kernels::Act::kSiLU;
  if (a == "gelu") return kernels::Act::kGeLU;
  if (a == "gelu_tanh" || a == "gelu_new" || a == "gelu_pytorch_tanh")
    return kernels::Act::kGeLUTanh;
  if (a == "relu") return kernels::Act::kReLU;
  TORCH_CHECK(false, op, ": unknown act '", a,
              "'; accepted: silu, gelu (erf), gelu_tanh (aliases gelu_new, gelu_pytorch_tanh), "
              "relu");
}

inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name = "x") {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), " (all tensors must be on one device)");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              " (dtypes must match)");
}

// int64 contiguous indices (int32 accepted and widened).
inline at::Tensor prepare_idx(const at::Tensor& idx, const at::Tensor& ref, const char* op,
                              const char* ref_name = "x") {
  check_cuda_tensor(idx, ref, op, "idx", ref_name);
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op,
              ": idx must be int64 (or int32), got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 || idx.dim() == 2, op,
              ": idx must be 1-D [k] or 2-D [B, k], got shape ", idx.sizes());
  return idx.to(at::kLong).contiguous();
}

// The optional per-row lengths [B] of a padded per-sequence idx [B, kmax] (see registration.cpp):
// checked on the host for shape, dtype and device (values are checked on the device, no sync);
// returned contiguous in their dtype (undefined when absent).
inline at::Tensor prepare_lengths(const c10::optional<at::Tensor>& lengths, const at::Tensor& idx,
                                  const char* op) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor& l = *lengths;
  TORCH_CHECK(idx.dim() == 2, op,
              ": lengths need a per-sequence idx [B, kmax] (padded rows), got idx of shape ",
              idx.sizes());
  check_cuda_tensor(l, idx, op, "lengths", "idx");
  TORCH_CHECK(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt, op,
              ": lengths must be int64 (or int32), got ", l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == idx.size(0), op, ": lengths must be 1-D [B] = [",
              idx.size(0), "] (one length per idx row), got shape ", l.sizes());
  return l.contiguous();
}

// A [N, d] weight whose rows are contiguous. Callers reject a non-unit last-dim stride for
// d > 1; a d <= 1 tensor (any stride) is made contiguous (a tiny copy).
inline at::Tensor rows_view(const at::Tensor& w) { return w.size(1) <= 1 ? w.contiguous() : w; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline size_t max_smem_optin() {
  return static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace dart
