// Gathered FFN kernels (torch-free): y = sum_j h_j * w_out[idx_j] (+ b_out / b_down on y) with
//   GLU: h_j = act(x . w_gate[idx_j] + b_gate[idx_j]) * (x . w_up[idx_j] + b_up[idx_j])
//   MLP: h_j = act(x . w_in[idx_j] + b_in[idx_j])            (biases optional)
//
// Decode path (few tokens per index set, memory-bandwidth bound), two streaming kernels:
//   phase 1  gate/up: the CTA stages its tokens' x in shared memory; a warp works on a unit of
//            NPW kept neurons at once (NPW * 2 rows for GLU), 8 vector loads in flight per lane,
//            so each shared-memory load of x (converted once) feeds NPW (x2) rows. Units are
//            interleaved across CTAs (a persistent grid of the resident CTAs), the next unit's
//            indices are loaded while the current one streams. The NPW * T (x2) dot products
//            are summed over the warp with one transpose-reduce (V - 1 + 5 - log2 V shuffles
//            for V values instead of 5 V), the activation is applied, h[token, j] is written in
//            fp32. CTA (0,0) also zeroes the split-K tickets of phase 2 (no memset node).
//   phase 2  down: split-K over the kept neurons. CTA (column tile of 32*VE columns, split,
//            group) stages its split's row offsets and h (fp32, token-minor, zero-padded to
//            MAXT tokens) in shared memory once per slab of phase2_slab_rows(MAXT) neurons
//            (one slab per CTA at the usual split sizes), then each warp keeps U >= 8 down rows
//            in flight (one warp-wide segment per row) and accumulates h * row in registers.
//            The 8 warps are summed by a fixed-order tree in shared memory; the CTA writes its
//            tile of partials (tile-contiguous, float4-aligned); the last CTA of a tile (atomic
//            ticket) sums the splits in parallel: Q threads per float4 of output, each over the
//            splits q, q+Q, ... in order, then a fixed-order tree over q. The result never
//            depends on the order in which CTAs run. The split count fills whole waves of
//            resident CTAs (best_splits).
// Prefill path (many tokens): the op glue gathers the kept rows with gather_rows.cuh and runs
// cuBLAS GEMMs; the small elementwise kernels for the activation are at the end of this file.
#pragma once

