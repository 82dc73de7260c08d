// Per-token sparse GLU FFN kernels (torch-free), the decode path of the two ops whose contract and
// reference are dart_ext/per_token.py (issue 26). Weights are x's dtype T; math in fp32.
//
//   gate_first_glu_ffn: per token t, for every neuron i: a = act(w_gate_i . x_t); neuron i is kept
//     for t when |a| * scale_i >= threshold; only then u = w_up_i . x_t and y_t += a u w_down_t_i.
//     Kernels: pt_gate_kernel (one warp per neuron: the gate dot for the call's tokens, the
//     threshold, the up dot only when some token keeps the neuron, h[t, i] = a u or 0, the
//     neuron's flag = kept by any token, kept[t, i] per token), then pt_rows_kernel over w_down_t
//     (the rows whose flag is set), then pt_count_kernel (read[t] = N d + 2 d |kept_t|).
//   input_sparse_glu_ffn: per token t, the columns j with |x_tj| >= x_threshold; g = W_gate[:, J]
//     x_J and u = W_up[:, J] x_J read only those columns, so the kernels take gate and up stored
//     INPUT-major (w_gate_t, w_up_t [d, N]: a kept column is one contiguous row); h = act(g) u;
//     the down projection reads only the rows with |h_i| >= h_threshold.
//     Kernels: pt_mask_kernel over x (coefficients x_tj or 0, per-column flags), pt_rows_kernel
//     over w_gate_t and over w_up_t (fp32 g and u), pt_mask_kernel over h (after the activation
//     product), pt_rows_kernel over w_down_t, pt_count_kernel (read[t] = 2 N |J_t| + d |K_t|).
// pt_rows_kernel: out[t, c] = sum over rows r with flag[r] of coef[t, r] * W[r, c] (+ bias[c]),
// split-K over the rows without float atomics (fixed-order sums: the last CTA of a column tile,
// by atomic ticket, adds the splits in split order), so the result never depends on CTA order.
// A row flagged for one token is read once for all the call's tokens; tokens that did not keep it
// add an exact 0 (their coefficient is 0), so each token's result equals its own computation.
// `read` counts each token's own entries, as the reference does.
// `unite` (the ops' policy "union"): one kept set for all the call's tokens, the union of their
// choices; every token is computed over it with its own values (no zero coefficients) and counts
// the union's entries. Thresholds are floats, or (threshold_ptr non-null) read from device
// memory by the kernels, so the glue never syncs to read a threshold tensor.
#pragma once

#include "gathered_ffn.cuh"

namespace dart {
namespace kernels {

constexpr int kPtThreads = 256;
constexpr int kPtWarps = kPtThreads / kWarp;
constexpr int kPtMaxTokens = 8;  // tokens per launch (the glue loops over chunks of tokens)
constexpr int kPtMinChunk = 64;  // pt_rows_kernel: fewest rows per split

// ---------------------------------------------------------------------------------------------
// Gate-first phase 1.
// ---------------------------------------------------------------------------------------------
struct PtGateParams {
  const void* x;  // [M, d] T
  const void* w_gate;  // [N, d] T rows, row stride w_stride
  const void* w_up;
  int64_t w_stride;
  const float* scale;  // [N] fp32
  float threshold;
  const float* threshold_ptr;  // non-null: the threshold is *threshold_ptr (device memory)
  bool unite;  // policy union: every token over the union of the tokens' kept neurons
  int64_t N, d;
  int M;
  Act act;
  float* h;  // [M, N] fp32 (0 where not kept)
  uint8_t* flag;  // [N]: kept by any token
  uint8_t* kept;  // [M, N]: kept by token t
  int* zero_counters;  // zeroed by CTA 0 (the tickets of the launches that follow), or null
  int nzero;
};

// Lane's partial dot of one row with the staged tokens: VE elements per load.
template <typename T, int MAXT, int VE>
__device__ __forceinline__ void pt_row_dot(const T* __restrict__ row, const float* s_x, int M,
                                           int64_t d, float (&acc)[MAXT]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.0f;
  for (int64_t c = static_cast<int64_t>(lane) * VE; c < d; c += kWarp * VE) {
    const Vec<T, VE> w = load_stream<T, VE>(row + c);
    float wf[VE];
    vec_to_float<T, VE>(w, wf);
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= M) break;
#pragma unroll
      for (int e = 0; e < VE; ++e) acc[t] = fmaf(wf[e], s_x[t * d + c + e], acc[t]);
    }
  }
}

