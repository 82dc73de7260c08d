// Torch-free device helpers shared by the dart CUDA kernels: element types, 16-byte vector
// loads, activations (fp32), warp reductions and a device-side check that aborts the kernel.
//
// Everything here compiles with nvcc alone (no torch / ATen headers) and also under the
// flags torch's cpp_extension passes (-D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__, ...): conversions only use the explicit intrinsics.
//
// Kernel source convention: every csrc/kernels/*.cuh compiles unchanged with nvcc AND with a
// host C++ compiler against the CPU emulation of the CUDA execution model (csrc/emu/, built with
// -DDART_CUDA_EMULATION by tests/emulation.py). To keep it so:
//   - launch kernels with DART_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...), never
//     with <<<...>>>; the kernel comes last so that a template-id with commas needs no
//     parentheses: DART_LAUNCH(grid, 256, 0, stream, topk_kernel<T, 256>)(scores, n, out);
//   - declare dynamic shared memory with DART_DYNAMIC_SMEM(type, name); inside the kernel (a
//     16-byte aligned `type name[]`; several declarations alias the same bytes, as in CUDA);
//     static shared memory is a plain `__shared__ T name[N];` at kernel scope, never
//     initialised in its declaration (the emulation keeps one copy across blocks, so a read
//     before the block's first write is a bug the emulation does NOT catch there);
//   - check arguments on the device with DART_DEVICE_CHECK (a failed launch with the message,
//     in the emulation as on the GPU);
//   - warp collectives (__shfl*_sync, __ballot_sync, __match_any_sync, __syncwarp, ...) with
//     the full mask 0xffffffff, reached by all 32 lanes (no early return before them); the
//     emulation fails the launch otherwise;
//   - no inline PTX (asm): use intrinsics that csrc/emu/cuda_emu.h provides (add a missing one
//     there with its exact CUDA semantics); no __CUDA_ARCH__ branches that change results;
//   - loads/stores of vectors go through aligned pointers (the emulation checks the alignment
//     of __ldg/__ldcs/__ldcg/__stcg and atomics; UBSan checks plain typed accesses).
#pragma once

#if defined(DART_CUDA_EMULATION)
#include "../emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define DART_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define DART_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

#include <cstdint>

namespace dart {
namespace kernels {

// ---------------------------------------------------------------------------------------------
// Device-side argument check. Index range checks cannot be done on the host without a device
// sync (not allowed: the ops run inside CUDA graphs), so a kernel that finds an index out of
// range traps through the same __assert_fail path as c10's CUDA_KERNEL_ASSERT: the launch fails
// with cudaErrorAssert ("device-side assert triggered") and the message below, which names the
// op and the argument, is printed on stderr by the driver. The CUDA context is unusable
// afterwards, exactly like torch's own out-of-range indexing; it is never silent garbage and
// never an out-of-bounds read (the faulting thread stops before it dereferences the index).
// Unlike <cassert>'s assert it is NOT compiled out by -DNDEBUG.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
extern "C" __device__ void __assert_fail(const char* assertion, const char* file,
                                         unsigned int line, const char* function) noexcept;
#define DART_DEVICE_CHECK(cond, msg)                                                   \
  do {                                                                                 \
    if (__builtin_expect(!(cond), 0)) {                                                \
      __assert_fail(msg " [" #cond "]", __FILE__, static_cast<unsigned int>(__LINE__), \
                    __func__);                                                         \
    }                                                                                  \
  } while (0)
#elif !defined(DART_CUDA_EMULATION)  // nvcc's host pass: kernels are not compiled there
#define DART_DEVICE_CHECK(cond, msg) \
  do {                               \
  } while (0)
#endif

// ---------------------------------------------------------------------------------------------
// Activations (computed in fp32).
// ---------------------------------------------------------------------------------------------
enum class Act : int { kSiLU = 0, kGeLU = 1, kGeLUTanh = 2, kReLU = 3 };

__device__ __forceinline__ float act_apply(Act act, float v) {
  switch (act) {
    case Act::kSiLU:
      return v / (1.0f + expf(-v));
    case Act::kGeLU:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f));
    case Act::kGeLUTanh: {
      const float kAlpha = 0.79788456080286535588f;  // sqrt(2/pi)
      const float inner = kAlpha * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + tanhf(inner));
    }
    case Act::kReLU:
    default:
      return v < 0.0f ? 0.0f : v;  // NaN propagates like torch.relu
  }
}

// ---------------------------------------------------------------------------------------------
// Element conversions (explicit intrinsics only).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Conv;

template <>
struct Conv<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Conv<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Conv<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Conv<T>::to_float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Conv<T>::from_float(v);
}

// ---------------------------------------------------------------------------------------------
// Vectors of VE elements of T loaded/stored as one aligned memory transaction (VE*sizeof(T) in
// {2, 4, 8, 16} bytes) or element by element (VE == 1).
// ---------------------------------------------------------------------------------------------
template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = uint32_t;
};
template <>
struct RawVec<2> {
  using type = uint16_t;
};

template <typename T, int VE>
struct alignas(VE * sizeof(T)) Vec {
  T v[VE];
};

// Streaming load (read-once weights: evict-first, do not pollute L1).
template <typename T, int VE>
__device__ __forceinline__ Vec<T, VE> load_stream(const T* p) {
  Vec<T, VE> out;
  if constexpr (VE * sizeof(T) == 16) {
    uint4 r = __ldcs(reinterpret_cast<const uint4*>(p));
    out = *reinterpret_cast<Vec<T, VE>*>(&r);
  } else if constexpr (VE * sizeof(T) == 8) {
    uint2 r = __ldcs(reinterpret_cast<const uint2*>(p));
    out = *reinterpret_cast<Vec<T, VE>*>(&r);
  } else {
#pragma unroll
    for (int e = 0; e < VE; ++e) out.v[e] = p[e];
  }
  return out;
}

// Plain vector load (shared or global memory that may be re-read).
template <typename T, int VE>
__device__ __forceinline__ Vec<T, VE> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VE>*>(p);
}

template <typename T, int VE>
__device__ __forceinline__ void vec_to_float(const Vec<T, VE>& v, float (&f)[VE]) {
#pragma unroll
  for (int e = 0; e < VE; ++e) f[e] = to_float<T>(v.v[e]);
}

// ---------------------------------------------------------------------------------------------
// Warp helpers.
// ---------------------------------------------------------------------------------------------
constexpr int kWarp = 32;

__device__ __forceinline__ float warp_allreduce_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

inline bool host_aligned(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace kernels
}  // namespace dart