#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace dart {
namespace kernels {

constexpr int kFfnThreads = 256;
constexpr int kFfnWarps = kFfnThreads / kWarp;
constexpr int kDecodeMaxTokens = 16;  // tokens sharing one index set the decode kernels take
constexpr int kFfnMinChunk = 64;  // phase 2: fewest neurons per split (staging is amortised)
constexpr int kFfnChunkQuantum = kFfnWarps;  // phase 2: split sizes are multiples of this
constexpr int kPhase2CtasPerSm = 2;  // __launch_bounds__(kFfnThreads, 2): resident CTAs per SM
constexpr int kPhase1LoadsPerLane = 8;  // phase 1: vector loads in flight per lane
constexpr int kPhase2BytesPerLane = 128;  // phase 2: bytes of down rows in flight per lane

struct FfnParams {
  const void* x;  // [G*Mc, d] contiguous
  const void* w1;  // gate (GLU) / in (MLP): [N, d] rows, last-dim stride 1
  int64_t w1_stride;  // elements between rows
  const void* w2;  // up (GLU only)
  int64_t w2_stride;
  const void* wo;  // down_t / out_t: [N, d]
  int64_t wo_stride;
  const void* b1;  // [N] or nullptr: bias of w1 (b_in of MLP, b_gate of GLU)
  const void* b2;  // [N] or nullptr: bias of w2 (b_up, GLU only)
  const void* bo;  // [d] or nullptr: bias of y (b_out / b_down)
  const void* idx;  // group g uses idx[g * idx_group_stride + j], j < k_g; int64 or int32
  bool idx_int32;
  int64_t idx_group_stride;
  // per-group lengths [G] (int64 or int32) or nullptr: group g uses its first k_g = lens[g]
  // entries of a padded idx row (k = kmax); entries past k_g are never read
  const void* lens;
  bool lens_int32;
  void* y;  // [G*Mc, d] contiguous
  int64_t N, d, k;
  int G, Mc;  // groups (sequences with their own index set) and tokens per group
  Act act;
  // workspace (see FfnPlan)
  float* h;  // [G*Mc, k]
  float* partial;  // [splits, G, ntiles, Mc, tile] (splits > 1)
  int* counters;  // [G, ntiles] (splits > 1)
  int splits, ntiles;
  int64_t chunk;  // neurons per split (a multiple of kFfnChunkQuantum unless splits == 1)
};

struct FfnPlan {
  bool ok = false;  // false: use the GEMM path
  bool vec = false;  // 16-byte vector path (else element-wise fallback)
  int maxt = 0;  // compile-time token bound (1, 2, 4, 8, 16)
  int ve2 = 1;  // elements per lane per row in phase 2 (tile = 32 * ve2 columns)
  size_t smem1 = 0;  // dynamic shared memory of phase 1
  size_t smem_cap = 0;  // the most phase 1 may ever ask for on this device (the opt-in value)
  int splits = 1, ntiles = 1;
  int64_t chunk = 0;
  size_t h_off = 0, partial_off = 0, counters_off = 0, ws_bytes = 0;
};

// ---------------------------------------------------------------------------------------------
// Compile-time shapes of the two kernels (shared by the kernels, the plan and the launcher).
// ---------------------------------------------------------------------------------------------
// Phase 1: neurons per warp unit (a power of two, 1 to 4). A lane holds NPW * MAXT (x2 for GLU)
// accumulators and, per row, the VE converted weights of the vector in use; keeping
// rows * (MAXT + VE) <= 36 fits them with 8 vector loads in flight per lane in 128 registers
// (2 CTAs per SM; checked with ptxas -v at sm_90: no spills below MAXT = 16). The warp sums the
// V = rows * MAXT values of a unit with one transpose-reduce (V <= 32).
template <bool GLU>
constexpr int phase1_npw(int maxt, int ve) {
  const int rows = 36 / (maxt + ve);
  const int fit = rows / (GLU ? 2 : 1);
  return fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}

// Phase 2: elements per lane per row; MAXT * VE accumulators per lane stay <= 32.
template <typename T>
constexpr int phase2_ve(int maxt, bool vec) {
  const int full = static_cast<int>(16 / sizeof(T));
  const int fit = 32 / maxt;
  return !vec ? 1 : (full < fit ? full : fit);
}

// Phase 2: neurons staged at once (offsets 8 B + h 4 MAXT B each: 12-18 KB of static shared
// memory, with the reduction buffer under 48 KB).
constexpr int phase2_slab_rows(int maxt) { return maxt <= 2 ? 1024 : maxt <= 8 ? 512 : 256; }

// Phase 2: rows in flight per warp (kPhase2BytesPerLane per lane, between 8 and 16 rows).
template <typename T>
constexpr int phase2_rows_in_flight(int ve) {
  const int u = kPhase2BytesPerLane / (ve * static_cast<int>(sizeof(T)));
  return u < 8 ? 8 : (u > 16 ? 16 : u);
}

__device__ __forceinline__ int64_t load_index(const FfnParams& p, int64_t pos) {
  return p.idx_int32 ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(p.idx) + pos))
                     : __ldg(static_cast<const int64_t*>(p.idx) + pos);
}

// k_g: the kept neurons group g sums over (p.k without per-group lengths).
__device__ __forceinline__ int64_t group_length(const FfnParams& p, int g) {
  if (p.lens == nullptr) return p.k;
  const int64_t n = p.lens_int32
                        ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(p.lens) + g))
                        : __ldg(static_cast<const int64_t*>(p.lens) + g);
  DART_DEVICE_CHECK(n >= 0 && n <= p.k,
                    "dart::gathered_glu_ffn/gathered_mlp: lengths out of range [0, kmax]");
  return n < 0 ? 0 : (n > p.k ? p.k : n);
}

// Sums each of the V values (V a power of two <= 32) over the 32 lanes of the warp with
// V - 1 + (5 - log2 V) shuffles (transpose-reduce; 5 V for V separate all-reductions). On
// return every lane holds the total of value reduced_index<V>(lane); the summation order is
// fixed, so the result is deterministic.
template <int V>
__device__ __forceinline__ float warp_reduce_many(float (&v)[V], int lane) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two <= 32");
  int offset = kWarp / 2;
#pragma unroll
  for (int half = V / 2; half >= 1; half /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
    offset /= 2;
  }
  float s = v[0];
#pragma unroll
  for (; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  return s;
}