template <typename T, int MAXT, int VE>
__global__ void __launch_bounds__(kPtThreads) pt_gate_kernel(PtGateParams p) {
  DART_DYNAMIC_SMEM(float, s_x);  // [M, d] fp32
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int M = p.M;
  const int64_t d = p.d;
  if (blockIdx.x == 0 && p.zero_counters != nullptr) {
    for (int i = threadIdx.x; i < p.nzero; i += kPtThreads) p.zero_counters[i] = 0;
  }
  const T* __restrict__ x = static_cast<const T*>(p.x);
  for (int64_t i = threadIdx.x; i < M * d; i += kPtThreads) s_x[i] = to_float<T>(x[i]);
  __syncthreads();
  const T* __restrict__ wg = static_cast<const T*>(p.w_gate);
  const T* __restrict__ wu = static_cast<const T*>(p.w_up);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kPtWarps + warp; i < p.N;
       i += static_cast<int64_t>(gridDim.x) * kPtWarps) {
    float a[MAXT];
    pt_row_dot<T, MAXT, VE>(wg + i * p.w_stride, s_x, M, d, a);
    bool keep[MAXT];
    bool any = false;
    const float sc = p.scale[i];
    const float thr = p.threshold_ptr != nullptr ? *p.threshold_ptr : p.threshold;
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      keep[t] = false;
      if (t >= M) break;  // M is uniform: every lane reaches the shuffles
      a[t] = act_apply(p.act, warp_allreduce_sum(a[t]));
      keep[t] = fabsf(a[t]) * sc >= thr;  // NaN scores are never kept (as the reference)
      any = any || keep[t];
    }
    float u[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) u[t] = 0.0f;
    if (any) {  // warp-uniform: every lane holds the reduced values
      pt_row_dot<T, MAXT, VE>(wu + i * p.w_stride, s_x, M, d, u);
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= M) break;
        u[t] = warp_allreduce_sum(u[t]);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= M) break;
        const bool k = p.unite ? any : keep[t];
        p.h[t * p.N + i] = k ? a[t] * u[t] : 0.0f;
        p.kept[t * p.N + i] = k ? 1 : 0;
      }
      p.flag[i] = any ? 1 : 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Masks (input-sparse): coef[t, j] = keep ? v : 0 with keep = |v| >= threshold, per column flag.
// v = x[t, j] (T, mode 0) or v = act(g[t, j]) * u[t, j] (fp32 g, u: mode 1).
// ---------------------------------------------------------------------------------------------
struct PtMaskParams {
  const void* x;  // mode 0: [M, R] T
  const float* g;  // mode 1: [M, R]
  const float* u;
  float threshold;
  const float* threshold_ptr;  // non-null: the threshold is *threshold_ptr (device memory)
  bool unite;  // policy union: every token keeps the columns any token keeps
  int64_t R;
  int M;
  Act act;
  float* coef;  // [M, R]
  uint8_t* flag;  // [R]
  uint8_t* kept;  // [M, R]
  int* zero_counters;
  int nzero;
};

template <typename T, int MODE>
__global__ void pt_mask_kernel(PtMaskParams p) {
  if (blockIdx.x == 0 && p.zero_counters != nullptr) {
    for (int i = threadIdx.x; i < p.nzero; i += blockDim.x) p.zero_counters[i] = 0;
  }
  const float thr = p.threshold_ptr != nullptr ? *p.threshold_ptr : p.threshold;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < p.R;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    auto value = [&](int t) -> float {
      if constexpr (MODE == 0) {
        return to_float<T>(static_cast<const T*>(p.x)[t * p.R + j]);
      } else {
        return act_apply(p.act, p.g[t * p.R + j]) * p.u[t * p.R + j];
      }
    };
    bool any = false;
    if (p.unite) {
      for (int t = 0; t < p.M && !any; ++t) any = fabsf(value(t)) >= thr;
    }
    for (int t = 0; t < p.M; ++t) {
      const float v = value(t);
      const bool keep = p.unite ? any : fabsf(v) >= thr;
      p.coef[t * p.R + j] = keep ? v : 0.0f;
      p.kept[t * p.R + j] = keep ? 1 : 0;
      any = any || keep;
    }
    p.flag[j] = any ? 1 : 0;
  }
}

