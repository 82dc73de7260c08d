// Row gather: out[g, s*k + j, :] = srcs[s][idx[g, j], :] for every group g (sequence), source
// s and kept neuron j; with per-group lengths, rows j >= lens[g] are zero (idx not read). One warp per output row, copying in the widest unit (16/8/4/2/1 bytes)
// that every pointer, row stride and the row length are aligned to, four units in flight per
// lane. The copy is dtype-agnostic (bytes). Used by dart::gather_neurons_ and by the prefill
// (GEMM) path of the gathered FFN ops.
#pragma once

#include "common.cuh"

namespace dart {
namespace kernels {

constexpr int kGatherMaxSrcs = 8;
constexpr int kGatherWarpsPerCta = 8;

struct GatherParams {
  const char* src[kGatherMaxSrcs];     // row 0 of each source
  int64_t src_row_stride[kGatherMaxSrcs];  // bytes
  int64_t src_rows[kGatherMaxSrcs];        // N of each source (index range check)
  char* out;                               // row 0 of group 0 of the output
  int64_t out_group_stride;                // bytes between groups
  int64_t out_row_stride;                  // bytes between output rows
  int64_t s_base;                          // index of src[0] among all sources (row block)
  const int64_t* idx;                      // [groups, k] (idx_group_stride = k) or [k] (0)
  int64_t idx_group_stride;
  const int64_t* lens;                     // [groups] (entries used per group) or nullptr (k)
  int64_t k;
  int64_t groups;
  int64_t row_bytes;
  int nsrc;                                // <= kGatherMaxSrcs
};

template <typename U>
__global__ void __launch_bounds__(kGatherWarpsPerCta * kWarp) gather_rows_kernel(GatherParams p) {
  constexpr int kUnroll = 4;
  const int lane = threadIdx.x % kWarp;
  const int64_t nunits = p.row_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t rows_per_group = static_cast<int64_t>(p.nsrc) * p.k;
  const int64_t total_rows = p.groups * rows_per_group;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kGatherWarpsPerCta;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGatherWarpsPerCta + threadIdx.x / kWarp;
       r < total_rows; r += warp_stride) {
    const int64_t g = r / rows_per_group;
    const int64_t rem = r - g * rows_per_group;
    const int s = static_cast<int>(rem / p.k);
    const int64_t j = rem - static_cast<int64_t>(s) * p.k;
    U* __restrict__ dst = reinterpret_cast<U*>(p.out + g * p.out_group_stride +
                                               ((p.s_base + s) * p.k + j) * p.out_row_stride);
    if (p.lens != nullptr && j >= p.lens[g]) {  // padding: a zero row (+0.0 in every dtype)
      for (int64_t i = lane; i < nunits; i += kWarp) dst[i] = U{};
      continue;
    }
    const int64_t row = p.idx[g * p.idx_group_stride + j];
    DART_DEVICE_CHECK(row >= 0 && row < p.src_rows[s],
                      "dart: idx out of range: every index must lie in [0, N)");
    const U* __restrict__ src =
        reinterpret_cast<const U*>(p.src[s] + row * p.src_row_stride[s]);
    for (int64_t base = lane; base < nunits; base += kWarp * kUnroll) {
      U buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kWarp;
        if (i < nunits) buf[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kWarp;
        if (i < nunits) dst[i] = buf[u];
      }
    }
  }
}

// Largest copy unit (bytes) every address / stride / row length is a multiple of.
inline int gather_unit_bytes(const GatherParams& p) {
  uint64_t acc = static_cast<uint64_t>(p.row_bytes) | static_cast<uint64_t>(p.out_row_stride) |
                 static_cast<uint64_t>(p.out_group_stride) |
                 static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p.out));
  for (int s = 0; s < p.nsrc; ++s) {
    acc |= static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p.src[s])) |
           static_cast<uint64_t>(p.src_row_stride[s]);
  }
  for (int u = 16; u > 1; u >>= 1) {
    if ((acc & static_cast<uint64_t>(u - 1)) == 0) return u;
  }
  return 1;
}

inline cudaError_t launch_gather_rows(const GatherParams& p, cudaStream_t stream) {
  const int64_t total_rows = p.groups * p.nsrc * p.k;
  if (total_rows <= 0 || p.row_bytes <= 0) return cudaSuccess;
  if (p.nsrc < 1 || p.nsrc > kGatherMaxSrcs) return cudaErrorInvalidValue;
  int64_t blocks = ceil_div(total_rows, kGatherWarpsPerCta);
  if (blocks > 0x7fffffffLL) blocks = 0x7fffffffLL;  // grid-stride loop covers the rest
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(kGatherWarpsPerCta * kWarp);
  switch (gather_unit_bytes(p)) {
    case 16:
      DART_LAUNCH(grid, block, 0, stream, gather_rows_kernel<uint4>)(p);
      break;
    case 8:
      DART_LAUNCH(grid, block, 0, stream, gather_rows_kernel<uint2>)(p);
      break;
    case 4:
      DART_LAUNCH(grid, block, 0, stream, gather_rows_kernel<uint32_t>)(p);
      break;
    case 2:
      DART_LAUNCH(grid, block, 0, stream, gather_rows_kernel<uint16_t>)(p);
      break;
    default:
      DART_LAUNCH(grid, block, 0, stream, gather_rows_kernel<uint8_t>)(p);
      break;
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dart