// Which of the V values lane `lane` holds after warp_reduce_many<V>: the bits of the lane from
// bit 4 down, one per halving step.
template <int V>
__device__ __forceinline__ int reduced_index(int lane) {
  int r = 0;
  int bit = 4;
#pragma unroll
  for (int half = V / 2; half >= 1; half /= 2, --bit) r += ((lane >> bit) & 1) * half;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Phase 1: h[g*Mc + t, j] = act(x_t . w1[idx_j] (+ b1)) (* (x_t . w2[idx_j] (+ b2)))
// ---------------------------------------------------------------------------------------------
template <typename T, bool GLU, int MAXT, int VE>
__global__ void __launch_bounds__(kFfnThreads, 2) ffn_phase1_kernel(FfnParams p) {
  DART_DYNAMIC_SMEM(unsigned char, smem_raw);
  T* xs = reinterpret_cast<T*>(smem_raw);
  constexpr int NPW = phase1_npw<GLU>(MAXT, VE);
  constexpr int ROWS = NPW * (GLU ? 2 : 1);
  constexpr int U = kPhase1LoadsPerLane / ROWS > 0 ? kPhase1LoadsPerLane / ROWS : 1;
  constexpr int V = ROWS * MAXT;  // values summed over the warp per unit
  static_assert(V <= 32, "one transpose-reduce per unit");
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
  const T* __restrict__ b2 = static_cast<const T*>(p.b2);
  const int64_t idx_base = static_cast<int64_t>(g) * p.idx_group_stride;
  float* __restrict__ hg = p.h + static_cast<int64_t>(g) * Mc * k;
  const int64_t nvec = d / VE;
  const int64_t kg = group_length(p, g);  // h columns past kg are never read (phase 2 stops)
  const int64_t units = (kg + NPW - 1) / NPW;
  const int64_t unit_stride = static_cast<int64_t>(gridDim.x) * kFfnWarps;

  // rows of a unit; neurons past kg (last unit only) repeat its first row and are not written
  auto unit_rows = [&](int64_t unit, int64_t (&rows)[NPW]) {
#pragma unroll
    for (int n = 0; n < NPW; ++n) {
      const int64_t j = unit * NPW + n;
      rows[n] = load_index(p, idx_base + (j < kg ? j : unit * NPW));
    }
  };

  int64_t unit = static_cast<int64_t>(warp) * gridDim.x + blockIdx.x;
  int64_t next_rows[NPW];
  if (unit < units) unit_rows(unit, next_rows);
  for (; unit < units; unit += unit_stride) {
    int64_t rows[NPW];
#pragma unroll
    for (int n = 0; n < NPW; ++n) {
      rows[n] = next_rows[n];
      DART_DEVICE_CHECK(rows[n] >= 0 && rows[n] < p.N,
                        "dart::gathered_glu_ffn/gathered_mlp: idx out of range [0, N)");
    }
    if (unit + unit_stride < units) unit_rows(unit + unit_stride, next_rows);  // in flight now
    const T* r1[NPW];
    const T* r2[NPW];
#pragma unroll
    for (int n = 0; n < NPW; ++n) {
      r1[n] = w1 + rows[n] * p.w1_stride;
      r2[n] = GLU ? w2 + rows[n] * p.w2_stride : nullptr;
    }
    // acc[(s * NPW + n) * MAXT + t]: s = 0 gate / in, s = 1 up (GLU)
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;

    for (int64_t v0 = lane; v0 < nvec; v0 += kWarp * U) {
      Vec<T, VE> wv[U][ROWS];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + u * kWarp;
        if (v < nvec) {
#pragma unroll
          for (int n = 0; n < NPW; ++n) {
            wv[u][n] = load_stream<T, VE>(r1[n] + v * VE);
            if constexpr (GLU) wv[u][NPW + n] = load_stream<T, VE>(r2[n] + v * VE);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + u * kWarp;
        if (v < nvec) {
          float wf[ROWS][VE];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) vec_to_float<T, VE>(wv[u][r], wf[r]);
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            if (t < Mc) {  // uniform across the warp
              float xf[VE];
              vec_to_float<T, VE>(load_vec<T, VE>(xs + t * d + v * VE), xf);
#pragma unroll
              for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int e = 0; e < VE; ++e) acc[r * MAXT + t] = fmaf(xf[e], wf[r][e], acc[r * MAXT + t]);
              }
            }
          }
        }
      }
    }

    const float total = warp_reduce_many<V>(acc, lane);
    const int ri = reduced_index<V>(lane);
    float up = 0.0f;
    if constexpr (GLU) up = __shfl_xor_sync(0xffffffffu, total, kWarp / 2);  // value ri + V/2
    constexpr int kCopies = kWarp / V;  // lanes holding each value; the first one writes
    const bool writer = (lane % kCopies) == 0 && ri < NPW * MAXT;
    if (writer) {
      const int n = ri / MAXT;
      const int t = ri % MAXT;
      const int64_t j = unit * NPW + n;
      if (t < Mc && j < kg) {
        float hv;
        int64_t row = rows[0];
#pragma unroll
        for (int m = 1; m < NPW; ++m) row = m == n ? rows[m] : row;  // no local-memory index
        const float bias = b1 != nullptr ? to_float<T>(b1[row]) : 0.0f;
        if constexpr (GLU) {
          const float bias2 = b2 != nullptr ? to_float<T>(b2[row]) : 0.0f;
          hv = act_apply(p.act, total + bias) * (up + bias2);
        } else {
          hv = act_apply(p.act, total + bias);
        }
        hg[static_cast<int64_t>(t) * k + j] = hv;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: y[g*Mc + t, c] = sum_j h[g*Mc + t, j] * wo[idx_j, c] (+ bo[c]), split-K over j.
// ---------------------------------------------------------------------------------------------
// Stores VE consecutive floats (16-byte aligned when VE % 4 == 0, 8 when VE == 2) bypassing L1.
template <int VE>
__device__ __forceinline__ void store_floats_cg(float* dst, const float (&v)[VE]) {
  if constexpr (VE % 4 == 0) {
#pragma unroll
    for (int e = 0; e < VE; e += 4) {
      __stcg(reinterpret_cast<float4*>(dst + e), make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]));
    }
  } else if constexpr (VE == 2) {
    __stcg(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int e = 0; e < VE; ++e) __stcg(dst + e, v[e]);
  }
}

