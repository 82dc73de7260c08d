// Quantised-row kernels (torch-free) for the decode path of dart::gathered_glu_ffn_q,
// dart::gathered_mlp_q and dart::linear_q. Formats (dart_ext/quant.py): each matrix is row-major
// [N, d] with its rows cut into groups of `group` (32 or 64) values along d, fp16 scales
// [N, d/group] (and fp16 mins for q4m):
//   q8   int8 [N, d]          value = scale * q
//   q4   uint8 [N, d/2]       value = scale * (u - 8)
//   q4m  uint8 [N, d/2]       value = scale * u + min
// 4-bit packing (llama.cpp's Q4_0 order): each 16-byte block holds 32 values, byte j has value
// j in its low nibble and value j + 16 in its high nibble.
//
// As the CPU kernels and the reference do, the activations the input rows are dotted with (x of
// gate / up / w_in / a dense linear) are rounded to int8 per block of 32 values along d
// (inv = 127 / amax, scale = amax / 127, round half to even); the down projection's input h is
// never rounded (fp32).
//
// Decode (few tokens, memory-bandwidth bound), the same two-phase shape as gathered_ffn.cuh:
//   phase 1  (qdot_kernel) each CTA rounds its group's x into shared memory once (int8 values,
//            fp32 block scales, int32 block sums); then one warp per kept neuron (GLU: its gate
//            and up rows) streams the row in 16-byte loads (4 in flight per lane per row),
//            multiplies bytes with __dp4a (q4: nibbles unpacked with one mask / shift per 4
//            values; the -8 offset and q4m's min come in through the block sum of x, as in
//            llama.cpp's Q4_0 / Q4_1 dot products), scales each block's integer dot in fp32 and
//            sums over the warp; the activation gives h[token, j] (fp32 workspace). A dense
//            linear (linear_q) is the same kernel over all N rows writing y directly.
//   phase 2  (qdown_kernel) split-K over the kept neurons without float atomics: CTA (column
//            tile, split, group), each lane owns VB bytes of a down row (the widest of 16 / 8 /
//            4 / 2 bytes that keeps MAXT * values <= 32 fp32 accumulators), rows are dequantised
//            in registers (exact integer -> float through the 2^23 trick) and accumulated as
//            h * scale * u, the per-row offset (-8 * scale, or min) summed once per lane; 8 warps
//            summed in a fixed order in shared memory, the CTA's tile of partials written, the
//            last CTA of a tile (atomic ticket, zeroed by phase 1) sums the splits in split
//            order. Results never depend on the order in which CTAs run.
// Prefill (more tokens than kQDecodeMaxTokens) is the op glue's job (dequantised rows + GEMMs).
#pragma once

#include "gathered_ffn.cuh"

