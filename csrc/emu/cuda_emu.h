// CPU emulation of the CUDA execution model, for running the torch-free kernel cores
// (csrc/kernels/*.cuh) with a host C++ compiler. Included by csrc/kernels/common.cuh when
// DART_CUDA_EMULATION is defined, in place of the CUDA headers.
//
// Model (the runtime is csrc/emu/runtime.cpp):
//   - blocks run one after another; the threads of a block are fibers on the calling host
//     thread (cooperative: a fiber runs until it reaches __syncthreads, a warp collective, or
//     returns). The order of blocks and of fibers between sync points is forward, reverse or
//     seeded-random (dart_emu_set_schedule), so code that depends on an order it does not
//     enforce gives different answers under different schedules.
//   - __syncthreads is a barrier over the threads still alive (threads that returned drop out).
//   - warp shuffles / votes / __syncwarp exchange values among the 32 lanes of a warp; a mask
//     other than 0xffffffff, a warp with fewer than 32 live lanes, or lanes reaching different
//     collectives fail the launch with a message.
//   - __shared__ variables are function-local statics (one copy, blocks never overlap); dynamic
//     shared memory (DART_DYNAMIC_SMEM) is a fresh heap block of the launch's size per block,
//     filled with 0xff bytes (reads before writes see NaN / -1), bounds-checked under ASan.
//   - __ldg/__ldcs/__ldcg/__stcg/... are plain accesses that fail the launch when the address
//     is not aligned to the access size; atomics are real (__atomic builtins), fences are real.
//   - bf16 / fp16 are bit-exact (round-to-nearest-even, canonical NaN 0x7fff like cvt.rn).
//   - host API: launch checks (block <= 1024 threads, grid limits, dynamic shared memory above
//     48 KB needs cudaFuncSetAttribute first, at most the opt-in limit of an H100/H200); errors
//     come back through cudaGetLastError like on hardware (launches are synchronous here).
// Anything a kernel uses that is not declared here fails to compile the emulation: add it here
// with its exact CUDA semantics, never a looser one.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static const

// ---------------------------------------------------------------------------------------------
// Vector types (alignment = size, as in CUDA's vector_types.h)
// ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit like CUDA
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(4) ushort2 {
  unsigned short x, y;
};
struct alignas(8) ushort4 {
  unsigned short x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------------------------
// Runtime API subset
// ---------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);

namespace dart_emu {

// ---- runtime entry points (runtime.cpp) ---------------------------------------------------
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
extern long long g_atomics;  // atomic operations issued (counter "atomics")

[[noreturn]] void fail(cudaError_t code, const char* what);
void check_aligned(const void* p, size_t bytes, const char* what);
void* dynamic_smem();
void sync_threads();
int sync_threads_reduce(int kind, int pred);  // kind: 1 count, 2 and, 3 or
enum class WarpOp : int {
  kShfl,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
  kMatchAny,
  kSyncWarp,
  kReduceAdd,
  kReduceMin,
  kReduceMax,
  kReduceAnd,
  kReduceOr,
  kReduceXor,
};
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t value, int arg, int width);
[[noreturn]] unsigned active_mask();

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t smem);

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;
  cudaStream_t stream;
  const void* kernel;
};
// Runs body(ctx) once per thread of the grid; errors go to cudaGetLastError.
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig cfg;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    static_assert((std::is_trivially_copyable_v<std::decay_t<P>> && ...),
                  "kernel parameters must be trivially copyable");
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{kernel, &params};
    run_grid(
        cfg,
        [](void* c) {
          auto* x = static_cast<Ctx*>(c);
          std::apply(x->kernel, *x->params);  // every thread gets its own copy, like hardware
        },
        &ctx);
  }
};

template <typename... P>
Launcher<P...> make_launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             void (*kernel)(P...)) {
  return Launcher<P...>{kernel, LaunchConfig{grid, block, smem, stream,
                                              reinterpret_cast<const void*>(kernel)}};
}

