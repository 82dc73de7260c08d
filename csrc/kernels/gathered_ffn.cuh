// Gathered FFN kernels (torch-free): y = sum_j h_j * w_out[idx_j] with
//   GLU: h_j = act(x . w_gate[idx_j]) * (x . w_up[idx_j])
//   MLP: h_j = act(x . w_in[idx_j] + b_in[idx_j])            (+ b_out on y)
//
// Decode path (few tokens per index set, memory-bandwidth bound), two kernels:
//   phase 1  one warp per kept neuron (persistent grid, neurons interleaved across CTAs so the
//            remainder spreads over all SMs): the CTA stages its tokens' x in shared memory,
//            the warp streams the gate (and up) row with 16-byte loads (4 in flight per row per
//            lane), dots them with every token, warp-reduces, applies the activation and writes
//            h[token, j] in fp32 (T*k*4 bytes: negligible next to the weight rows). CTA (0,0)
//            also zeroes the split-K tickets of phase 2 (no memset node needed).
//   phase 2  split-K over the kept neurons: CTA (column tile of 32*VE columns, split, group)
//            streams the down rows of its neuron chunk (one warp-wide 8/16-byte segment per
//            row, 4 rows in flight per warp), accumulates h * row in registers, reduces its 8
//            warps in shared memory in a fixed order, writes its fp32 partial tile; the last
//            CTA of a tile (atomic ticket) sums the partials in split order (deterministic),
//            adds b_out, casts and writes y.
// Prefill path (many tokens): the op glue gathers the kept rows with gather_rows.cuh and runs
// cuBLAS GEMMs; the small elementwise kernels for the activation are at the end of this file.
#pragma once

#include "common.cuh"

