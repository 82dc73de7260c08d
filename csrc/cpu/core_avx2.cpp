// AVX2 + FMA + F16C variant of the CPU hot loops (kernel_core.inc), 8-lane vectors; chosen at run
// time on CPUs that have these (config.cpp), whatever the build machine had.
#include "kernel_core.h"

#if DART_CPU_DISPATCH
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace dart {
namespace cpu {
namespace avx2 {
namespace {
#define DART_VW 8
#define DART_ISA 1
#include "kernel_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace avx2
}  // namespace cpu
}  // namespace dart
#pragma GCC pop_options

namespace dart {
namespace cpu {
const CoreKernels kCoreAvx2 = {"avx2",           &avx2::ffn_neurons,  &avx2::gather_rows_f32,
                                 &avx2::qffn_neurons, &avx2::qdot_rows,    &avx2::qdequant_rows,
                                 &avx2::quantize_act};
}  // namespace cpu
}  // namespace dart
#endif
