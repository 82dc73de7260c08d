// Argument checks of the quantised-row ops (CPU: quant_ops.cpp, per_token_ops.cpp): the format
// name and group, and one quantised matrix {data, scales[, mins]} of dart_ext/quant.py's layout.
#pragma once

#include "common.h"
#include "ffn_kernel.h"

#include <torch/library.h>

namespace dart {
namespace cpu {

// The C++ side of dart_ext.quant.FORMATS (tests/test_ops_quant.py checks that the two agree).
struct QFormat {
  const char* name;
  int bits;
  bool has_min;
};
constexpr QFormat kFormats[] = {{"q8", 8, false}, {"q4", 4, false}, {"q4m", 4, true}};

inline QSpec parse_format(c10::string_view fmt, int64_t group, int64_t d, const char* op, bool* has_min) {
  const QFormat* f = nullptr;
  for (const QFormat& c : kFormats)
    if (fmt == c.name) f = &c;
  TORCH_CHECK(f != nullptr, op, ": unknown quantisation format '", std::string(fmt),
              "'; accepted: q8, q4, q4m");
  TORCH_CHECK(group == 32 || group == 64, op, ": group must be 32 or 64, got ", group);
  TORCH_CHECK(d % group == 0, op, ": group = ", group, " must divide d = ", d,
              " (x's last dim, the rows' length)");
  *has_min = f->has_min;
  return QSpec{f->bits, static_cast<int>(group)};
}

// Checks one quantised matrix {data, scales[, mins]} of `rows` rows (-1: any) and row length d;
// returns its pointers and its row count through *n.
inline QMat check_qmat(at::TensorList t, const char* name, QSpec qs, bool has_min, int64_t d,
                const at::Tensor& x, const char* op, int64_t* n) {
  const size_t want = has_min ? 3 : 2;
  TORCH_CHECK(t.size() == want, op, ": ", name, " must hold ",
              has_min ? "[data, scales, mins]" : "[data, scales]", " for this format, got ",
              t.size(), " tensors");
  const at::Tensor& data = t[0];
  const int64_t N = data.dim() >= 1 ? data.size(0) : 0;
  const int64_t ng = d / qs.group;
  const at::ScalarType dt = qs.bits == 8 ? at::kChar : at::kByte;
  const int64_t width = d * qs.bits / 8;
  for (size_t i = 0; i < t.size(); ++i) {
    const char* part = i == 0 ? "data" : i == 1 ? "scales" : "mins";
    const at::Tensor& p = t[i];
    TORCH_CHECK(p.device() == x.device(), op, ": ", name, " ", part, " is on ", p.device(),
                " but x is on ", x.device());
    const at::ScalarType want_dt = i == 0 ? dt : at::kHalf;
    TORCH_CHECK(p.scalar_type() == want_dt, op, ": ", name, " ", part, " must be ", want_dt,
                " for ", qs.bits, "-bit rows, got ", p.scalar_type());
    const int64_t cols = i == 0 ? width : ng;
    TORCH_CHECK(p.dim() == 2 && p.size(0) == N && p.size(1) == cols, op, ": ", name, " ", part,
                " must be [N, ", cols, "] = [", N, ", ", cols, "] (d = ", d, ", group = ",
                qs.group, "), got shape ", p.sizes());
    TORCH_CHECK(p.stride(1) == 1 || cols <= 1, op, ": ", name, " ", part,
                " must have unit stride in its last dim, got strides ", p.strides());
  }
  if (has_min)
    TORCH_CHECK(t[1].stride(0) == t[2].stride(0), op, ": ", name,
                " scales and mins must share a row stride, got ", t[1].stride(0), " and ",
                t[2].stride(0));
  *n = N;
  return QMat{static_cast<const uint8_t*>(data.data_ptr()), data.stride(0),
              static_cast<const uint16_t*>(t[1].data_ptr()), t[1].stride(0),
              has_min ? static_cast<const uint16_t*>(t[2].data_ptr()) : nullptr};
}

}  // namespace cpu
}  // namespace dart
