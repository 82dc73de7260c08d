// Kernels that exercise the emulation itself (tests/test_cuda_emulation.py checks each one
// against the CUDA semantics, and that each misuse fails the launch with its message).
#include <cstdint>

#include "cuda_emu.h"

namespace {

// out[lane] per collective, 32 ints per row of results (one warp per block, `blocks` blocks).
__global__ void warp_ops_kernel(int* out, int width, int arg) {
  const int lane = threadIdx.x % 32;
  const int v = 100 * static_cast<int>(blockIdx.x) + lane;
  int* o = out + blockIdx.x * 32 * 11;
  o[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, arg, width);
  o[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  o[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
  o[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, arg, width);
  o[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5 * 32 + lane] = __any_sync(0xffffffffu, lane == 31);
  o[6 * 32 + lane] = __all_sync(0xffffffffu, lane < 31);
  o[7 * 32 + lane] = static_cast<int>(__match_any_sync(0xffffffffu, lane % 5));
  o[8 * 32 + lane] = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane)));
  const unsigned scrambled = static_cast<unsigned>(lane * 7 % 32);
  o[9 * 32 + lane] = static_cast<int>(__reduce_max_sync(0xffffffffu, scrambled));
  const float half_lane = 0.5f * static_cast<float>(lane);
  o[10 * 32 + lane] = __float_as_int(__shfl_xor_sync(0xffffffffu, half_lane, 1));
}

// Threads >= live return at once; the rest pass two barriers around a shared-memory exchange and
// count themselves with __syncthreads_count. out[t] = value of thread (t + 1) % live, out[n] =
// the count.
__global__ void barrier_kernel(int* out, int live) {
  __shared__ int vals[1024];
  const int t = static_cast<int>(threadIdx.x);
  if (t >= live) return;
  vals[t] = 3 * t + 1;
  __syncthreads();
  out[t] = vals[(t + 1) % live];
  const int n = __syncthreads_count(1);
  if (t == 0) out[blockDim.x] = n;
}

// Every thread of every block adds 1 (int) and 0.5 (float) to one counter each.
__global__ void atomics_kernel(int* icount, float* fcount, unsigned long long* ucount) {
  atomicAdd(icount, 1);
  atomicAdd(fcount, 0.5f);
  atomicAdd(ucount, 1ull);
  __threadfence();
}

// out[0..7]: the atomics family (every thread contributes), out[8..10]: __syncthreads_and /
// _or / _count, out[12..15]: bit intrinsics.
__global__ void atomics_family_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  atomicSub(out + 0, t);
  atomicMax(out + 1, (t * 37) % 101);
  atomicMin(out + 2, 1000 - t);
  atomicOr(out + 3, 1 << (t % 31));
  atomicAnd(out + 4, ~(1 << (t % 31)));
  atomicXor(out + 5, t);
  if (t == 17) atomicExch(out + 6, 1234);
  atomicCAS(out + 7, t, t + 1);  // a chain: succeeds for t = out[7] at the time of the call
  const int all_even = __syncthreads_and(t % 2 == 0);
  const int any_big = __syncthreads_or(t == 63);
  const int n_small = __syncthreads_count(t < 10);
  if (t == 0) {
    out[8] = all_even;
    out[9] = any_big;
    out[10] = n_small;
    out[12] = static_cast<int>(__brev(1u));
    out[13] = __clz(1);
    out[14] = __ffs(8);
    out[15] = __popc(0xf0f0u);
  }
}