namespace dart {
namespace kernels {

constexpr int kFfnThreads = 256;
constexpr int kFfnWarps = kFfnThreads / kWarp;
constexpr int kDecodeMaxTokens = 16;  // tokens sharing one index set, per CTA

struct FfnParams {
  const void* x;  // [G*Mc, d] contiguous
  const void* w1;  // gate (GLU) / in (MLP): [N, d] rows, last-dim stride 1
  int64_t w1_stride;  // elements between rows
  const void* w2;  // up (GLU only)
  int64_t w2_stride;
  const void* wo;  // down_t / out_t: [N, d]
  int64_t wo_stride;
  const void* b1;  // [N] or nullptr (MLP only)
  const void* bo;  // [d] or nullptr (MLP only)
  const int64_t* idx;  // group g uses idx[g * idx_group_stride + j], j < k
  int64_t idx_group_stride;
  void* y;  // [G*Mc, d] contiguous
  int64_t N, d, k;
  int G, Mc;  // groups (sequences with their own index set) and tokens per group
  Act act;
  // workspace (see FfnPlan)
  float* h;  // [G*Mc, k]
  float* partial;  // [splits, G*Mc, d] (splits > 1)
  int* counters;  // [G, ntiles] (splits > 1)
  int splits, ntiles;
};

struct FfnPlan {
  bool ok = false;  // false: use the GEMM path
  bool vec = false;  // 16-byte vector path (else element-wise fallback)
  int maxt = 0;  // compile-time token bound (1, 2, 4, 8, 16)
  int ve2 = 1;  // elements per lane per row in phase 2
  size_t smem1 = 0;  // dynamic shared memory of phase 1
  int splits = 1, ntiles = 1;
  size_t h_off = 0, partial_off = 0, counters_off = 0, ws_bytes = 0;
};

// ---------------------------------------------------------------------------------------------
// Phase 1: h[g*Mc + t, j] = act(x_t . w1[idx_j] (+ b1)) (* x_t . w2[idx_j])
// ---------------------------------------------------------------------------------------------
template <typename T, bool GLU, int MAXT, int VE>
__global__ void __launch_bounds__(kFfnThreads, 2) ffn_phase1_kernel(FfnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  constexpr int U = MAXT >= 16 ? 2 : 4;  // rows in flight per lane (x2 for GLU); 2 avoids spills
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int g = blockIdx.y;
  const int Mc = p.Mc;
  const int64_t d = p.d;
  const int64_t k = p.k;

  if (p.counters != nullptr && blockIdx.x == 0 && blockIdx.y == 0) {
    const int n = p.G * p.ntiles;
    for (int i = tid; i < n; i += kFfnThreads) p.counters[i] = 0;
  }

  // stage x of this group's tokens: [Mc, d]
  {
    const T* xg = static_cast<const T*>(p.x) + static_cast<int64_t>(g) * Mc * d;
    const int64_t nv = static_cast<int64_t>(Mc) * d / VE;
    for (int64_t i = tid; i < nv; i += kFfnThreads) {
      *reinterpret_cast<Vec<T, VE>*>(xs + i * VE) = load_vec<T, VE>(xg + i * VE);
    }
  }
  __syncthreads();

  const T* __restrict__ w1 = static_cast<const T*>(p.w1);
  const T* __restrict__ w2 = static_cast<const T*>(p.w2);
  const T* __restrict__ b1 = static_cast<const T*>(p.b1);
  const int64_t* __restrict__ idxg = p.idx + static_cast<int64_t>(g) * p.idx_group_stride;
  float* __restrict__ hg = p.h + static_cast<int64_t>(g) * Mc * k;
  const int64_t nvec = d / VE;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kFfnWarps;

  for (int64_t j = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x; j < k; j += warp_stride) {
    const int64_t row = __ldg(idxg + j);
    DART_DEVICE_CHECK(row >= 0 && row < p.N,
                      "dart::gathered_glu_ffn/gathered_mlp: idx out of range [0, N)");
    const T* r1 = w1 + row * p.w1_stride;
    const T* r2 = GLU ? (w2 + row * p.w2_stride) : nullptr;
    float a1[MAXT], a2[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      a1[t] = 0.0f;
      a2[t] = 0.0f;
    }
    for (int64_t v0 = lane; v0 < nvec; v0 += kWarp * U) {
      Vec<T, VE> g1[U], g2[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + u * kWarp;
        if (v < nvec) {
          g1[u] = load_stream<T, VE>(r1 + v * VE);
          if constexpr (GLU) g2[u] = load_stream<T, VE>(r2 + v * VE);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + u * kWarp;
        if (v < nvec) {
          float f1[VE], f2[VE];
          vec_to_float<T, VE>(g1[u], f1);
          if constexpr (GLU) vec_to_float<T, VE>(g2[u], f2);
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            if (t < Mc) {
              float xf[VE];
              vec_to_float<T, VE>(load_vec<T, VE>(xs + t * d + v * VE), xf);
#pragma unroll
              for (int e = 0; e < VE; ++e) {
                a1[t] = fmaf(xf[e], f1[e], a1[t]);
                if constexpr (GLU) a2[t] = fmaf(xf[e], f2[e], a2[t]);
              }
            }
          }
        }
      }
    }
    const float bias = (!GLU && b1 != nullptr) ? to_float<T>(b1[row]) : 0.0f;
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t < Mc) {  // uniform across the warp
        const float s1 = warp_allreduce_sum(a1[t]);
        float hv;
        if constexpr (GLU) {
          const float s2 = warp_allreduce_sum(a2[t]);
          hv = act_apply(p.act, s1) * s2;
        } else {
          hv = act_apply(p.act, s1 + bias);
        }
        if (lane == (t % kWarp)) hg[static_cast<int64_t>(t) * k + j] = hv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: y[g*Mc + t, c] = sum_j h[g*Mc + t, j] * wo[idx_j, c] (+ bo[c]), split-K over j.
// ---------------------------------------------------------------------------------------------
template <typename T, int MAXT, int VE>
__global__ void __launch_bounds__(kFfnThreads, 2) ffn_phase2_kernel(FfnParams p) {
  constexpr int TILE = kWarp * VE;
  constexpr int U = MAXT * VE >= 64 ? 2 : 4;  // rows in flight per warp; 2 avoids spills
  __shared__ float red[MAXT * TILE];
  __shared__ int sh_last;

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int g = blockIdx.z;
  const int Mc = p.Mc;
  const int64_t d = p.d;
  const int64_t k = p.k;
  const int64_t c0 = static_cast<int64_t>(tile) * TILE;
  const int64_t col = c0 + lane * VE;
  const bool col_ok = col < d;  // d % VE == 0 on the vector path

  const int64_t chunk = (k + p.splits - 1) / p.splits;
  const int64_t j0 = static_cast<int64_t>(split) * chunk;
  const int64_t j1 = j0 + chunk < k ? j0 + chunk : k;

  const T* __restrict__ wo = static_cast<const T*>(p.wo);
  const int64_t* __restrict__ idxg = p.idx + static_cast<int64_t>(g) * p.idx_group_stride;
  const float* __restrict__ hg = p.h + static_cast<int64_t>(g) * Mc * k;

  float acc[MAXT][VE];
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[t][e] = 0.0f;

  if (col_ok) {
    for (int64_t jb = j0 + warp; jb < j1; jb += kFfnWarps * U) {
      int64_t rows[U];
      Vec<T, VE> w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = jb + u * kFfnWarps;
        rows[u] = 0;
        if (j < j1) {
          rows[u] = __ldg(idxg + j);
          DART_DEVICE_CHECK(rows[u] >= 0 && rows[u] < p.N,
                            "dart::gathered_glu_ffn/gathered_mlp: idx out of range [0, N)");
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = jb + u * kFfnWarps;
        if (j < j1) w[u] = load_stream<T, VE>(wo + rows[u] * p.wo_stride + col);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = jb + u * kFfnWarps;
        if (j < j1) {
          float wf[VE];
          vec_to_float<T, VE>(w[u], wf);
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            if (t < Mc) {
              const float hv = __ldg(hg + static_cast<int64_t>(t) * k + j);
#pragma unroll
              for (int e = 0; e < VE; ++e) acc[t][e] = fmaf(hv, wf[e], acc[t][e]);
            }
          }
        }
      }
    }
  }

  // deterministic intra-CTA reduction: warps add into `red` one after the other
  for (int w = 0; w < kFfnWarps; ++w) {
    if (warp == w && col_ok) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t < Mc) {
#pragma unroll
          for (int e = 0; e < VE; ++e) {
            float& r = red[t * TILE + lane * VE + e];
            r = (w == 0 ? 0.0f : r) + acc[t][e];
          }
        }
      }
    }
    __syncthreads();
  }

  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bo = static_cast<const T*>(p.bo);
  const int64_t row0 = static_cast<int64_t>(g) * Mc;
  const int n_out = Mc * TILE;