template <typename T, int MAXT, int VE>
__global__ void __launch_bounds__(kFfnThreads, 2) ffn_phase2_kernel(FfnParams p) {
  constexpr int TILE = kWarp * VE;
  constexpr int U = phase2_rows_in_flight<T>(VE);
  constexpr int kTreeSlots = kFfnWarps / 2;  // warps that park their tile in the first round
  // the splits reduction needs up to 256 float4 (4 KB); the warp tree kTreeSlots tiles
  constexpr int kRedFloats =
      kTreeSlots * MAXT * TILE > kFfnThreads * 4 ? kTreeSlots * MAXT * TILE : kFfnThreads * 4;
  static_assert(MAXT * VE <= 32, "phase 2 keeps MAXT * VE accumulators per lane");
  constexpr int SLAB = phase2_slab_rows(MAXT);
  __shared__ int64_t s_off[SLAB];  // row offsets (elements) of the slab's neurons
  __shared__ float s_h[SLAB * MAXT];  // h of the slab, token-minor, 0 past Mc
  __shared__ __align__(16) float s_red[kRedFloats];
  __shared__ int s_last;

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

  // splits past group g's own length k_g sum nothing (their partials are zero)
  const int64_t kg = group_length(p, g);
  const int64_t j0 = static_cast<int64_t>(split) * p.chunk;
  const int64_t j1 = j0 + p.chunk < kg ? j0 + p.chunk : kg;

  const T* __restrict__ wo = static_cast<const T*>(p.wo);
  const int64_t idx_base = static_cast<int64_t>(g) * p.idx_group_stride;
  const float* __restrict__ hg = p.h + static_cast<int64_t>(g) * Mc * k;

  float acc[MAXT][VE];
#pragma unroll
  for (int t = 0; t < MAXT; ++t)
#pragma unroll
    for (int e = 0; e < VE; ++e) acc[t][e] = 0.0f;

  for (int64_t s0 = j0; s0 < j1; s0 += SLAB) {
    const int n = static_cast<int>(j1 - s0 < SLAB ? j1 - s0 : SLAB);
    __syncthreads();  // the previous slab is consumed
    for (int r = tid; r < n; r += kFfnThreads) {
      const int64_t row = load_index(p, idx_base + s0 + r);
      DART_DEVICE_CHECK(row >= 0 && row < p.N,
                        "dart::gathered_glu_ffn/gathered_mlp: idx out of range [0, N)");
      s_off[r] = row * p.wo_stride;
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        s_h[r * MAXT + t] = t < Mc ? __ldg(hg + static_cast<int64_t>(t) * k + s0 + r) : 0.0f;
      }
    }
    __syncthreads();
    if (!col_ok) continue;
    // warp w streams rows w, w + 8, ..., U of them in flight
    for (int rb = warp; rb < n; rb += kFfnWarps * U) {
      Vec<T, VE> w[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int r = rb + u * kFfnWarps;
        if (r < n) w[u] = load_stream<T, VE>(wo + s_off[r] + col);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int r = rb + u * kFfnWarps;
        if (r < n) {
          float wf[VE];
          vec_to_float<T, VE>(w[u], wf);
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            const float hv = s_h[r * MAXT + t];
#pragma unroll
            for (int e = 0; e < VE; ++e) acc[t][e] = fmaf(hv, wf[e], acc[t][e]);
          }
        }
      }
    }
  }

  // fixed-order tree over the 8 warps: (w0 + w4) + (w2 + w6) + ((w1 + w5) + (w3 + w7))
