// Memory-overlap checks of in-place op arguments, shared by the CPU and CUDA backends (the role of
// at::assert_no_internal_overlap / at::assert_no_overlap in torch's own in-place ops, with
// messages that name the op and the arguments). Both checks are conservative for layouts torch's
// own checks call "too hard" (strided views): an op that writes `out` while reading another
// argument must never see the two share memory, so a possible overlap is rejected.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace dart {

// True when no two elements of t can share a memory location: with the dims of size > 1 sorted
// by stride, each stride exceeds the largest offset the smaller dims reach. Every layout torch
// creates without as_strided passes; an expanded (stride 0) tensor fails.
inline bool elements_distinct(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t i = 0; i < t.dim(); ++i)
    if (t.size(i) > 1) dims.emplace_back(t.stride(i), t.size(i));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += stride * (size - 1);
  }
  return true;
}

// Byte range [first, last) spanned by t's elements (t non-empty).
inline std::pair<const char*, const char*> byte_span(const at::Tensor& t) {
  const char* first = static_cast<const char*>(t.data_ptr());
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  return {first, first + (last + 1) * t.element_size()};
}

// True when a and b may share memory (same storage and intersecting byte ranges), whatever
// their dtypes: numpy's may_share_memory.
inline bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

inline void check_no_internal_overlap(const at::Tensor& out, const char* op, const char* name) {
  TORCH_CHECK(elements_distinct(out), op, ": ", name,
              " has elements that share memory (an expanded or stride-0 view?), got shape ",
              out.sizes(), " and strides ", out.strides(),
              "; pass a tensor with its own memory per element (e.g. torch.empty)");
}

inline void check_no_overlap(const at::Tensor& out, const char* out_name, const at::Tensor& other,
                             const std::string& other_name, const char* op) {
  TORCH_CHECK(!may_share_memory(out, other), op, ": ", out_name, " shares memory with ",
              other_name, ", which the op reads while writing ", out_name, "; give ", out_name,
              " its own memory (e.g. torch.empty) or clone() ", other_name);
}

}  // namespace dart
