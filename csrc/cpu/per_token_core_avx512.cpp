// AVX-512 (F, BW, VL, DQ, VNNI) variant of the per-token hot loops (per_token_core.inc on
// kernel_core.inc), 16-lane vectors; chosen at run time with core_kernels()'s avx512 variant.
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

// GCC 12's own _mm512_cvtph_ps trips -Wmaybe-uninitialized (its `__m512 __Y = __Y` idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace dart {
namespace cpu {
namespace pt_avx512 {
namespace {
#define DART_VW 16
#define DART_ISA 2
#include "kernel_core.inc"
#include "per_token_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace pt_avx512
}  // namespace cpu
}  // namespace dart
#pragma GCC pop_options

namespace dart {
namespace cpu {
const PerTokenKernels kPerTokenAvx512 = {
    "avx512",          &pt_avx512::pt_gate_acts,      &pt_avx512::pt_qgate_acts,
    &pt_avx512::pt_up_down,   &pt_avx512::pt_qup_down, &pt_avx512::pt_colsparse_t,
    &pt_avx512::pt_colsparse_rows, &pt_avx512::pt_rows_axpy};
}  // namespace cpu
}  // namespace dart
#endif
