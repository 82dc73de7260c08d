// Shared helpers of the dart CPU kernels: activations, argument checks, fp32 vector loads of
// fp32/bf16/fp16 rows. Vectorisation uses GCC/Clang vector extensions, which compile to AVX-512
// (16 lanes) with -march=native on an AVX-512 machine, AVX2 (8 lanes) otherwise, and to plain
// SSE2 when built without -march (DART_NATIVE=0).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace dart {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Activations
enum class Act { Silu, Gelu, GeluTanh, Relu };

inline Act parse_act(const std::string& name, const char* op) {
  if (name == "silu" || name == "swish") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh" || name == "gelu_new" || name == "gelu_pytorch_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK(false, op, ": unknown act '", name,
              "'; accepted: silu, gelu (erf), gelu_tanh (aliases gelu_new, gelu_pytorch_tanh), "
              "relu");
}

inline float apply_act(Act a, float v) {
  switch (a) {
    case Act::Silu:
      return v / (1.0f + std::exp(-v));
    case Act::Gelu:
      return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752440f));
    case Act::GeluTanh: {
      const float c = 0.79788456080286535588f;  // sqrt(2/pi)
      return 0.5f * v * (1.0f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
    case Act::Relu:
      return v > 0.0f ? v : 0.0f;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Vector type and loaders (row element type -> fp32 vector)
#if defined(__AVX512F__)
constexpr int kV = 16;
#else
constexpr int kV = 8;
#endif
typedef float vf __attribute__((vector_size(kV * 4)));
typedef uint16_t vu16 __attribute__((vector_size(kV * 2)));
typedef uint32_t vu32 __attribute__((vector_size(kV * 4)));

inline vf vzero() { return vf{} ; }
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int l = 0; l < kV; ++l) s += v[l];
  return s;
}

struct LdF32 {
  using S = float;
  static inline vf load(const S* p) { return vload(p); }
  static inline float scalar(S v) { return v; }
};

struct LdBF16 {
  using S = c10::BFloat16;
  static inline vf load(const S* p) {
    vu16 u;
    std::memcpy(&u, p, sizeof(u));
    vu32 w = __builtin_convertvector(u, vu32) << 16;
    vf f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  }
  static inline float scalar(S v) { return static_cast<float>(v); }
};

struct LdF16 {
  using S = c10::Half;
  static inline vf load(const S* p) {
#if defined(__AVX512F__)
    __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    vf f;
    std::memcpy(&f, &r, sizeof(f));
    return f;
#elif defined(__F16C__)
    __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    vf f;
    std::memcpy(&f, &r, sizeof(f));
    return f;
#else
    float tmp[kV];
    for (int l = 0; l < kV; ++l) tmp[l] = static_cast<float>(p[l]);
    return vload(tmp);
#endif
  }
  static inline float scalar(S v) { return static_cast<float>(v); }
};

// Calls f with the loader type matching dtype (fp32, bf16, fp16).
#define DART_DISPATCH_LOADER(dtype, op, ...)                                              \
  [&] {                                                                                   \
    switch (dtype) {                                                                      \
      case at::kFloat: {                                                                  \
        using L = ::dart::cpu::LdF32;                                                     \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case at::kBFloat16: {                                                               \
        using L = ::dart::cpu::LdBF16;                                                    \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case at::kHalf: {                                                                   \
        using L = ::dart::cpu::LdF16;                                                     \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      default:                                                                            \
        TORCH_CHECK(false, op, ": unsupported dtype ", dtype,                             \
                    "; expected float32, bfloat16 or float16");                           \
    }                                                                                     \
  }()

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

// Validates idx against N; returns int64 contiguous idx. per_seq is set for idx [B, k].
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
  at::Tensor out = idx.to(at::kLong).contiguous();
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

// x [..., d] as a contiguous fp32 [M, d] tensor (a no-op for contiguous fp32 x).
inline at::Tensor x_as_f32_2d(const at::Tensor& x) {
  return x.to(at::kFloat).contiguous().reshape({-1, x.size(-1)});
}

}  // namespace cpu
}  // namespace dart