namespace dart {
namespace kernels {

enum class QFmt : int { kQ8 = 0, kQ4 = 1, kQ4M = 2 };
enum class QMode : int { kGlu = 0, kMlp = 1, kLinear = 2 };

constexpr int kQThreads = 256;
constexpr int kQWarps = kQThreads / kWarp;
constexpr int kQDecodeMaxTokens = 8;  // tokens per index set the decode kernels take
constexpr int kQBlock = 32;  // values per packed block and per activation-rounding block
constexpr int kQMinChunk = 64;  // phase 2: fewest neurons per split
constexpr int kQChunkQuantum = kQWarps;  // phase 2: split sizes are multiples of this
constexpr int kQRowLoads = 4;  // phase 1: 16-byte loads in flight per lane per row

// One quantised matrix [N, d]: packed data rows (d or d/2 bytes each, contiguous), fp16 scales
// (and mins) [N, d/group] contiguous, as raw 16-bit patterns.
struct QMat {
  const void* data;
  const uint16_t* scales;
  const uint16_t* mins;  // q4m only
};

struct QParams {
  const void* x;  // [G*Mc, d] contiguous, element type T
  QMat w1;  // gate (GLU) / w_in (MLP) / w (linear)
  QMat w2;  // up (GLU only)
  QMat wo;  // down_t / w_out_t
  const void* b1;  // [N] or nullptr: b_gate / b_in / the linear's bias
  const void* b2;  // [N] or nullptr: b_up
  const void* bo;  // [d] or nullptr: b_down / b_out
  const void* idx;  // group g uses idx[g * idx_group_stride + j], j < k_g; int64 or int32
  bool idx_int32;
  int64_t idx_group_stride;
  const void* lens;  // per-group lengths [G] (int64 or int32) or nullptr
  bool lens_int32;
  void* y;  // [G*Mc, d] (FFN) or [Mc, N] (linear), element type T
  int64_t N, d, k;  // linear: k = N
  int G, Mc;
  int group;  // 32 or 64
  Act act;
  // workspace (QPlan's offsets)
  float* h;  // [G*Mc, k]
  float* partial;  // [splits, G, ntiles, Mc, tile] (splits > 1)
  int* counters;  // [G, ntiles] (splits > 1)
  int splits, ntiles;
  int64_t chunk;
};

template <QFmt F>
constexpr int64_t q_row_bytes(int64_t d) {
  return F == QFmt::kQ8 ? d : d / 2;
}

// Phase 2: bytes per lane per down row: the widest of 16 / 8 / 4 / 2 whose values times MAXT
// tokens stay within 32 fp32 accumulators.
template <QFmt F>
constexpr int qdown_vb(int maxt) {
  const int per_byte = F == QFmt::kQ8 ? 1 : 2;
  int vb = 16;
  while (vb > 2 && vb * per_byte * maxt > 32) vb /= 2;
  return vb;
}

struct QPlan {
  bool ok = false;  // false: the glue's dequantise + GEMM path
  int maxt = 0;  // compile-time token bound (1, 2, 4, 8)
  int vb = 0;  // phase 2 bytes per lane per row
  size_t smem1 = 0;  // dynamic shared memory of phase 1
  size_t smem_cap = 0;
  int splits = 1, ntiles = 1;
  int64_t chunk = 0;
  size_t h_off = 0, partial_off = 0, counters_off = 0, ws_bytes = 0;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t q_load_index(const QParams& p, int64_t pos) {
  return p.idx_int32 ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(p.idx) + pos))
                     : __ldg(static_cast<const int64_t*>(p.idx) + pos);
}

__device__ __forceinline__ int64_t q_group_length(const QParams& p, int g) {
  if (p.lens == nullptr) return p.k;
  const int64_t n = p.lens_int32
                        ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(p.lens) + g))
                        : __ldg(static_cast<const int64_t*>(p.lens) + g);
  DART_DEVICE_CHECK(n >= 0 && n <= p.k,
                    "dart::gathered_glu_ffn_q/gathered_mlp_q: lengths out of range [0, kmax]");
  return n < 0 ? 0 : (n > p.k ? p.k : n);
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// An integer in [0, 2^23) as float, exactly, with one integer OR and one float subtraction
// (cheaper than the int -> float conversion unit on the phase-2 inner loop).
__device__ __forceinline__ float small_uint_to_float(unsigned u) {
  return __uint_as_float(0x4B000000u | u) - 8388608.0f;
}

// Rounds x rows [Mc, d] of one group into shared memory: int8 values [Mc, d], fp32 block scales
// [Mc, d/32] and int32 block sums [Mc, d/32]. One warp per block of 32 values.
template <typename T>
__device__ __forceinline__ void q_stage_x(const T* __restrict__ x, int Mc, int64_t d,
                                          int8_t* s_xq, float* s_xs, int* s_xsum) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t nb = d / kQBlock;
  for (int64_t b = warp; b < Mc * nb; b += kQWarps) {
    const int64_t t = b / nb;
    const int64_t c = (b - t * nb) * kQBlock + lane;
    const float v = to_float<T>(x[t * d + c]);
    float amax = fabsf(v);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    // as dart_ext.quant.quantize_activations: fp32 127 / amax, round half to even, clamp
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int q = __float2int_rn(v * inv);
    q = q < -127 ? -127 : (q > 127 ? 127 : q);
    s_xq[t * d + c] = static_cast<int8_t>(q);
    int sum = q;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      s_xs[b] = amax / 127.0f;
      s_xsum[b] = sum;
    }
  }
}

