// topk_indices: the k largest scores of each row, as indices sorted ascending (memory order).
//
// One CTA per row:
//   1. radix select (8 bits per pass, MSB first, early exit) finds the key of the k-th largest
//      value: each pass histograms, into 256 shared-memory bins, the digit of the elements whose
//      higher digits equal the prefix selected so far, then one warp finds the bin holding the
//      k-th element. The histogram is warp-aggregated (__match_any_sync, sm_70+: one atomic per
//      distinct bin per warp), because real DART scores are positive with a narrow exponent
//      range and many ties: per-element atomics would pile onto a few bins and serialise. Only
//      the key bits the element type can set are visited (bf16: 2 passes, fp16: 3, fp32: 4).
//   2. a stable compaction writes, in ascending index order, every index whose key is above the
//      threshold plus the lowest-index `remaining` ones equal to it (ties: the lower index wins).
//      Each thread owns a contiguous chunk of the row; one block-wide exclusive scan of the
//      per-thread (above, equal) counts gives every thread its output positions.
// Keys: scores are converted to fp32 (exact for bf16/fp16), NaN -> -inf, -0 -> +0, then mapped
// to an order-preserving uint32. The row is re-read from global memory each pass (L1/L2
// resident for rows up to a few hundred KB).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace dart {
namespace kernels {

__device__ __forceinline__ uint32_t topk_key(float f) {
  if (f != f) f = __int_as_float(0xff800000);  // NaN counts as -inf
  if (f == 0.0f) f = 0.0f;    // -0 == +0 (a tie, resolved by index)
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Longest row: the index arithmetic (i + BLOCK, N + BLOCK - 1) stays inside int.
constexpr int kTopkMaxN = 1 << 30;

// Shift of the last radix pass: below it every key of an element type is the same function of
// the sign (fp32 bits 15..0 are zero for a bf16 value, bits 12..0 for an fp16 one), so a pass
// there would only count the whole bucket into one bin.
template <typename T>
constexpr int topk_last_shift() {
  return sizeof(T) == 4 ? 0 : std::is_same<T, __nv_bfloat16>::value ? 16 : 8;
}

// Block-wide exclusive scan of two counters. Must be called by all threads of the block.
template <int BLOCK>
__device__ __forceinline__ void block_exclusive_scan2(int a, int b, int& a_ex, int& b_ex,
                                                      int (*warp_tot)[2]) {
  constexpr int kWarps = BLOCK / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  int ia = a, ib = b;
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const int na = __shfl_up_sync(0xffffffffu, ia, off);
    const int nb = __shfl_up_sync(0xffffffffu, ib, off);
    if (lane >= off) {
      ia += na;
      ib += nb;
    }
  }
  if (lane == kWarp - 1) {
    warp_tot[warp][0] = ia;
    warp_tot[warp][1] = ib;
  }
  __syncthreads();
  if (warp == 0) {
    int ta = lane < kWarps ? warp_tot[lane][0] : 0;
    int tb = lane < kWarps ? warp_tot[lane][1] : 0;
    const int sa = ta, sb = tb;
#pragma unroll
    for (int off = 1; off < kWarp; off <<= 1) {
      const int na = __shfl_up_sync(0xffffffffu, ta, off);
      const int nb = __shfl_up_sync(0xffffffffu, tb, off);
      if (lane >= off) {
        ta += na;
        tb += nb;
      }
    }
    if (lane < kWarps) {
      warp_tot[lane][0] = ta - sa;  // exclusive prefix of the warp totals
      warp_tot[lane][1] = tb - sb;
    }
  }
  __syncthreads();
  a_ex = warp_tot[warp][0] + ia - a;
  b_ex = warp_tot[warp][1] + ib - b;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    topk_indices_kernel(const T* __restrict__ scores, int N, int k, int64_t* __restrict__ out) {
  static_assert(BLOCK >= 256 && BLOCK % kWarp == 0 && BLOCK <= 1024, "bad block size");
  __shared__ int hist[256];
  __shared__ int warp_tot[BLOCK / kWarp][2];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_remaining;
  __shared__ int sh_done;

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const T* __restrict__ s = scores + static_cast<int64_t>(blockIdx.x) * N;
  int64_t* __restrict__ o = out + static_cast<int64_t>(blockIdx.x) * k;

  uint32_t prefix = 0, mask = 0;
  int remaining = k;

  // ---- 1. radix select -------------------------------------------------------------------
  const int warp = tid / kWarp;
#pragma unroll 1
  for (int shift = 24; shift >= topk_last_shift<T>(); shift -= 8) {
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
    // `base` is uniform across the warp, so all 32 lanes reach the match together.
    for (int base = warp * kWarp; base < N; base += BLOCK) {
      const int i = base + lane;
      uint32_t bin = 0xffffffffu;  // out of range or outside the selected prefix: no bin
      if (i < N) {
        const uint32_t key = topk_key(to_float<T>(s[i]));
        if ((key & mask) == prefix) bin = (key >> shift) & 0xffu;
      }
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (bin != 0xffffffffu && lane == __ffs(static_cast<int>(peers)) - 1) {
        atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    if (tid < kWarp) {
      // lane l owns bins 255-8l .. 248-8l (descending)
      int c[8];
      int lsum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = hist[255 - (lane * 8 + j)];
        lsum += c[j];
      }
      int incl = lsum;
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      int cum = incl - lsum;  // elements in higher bins
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (cum < remaining && remaining <= cum + c[j]) {  // exactly one (lane, j) matches
          const uint32_t bin = 255u - static_cast<uint32_t>(lane * 8 + j);
          sh_prefix = prefix | (bin << shift);
          sh_remaining = remaining - cum;
          sh_done = (c[j] == remaining - cum) ? 1 : 0;
        }
        cum += c[j];
      }
    }
    __syncthreads();
    prefix = sh_prefix;
    mask |= 0xffu << shift;
    remaining = sh_remaining;
    if (sh_done) break;  // uniform: every element of the bucket is selected
  }

  // ---- 2. stable compaction in index order ------------------------------------------------
  // selected(i) = (key & mask) > prefix, or (key & mask) == prefix and it is among the first
  // `remaining` such elements. Exactly k - remaining elements are above the bucket.
  const int per = (N + BLOCK - 1) / BLOCK;
  const int beg = min(tid * per, N);
  const int end = min(beg + per, N);
  int na = 0, ne = 0;
  for (int i = beg; i < end; ++i) {
    const uint32_t km = topk_key(to_float<T>(s[i])) & mask;
    na += km > prefix;
    ne += km == prefix;
  }
  int a0, e0;
  block_exclusive_scan2<BLOCK>(na, ne, a0, e0, warp_tot);
  for (int i = beg; i < end; ++i) {
    const uint32_t km = topk_key(to_float<T>(s[i])) & mask;
    if (km > prefix) {
      o[a0 + min(e0, remaining)] = i;
      ++a0;
    } else if (km == prefix) {
      if (e0 < remaining) o[a0 + e0] = i;
      ++e0;
    }
  }
}

// Few rows (decode): one big CTA per row for latency; many rows: smaller CTAs, more per SM.
inline int topk_block_size(int64_t rows, int N, int num_sms) {
  return rows <= 2LL * num_sms && N >= 4096 ? 1024 : 256;
}

// scores: [rows, N] contiguous; out: [rows, k] contiguous int64. Requires 1 <= k <= N <= 2^30.
// block: 256 or 1024 threads per row.
template <typename T>
cudaError_t launch_topk_indices_block(const T* scores, int64_t rows, int N, int k, int64_t* out,
                                      int block, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (k < 1 || k > N || N > kTopkMaxN) return cudaErrorInvalidValue;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rows));
  if (block == 1024) {
    DART_LAUNCH(grid, 1024, 0, stream, topk_indices_kernel<T, 1024>)(scores, N, k, out);
  } else if (block == 256) {
    DART_LAUNCH(grid, 256, 0, stream, topk_indices_kernel<T, 256>)(scores, N, k, out);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_topk_indices(const T* scores, int64_t rows, int N, int k, int64_t* out,
                                int num_sms, cudaStream_t stream) {
  return launch_topk_indices_block<T>(scores, rows, N, k, out, topk_block_size(rows, N, num_sms),
                                      stream);
}

}  // namespace kernels
}  // namespace dart
