// Portable variant of the CPU hot loops (kernel_core.inc): the build's baseline instruction set
// (SSE2 on x86-64 unless DART_NATIVE=1), 8-lane vectors.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel_core.h"

// The 8-lane (32-byte) vectors are wider than SSE2 registers: GCC warns that passing them by value
// would change the ABI, which concerns only these file-local functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dart {
namespace cpu {
namespace portable {
namespace {
#define DART_VW 8
#define DART_ISA 0
#include "kernel_core.inc"
#undef DART_ISA
#undef DART_VW
}  // namespace
}  // namespace portable

const CoreKernels kCoreDefault = {"default",
                                  &portable::ffn_neurons,
                                  &portable::gather_rows_f32,
                                  &portable::qffn_neurons,
                                  &portable::qdot_rows,
                                  &portable::qdequant_rows,
                                  &portable::quantize_act};

}  // namespace cpu
}  // namespace dart