// Per-lane partial dots of one quantised row with the Mc staged token rows (summed over the warp
// by the caller). Lane l takes the 16-byte chunks l, l + 32, ... of the row.
template <QFmt F, int MAXT>
__device__ __forceinline__ void q_row_dot(const QMat& w, int64_t row, int64_t d, int group,
                                          int Mc, const int8_t* s_xq, const float* s_xs,
                                          const int* s_xsum, float (&acc)[MAXT]) {
  constexpr int VPC = F == QFmt::kQ8 ? 16 : 32;  // values per 16-byte chunk
  const int lane = threadIdx.x % kWarp;
  const int64_t rb = q_row_bytes<F>(d);
  const int64_t nch = rb / 16;
  const int64_t nb = d / kQBlock;
  const int64_t ng = d / group;
  const uint4* __restrict__ base = reinterpret_cast<const uint4*>(
      static_cast<const uint8_t*>(w.data) + row * rb);
  const uint16_t* __restrict__ sc = w.scales + row * ng;
  const uint16_t* __restrict__ mn = F == QFmt::kQ4M ? w.mins + row * ng : nullptr;
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.0f;
  for (int64_t c0 = lane; c0 < nch; c0 += kWarp * kQRowLoads) {
    uint4 v[kQRowLoads];
#pragma unroll
    for (int u = 0; u < kQRowLoads; ++u) {
      const int64_t ch = c0 + u * kWarp;
      if (ch < nch) v[u] = __ldcs(base + ch);
    }
#pragma unroll
    for (int u = 0; u < kQRowLoads; ++u) {
      const int64_t ch = c0 + u * kWarp;
      if (ch >= nch) break;
      const int64_t col = ch * VPC;  // first value of the chunk
      const int64_t blk = col / kQBlock;
      const float ws = half_bits_to_float(__ldg(sc + col / group));
      const float wm = F == QFmt::kQ4M ? half_bits_to_float(__ldg(mn + col / group)) : 0.0f;
      const int words[4] = {static_cast<int>(v[u].x), static_cast<int>(v[u].y),
                            static_cast<int>(v[u].z), static_cast<int>(v[u].w)};
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= Mc) break;
        const int8_t* xrow = s_xq + t * d;
        int dot = 0;
        if constexpr (F == QFmt::kQ8) {
          const int4 xv = *reinterpret_cast<const int4*>(xrow + col);
          dot = __dp4a(words[0], xv.x, dot);
          dot = __dp4a(words[1], xv.y, dot);
          dot = __dp4a(words[2], xv.z, dot);
          dot = __dp4a(words[3], xv.w, dot);
        } else {
          const int4 lo = *reinterpret_cast<const int4*>(xrow + col);  // values 0..15
          const int4 hi = *reinterpret_cast<const int4*>(xrow + col + 16);  // values 16..31
          const int xl[4] = {lo.x, lo.y, lo.z, lo.w};
          const int xh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            dot = __dp4a(words[i] & 0x0F0F0F0F, xl[i], dot);
            dot = __dp4a((words[i] >> 4) & 0x0F0F0F0F, xh[i], dot);
          }
        }
        const float xs = s_xs[t * nb + blk];
        if constexpr (F == QFmt::kQ8) {
          acc[t] = fmaf(ws * xs, static_cast<float>(dot), acc[t]);
        } else if constexpr (F == QFmt::kQ4) {
          acc[t] = fmaf(ws * xs, static_cast<float>(dot - 8 * s_xsum[t * nb + blk]), acc[t]);
        } else {
          acc[t] = fmaf(xs, fmaf(ws, static_cast<float>(dot),
                                 wm * static_cast<float>(s_xsum[t * nb + blk])),
                        acc[t]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 1 (and the whole of linear_q's decode path).
// ---------------------------------------------------------------------------------------------
template <typename T, QFmt F, QMode MODE, int MAXT>
__global__ void __launch_bounds__(kQThreads) qdot_kernel(QParams p) {
  DART_DYNAMIC_SMEM(int4, smem);
  const int Mc = p.Mc;
  const int64_t d = p.d;
  const int64_t nb = d / kQBlock;
  int8_t* s_xq = reinterpret_cast<int8_t*>(smem);
  float* s_xs = reinterpret_cast<float*>(s_xq + Mc * d);  // d % 32 == 0: 4-byte aligned
  int* s_xsum = reinterpret_cast<int*>(s_xs + Mc * nb);
  const int g = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  if constexpr (MODE != QMode::kLinear) {
    // phase 2's tickets, zeroed here (stream order puts this before phase 2; no memset node)
    if (blockIdx.x == 0 && blockIdx.y == 0 && p.counters != nullptr) {
      for (int i = threadIdx.x; i < p.G * p.ntiles; i += kQThreads) p.counters[i] = 0;
    }
  }
  q_stage_x<T>(static_cast<const T*>(p.x) + static_cast<int64_t>(g) * Mc * d, Mc, d, s_xq, s_xs,
               s_xsum);
  __syncthreads();

  const int64_t kg = MODE == QMode::kLinear ? p.N : q_group_length(p, g);
  const int64_t idx_base = static_cast<int64_t>(g) * p.idx_group_stride;
  const T* __restrict__ b1 = static_cast<const T*>(p.b1);
  const T* __restrict__ b2 = static_cast<const T*>(p.b2);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kQWarps + warp; j < kg;
       j += static_cast<int64_t>(gridDim.x) * kQWarps) {
    int64_t row = j;
    if constexpr (MODE != QMode::kLinear) {
      row = q_load_index(p, idx_base + j);
      DART_DEVICE_CHECK(row >= 0 && row < p.N,
                        "dart::gathered_glu_ffn_q/gathered_mlp_q: idx out of range [0, N)");
    }
    float a1[MAXT];
    q_row_dot<F, MAXT>(p.w1, row, d, p.group, Mc, s_xq, s_xs, s_xsum, a1);
    float a2[MAXT];
    if constexpr (MODE == QMode::kGlu) {
      q_row_dot<F, MAXT>(p.w2, row, d, p.group, Mc, s_xq, s_xs, s_xsum, a2);
    }
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= Mc) break;  // Mc is uniform over the warp: every lane reaches the shuffles
      a1[t] = warp_allreduce_sum(a1[t]);
      if constexpr (MODE == QMode::kGlu) a2[t] = warp_allreduce_sum(a2[t]);
    }
    if (lane == 0) {
      const float bias1 = b1 != nullptr ? to_float<T>(b1[row]) : 0.0f;
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= Mc) break;
        if constexpr (MODE == QMode::kLinear) {
          static_cast<T*>(p.y)[t * p.N + row] = from_float<T>(a1[t] + bias1);
        } else if constexpr (MODE == QMode::kGlu) {
          const float bias2 = b2 != nullptr ? to_float<T>(b2[row]) : 0.0f;
          p.h[(static_cast<int64_t>(g) * Mc + t) * p.k + j] =
              act_apply(p.act, a1[t] + bias1) * (a2[t] + bias2);
        } else {
          p.h[(static_cast<int64_t>(g) * Mc + t) * p.k + j] = act_apply(p.act, a1[t] + bias1);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: y[g*Mc + t, c] = sum_j h[g*Mc + t, j] * dequant(wo[idx_j])[c] (+ bo[c]), split-K.
// ---------------------------------------------------------------------------------------------
template <int VB>
struct RawBytes;
template <>
struct RawBytes<16> {
  using type = uint4;
  __device__ __forceinline__ static void words(const uint4& v, unsigned (&w)[4]) {
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
};
template <>
struct RawBytes<8> {
  using type = uint2;
  __device__ __forceinline__ static void words(const uint2& v, unsigned (&w)[2]) {
    w[0] = v.x;
    w[1] = v.y;
  }
};
template <>
struct RawBytes<4> {
  using type = unsigned int;
  __device__ __forceinline__ static void words(const unsigned& v, unsigned (&w)[1]) { w[0] = v; }
};
template <>
struct RawBytes<2> {
  using type = unsigned short;
  __device__ __forceinline__ static void words(const unsigned short& v, unsigned (&w)[1]) {
    w[0] = v;
  }
};

template <typename T, QFmt F, int MAXT, int VB>
__global__ void __launch_bounds__(kQThreads) qdown_kernel(QParams p) {
  constexpr int PER = F == QFmt::kQ8 ? VB : 2 * VB;  // values per lane
  constexpr int TILE = kWarp * PER;  // columns per tile
  constexpr int NW = VB >= 4 ? VB / 4 : 1;  // 32-bit words per lane
  constexpr int U = 64 / VB < 8 ? 64 / VB : 8;  // rows in flight per warp
  static_assert(MAXT * PER <= 32, "phase 2 keeps MAXT * PER accumulators per lane");
  using Raw = typename RawBytes<VB>::type;
  __shared__ __align__(16) float s_red[kQWarps * MAXT * TILE];
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
  const int64_t rb = q_row_bytes<F>(d);
  const int64_t ng = d / p.group;
  const int64_t boff = static_cast<int64_t>(tile) * kWarp * VB + lane * VB;  // lane's bytes
  const bool lane_ok = boff < rb;  // rb % 16 == 0: a lane is wholly in or out
  // the lane's first column (q8: VB consecutive columns; q4: VB columns from `first` and VB
  // columns from `first + 16`, all in one 32-block)
  const int64_t first = F == QFmt::kQ8 ? boff : (boff / 16) * kQBlock + boff % 16;
  const int64_t sg = first / p.group;  // the lane's scale group (one per row)
  const int64_t tile_c0 = static_cast<int64_t>(tile) * TILE;

  const int64_t kg = q_group_length(p, g);
  const int64_t j0 = static_cast<int64_t>(split) * p.chunk;
  const int64_t j1 = j0 + p.chunk < kg ? j0 + p.chunk : kg;
  const int64_t idx_base = static_cast<int64_t>(g) * p.idx_group_stride;
  const float* __restrict__ hg = p.h + static_cast<int64_t>(g) * Mc * k;
  const uint8_t* __restrict__ wo = static_cast<const uint8_t*>(p.wo.data);

  float acc[MAXT][PER];
  float off[MAXT];  // sum over rows of the per-row offset (q4: -8 * h * scale, q4m: h * min)
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    off[t] = 0.0f;
#pragma unroll
    for (int e = 0; e < PER; ++e) acc[t][e] = 0.0f;
  }

  for (int64_t rb0 = j0 + warp; rb0 < j1; rb0 += static_cast<int64_t>(kQWarps) * U) {
    int64_t rows[U];
    Raw raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = rb0 + static_cast<int64_t>(u) * kQWarps;
      rows[u] = 0;
      raw[u] = Raw{};
      if (j < j1) {
        rows[u] = q_load_index(p, idx_base + j);
        DART_DEVICE_CHECK(rows[u] >= 0 && rows[u] < p.N,
                          "dart::gathered_glu_ffn_q/gathered_mlp_q: idx out of range [0, N)");
        if (lane_ok) raw[u] = __ldcs(reinterpret_cast<const Raw*>(wo + rows[u] * rb + boff));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = rb0 + static_cast<int64_t>(u) * kQWarps;
      if (j >= j1 || !lane_ok) continue;
      const float s = half_bits_to_float(__ldg(p.wo.scales + rows[u] * ng + sg));
      const float m =
          F == QFmt::kQ4M ? half_bits_to_float(__ldg(p.wo.mins + rows[u] * ng + sg)) : 0.0f;
      unsigned w[NW];
      RawBytes<VB>::words(raw[u], w);
      float vals[PER];  // in the order of the accumulators (see `column` below)
      if constexpr (F == QFmt::kQ8) {
#pragma unroll
        for (int e = 0; e < PER; ++e) {
          // signed byte b as float: (b ^ 0x80) + 2^23 - (2^23 + 128), exact
          const unsigned b = (w[e / 4] >> (8 * (e % 4))) & 0xFFu;
          vals[e] = __uint_as_float(0x4B000000u | (b ^ 0x80u)) - 8388736.0f;
        }
      } else {
#pragma unroll
        for (int e = 0; e < VB; ++e) {
          const unsigned b = (w[e / 4] >> (8 * (e % 4))) & 0xFFu;
          vals[e] = small_uint_to_float(b & 0x0Fu);
          vals[VB + e] = small_uint_to_float(b >> 4);
        }
      }
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t >= Mc) break;
        const float hv = __ldg(hg + static_cast<int64_t>(t) * k + j);
        const float hs = hv * s;
        if constexpr (F == QFmt::kQ4) off[t] = fmaf(-8.0f, hs, off[t]);
        if constexpr (F == QFmt::kQ4M) off[t] = fmaf(hv, m, off[t]);
#pragma unroll
        for (int e = 0; e < PER; ++e) acc[t][e] = fmaf(hs, vals[e], acc[t][e]);
      }
    }
  }

  // the lane's values into the CTA's [warp][t][tile column] slab
  auto column = [&](int e) -> int64_t {  // tile-relative column of accumulator e
    if constexpr (F == QFmt::kQ8) {
      return first + e - tile_c0;
    } else {
      return first + (e < VB ? e : 16 + e - VB) - tile_c0;
    }
  };
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
#pragma unroll
    for (int e = 0; e < PER; ++e) {
      s_red[(warp * MAXT + t) * TILE + column(e)] = acc[t][e] + off[t];
    }
  }
  __syncthreads();

  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bo = static_cast<const T*>(p.bo);
  const int64_t row0 = static_cast<int64_t>(g) * Mc;
  const int tile_floats = Mc * TILE;
  constexpr int kPerThread = (MAXT * TILE + kQThreads - 1) / kQThreads;
  float sums[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kQThreads;
    float v = 0.0f;
    if (e < tile_floats) {
      const int t = e / TILE;
      const int c = e % TILE;
#pragma unroll
      for (int w = 0; w < kQWarps; ++w) v += s_red[(w * MAXT + t) * TILE + c];  // fixed order
    }
    sums[i] = v;
  }

  if (p.splits == 1) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kQThreads;
      const int64_t c = tile_c0 + e % TILE;
      if (e < tile_floats && c < d) {
        const float b = bo != nullptr ? to_float<T>(bo[c]) : 0.0f;
        y[(row0 + e / TILE) * d + c] = from_float<T>(sums[i] + b);
      }
    }
    return;
  }

  // this CTA's partial tile [Mc, TILE]; split s of (g, tile) at s * tiles_per_split
  const int64_t tiles_per_split = static_cast<int64_t>(p.G) * p.ntiles;
  float* const tile_base = p.partial + (static_cast<int64_t>(g) * p.ntiles + tile) * tile_floats;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kQThreads;
    if (e < tile_floats) __stcg(tile_base + split * tiles_per_split * tile_floats + e, sums[i]);
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
  // the last CTA of the tile sums the splits in split order
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = tid + i * kQThreads;
    const int64_t c = tile_c0 + e % TILE;
    if (e >= tile_floats || c >= d) continue;
    float v = 0.0f;
    for (int s = 0; s < p.splits; ++s) v += __ldcg(tile_base + s * tiles_per_split * tile_floats + e);
    const float b = bo != nullptr ? to_float<T>(bo[c]) : 0.0f;
    y[(row0 + e / TILE) * d + c] = from_float<T>(v + b);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
