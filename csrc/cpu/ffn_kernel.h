// Index-in-kernel FFN core shared by gathered_glu_ffn (gated, R = 2 input rows per neuron) and
// gathered_mlp (plain, R = 1 input row + bias).
//
// Small M (tokens < gemm_min_tokens()): one pass over the kept neurons. The k neurons are split
// into contiguous chunks claimed by the threads; for each neuron a thread reads its input row(s) once,
// computes the dots with every token (token tiles of 4 share each row load), applies the
// activation and adds h * down_row into a per-chunk partial output [M, d]; the partials are then
// summed in chunk order. Every weight byte of a kept neuron is read exactly once; the chunking
// depends on the shape only, so the result is deterministic for any thread count.
//
// Large M: the kept rows are gathered (converted to fp32) into temporaries [R*k, d] and [k, d] and
// two fp32 GEMMs (MKL via at::mm) run on them. This copies k/N of the weights per call, never the
// whole weight, and at many tokens the GEMM dominates the copy.
#pragma once

#include "common.h"

#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

namespace dart {
namespace cpu {

// Token count from which the gather + GEMM path is used (env DART_CPU_GEMM_MIN_TOKENS, read once).
inline int64_t gemm_min_tokens() {
  static const int64_t v = [] {
    const char* e = std::getenv("DART_CPU_GEMM_MIN_TOKENS");
    return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(8);
  }();
  return v;
}

// Upper bound of the neuron chunks of the small-M kernel (threads claim chunks dynamically).
constexpr int64_t kMaxChunks = 16;

// out[t*R + r] = dot(x[t], w[r]) for t < TM, r < R.
// pf (optional): rows of the next neuron, prefetched at the same offsets while this one streams,
// so the jump to the next (scattered) row does not restart the hardware prefetcher cold.
template <class L, int TM, int R>
inline void dot_tile(const float* x, int64_t ldx, const typename L::S* const* w, int64_t d,
                     float* out, const typename L::S* const* pf = nullptr) {
  constexpr int U = (TM * R <= 4) ? 2 : 1;  // extra accumulators hide FMA latency
  vf acc[U][TM][R];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < TM; ++t)
      for (int r = 0; r < R; ++r) acc[u][t][r] = vzero();
  int64_t i = 0;
  for (; i + U * kV <= d; i += U * kV) {
    if (pf)
      for (int r = 0; r < R; ++r) __builtin_prefetch(pf[r] + i + 8 * kV);
    for (int u = 0; u < U; ++u) {
      vf wv[R];
      for (int r = 0; r < R; ++r) wv[r] = L::load(w[r] + i + u * kV);
      for (int t = 0; t < TM; ++t) {
        vf xv = vload(x + t * ldx + i + u * kV);
        for (int r = 0; r < R; ++r) acc[u][t][r] += xv * wv[r];
      }
    }
  }
  for (; i + kV <= d; i += kV) {
    vf wv[R];
    for (int r = 0; r < R; ++r) wv[r] = L::load(w[r] + i);
    for (int t = 0; t < TM; ++t) {
      vf xv = vload(x + t * ldx + i);
      for (int r = 0; r < R; ++r) acc[0][t][r] += xv * wv[r];
    }
  }
  for (int t = 0; t < TM; ++t) {
    for (int r = 0; r < R; ++r) {
      vf a = acc[0][t][r];
      if (U == 2) a += acc[U - 1][t][r];
      float s = hsum(a);
      for (int64_t j = i; j < d; ++j) s += x[t * ldx + j] * L::scalar(w[r][j]);
      out[t * R + r] = s;
    }
  }
}

// y[t] += h[t] * w for t < M (y rows of length d, leading dim ldy).
template <class L>
inline void axpy_rows(float* y, int64_t ldy, const float* h, int64_t M, const typename L::S* w,
                      int64_t d, const typename L::S* pf = nullptr) {
  int64_t i = 0;
  for (; i + kV <= d; i += kV) {
    if (pf) __builtin_prefetch(pf + i + 8 * kV);
    vf wv = L::load(w + i);
    for (int64_t t = 0; t < M; ++t) {
      float* yp = y + t * ldy + i;
      vstore(yp, vload(yp) + h[t] * wv);
    }
  }
  for (; i < d; ++i) {
    float wi = L::scalar(w[i]);
    for (int64_t t = 0; t < M; ++t) y[t * ldy + i] += h[t] * wi;
  }
}

// Pre-activations of neuron n for all M tokens: pre[t*R + r] = x[t] . in_r[n].
template <class L, int R>
inline void neuron_dots(const float* x, int64_t M, int64_t d, const typename L::S* const* rows,
                        float* pre, const typename L::S* const* pf) {
  int64_t t = 0;
  if (M == 1) {
    dot_tile<L, 1, R>(x, d, rows, d, pre, pf);
    return;
  }
  for (; t + 4 <= M; t += 4)
    dot_tile<L, 4, R>(x + t * d, d, rows, d, pre + t * R, t == 0 ? pf : nullptr);
  switch (M - t) {
    case 3:
      dot_tile<L, 3, R>(x + t * d, d, rows, d, pre + t * R);
      break;
    case 2:
      dot_tile<L, 2, R>(x + t * d, d, rows, d, pre + t * R);
      break;
    case 1:
      dot_tile<L, 1, R>(x + t * d, d, rows, d, pre + t * R);
      break;
    default:
      break;
  }
}

struct FfnArgs {
  const void* in0;  // gate (GLU) or w_in (MLP) base pointer
  int64_t s0;       // row stride (elements)
  const void* in1;  // up (GLU) or nullptr
  int64_t s1;
  const void* out;  // w_down_t / w_out_t
  int64_t so;
  const float* b_in;  // MLP: bias of the kept neurons, [k] fp32 (already gathered), or nullptr
  Act act;
};

// y [M, d] fp32 (zero-initialised by the caller) += FFN of x [M, d] fp32 over neurons idx [k].
template <class L, int R>
void ffn_small(const float* x, int64_t M, int64_t d, const FfnArgs& a, const int64_t* idx,
               int64_t k, float* y) {
  using S = typename L::S;
  if (k == 0 || M == 0) return;
  const S* in0 = static_cast<const S*>(a.in0);
  const S* in1 = static_cast<const S*>(a.in1);
  const S* wo = static_cast<const S*>(a.out);
  // Neurons are cut into a number of chunks that depends on the shape only (never on the
  // thread count), each chunk accumulating into its own partial output; threads claim chunks
  // dynamically (a descheduled thread does not hold up the others) and the partials are summed in
  // chunk order, so the result is bitwise identical for any thread count.
  const int64_t macs = k * d * (R + 1) * M;
  const int64_t nchunks =
      macs < 65536 ? 1 : std::min<int64_t>({kMaxChunks, std::max<int64_t>(1, k / 16)});
  std::vector<float> part(nchunks > 1 ? (nchunks - 1) * M * d : 0, 0.0f);
  auto run_chunk = [&](int64_t c) {
    float* yc = c == 0 ? y : part.data() + (c - 1) * M * d;
    const int64_t j0 = k * c / nchunks, j1 = k * (c + 1) / nchunks;
    std::vector<float> pre(M * R), h(M);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = idx[j];
      const S* rows[R];
      rows[0] = in0 + n * a.s0;
      if (R == 2) rows[R - 1] = in1 + n * a.s1;
      const S* pf[R];  // next neuron's rows (prefetched while this one streams)
      const S* pfo = nullptr;
      const bool has_next = j + 1 < j1;
      if (has_next) {
        const int64_t nn = idx[j + 1];
        pf[0] = in0 + nn * a.s0;
        if (R == 2) pf[R - 1] = in1 + nn * a.s1;
        pfo = wo + nn * a.so;
      }
      neuron_dots<L, R>(x, M, d, rows, pre.data(), has_next ? pf : nullptr);
      if (R == 2) {
        for (int64_t t = 0; t < M; ++t) h[t] = apply_act(a.act, pre[2 * t]) * pre[2 * t + 1];
      } else {
        const float b = a.b_in ? a.b_in[j] : 0.0f;
        for (int64_t t = 0; t < M; ++t) h[t] = apply_act(a.act, pre[t] + b);
      }
      axpy_rows<L>(yc, d, h.data(), M, wo + n * a.so, d, pfo);
    }
  };
  const int64_t nthr = std::min<int64_t>(at::get_num_threads(), nchunks);
  if (nthr <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < nchunks; ++c) run_chunk(c);
  } else {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
      for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) run_chunk(c);
    });
  }
  if (nchunks == 1) return;
  const int64_t total = M * d;
  auto reduce = [&](int64_t b, int64_t e) {
    for (int64_t c = 1; c < nchunks; ++c) {
      const float* p = part.data() + (c - 1) * total;
      for (int64_t i = b; i < e; ++i) y[i] += p[i];
    }
  };
  if (total * nchunks < (1 << 18)) {
    reduce(0, total);
  } else {
    at::parallel_for(0, total, 16384, reduce);
  }
}