  if (p.splits == 1) {
    for (int i = tid; i < n_out; i += kFfnThreads) {
      const int t = i / TILE;
      const int64_t c = c0 + (i - t * TILE);
      if (c < d) {
        const float v = red[i] + (bo != nullptr ? to_float<T>(bo[c]) : 0.0f);
        y[(row0 + t) * d + c] = from_float<T>(v);
      }
    }
    return;
  }

  const int64_t rows_total = static_cast<int64_t>(p.G) * Mc;
  for (int i = tid; i < n_out; i += kFfnThreads) {
    const int t = i / TILE;
    const int64_t c = c0 + (i - t * TILE);
    if (c < d) __stcg(p.partial + (split * rows_total + row0 + t) * d + c, red[i]);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(p.counters + static_cast<int64_t>(g) * p.ntiles + tile, 1);
    sh_last = (prev == p.splits - 1) ? 1 : 0;
  }
  __syncthreads();
  if (!sh_last) return;
  __threadfence();
  for (int i = tid; i < n_out; i += kFfnThreads) {
    const int t = i / TILE;
    const int64_t c = c0 + (i - t * TILE);
    if (c < d) {
      float v = 0.0f;
      for (int s = 0; s < p.splits; ++s) {
        v += __ldcg(p.partial + (static_cast<int64_t>(s) * rows_total + row0 + t) * d + c);
      }
      if (bo != nullptr) v += to_float<T>(bo[c]);
      y[(row0 + t) * d + c] = from_float<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: plan + launch of the decode path.
// ---------------------------------------------------------------------------------------------
inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// `vec_ok`: x, y, every weight/bias pointer and every row stride are 16-byte aligned and
// d * sizeof(T) % 16 == 0 (the caller checks; otherwise the element-wise fallback runs).
// `max_smem`: the largest dynamic shared memory a CTA may opt into on this device.
template <typename T>
FfnPlan plan_ffn_decode(int G, int Mc, int64_t d, int64_t k, bool vec_ok, int num_sms,
                        size_t max_smem) {
  FfnPlan plan;
  if (G < 1 || G > 65535 || Mc < 1 || Mc > kDecodeMaxTokens || d < 1 || k < 1) return plan;
  const size_t smem1 = static_cast<size_t>(Mc) * static_cast<size_t>(d) * sizeof(T);
  const size_t smem_cap = max_smem < (200u << 10) ? max_smem : (200u << 10);
  if (smem1 > smem_cap) return plan;
  plan.ok = true;
  plan.vec = vec_ok;
  plan.smem1 = smem1;
  if (!vec_ok) {
    plan.maxt = kDecodeMaxTokens;
    plan.ve2 = 1;
  } else {
    plan.maxt = Mc <= 1 ? 1 : Mc <= 2 ? 2 : Mc <= 4 ? 4 : Mc <= 8 ? 8 : 16;
    const int ve_max = static_cast<int>(16 / sizeof(T));
    const int ve_acc = 64 / plan.maxt;
    plan.ve2 = ve_max < ve_acc ? ve_max : ve_acc;
  }
  const int64_t tile = static_cast<int64_t>(kWarp) * plan.ve2;
  plan.ntiles = static_cast<int>(ceil_div(d, tile));
  // split-K: fill ~4 CTAs per SM, keep >= 64 neurons per split and the partial traffic
  // (2 * splits * Mc * d * 4 bytes) under 1/8 of the down rows' bytes (k * d * sizeof(T)).
  int64_t splits = ceil_div(4LL * num_sms, static_cast<int64_t>(plan.ntiles) * G);
  const int64_t by_chunk = k / 64;
  const int64_t by_traffic = static_cast<int64_t>(k * sizeof(T)) / (64LL * Mc);
  if (splits > by_chunk) splits = by_chunk;
  if (splits > by_traffic) splits = by_traffic;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  plan.splits = static_cast<int>(splits);

  const size_t rows = static_cast<size_t>(G) * Mc;
  size_t off = 0;
  plan.h_off = off;
  off = align_up(off + rows * static_cast<size_t>(k) * sizeof(float), 256);
  plan.partial_off = off;
  if (plan.splits > 1) {
    off = align_up(off + plan.splits * rows * static_cast<size_t>(d) * sizeof(float), 256);
  }
  plan.counters_off = off;
  if (plan.splits > 1) off = align_up(off + static_cast<size_t>(G) * plan.ntiles * sizeof(int), 256);
  plan.ws_bytes = off;
  return plan;
}

template <typename T, bool GLU, int MAXT, int VE1, int VE2>
cudaError_t launch_ffn_decode_impl(FfnParams p, const FfnPlan& plan, int num_sms,
                                   cudaStream_t stream) {
  auto k1 = ffn_phase1_kernel<T, GLU, MAXT, VE1>;
  auto k2 = ffn_phase2_kernel<T, MAXT, VE2>;
  cudaError_t err;
  if (plan.smem1 > (48u << 10)) {
    err = cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.smem1));
    if (err != cudaSuccess) return err;
  }
  int occ = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, k1, kFfnThreads, plan.smem1);
  if (err != cudaSuccess) return err;
  if (occ < 1) occ = 1;
  int64_t gx = ceil_div(static_cast<int64_t>(num_sms) * occ, p.G);
  const int64_t gmax = ceil_div(p.k, kFfnWarps);
  if (gx > gmax) gx = gmax;
  if (gx < 1) gx = 1;
  k1<<<dim3(static_cast<unsigned>(gx), p.G), kFfnThreads, plan.smem1, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  k2<<<dim3(p.ntiles, p.splits, p.G), kFfnThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// p.h / p.partial / p.counters must point into a workspace of plan.ws_bytes bytes (offsets in
// the plan); p.splits / p.ntiles are filled here.
template <typename T, bool GLU>
cudaError_t launch_ffn_decode(FfnParams p, const FfnPlan& plan, int num_sms,
                              cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
  p.splits = plan.splits;
  p.ntiles = plan.ntiles;
  if (plan.splits == 1) {
    p.partial = nullptr;
    p.counters = nullptr;
  }
  constexpr int V = static_cast<int>(16 / sizeof(T));
  constexpr int V16 = V < 4 ? V : 4;  // 64 accumulators at MAXT = 16
  if (!plan.vec) return launch_ffn_decode_impl<T, GLU, kDecodeMaxTokens, 1, 1>(p, plan, num_sms, stream);
  switch (plan.maxt) {
    case 1:
      return launch_ffn_decode_impl<T, GLU, 1, V, V>(p, plan, num_sms, stream);
    case 2:
      return launch_ffn_decode_impl<T, GLU, 2, V, V>(p, plan, num_sms, stream);
    case 4:
      return launch_ffn_decode_impl<T, GLU, 4, V, V>(p, plan, num_sms, stream);
    case 8:
      return launch_ffn_decode_impl<T, GLU, 8, V, V>(p, plan, num_sms, stream);
    default:
      return launch_ffn_decode_impl<T, GLU, 16, V, V16>(p, plan, num_sms, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill helpers (elementwise, fp32 math).
// ---------------------------------------------------------------------------------------------

// h[r, j] = act(gu[r, j]) * gu[r, k + j]; gu rows have stride gu_stride (>= 2k), h is [rows, k].
template <typename T>
__global__ void glu_act_mul_kernel(const T* __restrict__ gu, int64_t gu_stride,
                                   T* __restrict__ h, int64_t rows, int64_t k, Act act) {
  const int64_t n = rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    const float a = to_float<T>(gu[r * gu_stride + j]);
    const float b = to_float<T>(gu[r * gu_stride + k + j]);
    h[i] = from_float<T>(act_apply(act, a) * b);
  }
}

// pre[r, j] = act(pre[r, j] + b1[idx[g, j]]) in place, g = r / rows_per_group; b1 may be null.
template <typename T>
__global__ void mlp_bias_act_kernel(T* __restrict__ pre, int64_t rows, int64_t k,
                                    const T* __restrict__ b1, const int64_t* __restrict__ idx,
                                    int64_t idx_group_stride, int64_t rows_per_group, int64_t N,
                                    Act act) {
  const int64_t n = rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    float v = to_float<T>(pre[i]);
    if (b1 != nullptr) {
      const int64_t row = idx[(r / rows_per_group) * idx_group_stride + j];
      DART_DEVICE_CHECK(row >= 0 && row < N, "dart::gathered_mlp: idx out of range [0, N)");
      v += to_float<T>(b1[row]);
    }
    pre[i] = from_float<T>(act_apply(act, v));
  }
}

inline unsigned elementwise_blocks(int64_t n, int num_sms) {
  int64_t b = ceil_div(n, 256);
  const int64_t cap = static_cast<int64_t>(num_sms) * 16;
  if (b > cap) b = cap;
  if (b < 1) b = 1;
  return static_cast<unsigned>(b);
}

template <typename T>
cudaError_t launch_glu_act_mul(const T* gu, int64_t gu_stride, T* h, int64_t rows, int64_t k,
                               Act act, int num_sms, cudaStream_t stream) {
  if (rows * k <= 0) return cudaSuccess;
  glu_act_mul_kernel<T><<<elementwise_blocks(rows * k, num_sms), 256, 0, stream>>>(
      gu, gu_stride, h, rows, k, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mlp_bias_act(T* pre, int64_t rows, int64_t k, const T* b1, const int64_t* idx,
                                int64_t idx_group_stride, int64_t rows_per_group, int64_t N,
                                Act act, int num_sms, cudaStream_t stream) {
  if (rows * k <= 0) return cudaSuccess;
  mlp_bias_act_kernel<T><<<elementwise_blocks(rows * k, num_sms), 256, 0, stream>>>(
      pre, rows, k, b1, idx, idx_group_stride, rows_per_group, N, act);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dart
