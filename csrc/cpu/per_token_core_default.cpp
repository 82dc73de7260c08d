// Portable variant of the per-token hot loops (per_token_core.inc on kernel_core.inc): the
// build's baseline instruction set, 8-lane vectors (as core_default.cpp).
#include <algorithm>
#include <cstring>
#include <vector>

#include "per_token_core.h"

// kernel_core.inc's own entry points (ffn_neurons, qdot_rows, ...) are compiled again in this
// unit for the helpers they come with; only the per-token loops are exported, so GCC would warn
// that those entry points are unused.
#pragma GCC diagnostic ignored "-Wunused-function"

// The 8-lane (32-byte) vectors are wider than SSE2 registers: GCC warns that passing them by value
// would change the ABI, which concerns only these file-local functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dart {
namespace cpu {
namespace pt_portable {
namespace {
#define DART_VW 8
#define DART_ISA 0
#include "kernel_core.inc"
#include "per_token_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace pt_portable

const PerTokenKernels kPerTokenDefault = {
    "default",          &pt_portable::pt_gate_acts,      &pt_portable::pt_qgate_acts,
    &pt_portable::pt_up_down,   &pt_portable::pt_qup_down, &pt_portable::pt_colsparse_t,
    &pt_portable::pt_colsparse_rows, &pt_portable::pt_rows_axpy};

}  // namespace cpu
}  // namespace dart
