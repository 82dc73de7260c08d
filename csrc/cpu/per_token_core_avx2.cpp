// AVX2 + FMA + F16C variant of the per-token hot loops (per_token_core.inc on kernel_core.inc),
// 8-lane vectors; chosen at run time with core_kernels()'s avx2 variant.
#include "per_token_core.h"

// kernel_core.inc's own entry points (ffn_neurons, qdot_rows, ...) are compiled again in this
// unit for the helpers they come with; only the per-token loops are exported, so GCC would warn
// that those entry points are unused.
#pragma GCC diagnostic ignored "-Wunused-function"

#if DART_CPU_DISPATCH
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace dart {
namespace cpu {
namespace pt_avx2 {
namespace {
#define DART_VW 8
#define DART_ISA 1
#include "kernel_core.inc"
#include "per_token_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace pt_avx2
}  // namespace cpu
}  // namespace dart
#pragma GCC pop_options

namespace dart {
namespace cpu {
const PerTokenKernels kPerTokenAvx2 = {
    "avx2",          &pt_avx2::pt_gate_acts,      &pt_avx2::pt_qgate_acts,
    &pt_avx2::pt_up_down,   &pt_avx2::pt_qup_down, &pt_avx2::pt_colsparse_t,
    &pt_avx2::pt_colsparse_rows, &pt_avx2::pt_rows_axpy};
}  // namespace cpu
}  // namespace dart
#endif
