// Torch-free interface of the CPU hot loops (the per-neuron FFN stream and the row gather of the
// GEMM path). The loops live in kernel_core.inc, compiled once per instruction set (core_*.cpp);
// core_kernels() (config.cpp) picks the best variant this CPU runs, so one binary is portable and
// still uses AVX2 / AVX-512 where present.
#pragma once

#include <cmath>
#include <cstdint>

// Runtime dispatch needs GCC's `#pragma GCC target` and __builtin_cpu_supports on x86-64; other
// compilers and architectures build the portable variant only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DART_CPU_DISPATCH 1
#else
#define DART_CPU_DISPATCH 0
#endif

namespace dart {
namespace cpu {

enum class Act { Silu, Gelu, GeluTanh, Relu };

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

// Element type of the weight rows (x and the accumulators are always fp32).
enum class Elem { F32, BF16, F16 };

// One FFN call's weights: R = 2 input rows per neuron (gated: gate, up) or R = 1 (plain + bias).
struct FfnArgs {
  const void* in0;  // gate (GLU) or w_in (MLP) base pointer
  int64_t s0;       // row stride (elements)
  const void* in1;  // up (GLU) or nullptr
  int64_t s1;
  const void* out;  // w_down_t / w_out_t
  int64_t so;
  const float* b_in;  // MLP: bias of the kept neurons, [k] fp32 (already gathered), or nullptr
  Act act;
  Elem elem;
  int rows;  // R
};

struct CoreKernels {
  const char* name;  // "default", "avx2", "avx512"
  // y [M, d] += FFN of x [M, d] over the kept neurons idx[j0 .. j1) (b_in indexed by j).
  // scratch: 3 * M floats.
  void (*ffn_neurons)(const float* x, int64_t M, int64_t d, const FfnArgs& a, const int64_t* idx,
                      int64_t j0, int64_t j1, float* y, float* scratch);
  // out [n, d] fp32 = rows idx[0 .. n) of w (element type e, row stride sw), converted.
  void (*gather_rows_f32)(Elem e, const void* w, int64_t sw, const int64_t* idx, int64_t n,
                          int64_t d, float* out);
};

extern const CoreKernels kCoreDefault;
#if DART_CPU_DISPATCH
extern const CoreKernels kCoreAvx2;
extern const CoreKernels kCoreAvx512;
#endif

}  // namespace cpu
}  // namespace dart