inline int q_maxt(int Mc) { return Mc <= 1 ? 1 : Mc <= 2 ? 2 : Mc <= 4 ? 4 : 8; }

inline int qdown_vb_of(QFmt f, int maxt) {
  switch (f) {
    case QFmt::kQ8:
      return qdown_vb<QFmt::kQ8>(maxt);
    default:
      return qdown_vb<QFmt::kQ4>(maxt);
  }
}

inline size_t q_smem1(int Mc, int64_t d) {
  const size_t nb = static_cast<size_t>(d / kQBlock);
  return static_cast<size_t>(Mc) * (static_cast<size_t>(d) + nb * (sizeof(float) + sizeof(int)));
}

// Fixes the split count (clamped to [1, k / kQMinChunk]) and the workspace layout.
inline void q_plan_set_splits(QPlan& plan, int G, int Mc, int64_t k, int64_t splits) {
  const int64_t max_splits = k / kQMinChunk;
  if (splits > max_splits) splits = max_splits;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  plan.chunk = splits <= 1 ? k : ceil_div(ceil_div(k, splits), kQChunkQuantum) * kQChunkQuantum;
  plan.splits = static_cast<int>(ceil_div(k, plan.chunk));
  const size_t rows = static_cast<size_t>(G) * Mc;
  const size_t per = static_cast<size_t>(plan.vb) * 2;  // q4 values per lane (q8: vb, smaller)
  const size_t tile = static_cast<size_t>(kWarp) * per;
  size_t off = 0;
  plan.h_off = off;
  off = align_up(off + rows * static_cast<size_t>(k) * sizeof(float), 256);
  plan.partial_off = off;
  if (plan.splits > 1) off = align_up(off + plan.splits * rows * plan.ntiles * tile * sizeof(float), 256);
  plan.counters_off = off;
  if (plan.splits > 1) off = align_up(off + static_cast<size_t>(G) * plan.ntiles * sizeof(int), 256);
  plan.ws_bytes = off;
}