inline void check_atomic(const void* p, size_t bytes, const char* what) {
  check_aligned(p, bytes, what);
  ++g_atomics;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace dart_emu

#define threadIdx (static_cast<const uint3&>(::dart_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::dart_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::dart_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::dart_emu::g_grid_dim))
#define warpSize 32

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::dart_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...),
                                                          int block_size, size_t smem) {
  return ::dart_emu::occupancy(blocks, reinterpret_cast<const void*>(kernel), block_size, smem);
}

// ---------------------------------------------------------------------------------------------
// Synchronisation, warp collectives
// ---------------------------------------------------------------------------------------------
inline void __syncthreads() { ::dart_emu::sync_threads(); }
inline int __syncthreads_count(int pred) { return ::dart_emu::sync_threads_reduce(1, pred); }
inline int __syncthreads_and(int pred) { return ::dart_emu::sync_threads_reduce(2, pred); }
inline int __syncthreads_or(int pred) { return ::dart_emu::sync_threads_reduce(3, pred); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::dart_emu::warp_exchange(::dart_emu::WarpOp::kSyncWarp, mask, 0, 0, 32);
}
inline unsigned __activemask() { return ::dart_emu::active_mask(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::dart_emu::from_bits<T>(::dart_emu::warp_exchange(
      ::dart_emu::WarpOp::kShfl, mask, ::dart_emu::to_bits(v), src_lane, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::dart_emu::from_bits<T>(
      ::dart_emu::warp_exchange(::dart_emu::WarpOp::kShflUp, mask, ::dart_emu::to_bits(v),
                                static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::dart_emu::from_bits<T>(
      ::dart_emu::warp_exchange(::dart_emu::WarpOp::kShflDown, mask, ::dart_emu::to_bits(v),
                                static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::dart_emu::from_bits<T>(::dart_emu::warp_exchange(
      ::dart_emu::WarpOp::kShflXor, mask, ::dart_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(
      ::dart_emu::warp_exchange(::dart_emu::WarpOp::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(
      ::dart_emu::warp_exchange(::dart_emu::WarpOp::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(
      ::dart_emu::warp_exchange(::dart_emu::WarpOp::kAll, mask, pred != 0, 0, 32));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32/64-bit values");
  return static_cast<unsigned>(::dart_emu::warp_exchange(::dart_emu::WarpOp::kMatchAny, mask,
                                                         ::dart_emu::to_bits(v), 0, 32));
}
#define DART_EMU_REDUCE(name, op)                                                          \
  inline unsigned name(unsigned mask, unsigned v) {                                        \
    return static_cast<unsigned>(::dart_emu::warp_exchange(op, mask, v, 0, 32));          \
  }
DART_EMU_REDUCE(__reduce_add_sync, ::dart_emu::WarpOp::kReduceAdd)
DART_EMU_REDUCE(__reduce_min_sync, ::dart_emu::WarpOp::kReduceMin)
DART_EMU_REDUCE(__reduce_max_sync, ::dart_emu::WarpOp::kReduceMax)
DART_EMU_REDUCE(__reduce_and_sync, ::dart_emu::WarpOp::kReduceAnd)
DART_EMU_REDUCE(__reduce_or_sync, ::dart_emu::WarpOp::kReduceOr)
DART_EMU_REDUCE(__reduce_xor_sync, ::dart_emu::WarpOp::kReduceXor)
#undef DART_EMU_REDUCE

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}

// ---------------------------------------------------------------------------------------------
// Cache-hinted loads / stores: plain accesses, alignment checked
// ---------------------------------------------------------------------------------------------
#define DART_EMU_LOAD(name)                                              \
  template <typename T>                                                  \
  inline T name(const T* p) {                                            \
    ::dart_emu::check_aligned(p, alignof(T), #name);                     \
    return *p;                                                           \
  }
DART_EMU_LOAD(__ldg)
DART_EMU_LOAD(__ldcs)
DART_EMU_LOAD(__ldcg)
DART_EMU_LOAD(__ldca)
DART_EMU_LOAD(__ldlu)
DART_EMU_LOAD(__ldcv)
#undef DART_EMU_LOAD
#define DART_EMU_STORE(name)                                             \
  template <typename T>                                                  \
  inline void name(T* p, T v) {                                          \
    ::dart_emu::check_aligned(p, alignof(T), #name);                     \
    *p = v;                                                              \
  }
DART_EMU_STORE(__stcg)
DART_EMU_STORE(__stcs)
DART_EMU_STORE(__stwb)
DART_EMU_STORE(__stwt)
#undef DART_EMU_STORE

// ---------------------------------------------------------------------------------------------
// Atomics (device scope, relaxed on hardware; sequentially consistent here)
// ---------------------------------------------------------------------------------------------
#define DART_EMU_ATOMIC_INT(T)                                                           \
  inline T atomicAdd(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicAdd");                                \
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                   \
  }                                                                                      \
  inline T atomicSub(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicSub");                                \
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);                                   \
  }                                                                                      \
  inline T atomicExch(T* p, T v) {                                                       \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicExch");                               \
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                  \
  }                                                                                      \
  inline T atomicAnd(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicAnd");                                 \
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);                                   \
  }                                                                                      \
  inline T atomicOr(T* p, T v) {                                                         \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicOr");                                  \
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                    \
  }                                                                                      \
  inline T atomicXor(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicXor");                                 \
    return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);                                   \
  }                                                                                      \
  inline T atomicCAS(T* p, T cmp, T v) {                                                 \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicCAS");                                \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return cmp;                                                                          \
  }                                                                                      \
  inline T atomicMin(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicMin");                                 \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                        \
    while (v < old &&                                                                    \
           !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
    }                                                                                    \
    return old;                                                                          \
  }                                                                                      \
  inline T atomicMax(T* p, T v) {                                                        \
    ::dart_emu::check_atomic(p, sizeof(T), "atomicMax");                                 \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                        \
    while (v > old &&                                                                    \
           !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
    }                                                                                    \
    return old;                                                                          \
  }
DART_EMU_ATOMIC_INT(int)
DART_EMU_ATOMIC_INT(unsigned int)
DART_EMU_ATOMIC_INT(long long)
DART_EMU_ATOMIC_INT(unsigned long long)
#undef DART_EMU_ATOMIC_INT

inline float atomicAdd(float* p, float v) {
  ::dart_emu::check_atomic(p, sizeof(float), "atomicAdd");
  float old, next;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    next = old + v;
  } while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline double atomicAdd(double* p, double v) {
  ::dart_emu::check_atomic(p, sizeof(double), "atomicAdd");
  double old, next;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    next = old + v;
  } while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}

// ---------------------------------------------------------------------------------------------
// Integer / bit intrinsics, min / max
// ---------------------------------------------------------------------------------------------
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) {
  return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v));
}
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// Four-way byte dot product with accumulate (dp4a.s32.s32 / dp4a.u32.u32): bytes of a and b as
// signed (int overload) or unsigned (unsigned overload) 8-bit values, products summed into c
// with 32-bit wraparound.
inline int __dp4a(int a, int b, int c) {
  uint32_t acc = static_cast<uint32_t>(c);
  for (int i = 0; i < 4; ++i) {
    const int8_t ai = static_cast<int8_t>(static_cast<uint32_t>(a) >> (8 * i));
    const int8_t bi = static_cast<int8_t>(static_cast<uint32_t>(b) >> (8 * i));
    acc += static_cast<uint32_t>(static_cast<int32_t>(ai) * static_cast<int32_t>(bi));
  }
  return static_cast<int>(acc);
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return c;
}

// cvt.rni.s32.f32: round to nearest even; NaN -> 0; out of range saturates.
inline int __float2int_rn(float v) {
  if (v != v) return 0;
  if (v >= 2147483648.0f) return 2147483647;
  if (v <= -2147483648.0f) return -2147483647 - 1;
  const float r = std::nearbyint(v);  // the default rounding mode: to nearest even
  return static_cast<int>(r);
}

#define DART_EMU_MINMAX(T)                           \
  inline T min(T a, T b) { return a < b ? a : b; }   \
  inline T max(T a, T b) { return a > b ? a : b; }
DART_EMU_MINMAX(int)
DART_EMU_MINMAX(unsigned int)
DART_EMU_MINMAX(long)
DART_EMU_MINMAX(unsigned long)
DART_EMU_MINMAX(long long)
DART_EMU_MINMAX(unsigned long long)
#undef DART_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// Float intrinsics (host libm: results may differ from the device's in the last ulp)
// ---------------------------------------------------------------------------------------------
inline float __int_as_float(int v) {
  return ::dart_emu::from_bits<float>(static_cast<uint32_t>(v));
}
inline float __uint_as_float(unsigned v) { return ::dart_emu::from_bits<float>(v); }
inline int __float_as_int(float v) { return static_cast<int>(::dart_emu::to_bits(v)); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(::dart_emu::to_bits(v)); }
inline double __longlong_as_double(long long v) {
  return ::dart_emu::from_bits<double>(static_cast<uint64_t>(v));
}
inline long long __double_as_longlong(double v) {
  return static_cast<long long>(::dart_emu::to_bits(v));
}
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float __saturatef(float v) { return v != v ? 0.0f : v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// ---------------------------------------------------------------------------------------------
// bf16 / fp16 storage types with the explicit conversion intrinsics only (the project builds
// with -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__: no operators, no
// implicit conversions here either).
// ---------------------------------------------------------------------------------------------
struct alignas(2) __half {
  unsigned short __x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
using half = __half;
using half2 = __half2;

namespace dart_emu {
uint16_t float_to_bf16_bits(float f);  // round to nearest even, NaN -> 0x7fff
uint16_t float_to_half_bits(float f);  // round to nearest even, NaN -> 0x7fff
float bf16_bits_to_float(uint16_t b);
float half_bits_to_float(uint16_t b);
}  // namespace dart_emu

inline float __bfloat162float(__nv_bfloat16 v) { return ::dart_emu::bf16_bits_to_float(v.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  return __nv_bfloat16{::dart_emu::float_to_bf16_bits(v)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline float __half2float(__half v) { return ::dart_emu::half_bits_to_float(v.__x); }
inline __half __float2half_rn(float v) { return __half{::dart_emu::float_to_half_bits(v)}; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __half_as_ushort(__half v) { return v.__x; }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __half2 __floats2half2_rn(float a, float b) {
  return {__float2half_rn(a), __float2half_rn(b)};
}
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

// ---------------------------------------------------------------------------------------------
// Kernel-source macros (see the convention at the top of csrc/kernels/common.cuh)
// ---------------------------------------------------------------------------------------------
#define DART_LAUNCH(grid, block, smem, stream, ...) \
  ::dart_emu::make_launcher((grid), (block), (smem), (stream), __VA_ARGS__)
#define DART_DYNAMIC_SMEM(type, name) \
  type* const name = reinterpret_cast<type*>(::dart_emu::dynamic_smem())
#define DART_DEVICE_CHECK(cond, msg)                                                    \
  do {                                                                                  \
    if (__builtin_expect(!(cond), 0)) {                                                 \
      ::dart_emu::fail(cudaErrorAssert, msg " [" #cond "] at " __FILE__ ":" DART_EMU_STR( \
                                            __LINE__));                                 \
    }                                                                                   \
  } while (0)
#define DART_EMU_STR2(x) #x
#define DART_EMU_STR(x) DART_EMU_STR2(x)
