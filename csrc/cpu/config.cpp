// Run-time settings of the CPU kernels, each read once from the environment by the one parser
// here; dart::cpu_gemm_min_tokens / dart::cpu_capability report them, so Python never parses
// the variables itself and both sides always agree.
//   DART_CPU_GEMM_MIN_TOKENS  token count from which the FFN ops gather the kept rows and run
//                             GEMMs (default 8; an integer >= 1)
//   DART_CPU_CAPABILITY       default | avx2 | avx512: the hot-loop variant (default: the best this
//                             CPU runs; a lower one for tests and comparisons)
#include "common.h"

#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <vector>

namespace dart {
namespace cpu {
namespace {

// The variable's value, or nullptr when unset or empty.
const char* env_value(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int64_t env_int(const char* name, int64_t fallback, int64_t min, const char* meaning) {
  const char* v = env_value(name);
  if (!v) return fallback;
  errno = 0;
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  while (end && (*end == ' ' || *end == '\t')) ++end;
  TORCH_CHECK(end != v && *end == '\0' && errno == 0 && parsed >= min, name,
              " must be an integer >= ", min, " (", meaning, "), got '", v, "'");
  return parsed;
}

// Variants this CPU runs, best first.
std::vector<const CoreKernels*> supported_kernels() {
  std::vector<const CoreKernels*> out;
#if DART_CPU_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))  // (the quantised dots use dpbusd)
    out.push_back(&kCoreAvx512);
  if (avx2) out.push_back(&kCoreAvx2);
#endif
  out.push_back(&kCoreDefault);
  return out;
}

const CoreKernels& choose_kernels() {
  const auto supported = supported_kernels();
  const char* want = env_value("DART_CPU_CAPABILITY");
  if (!want) return *supported.front();
  for (const CoreKernels* k : supported)
    if (want == std::string(k->name)) return *k;
  TORCH_CHECK(want == std::string("avx2") || want == std::string("avx512"),
              "DART_CPU_CAPABILITY must be one of default, avx2, avx512, got '", want, "'");
  TORCH_CHECK(false, "DART_CPU_CAPABILITY=", want, " but this CPU (or this build) runs at most ",
              supported.front()->name);
}

}  // namespace

int64_t gemm_min_tokens() {
  static const int64_t v =
      env_int("DART_CPU_GEMM_MIN_TOKENS", 8, 1,
              "the token count from which the CPU FFN ops gather the kept rows and run GEMMs");
  return v;
}

const CoreKernels& core_kernels() {
  static const CoreKernels& k = choose_kernels();
  return k;
}

namespace {

std::string cpu_capability() { return core_kernels().name; }

}  // namespace

TORCH_LIBRARY_IMPL(dart, CompositeImplicitAutograd, m) {
  m.impl("cpu_gemm_min_tokens", &gemm_min_tokens);
  m.impl("cpu_capability", &cpu_capability);
}

}  // namespace cpu
}  // namespace dart