// The decode plan of the gathered FFN ops (G groups of Mc tokens, k kept neurons each) or, with
// k = 0, of linear_q (no phase 2, no workspace). d must be a multiple of 32 (the formats' own
// rule); `max_smem` is the device's opt-in limit of dynamic shared memory.
inline QPlan plan_q_decode(QFmt f, int G, int Mc, int64_t d, int64_t k, int num_sms,
                           size_t max_smem) {
  QPlan plan;
  if (G < 1 || G > 65535 || Mc < 1 || Mc > kQDecodeMaxTokens || d < kQBlock || d % kQBlock) {
    return plan;
  }
  plan.smem1 = q_smem1(Mc, d);
  plan.smem_cap = max_smem < (200u << 10) ? max_smem : (200u << 10);
  if (plan.smem1 > plan.smem_cap) return plan;
  plan.ok = true;
  plan.maxt = q_maxt(Mc);
  if (k < 1) return plan;  // linear_q
  plan.vb = qdown_vb_of(f, plan.maxt);
  const int64_t rb = f == QFmt::kQ8 ? d : d / 2;
  plan.ntiles = static_cast<int>(ceil_div(rb, static_cast<int64_t>(kWarp) * plan.vb));
  // enough CTAs for two waves of 2 resident CTAs per SM, at least kQMinChunk neurons a split,
  // and the partials' traffic (written and read back, fp32 [Mc, d] per split; mostly L2) at most
  // a quarter of the down rows' bytes
  const int64_t slots = 4LL * num_sms;
  const int64_t per_split = static_cast<int64_t>(plan.ntiles) * G;
  int64_t splits = ceil_div(slots, per_split);
  const int64_t by_traffic = k * rb / (32LL * Mc * d);
  if (splits > by_traffic) splits = by_traffic;
  q_plan_set_splits(plan, G, Mc, k, splits);
  return plan;
}

