// AVX-512 (F, BW, VL, DQ, VNNI) variant of the CPU hot loops (kernel_core.inc), 16-lane vectors;
// chosen at run time on CPUs that have all of these (config.cpp), whatever the build machine had.
// VNNI is required because the compiler may emit it anywhere under this target: an AVX-512 CPU
// without it (Skylake-X) runs the AVX2 variant.
#include "kernel_core.h"

#if DART_CPU_DISPATCH
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

// GCC 12's own _mm512_cvtph_ps trips -Wmaybe-uninitialized (its `__m512 __Y = __Y` idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace dart {
namespace cpu {
namespace avx512 {
namespace {
#define DART_VW 16
#define DART_ISA 2
#include "kernel_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace avx512
}  // namespace cpu
}  // namespace dart
#pragma GCC pop_options

namespace dart {
namespace cpu {
const CoreKernels kCoreAvx512 = {"avx512",           &avx512::ffn_neurons,  &avx512::gather_rows_f32,
                                 &avx512::qffn_neurons, &avx512::qdot_rows,    &avx512::qdequant_rows,
                                 &avx512::quantize_act};
}  // namespace cpu
}  // namespace dart
#endif
