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

// One quantised row-major matrix [N, d] (formats of dart_ext/quant.py): per row, packed data
// (int8 [d] for 8 bits; for 4 bits [d/2] bytes, each block of 32 values in 16 bytes, byte j = value
// j (low nibble) | value j + 16 (high nibble)) and fp16 scales (and mins, q4m) per group.
struct QMat {
  const uint8_t* data;
  int64_t data_stride;  // bytes between rows
  const uint16_t* scales;  // fp16 bits [N, d / group]
  int64_t scale_stride;  // elements between rows (of scales and mins)
  const uint16_t* mins;  // fp16 bits, or nullptr (q8, q4)
};

// Format of the quantised matrices of one call: bits 8 (value = scale * q) or 4 (value =
// scale * (u - 8), or scale * u + min with mins); group = values per scale (32 or 64).
struct QSpec {
  int bits;
  int group;
};

// Activations rounded to int8 per block of 32 values (quantize_act): q [M, d], per block
// scale = amax / 127 and the sum of its q (for the offset / min terms of 4-bit rows).
struct QAct {
  const int8_t* q;
  const float* scale;  // [M, d / 32]
  const int32_t* sum;  // [M, d / 32]
};

constexpr int64_t kQBlock = 32;

// One FFN call's weights: R = 2 input rows per neuron (gated: gate, up) or R = 1 (plain + bias).
struct FfnArgs {
  const void* in0;  // gate (GLU) or w_in (MLP) base pointer
  int64_t s0;       // row stride (elements)
  const void* in1;  // up (GLU) or nullptr
  int64_t s1;
  const void* out;  // w_down_t / w_out_t
  int64_t so;
  // Input biases of the kept neurons, [k] fp32 (already gathered, indexed by j), or nullptr:
  // b_in of w_in (MLP) / of w_gate (GLU); b_in1 of w_up (GLU only).
  const float* b_in;
  const float* b_in1;
  Act act;
  Elem elem;
  int rows;  // R
  // Quantised weights (the *_q ops): q[0], q[1] (GLU), q[2] stand for in0, in1, out (whose
  // pointers above are then unused), all in format qs; nullptr for float weights.
  const QMat* q = nullptr;
  QSpec qs{0, 0};
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
  // Quantised weights (a.q set): the same FFN stream as ffn_neurons, the input rows dotted with
  // the int8 activations xa (of x), the down rows added in fp32. scratch: 3 * M floats.
  void (*qffn_neurons)(const QAct& xa, int64_t M, int64_t d, const FfnArgs& a,
                       const int64_t* idx, int64_t j0, int64_t j1, float* y, float* scratch);
  // y[t * ldy + r] = xa_t . w[r] for rows r in [r0, r1), t < M (the dense quantised linear).
  void (*qdot_rows)(const QAct& xa, int64_t M, int64_t d, const QMat& w, QSpec qs, int64_t r0,
                    int64_t r1, float* y, int64_t ldy);
  // out [n, d] fp32 = rows idx[0 .. n) of w dequantised (rows r0 .. r0 + n when idx is null).
  void (*qdequant_rows)(const QMat& w, QSpec qs, const int64_t* idx, int64_t r0, int64_t n,
                        int64_t d, float* out);
  // Rounds x [M, d] (d a multiple of 32) to int8 per block of 32: q [M, d], scale and sum
  // [M, d / 32] (dart_ext.quant.quantize_activations).
  void (*quantize_act)(const float* x, int64_t M, int64_t d, int8_t* q, float* scale,
                       int32_t* sum);
};

extern const CoreKernels kCoreDefault;
#if DART_CPU_DISPATCH
extern const CoreKernels kCoreAvx2;
extern const CoreKernels kCoreAvx512;
#endif

}  // namespace cpu
}  // namespace dart