template <typename T, QFmt F, QMode MODE, int MAXT>
cudaError_t launch_q_decode_impl(const QParams& p, const QPlan& plan, int num_sms,
                                 cudaStream_t stream) {
  auto k1 = qdot_kernel<T, F, MODE, MAXT>;
  int occ = 0;
  cudaError_t err = cached_occupancy(k1, plan.smem1, plan.smem_cap, &occ);
  if (err != cudaSuccess) return err;
  const int64_t rows = MODE == QMode::kLinear ? p.N : p.k;
  int64_t gx = ceil_div(static_cast<int64_t>(num_sms) * occ, p.G);  // a persistent grid
  const int64_t gmax = ceil_div(rows, kQWarps);
  if (gx > gmax) gx = gmax;
  if (gx < 1) gx = 1;
  DART_LAUNCH(dim3(static_cast<unsigned>(gx), p.G), kQThreads, plan.smem1, stream, k1)(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || MODE == QMode::kLinear) return err;
  constexpr QFmt FD = F;  // phase 2 reads the down rows in the same format
  constexpr int VB = qdown_vb<FD>(MAXT);
  DART_LAUNCH(dim3(p.ntiles, p.splits, p.G), kQThreads, 0, stream,
              qdown_kernel<T, FD, MAXT, VB>)(p);
  return cudaGetLastError();
}