// read[t] = base + per1 * |kept1[t, :]| + per2 * |kept2[t, :]| (kept2 may be null), counted in
// 64-bit integers and rounded to fp32 once, as the reference rounds its exact count; one CTA per
// token, a fixed-order tree. (A template so that including this header in several translation
// units defines it once.)
template <int kUnused = 0>
__global__ void pt_count_kernel(const uint8_t* __restrict__ kept1, int64_t R1, long long per1,
                                const uint8_t* __restrict__ kept2, int64_t R2, long long per2,
                                long long base, float* __restrict__ read) {
  __shared__ long long s_sum[kPtThreads];
  const int t = blockIdx.x;
  long long n = 0;
  for (int64_t j = threadIdx.x; j < R1; j += kPtThreads) n += per1 * kept1[t * R1 + j];
  if (kept2 != nullptr) {
    for (int64_t j = threadIdx.x; j < R2; j += kPtThreads) n += per2 * kept2[t * R2 + j];
  }
  s_sum[threadIdx.x] = n;
  for (int half = kPtThreads / 2; half >= 1; half /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < half) s_sum[threadIdx.x] += s_sum[threadIdx.x + half];
  }
  __syncthreads();
  if (threadIdx.x == 0) read[t] = static_cast<float>(base + s_sum[0]);
}

// ---------------------------------------------------------------------------------------------
// Flagged-row accumulation: out[t, c] = sum_{r < R, flag[r]} coef[t, r] * W[r, c] (+ bias[c]).
// ---------------------------------------------------------------------------------------------
struct PtRowsParams {
  const void* w;  // [R, C] T, row stride w_stride
  int64_t w_stride;
  int64_t R, C;
  const float* coef;  // [M, R]
  const uint8_t* flag;  // [R]
  int M;
  const void* bias;  // [C] T or null
  void* out;  // [M, C]: T (out_float false) or fp32
  bool out_float;
  float* partial;  // [splits, ntiles, M, tile]
  int* counters;  // [ntiles] (zeroed by an earlier kernel of the launch sequence)
  int splits, ntiles;
  int64_t chunk;
};