#pragma unroll
  for (int half = kTreeSlots; half >= 1; half /= 2) {
    __syncthreads();
    if (warp >= half && warp < 2 * half) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
#pragma unroll
        for (int e = 0; e < VE; ++e) s_red[((warp - half) * MAXT + t) * TILE + lane * VE + e] = acc[t][e];
    }
    __syncthreads();
    if (warp < half) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
#pragma unroll
        for (int e = 0; e < VE; ++e) acc[t][e] += s_red[(warp * MAXT + t) * TILE + lane * VE + e];
    }
  }

  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bo = static_cast<const T*>(p.bo);
  const int64_t row0 = static_cast<int64_t>(g) * Mc;

  if (p.splits == 1) {
    if (warp == 0 && col_ok) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= Mc) break;
        Vec<T, VE> out;
#pragma unroll
        for (int e = 0; e < VE; ++e) {
          const float b = bo != nullptr ? to_float<T>(bo[col + e]) : 0.0f;
          out.v[e] = from_float<T>(acc[t][e] + b);
        }
        *reinterpret_cast<Vec<T, VE>*>(y + (row0 + t) * d + col) = out;
      }
    }
    return;
  }

  // this CTA's partial tile: [Mc, TILE] contiguous (columns past d hold zeros)
  const int tile_floats = Mc * TILE;
  const int64_t tiles_per_split = static_cast<int64_t>(p.G) * p.ntiles;
  float* const tile_base = p.partial + (static_cast<int64_t>(g) * p.ntiles + tile) * tile_floats;
  if (warp == 0) {
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= Mc) break;
      store_floats_cg<VE>(tile_base + split * tiles_per_split * tile_floats + t * TILE + lane * VE,
                          acc[t]);
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int prev = atomicAdd(p.counters + static_cast<int64_t>(g) * p.ntiles + tile, 1);
    s_last = (prev == p.splits - 1) ? 1 : 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // The last CTA of the tile: Q threads per float4 of the tile, thread q sums the splits
  // q, q + Q, ... in order; then a fixed-order tree over q.
  const int nv = tile_floats / 4;  // <= 256: MAXT * VE <= 32
  int Q = 1;
  while (2 * Q * nv <= kFfnThreads && 2 * Q <= p.splits) Q *= 2;
  const int v = tid % nv;
  const int q = tid / nv;
  float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (q < Q) {
    const float4* src = reinterpret_cast<const float4*>(tile_base) + v;
    const int64_t split_stride = tiles_per_split * tile_floats / 4;
    int s = q;
    for (; s + 3 * Q < p.splits; s += 4 * Q) {  // 4 loads in flight, added in split order
      const float4 a = __ldcg(src + s * split_stride);
      const float4 b = __ldcg(src + (s + Q) * split_stride);
      const float4 c = __ldcg(src + (s + 2 * Q) * split_stride);
      const float4 e = __ldcg(src + (s + 3 * Q) * split_stride);
      sum.x = sum.x + a.x + b.x + c.x + e.x;
      sum.y = sum.y + a.y + b.y + c.y + e.y;
      sum.z = sum.z + a.z + b.z + c.z + e.z;
      sum.w = sum.w + a.w + b.w + c.w + e.w;
    }
    for (; s < p.splits; s += Q) {
      const float4 a = __ldcg(src + s * split_stride);
      sum.x += a.x;
      sum.y += a.y;
      sum.z += a.z;
      sum.w += a.w;
    }
  }
  float4* const red4 = reinterpret_cast<float4*>(s_red);  // the warp tree is done with it
  if (q < Q) red4[q * nv + v] = sum;
  for (int half = Q / 2; half >= 1; half /= 2) {
    __syncthreads();
    if (q < half) {
      const float4 o = red4[(q + half) * nv + v];
      sum.x += o.x;
      sum.y += o.y;
      sum.z += o.z;
      sum.w += o.w;
      red4[q * nv + v] = sum;
    }
  }
  if (q == 0) {
    const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
    const int t = (v * 4) / TILE;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = c0 + (v * 4) % TILE + e;
      if (c < d) {
        const float b = bo != nullptr ? to_float<T>(bo[c]) : 0.0f;
        y[(row0 + t) * d + c] = from_float<T>(vals[e] + b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: plan + launch of the decode path.
// ---------------------------------------------------------------------------------------------
inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Neurons per split for a requested split count: a multiple of kFfnChunkQuantum (k for one).
inline int64_t split_chunk(int64_t k, int64_t splits) {
  return splits <= 1 ? k : ceil_div(ceil_div(k, splits), kFfnChunkQuantum) * kFfnChunkQuantum;
}

// Fixes the plan's split-K factor (clamped to [1, k / kFfnMinChunk]) and what follows from it:
// neurons per split and the workspace layout.
inline void plan_set_splits(FfnPlan& plan, int G, int Mc, int64_t k, int64_t splits) {
  const int64_t max_splits = k / kFfnMinChunk;
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  plan.chunk = split_chunk(k, splits);
  plan.splits = static_cast<int>(ceil_div(k, plan.chunk));
  const size_t rows = static_cast<size_t>(G) * Mc;
  const size_t tile = static_cast<size_t>(kWarp) * plan.ve2;
  size_t off = 0;
  plan.h_off = off;
  off = align_up(off + rows * static_cast<size_t>(k) * sizeof(float), 256);
  plan.partial_off = off;
  if (plan.splits > 1) {
    off = align_up(off + plan.splits * rows * plan.ntiles * tile * sizeof(float), 256);
  }
  plan.counters_off = off;
  if (plan.splits > 1) off = align_up(off + static_cast<size_t>(G) * plan.ntiles * sizeof(int), 256);
  plan.ws_bytes = off;
}

// The split count for phase 2: the fewest splits (the least partial traffic, the fewest CTA
// start-ups and reductions) whose CTAs fill whole waves of resident CTAs within 3% of the best
// split count's fill. Fill = useful neuron rows over (waves * resident CTAs * rows per CTA): it
// counts both the last wave's idle slots and a short last split.
inline int64_t best_splits(int64_t k, int64_t ctas_per_split, int64_t max_splits, int num_sms) {
  const int64_t slots = static_cast<int64_t>(kPhase2CtasPerSm) * num_sms;
  auto fill = [&](int64_t s) {
    const int64_t chunk = split_chunk(k, s);
    const int64_t ctas = ceil_div(k, chunk) * ctas_per_split;
    return static_cast<double>(k) * ctas_per_split /
           (static_cast<double>(ceil_div(ctas, slots) * slots) * chunk);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) best = fill(s) > best ? fill(s) : best;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (fill(s) >= best - 0.03) return s;
  }
  return 1;
}

// `vec_ok`: x, y, every weight/bias pointer and every row stride are 16-byte aligned and
// d * sizeof(T) % 16 == 0 (the caller checks; otherwise the element-wise fallback runs).
// `max_smem`: the largest dynamic shared memory a CTA may opt into on this device.
template <typename T>
FfnPlan plan_ffn_decode(int G, int Mc, int64_t d, int64_t k, bool vec_ok, int num_sms,
                        size_t max_smem) {
  FfnPlan plan;
  if (G < 1 || G > 65535 || Mc < 1 || Mc > kDecodeMaxTokens || d < 1 || k < 1) return plan;
  const size_t smem1 = static_cast<size_t>(Mc) * static_cast<size_t>(d) * sizeof(T);
  plan.smem_cap = max_smem < (200u << 10) ? max_smem : (200u << 10);
  if (smem1 > plan.smem_cap) return plan;
  plan.ok = true;
  plan.vec = vec_ok;
  plan.smem1 = smem1;
  plan.maxt = !vec_ok ? kDecodeMaxTokens
                      : Mc <= 1 ? 1 : Mc <= 2 ? 2 : Mc <= 4 ? 4 : Mc <= 8 ? 8 : 16;
  plan.ve2 = phase2_ve<T>(plan.maxt, vec_ok);
  plan.ntiles = static_cast<int>(ceil_div(d, static_cast<int64_t>(kWarp) * plan.ve2));
  int64_t max_splits = k / kFfnMinChunk;
  const int64_t by_traffic = static_cast<int64_t>(k * sizeof(T)) / (64LL * Mc);
  if (max_splits > by_traffic) max_splits = by_traffic;
  if (max_splits > 65535) max_splits = 65535;
  const int64_t splits = best_splits(k, static_cast<int64_t>(plan.ntiles) * G, max_splits, num_sms);
  plan_set_splits(plan, G, Mc, k, splits);
  return plan;
}

// Blocks of `kernel` per SM with `smem` bytes of dynamic shared memory, on the current device.
// Per device and kernel, the first call opts the kernel into `smem_cap` bytes (the most any plan
// asks for: setting it per call to that call's size races between host threads) and each
// (device, kernel, smem) is queried once (a query costs microseconds of host time per call).
template <typename... P>
cudaError_t cached_occupancy(void (*kernel)(P...), size_t smem, size_t smem_cap, int* blocks) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* id = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mu);
  const auto opted = std::make_tuple(device, id, ~size_t{0});  // key of the opt-in
  if (cache.find(opted) == cache.end()) {
    if (smem_cap > (48u << 10)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem_cap));
      if (err != cudaSuccess) return err;
    }
    cache[opted] = 0;
  }
  const auto key = std::make_tuple(device, id, smem);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int occ = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kFfnThreads, smem);
    if (err != cudaSuccess) return err;
    it = cache.emplace(key, occ < 1 ? 1 : occ).first;
  }
  *blocks = it->second;
  return cudaSuccess;
}