// Misuses, selected by `which` (the launch must fail):
//   1 partial mask, 2 shuffle after some lanes of the warp returned, 3 half a warp at a shuffle
//   and the other half at __syncthreads, 4 misaligned __ldg, 5 device-side check,
//   6 misaligned __stcg, 7 misaligned atomicAdd, 8 __activemask (not modelled).
__global__ void misuse_kernel(int which, const float* data, int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  switch (which) {
    case 1:
      out[lane] = __shfl_sync(0x0000ffffu, lane, 0);
      break;
    case 2:
      if (lane == 5) return;
      out[lane] = __shfl_sync(0xffffffffu, lane, 0);
      break;
    case 3:
      if (lane < 16) {
        out[lane] = __shfl_sync(0xffffffffu, lane, 0);
      } else {
        __syncthreads();
      }
      break;
    case 4:
      out[lane] = static_cast<int>(__ldg(reinterpret_cast<const float4*>(data + 1)).x);
      break;
    case 5:
      DART_DEVICE_CHECK(lane != 7, "selftest: lane 7 is out of range");
      out[lane] = lane;
      break;
    case 6:
      __stcg(reinterpret_cast<float2*>(out + 1), make_float2(1.0f, 2.0f));
      break;
    case 7:
      atomicAdd(reinterpret_cast<int*>(reinterpret_cast<char*>(out) + 2), 1);
      break;
    case 8:
      out[lane] = static_cast<int>(__activemask());
      break;
    default:
      break;
  }
}

// Dynamic shared memory: out[0] = the first word as the block found it (0xffffffff: never
// written), then each thread writes its slot and reads its neighbour's after a barrier.
__global__ void dynamic_smem_kernel(int* out, int n) {
  DART_DYNAMIC_SMEM(int, words);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) out[0] = words[n - 1];
  __syncthreads();
  words[t] = t * t;
  __syncthreads();
  out[1 + t] = words[(t + 1) % static_cast<int>(blockDim.x)];
}

// A data race on purpose (no barrier between the write and the neighbour's read): its result
// depends on the order the threads run in, which the schedule changes.
__global__ void racy_kernel(int* out) {
  __shared__ int vals[256];
  const int t = static_cast<int>(threadIdx.x);
  vals[t] = 0;
  __syncthreads();
  vals[t] = t + 1;
  out[t] = vals[(t + 1) % 256];  // missing __syncthreads before this read
}

}  // namespace

extern "C" {

int dart_emu_selftest_warp_ops(int* out, int blocks, int width, int arg) {
  DART_LAUNCH(blocks, 32, 0, nullptr, warp_ops_kernel)(out, width, arg);
  return cudaGetLastError();
}

int dart_emu_selftest_barrier(int* out, int threads, int live) {
  DART_LAUNCH(1, threads, 0, nullptr, barrier_kernel)(out, live);
  return cudaGetLastError();
}

int dart_emu_selftest_atomics(int* icount, float* fcount, unsigned long long* ucount, int blocks,
                              int threads) {
  DART_LAUNCH(blocks, threads, 0, nullptr, atomics_kernel)(icount, fcount, ucount);
  return cudaGetLastError();
}

int dart_emu_selftest_misuse(int which, const float* data, int* out) {
  DART_LAUNCH(1, 32, 0, nullptr, misuse_kernel)(which, data, out);
  return cudaGetLastError();
}

int dart_emu_selftest_atomics_family(int* out) {
  DART_LAUNCH(1, 64, 0, nullptr, atomics_family_kernel)(out);
  return cudaGetLastError();
}

// set_attribute: bytes to opt into first (0: none).
int dart_emu_selftest_dynamic_smem(int* out, int threads, int smem_bytes, int set_attribute) {
  if (set_attribute > 0) {
    const cudaError_t err = cudaFuncSetAttribute(
        dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, set_attribute);
    if (err != cudaSuccess) return err;
  }
  DART_LAUNCH(1, threads, static_cast<size_t>(smem_bytes), nullptr, dynamic_smem_kernel)(
      out, smem_bytes / 4);
  return cudaGetLastError();
}

int dart_emu_selftest_racy(int* out) {
  DART_LAUNCH(1, 256, 0, nullptr, racy_kernel)(out);
  return cudaGetLastError();
}

// A launch with an arbitrary configuration (limits checks).
int dart_emu_selftest_config(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                             unsigned bz, int* out) {
  DART_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, misuse_kernel)(0, nullptr, out);
  return cudaGetLastError();
}

}  // extern "C"