template <typename T, int MAXT, int VE>
__global__ void __launch_bounds__(kPtThreads) pt_rows_kernel(PtRowsParams p) {
  constexpr int TILE = kWarp * VE;
  constexpr int U = 4;  // rows in flight per warp
  static_assert(MAXT * VE <= 32, "MAXT * VE accumulators per lane");
  __shared__ __align__(16) float s_red[kPtWarps * MAXT * TILE];
  __shared__ int s_last;
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int M = p.M;
  const int64_t C = p.C;
  const int64_t R = p.R;
  const int64_t c0 = static_cast<int64_t>(tile) * TILE;
  const int64_t col = c0 + lane * VE;
  const bool col_ok = col < C;  // C % VE == 0 on the vector path
  const int64_t j0 = static_cast<int64_t>(split) * p.chunk;
  const int64_t j1 = j0 + p.chunk < R ? j0 + p.chunk : R;
  const T* __restrict__ w = static_cast<const T*>(p.w);

  float acc[MAXT][VE];
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[t][e] = 0.0f;

  for (int64_t rb = j0 + warp; rb < j1; rb += static_cast<int64_t>(kPtWarps) * U) {
    Vec<T, VE> v[U];
    bool on[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t r = rb + static_cast<int64_t>(u) * kPtWarps;
      on[u] = r < j1 && p.flag[r] != 0;  // the same for every lane of the warp
      if (on[u] && col_ok) v[u] = load_stream<T, VE>(w + r * p.w_stride + col);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!on[u] || !col_ok) continue;
      const int64_t r = rb + static_cast<int64_t>(u) * kPtWarps;
      float wf[VE];
      vec_to_float<T, VE>(v[u], wf);
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= M) break;
        const float cf = p.coef[t * R + r];
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[t][e] = fmaf(cf, wf[e], acc[t][e]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int e = 0; e < VE; ++e) s_red[(warp * MAXT + t) * TILE + lane * VE + e] = acc[t][e];
  __syncthreads();

  constexpr int kPerThread = (MAXT * TILE + kPtThreads - 1) / kPtThreads;
  const int tile_floats = M * TILE;
  float sums[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kPtThreads;
    float s = 0.0f;
    if (e < tile_floats) {
#pragma unroll
      for (int wp = 0; wp < kPtWarps; ++wp) s += s_red[(wp * MAXT + e / TILE) * TILE + e % TILE];
    }
    sums[i] = s;
  }
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  auto store = [&](int e, float v) {
    const int64_t c = c0 + e % TILE;
    if (c >= C) return;
    const int64_t t = e / TILE;
    if (bias != nullptr) v += to_float<T>(bias[c]);
    if (p.out_float) {
      static_cast<float*>(p.out)[t * C + c] = v;
    } else {
      static_cast<T*>(p.out)[t * C + c] = from_float<T>(v);
    }
  };
  if (p.splits == 1) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kPtThreads;
      if (e < tile_floats) store(e, sums[i]);
    }
    return;
  }
  float* const tile_base = p.partial + static_cast<int64_t>(tile) * tile_floats;
  const int64_t split_stride = static_cast<int64_t>(p.ntiles) * tile_floats;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kPtThreads;
    if (e < tile_floats) __stcg(tile_base + split * split_stride + e, sums[i]);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(p.counters + tile, 1) == p.splits - 1 ? 1 : 0;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kPtThreads;
    if (e >= tile_floats) continue;
    float s = 0.0f;
    for (int sp = 0; sp < p.splits; ++sp) s += __ldcg(tile_base + sp * split_stride + e);
    store(e, s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
struct PtRowsPlan {
  int ve = 1, maxt = 1, splits = 1, ntiles = 1;
  int64_t chunk = 0;
  size_t partial_floats = 0;  // workspace of the partials
};

// `vec_ok`: W's pointer and row stride 16-byte aligned and C * sizeof(T) % 16 == 0.
template <typename T>
PtRowsPlan plan_pt_rows(int64_t R, int64_t C, int M, bool vec_ok, int num_sms, int64_t splits) {
  PtRowsPlan plan;
  plan.maxt = M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8;
  const int full = static_cast<int>(16 / sizeof(T));
  const int fit = 32 / plan.maxt;
  plan.ve = !vec_ok ? 1 : (full < fit ? full : fit);
  plan.ntiles = static_cast<int>(ceil_div(C, static_cast<int64_t>(kWarp) * plan.ve));
  if (splits <= 0) splits = ceil_div(4LL * num_sms, plan.ntiles);  // two waves of 2 CTAs / SM
  const int64_t max_splits = R / kPtMinChunk;
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  plan.chunk = splits <= 1 ? R : ceil_div(ceil_div(R, splits), kPtWarps) * kPtWarps;
  plan.splits = static_cast<int>(R > 0 ? ceil_div(R, plan.chunk) : 1);
  plan.partial_floats = plan.splits > 1 ? static_cast<size_t>(plan.splits) * plan.ntiles * M *
                                              kWarp * plan.ve
                                        : 0;
  return plan;
}

template <typename T, int MAXT, int VE>
cudaError_t launch_pt_rows_impl(const PtRowsParams& p, cudaStream_t stream) {
  DART_LAUNCH(dim3(p.ntiles, p.splits), kPtThreads, 0, stream, pt_rows_kernel<T, MAXT, VE>)(p);
  return cudaGetLastError();
}

// p.partial / p.counters point at plan.partial_floats floats / plan.ntiles ints (the counters
// zeroed by an earlier kernel of the same stream); the plan's fields are copied into p here.
template <typename T>
cudaError_t launch_pt_rows(PtRowsParams p, const PtRowsPlan& plan, cudaStream_t stream) {
  if (p.M < 1 || p.M > kPtMaxTokens) return cudaErrorInvalidValue;
  p.splits = plan.splits;
  p.ntiles = plan.ntiles;
  p.chunk = plan.chunk;
  constexpr int V = static_cast<int>(16 / sizeof(T));  // 4 (fp32) or 8: MAXT <= 4 keeps all V
  if (plan.ve == 1) {
    switch (plan.maxt) {
      case 1:
        return launch_pt_rows_impl<T, 1, 1>(p, stream);
      case 2:
        return launch_pt_rows_impl<T, 2, 1>(p, stream);
      case 4:
        return launch_pt_rows_impl<T, 4, 1>(p, stream);
      default:
        return launch_pt_rows_impl<T, 8, 1>(p, stream);
    }
  }
  switch (plan.maxt) {
    case 1:
      return launch_pt_rows_impl<T, 1, V>(p, stream);
    case 2:
      return launch_pt_rows_impl<T, 2, V>(p, stream);
    case 4:
      return launch_pt_rows_impl<T, 4, V>(p, stream);
    default:
      return launch_pt_rows_impl<T, 8, 4>(p, stream);
  }
}

template <typename T, int MAXT, int VE>
cudaError_t launch_pt_gate_impl(const PtGateParams& p, int num_sms, cudaStream_t stream) {
  auto k1 = pt_gate_kernel<T, MAXT, VE>;
  const size_t smem = static_cast<size_t>(p.M) * p.d * sizeof(float);
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (err != cudaSuccess) return err;
  const size_t cap = optin < (200 << 10) ? static_cast<size_t>(optin) : (200u << 10);
  if (smem > cap) return cudaErrorInvalidValue;  // the glue runs fewer tokens per launch
  int occ = 0;
  err = cached_occupancy(k1, smem, cap, &occ);
  if (err != cudaSuccess) return err;
  int64_t gx = static_cast<int64_t>(num_sms) * occ;
  const int64_t gmax = ceil_div(p.N, kPtWarps);
  if (gx > gmax) gx = gmax;
  if (gx < 1) gx = 1;
  DART_LAUNCH(dim3(static_cast<unsigned>(gx)), kPtThreads, smem, stream, k1)(p);
  return cudaGetLastError();
}

// `vec_ok`: the weights' pointers and row stride 16-byte aligned and d * sizeof(T) % 16 == 0.
template <typename T>
cudaError_t launch_pt_gate(const PtGateParams& p, bool vec_ok, int num_sms, cudaStream_t stream) {
  if (p.M < 1 || p.M > kPtMaxTokens || p.d < 1) return cudaErrorInvalidValue;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int maxt = p.M <= 1 ? 1 : p.M <= 2 ? 2 : p.M <= 4 ? 4 : 8;
  if (!vec_ok) {
    return maxt == 1   ? launch_pt_gate_impl<T, 1, 1>(p, num_sms, stream)
           : maxt == 2 ? launch_pt_gate_impl<T, 2, 1>(p, num_sms, stream)
           : maxt == 4 ? launch_pt_gate_impl<T, 4, 1>(p, num_sms, stream)
                       : launch_pt_gate_impl<T, 8, 1>(p, num_sms, stream);
  }
  return maxt == 1   ? launch_pt_gate_impl<T, 1, V>(p, num_sms, stream)
         : maxt == 2 ? launch_pt_gate_impl<T, 2, V>(p, num_sms, stream)
         : maxt == 4 ? launch_pt_gate_impl<T, 4, V>(p, num_sms, stream)
                     : launch_pt_gate_impl<T, 8, V>(p, num_sms, stream);
}

template <typename T, int MODE>
cudaError_t launch_pt_mask(const PtMaskParams& p, int num_sms, cudaStream_t stream) {
  if (p.M < 1 || p.M > kPtMaxTokens) return cudaErrorInvalidValue;
  DART_LAUNCH(elementwise_blocks(p.R, num_sms), 256, 0, stream, pt_mask_kernel<T, MODE>)(p);
  return cudaGetLastError();
}

inline cudaError_t launch_pt_count(const uint8_t* kept1, int64_t R1, long long per1,
                                   const uint8_t* kept2, int64_t R2, long long per2,
                                   long long base, int M, float* read, cudaStream_t stream) {
  DART_LAUNCH(dim3(static_cast<unsigned>(M)), kPtThreads, 0, stream, pt_count_kernel<0>)(
      kept1, R1, per1, kept2, R2, per2, base, read);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// The two ops' launch sequences over one workspace (the op glue and the emulation share them).
// ---------------------------------------------------------------------------------------------
struct PtFfnArgs {
  const void* x;  // [M, d] T, M <= kPtMaxTokens
  // gate-first: w_gate, w_up [N, d] (row stride w_stride); input-sparse: w_gate_t, w_up_t
  // [d, N] (input-major, row stride w_stride)
  const void* w_gate;
  const void* w_up;
  int64_t w_stride;
  const void* w_down_t;  // [N, d], row stride wd_stride
  int64_t wd_stride;
  const float* scale;  // gate-first: [N] fp32
  float threshold;  // gate-first: score threshold; input-sparse: x threshold
  float h_threshold;  // input-sparse
  // non-null: the thresholds are read from these device floats instead (no host sync)
  const float* threshold_ptr;
  const float* h_threshold_ptr;
  bool unite;  // policy union (see the top of this file)
  int64_t N, d;
  int M;
  Act act;
  void* y;  // [M, d] T
  float* read;  // [M]
  bool vec_ok;  // false: the element-wise path everywhere (else per matrix, by its alignment)
  int64_t splits;  // <= 0: the plans' choice
};

// The 16-byte vector path for rows of `cols` elements of T at `w` with row stride `stride`.
template <typename T>
bool pt_vec_rows(const PtFfnArgs& a, const void* w, int64_t stride, int64_t cols) {
  const int64_t es = static_cast<int64_t>(sizeof(T));
  return a.vec_ok && host_aligned(w, 16) && (stride * es) % 16 == 0 && (cols * es) % 16 == 0;
}

inline size_t pt_align(size_t v) { return (v + 255) / 256 * 256; }

struct PtLayout {
  PtRowsPlan gate, up, down;  // input-sparse uses all three, gate-first only `down`
  size_t coef = 0, coef2 = 0, g = 0, u = 0, flag = 0, kept = 0, flag2 = 0, kept2 = 0;
  size_t partial = 0, counters = 0, bytes = 0;
};

template <typename T>
PtLayout pt_layout(const PtFfnArgs& a, bool input_sparse, int num_sms) {
  PtLayout l;
  const size_t M = static_cast<size_t>(a.M), N = static_cast<size_t>(a.N);
  const size_t d = static_cast<size_t>(a.d);
  l.down = plan_pt_rows<T>(a.N, a.d, a.M, pt_vec_rows<T>(a, a.w_down_t, a.wd_stride, a.d),
                           num_sms, a.splits);
  if (input_sparse) {  // gate and up share one layout: both vector or both element-wise
    const bool v = pt_vec_rows<T>(a, a.w_gate, a.w_stride, a.N) &&
                   pt_vec_rows<T>(a, a.w_up, a.w_stride, a.N);
    l.gate = plan_pt_rows<T>(a.d, a.N, a.M, v, num_sms, a.splits);
    l.up = l.gate;
  }
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = pt_align(off + bytes);
    return at;
  };
  l.coef = take(M * N * sizeof(float));  // h (gate-first) / masked h (input-sparse)
  l.flag = take(N);
  l.kept = take(M * N);
  if (input_sparse) {
    l.coef2 = take(M * d * sizeof(float));  // masked x
    l.flag2 = take(d);
    l.kept2 = take(M * d);
    l.g = take(M * N * sizeof(float));
    l.u = take(M * N * sizeof(float));
  }
  const size_t pf = l.down.partial_floats + l.gate.partial_floats + l.up.partial_floats;
  l.partial = take(pf * sizeof(float));
  l.counters = take(static_cast<size_t>(l.down.ntiles + 2 * (input_sparse ? l.gate.ntiles : 0)) *
                    sizeof(int));
  l.bytes = off;
  return l;
}

template <typename T>
PtRowsParams pt_rows_params(const void* w, int64_t stride, int64_t R, int64_t C, const float* coef,
                            const uint8_t* flag, int M, void* out, bool out_float, float* partial,
                            int* counters) {
  PtRowsParams r{};
  r.w = w;
  r.w_stride = stride;
  r.R = R;
  r.C = C;
  r.coef = coef;
  r.flag = flag;
  r.M = M;
  r.bias = nullptr;
  r.out = out;
  r.out_float = out_float;
  r.partial = partial;
  r.counters = counters;
  return r;
}

// `ws`: pt_layout<T>(a, false, num_sms).bytes bytes, 256-byte aligned.
template <typename T>
cudaError_t launch_pt_gate_first(const PtFfnArgs& a, void* ws, int num_sms, cudaStream_t stream) {
  const PtLayout l = pt_layout<T>(a, false, num_sms);
  char* base = static_cast<char*>(ws);
  int* counters = reinterpret_cast<int*>(base + l.counters);
  PtGateParams g{};
  g.x = a.x;
  g.w_gate = a.w_gate;
  g.w_up = a.w_up;
  g.w_stride = a.w_stride;
  g.scale = a.scale;
  g.threshold = a.threshold;
  g.threshold_ptr = a.threshold_ptr;
  g.unite = a.unite;
  g.N = a.N;
  g.d = a.d;
  g.M = a.M;
  g.act = a.act;
  g.h = reinterpret_cast<float*>(base + l.coef);
  g.flag = reinterpret_cast<uint8_t*>(base + l.flag);
  g.kept = reinterpret_cast<uint8_t*>(base + l.kept);
  g.zero_counters = counters;
  g.nzero = l.down.ntiles;
  const bool vec = pt_vec_rows<T>(a, a.w_gate, a.w_stride, a.d) &&
                   pt_vec_rows<T>(a, a.w_up, a.w_stride, a.d);
  cudaError_t err = launch_pt_gate<T>(g, vec, num_sms, stream);
  if (err != cudaSuccess) return err;
  const PtRowsParams r = pt_rows_params<T>(a.w_down_t, a.wd_stride, a.N, a.d, g.h, g.flag, a.M,
                                           a.y, false,
                                           reinterpret_cast<float*>(base + l.partial), counters);
  err = launch_pt_rows<T>(r, l.down, stream);
  if (err != cudaSuccess) return err;
  // read[t] = N d + 2 d |kept_t|
  return launch_pt_count(g.kept, a.N, 2LL * a.d, nullptr, 0, 0, static_cast<long long>(a.N) * a.d,
                         a.M, a.read, stream);
}

// `ws`: pt_layout<T>(a, true, num_sms).bytes bytes, 256-byte aligned.
template <typename T>
cudaError_t launch_pt_input_sparse(const PtFfnArgs& a, void* ws, int num_sms,
                                   cudaStream_t stream) {
  const PtLayout l = pt_layout<T>(a, true, num_sms);
  char* base = static_cast<char*>(ws);
  int* counters = reinterpret_cast<int*>(base + l.counters);
  float* partial = reinterpret_cast<float*>(base + l.partial);
  float* g = reinterpret_cast<float*>(base + l.g);
  float* u = reinterpret_cast<float*>(base + l.u);
  PtMaskParams mx{};
  mx.x = a.x;
  mx.threshold = a.threshold;
  mx.threshold_ptr = a.threshold_ptr;
  mx.unite = a.unite;
  mx.R = a.d;
  mx.M = a.M;
  mx.act = a.act;
  mx.coef = reinterpret_cast<float*>(base + l.coef2);
  mx.flag = reinterpret_cast<uint8_t*>(base + l.flag2);
  mx.kept = reinterpret_cast<uint8_t*>(base + l.kept2);
  mx.zero_counters = counters;
  mx.nzero = l.down.ntiles + 2 * l.gate.ntiles;
  cudaError_t err = launch_pt_mask<T, 0>(mx, num_sms, stream);
  if (err != cudaSuccess) return err;
  err = launch_pt_rows<T>(pt_rows_params<T>(a.w_gate, a.w_stride, a.d, a.N, mx.coef, mx.flag,
                                            a.M, g, true, partial, counters),
                          l.gate, stream);
  if (err != cudaSuccess) return err;
  err = launch_pt_rows<T>(pt_rows_params<T>(a.w_up, a.w_stride, a.d, a.N, mx.coef, mx.flag, a.M,
                                            u, true, partial + l.gate.partial_floats,
                                            counters + l.gate.ntiles),
                          l.up, stream);
  if (err != cudaSuccess) return err;
  PtMaskParams mh{};
  mh.g = g;
  mh.u = u;
  mh.threshold = a.h_threshold;
  mh.threshold_ptr = a.h_threshold_ptr;
  mh.unite = a.unite;
  mh.R = a.N;
  mh.M = a.M;
  mh.act = a.act;
  mh.coef = reinterpret_cast<float*>(base + l.coef);
  mh.flag = reinterpret_cast<uint8_t*>(base + l.flag);
  mh.kept = reinterpret_cast<uint8_t*>(base + l.kept);
  err = launch_pt_mask<T, 1>(mh, num_sms, stream);
  if (err != cudaSuccess) return err;
  err = launch_pt_rows<T>(
      pt_rows_params<T>(a.w_down_t, a.wd_stride, a.N, a.d, mh.coef, mh.flag, a.M, a.y, false,
                        partial + 2 * l.gate.partial_floats, counters + 2 * l.gate.ntiles),
      l.down, stream);
  if (err != cudaSuccess) return err;
  // read[t] = 2 N |J_t| + d |K_t|
  return launch_pt_count(mx.kept, a.d, 2LL * a.N, mh.kept, a.N, a.d, 0, a.M, a.read, stream);
}

}  // namespace kernels
}  // namespace dart