template <typename T, QFmt F, QMode MODE>
cudaError_t launch_q_decode_fmt(const QParams& p, const QPlan& plan, int num_sms,
                                cudaStream_t stream) {
  switch (plan.maxt) {
    case 1:
      return launch_q_decode_impl<T, F, MODE, 1>(p, plan, num_sms, stream);
    case 2:
      return launch_q_decode_impl<T, F, MODE, 2>(p, plan, num_sms, stream);
    case 4:
      return launch_q_decode_impl<T, F, MODE, 4>(p, plan, num_sms, stream);
    default:
      return launch_q_decode_impl<T, F, MODE, 8>(p, plan, num_sms, stream);
  }
}

// p.h / p.partial / p.counters point into a workspace of plan.ws_bytes bytes (the plan's
// offsets; linear_q needs none); p.splits / p.ntiles / p.chunk are filled here. Pointers must be
// 16-byte aligned (data rows are then too: d % 32 == 0), scales / mins 2-byte aligned.
template <typename T, QMode MODE>
cudaError_t launch_q_decode(QParams p, QFmt f, const QPlan& plan, int num_sms,
                            cudaStream_t stream) {
  if (!plan.ok || p.d % kQBlock != 0 || (p.group != 32 && p.group != 64) || p.d % p.group != 0) {
    return cudaErrorInvalidValue;
  }
  const QMat* mats[3] = {&p.w1, MODE == QMode::kGlu ? &p.w2 : nullptr,
                         MODE == QMode::kLinear ? nullptr : &p.wo};
  for (const QMat* m : mats) {
    if (m == nullptr) continue;
    if (!host_aligned(m->data, 16) || !host_aligned(m->scales, 2) ||
        (f == QFmt::kQ4M && (m->mins == nullptr || !host_aligned(m->mins, 2)))) {
      return cudaErrorInvalidValue;
    }
  }
  p.splits = plan.splits;
  p.ntiles = plan.ntiles;
  p.chunk = plan.chunk;
  if (MODE == QMode::kLinear) p.k = p.N;
  if (plan.splits <= 1) {
    p.partial = nullptr;
    p.counters = nullptr;
  }
  switch (f) {
    case QFmt::kQ8:
      return launch_q_decode_fmt<T, QFmt::kQ8, MODE>(p, plan, num_sms, stream);
    case QFmt::kQ4:
      return launch_q_decode_fmt<T, QFmt::kQ4, MODE>(p, plan, num_sms, stream);
    default:
      return launch_q_decode_fmt<T, QFmt::kQ4M, MODE>(p, plan, num_sms, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill helpers: dequantise rows (gathered or all) into the activation dtype; round x.
// ---------------------------------------------------------------------------------------------
// out[g, s*k + j, :] = dequant(src_s[idx[g * idx_group_stride + j]]) for s < nsrc, j < k_g
// (zeros past a group's length); with idx == nullptr, out[j] = dequant(src_0[j]) for j < k.
// One thread per pair of values: grid-stride over (group, source, row, pair).
template <typename T>
struct QGatherParams {
  QMat src[3];
  int nsrc;
  QFmt fmt;
  int group;
  int64_t d, N, k;
  const int64_t* idx;  // nullptr: rows 0..k-1 of src[0]
  int64_t idx_group_stride;
  const int64_t* lens;  // [groups] or nullptr
  int64_t groups;
  T* out;  // [groups, nsrc * k, d]
};

template <typename T>
__global__ void q_dequant_rows_kernel(QGatherParams<T> p) {
  const int64_t per_row = p.d / 2;  // pairs of values
  const int64_t total = p.groups * p.nsrc * p.k * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pr = i % per_row;
    const int64_t r = i / per_row;  // (group, source, row j)
    const int64_t j = r % p.k;
    const int64_t s = (r / p.k) % p.nsrc;
    const int64_t g = r / (p.k * p.nsrc);
    T* dst = p.out + r * p.d + 2 * pr;
    if (p.lens != nullptr && j >= p.lens[g]) {
      dst[0] = from_float<T>(0.0f);
      dst[1] = from_float<T>(0.0f);
      continue;
    }
    const int64_t row = p.idx != nullptr ? p.idx[g * p.idx_group_stride + j] : j;
    DART_DEVICE_CHECK(row >= 0 && row < p.N,
                      "dart::gathered_glu_ffn_q/gathered_mlp_q: idx out of range [0, N)");
    const QMat& m = p.src[s];
    const int64_t ng = p.d / p.group;
    float v[2];
    for (int e = 0; e < 2; ++e) {
      const int64_t c = 2 * pr + e;
      const float sc = half_bits_to_float(m.scales[row * ng + c / p.group]);
      if (p.fmt == QFmt::kQ8) {
        v[e] = sc * static_cast<float>(static_cast<const int8_t*>(m.data)[row * p.d + c]);
      } else {
        const int64_t blk = c / kQBlock;
        const int64_t w = c % kQBlock;
        const uint8_t b =
            static_cast<const uint8_t*>(m.data)[row * (p.d / 2) + blk * 16 + (w % 16)];
        const float u = static_cast<float>(w < 16 ? (b & 0x0F) : (b >> 4));
        v[e] = p.fmt == QFmt::kQ4 ? sc * (u - 8.0f)
                                  : fmaf(sc, u, half_bits_to_float(m.mins[row * ng + c / p.group]));
      }
    }
    dst[0] = from_float<T>(v[0]);
    dst[1] = from_float<T>(v[1]);
  }
}

template <typename T>
cudaError_t launch_q_dequant_rows(const QGatherParams<T>& p, int num_sms, cudaStream_t stream) {
  const int64_t total = p.groups * p.nsrc * p.k * (p.d / 2);
  if (total <= 0) return cudaSuccess;
  DART_LAUNCH(elementwise_blocks(total, num_sms), 256, 0, stream, q_dequant_rows_kernel<T>)(p);
  return cudaGetLastError();
}

// xr[r, :] = x[r, :] rounded as the ops round activations (int8 per block of 32, back to T).
// One warp per block of 32 values.
template <typename T>
__global__ void q_round_x_kernel(const T* __restrict__ x, T* __restrict__ xr, int64_t blocks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       b < blocks; b += warps) {
    const float v = to_float<T>(x[b * kQBlock + lane]);
    float amax = fabsf(v);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int q = __float2int_rn(v * inv);
    q = q < -127 ? -127 : (q > 127 ? 127 : q);
    xr[b * kQBlock + lane] = from_float<T>(static_cast<float>(q) * (amax / 127.0f));
  }
}

template <typename T>
cudaError_t launch_q_round_x(const T* x, T* xr, int64_t numel, int num_sms, cudaStream_t stream) {
  const int64_t blocks = numel / kQBlock;
  if (blocks <= 0) return cudaSuccess;
  DART_LAUNCH(elementwise_blocks(blocks * kWarp, num_sms), 256, 0, stream,
              q_round_x_kernel<T>)(x, xr, blocks);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dart