// out [k, d] fp32 = rows idx of w (row stride sw), converted to fp32. Multi-threaded.
template <class L>
void gather_rows_f32(const typename L::S* w, int64_t sw, const int64_t* idx, int64_t k, int64_t d,
                     float* out) {
  at::parallel_for(0, k, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t j = b; j < e; ++j) {
                       const typename L::S* src = w + idx[j] * sw;
                       float* dst = out + j * d;
                       int64_t i = 0;
                       for (; i + kV <= d; i += kV) vstore(dst + i, L::load(src + i));
                       for (; i < d; ++i) dst[i] = L::scalar(src[i]);
                     }
                   });
}

// Large-M path: y [M, d] fp32 += FFN via gathered fp32 weights and at::mm, in blocks of kept
// neurons so the temporary stays small (about 1 MB a matrix, cache-resident and reused across
// blocks; a temporary as large as
// the kept weights would cost more in page faults than the GEMM at moderate M).
template <class L, int R>
void ffn_gemm(const at::Tensor& xf, const FfnArgs& a, const int64_t* idx, int64_t k,
              at::Tensor& y) {
  using S = typename L::S;
  // The ops are inference-only (autograd falls through): run the nested ATen GEMMs below
  // autograd, or inputs that require grad make the out= variants refuse to run.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = xf.size(0), d = xf.size(1);
  if (k == 0) return;
  const int64_t nb = std::min<int64_t>(k, std::max<int64_t>(64, (int64_t(1) << 18) / d));
  auto opts = xf.options();
  at::Tensor win = at::empty({R * nb, d}, opts);
  at::Tensor wout = at::empty({nb, d}, opts);
  at::Tensor pre = at::empty({M, R * nb}, opts);
  at::Tensor h = at::empty({M, nb}, opts);
  const Act act = a.act;
  for (int64_t j0 = 0; j0 < k; j0 += nb) {
    const int64_t kb = std::min<int64_t>(nb, k - j0);
    const int64_t* ib = idx + j0;
    float* wi = win.data_ptr<float>();
    gather_rows_f32<L>(static_cast<const S*>(a.in0), a.s0, ib, kb, d, wi);
    if (R == 2) gather_rows_f32<L>(static_cast<const S*>(a.in1), a.s1, ib, kb, d, wi + kb * d);
    gather_rows_f32<L>(static_cast<const S*>(a.out), a.so, ib, kb, d, wout.data_ptr<float>());
    at::Tensor preb = pre.narrow(1, 0, R * kb);
    at::mm_out(preb, xf, win.narrow(0, 0, R * kb).t());  // [M, R*kb] (row stride R*nb)
    const float* pp = preb.data_ptr<float>();
    const int64_t lp = preb.stride(0);
    at::Tensor hb = h.narrow(1, 0, kb);
    float* hp = hb.data_ptr<float>();
    const int64_t lh = hb.stride(0);
    const float* b_in = a.b_in ? a.b_in + j0 : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / kb), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* pr = pp + t * lp;
        float* hr = hp + t * lh;
        if (R == 2) {
          for (int64_t j = 0; j < kb; ++j) hr[j] = apply_act(act, pr[j]) * pr[kb + j];
        } else {
          for (int64_t j = 0; j < kb; ++j) hr[j] = apply_act(act, pr[j] + (b_in ? b_in[j] : 0.f));
        }
      }
    });
    y.addmm_(hb, wout.narrow(0, 0, kb));
  }
}

// Runs the FFN for x2 [M, d] fp32 contiguous with idx [k] into y2 [M, d] fp32 (zeroed).
template <class L, int R>
void ffn_dispatch(const at::Tensor& x2, const FfnArgs& a, const int64_t* idx, int64_t k,
                  at::Tensor& y2) {
  const int64_t M = x2.size(0), d = x2.size(1);
  if (M >= gemm_min_tokens()) {
    ffn_gemm<L, R>(x2, a, idx, k, y2);
  } else {
    ffn_small<L, R>(x2.data_ptr<float>(), M, d, a, idx, k, y2.data_ptr<float>());
  }
}

}  // namespace cpu
}  // namespace dart