template <typename T, bool GLU, int MAXT, int VE1, int VE2>
cudaError_t launch_ffn_decode_impl(const FfnParams& p, const FfnPlan& plan, int num_sms,
                                   cudaStream_t stream) {
  auto k1 = ffn_phase1_kernel<T, GLU, MAXT, VE1>;
  auto k2 = ffn_phase2_kernel<T, MAXT, VE2>;
  int occ = 0;
  cudaError_t err = cached_occupancy(k1, plan.smem1, plan.smem_cap, &occ);
  if (err != cudaSuccess) return err;
  // a persistent grid: the resident CTAs, no more than the units need
  const int64_t units = ceil_div(p.k, phase1_npw<GLU>(MAXT, VE1));
  int64_t gx = ceil_div(static_cast<int64_t>(num_sms) * occ, p.G);
  const int64_t gmax = ceil_div(units, kFfnWarps);
  if (gx > gmax) gx = gmax;
  if (gx < 1) gx = 1;
  DART_LAUNCH(dim3(static_cast<unsigned>(gx), p.G), kFfnThreads, plan.smem1, stream, k1)(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  DART_LAUNCH(dim3(p.ntiles, p.splits, p.G), kFfnThreads, 0, stream, k2)(p);
  return cudaGetLastError();
}

// p.h / p.partial / p.counters must point into a workspace of plan.ws_bytes bytes (offsets in
// the plan); p.splits / p.ntiles / p.chunk are filled here.
template <typename T, bool GLU>
cudaError_t launch_ffn_decode(FfnParams p, const FfnPlan& plan, int num_sms,
                              cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
  p.splits = plan.splits;
  p.ntiles = plan.ntiles;
  p.chunk = plan.chunk;
  if (plan.splits == 1) {
    p.partial = nullptr;
    p.counters = nullptr;
  }
  constexpr int V = static_cast<int>(16 / sizeof(T));
  if (!plan.vec) {
    return launch_ffn_decode_impl<T, GLU, kDecodeMaxTokens, 1, 1>(p, plan, num_sms, stream);
  }
  switch (plan.maxt) {
    case 1:
      return launch_ffn_decode_impl<T, GLU, 1, V, phase2_ve<T>(1, true)>(p, plan, num_sms, stream);
    case 2:
      return launch_ffn_decode_impl<T, GLU, 2, V, phase2_ve<T>(2, true)>(p, plan, num_sms, stream);
    case 4:
      return launch_ffn_decode_impl<T, GLU, 4, V, phase2_ve<T>(4, true)>(p, plan, num_sms, stream);
    case 8:
      return launch_ffn_decode_impl<T, GLU, 8, V, phase2_ve<T>(8, true)>(p, plan, num_sms, stream);
    default:
      return launch_ffn_decode_impl<T, GLU, 16, V, phase2_ve<T>(16, true)>(p, plan, num_sms,
                                                                          stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill helpers (elementwise, fp32 math).
// ---------------------------------------------------------------------------------------------

// Optional gate / up biases of the prefill GLU (b_gate / b_up [N] or null), read through the
// index rows: row r of group g = r / rows_per_group uses idx[g * idx_group_stride + j]; with lens
// (int64 [groups]) entries j >= lens[g] are padding (h = 0, idx not read).
template <typename T>
struct GluBias {
  const T* b_gate;
  const T* b_up;
  const int64_t* idx;
  int64_t idx_group_stride;
  const int64_t* lens;
  int64_t rows_per_group;
  int64_t N;
};

// h[r, j] = act(gu[r, j] + bg) * (gu[r, k + j] + bu); gu rows have stride gu_stride (>= 2k), h is
// [rows, k]. Without biases the padding rows (gathered as zeros) give act(0) * 0 = 0 by
// themselves; with biases they are zeroed explicitly.
template <typename T>
__global__ void glu_act_mul_kernel(const T* __restrict__ gu, int64_t gu_stride,
                                   T* __restrict__ h, int64_t rows, int64_t k, Act act,
                                   GluBias<T> gb) {
  const int64_t n = rows * k;
  const bool biased = gb.b_gate != nullptr || gb.b_up != nullptr;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    float a = to_float<T>(gu[r * gu_stride + j]);
    float b = to_float<T>(gu[r * gu_stride + k + j]);
    if (biased) {
      const int64_t g = r / gb.rows_per_group;
      if (gb.lens != nullptr && j >= gb.lens[g]) {
        h[i] = from_float<T>(0.0f);
        continue;
      }
      const int64_t row = gb.idx[g * gb.idx_group_stride + j];
      DART_DEVICE_CHECK(row >= 0 && row < gb.N, "dart::gathered_glu_ffn: idx out of range [0, N)");
      if (gb.b_gate != nullptr) a += to_float<T>(gb.b_gate[row]);
      if (gb.b_up != nullptr) b += to_float<T>(gb.b_up[row]);
    }
    h[i] = from_float<T>(act_apply(act, a) * b);
  }
}

// pre[r, j] = act(pre[r, j] + b1[idx[g, j]]) in place, g = r / rows_per_group; b1 may be null.
// With lens (int64 [groups]), entries j >= lens[g] are padding: pre[r, j] = 0, idx not read.
template <typename T>
__global__ void mlp_bias_act_kernel(T* __restrict__ pre, int64_t rows, int64_t k,
                                    const T* __restrict__ b1, const int64_t* __restrict__ idx,
                                    int64_t idx_group_stride, const int64_t* __restrict__ lens,
                                    int64_t rows_per_group, int64_t N, Act act) {
  const int64_t n = rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    if (lens != nullptr && j >= lens[r / rows_per_group]) {
      pre[i] = from_float<T>(0.0f);
      continue;
    }
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
                               Act act, const GluBias<T>& gb, int num_sms, cudaStream_t stream) {
  if (rows * k <= 0) return cudaSuccess;
  DART_LAUNCH(elementwise_blocks(rows * k, num_sms), 256, 0, stream, glu_act_mul_kernel<T>)(
      gu, gu_stride, h, rows, k, act, gb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mlp_bias_act(T* pre, int64_t rows, int64_t k, const T* b1, const int64_t* idx,
                                int64_t idx_group_stride, const int64_t* lens,
                                int64_t rows_per_group, int64_t N, Act act, int num_sms,
                                cudaStream_t stream) {
  if (rows * k <= 0) return cudaSuccess;
  DART_LAUNCH(elementwise_blocks(rows * k, num_sms), 256, 0, stream, mlp_bias_act_kernel<T>)(
      pre, rows, k, b1, idx, idx_group_stride, lens, rows_per_group, N, act);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dart
