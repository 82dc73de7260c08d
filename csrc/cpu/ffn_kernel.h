// Index-in-kernel FFN shared by gathered_glu_ffn (gated, R = 2 input rows per neuron) and
// gathered_mlp (plain, R = 1 input row + bias): the threading and the two routes around the
// torch-free hot loops of kernel_core.inc (run through core_kernels(), the variant this CPU runs).
//
// Small M (tokens < gemm_min_tokens()): one pass over the kept neurons. The k neurons are split
// into contiguous chunks claimed by the threads; each chunk streams its neurons' rows once
// (CoreKernels::ffn_neurons) into a per-chunk partial output [M, d]; the partials are then summed
// in chunk order. The chunking depends on the shape only, so the result is bitwise identical for
// any thread count.
//
// Large M: the kept rows are gathered (converted to fp32) into temporaries [R*k, d] and [k, d] and
// two fp32 GEMMs (MKL via at::mm) run on them. This copies k/N of the weights per call, never the
// whole weight, and at many tokens the GEMM dominates the copy.
#pragma once

#include "common.h"

#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace dart {
namespace cpu {

// Upper bound of the neuron chunks of the small-M kernel (threads claim chunks dynamically).
constexpr int64_t kMaxChunks = 16;

// x [M, d] rounded to int8 per block of 32 (CoreKernels::quantize_act), owning its buffers.
struct QuantizedAct {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  QAct view() const { return {q.data(), scale.data(), sum.data()}; }
};

inline QuantizedAct quantize_act(const CoreKernels& core, const float* x, int64_t M, int64_t d) {
  QuantizedAct r{std::vector<int8_t>(M * d), std::vector<float>(M * d / kQBlock),
                 std::vector<int32_t>(M * d / kQBlock)};
  core.quantize_act(x, M, d, r.q.data(), r.scale.data(), r.sum.data());
  return r;
}

// xf [M, d] as the quantised ops see it in their input dots: each block of 32 rounded to int8 and
// scaled back (dart_ext.quant.quantize_activations), for the GEMM routes.
inline at::Tensor fake_quant_act(const CoreKernels& core, const at::Tensor& xf) {
  const int64_t M = xf.size(0), d = xf.size(1);
  const QuantizedAct qa = quantize_act(core, xf.data_ptr<float>(), M, d);
  at::Tensor out = at::empty_like(xf);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < M * d; ++i) o[i] = static_cast<float>(qa.q[i]) * qa.scale[i / kQBlock];
  return out;
}

// y [M, d] fp32 (zero-initialised by the caller) += FFN of x [M, d] fp32 over neurons idx [k].
inline void ffn_small(const float* x, int64_t M, int64_t d, const FfnArgs& a, const int64_t* idx,
                      int64_t k, float* y) {
  if (k == 0 || M == 0) return;
  const CoreKernels& core = core_kernels();
  // quantised weights: the activations are rounded to int8 once per call, shared by all chunks
  QuantizedAct xq;
  if (a.q) xq = quantize_act(core, x, M, d);
  const QAct xa = xq.view();
  // Neurons are cut into a number of chunks that depends on the shape only (never on the
  // thread count), each chunk accumulating into its own partial output; threads claim chunks
  // dynamically (a descheduled thread does not hold up the others) and the partials are summed in
  // chunk order, so the result is bitwise identical for any thread count.
  const int64_t macs = k * d * (a.rows + 1) * M;
  const int64_t nchunks =
      macs < 65536 ? 1 : std::min<int64_t>({kMaxChunks, std::max<int64_t>(1, k / 16)});
  std::vector<float> part(nchunks > 1 ? (nchunks - 1) * M * d : 0, 0.0f);
  auto run_chunk = [&](int64_t c) {
    float* yc = c == 0 ? y : part.data() + (c - 1) * M * d;
    std::vector<float> scratch(3 * M);
    const int64_t j0 = k * c / nchunks, j1 = k * (c + 1) / nchunks;
    if (a.q) {
      core.qffn_neurons(xa, M, d, a, idx, j0, j1, yc, scratch.data());
    } else {
      core.ffn_neurons(x, M, d, a, idx, j0, j1, yc, scratch.data());
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
inline void gather_rows_f32(const CoreKernels& core, Elem e, const void* w, int64_t sw,
                            const int64_t* idx, int64_t k, int64_t d, float* out) {
  at::parallel_for(0, k, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                   [&](int64_t b, int64_t e_) {
                     core.gather_rows_f32(e, w, sw, idx + b, e_ - b, d, out + b * d);
                   });
}

// Large-M path: y [M, d] fp32 += FFN via gathered fp32 weights and at::mm, in blocks of kept
// neurons so the temporary stays small (about 1 MB a matrix, cache-resident and reused across
// blocks; a temporary as large as the kept weights would cost more in page faults than the GEMM
// at moderate M).
inline void ffn_gemm(const at::Tensor& x_in, const FfnArgs& a, const int64_t* idx, int64_t k,
                     at::Tensor& y) {
  // The ops are inference-only (autograd falls through): run the nested ATen GEMMs below
  // autograd, or inputs that require grad make the out= variants refuse to run.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = x_in.size(0), d = x_in.size(1);
  if (k == 0) return;
  const CoreKernels& core = core_kernels();
  // quantised weights: the input GEMM sees x rounded as the small-M route's int8 dots do
  const at::Tensor xf = a.q ? fake_quant_act(core, x_in) : x_in;
  auto gather = [&](int m, const void* w, int64_t sw, const int64_t* ib, int64_t kb, float* out) {
    if (a.q) {
      at::parallel_for(0, kb, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)),
                       [&](int64_t b, int64_t e) {
                         core.qdequant_rows(a.q[m], a.qs, ib + b, 0, e - b, d, out + b * d);
                       });
    } else {
      gather_rows_f32(core, a.elem, w, sw, ib, kb, d, out);
    }
  };
  const int64_t R = a.rows;
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
    gather(0, a.in0, a.s0, ib, kb, wi);
    if (R == 2) gather(1, a.in1, a.s1, ib, kb, wi + kb * d);
    gather(2, a.out, a.so, ib, kb, wout.data_ptr<float>());
    at::Tensor preb = pre.narrow(1, 0, R * kb);
    at::mm_out(preb, xf, win.narrow(0, 0, R * kb).t());  // [M, R*kb] (row stride R*nb)
    const float* pp = preb.data_ptr<float>();
    const int64_t lp = preb.stride(0);
    at::Tensor hb = h.narrow(1, 0, kb);
    float* hp = hb.data_ptr<float>();
    const int64_t lh = hb.stride(0);
    const float* b_in = a.b_in ? a.b_in + j0 : nullptr;
    const float* b_in1 = a.b_in1 ? a.b_in1 + j0 : nullptr;
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / kb), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* pr = pp + t * lp;
        float* hr = hp + t * lh;
        if (R == 2) {
          for (int64_t j = 0; j < kb; ++j)
            hr[j] = apply_act(act, pr[j] + (b_in ? b_in[j] : 0.f)) *
                    (pr[kb + j] + (b_in1 ? b_in1[j] : 0.f));
        } else {
          for (int64_t j = 0; j < kb; ++j) hr[j] = apply_act(act, pr[j] + (b_in ? b_in[j] : 0.f));
        }
      }
    });
    y.addmm_(hb, wout.narrow(0, 0, kb));
  }
}

// Runs the FFN for x2 [M, d] fp32 contiguous with idx [k] into y2 [M, d] fp32 (zeroed).
inline void ffn_dispatch(const at::Tensor& x2, const FfnArgs& a, const int64_t* idx, int64_t k,
                         at::Tensor& y2) {
  const int64_t M = x2.size(0), d = x2.size(1);
  if (M >= gemm_min_tokens()) {
    ffn_gemm(x2, a, idx, k, y2);
  } else {
    ffn_small(x2.data_ptr<float>(), M, d, a, idx, k, y2.data_ptr<float>());
  }
}

// Runs the FFN for xf [M, d] fp32 contiguous into yf [M, d] fp32 (zeroed) over the indices ix:
// one index set [k] for all M tokens, or per sequence (xf holds B sequences of M / B tokens; row
// b uses its first ix.length(b) indices of idx [B, kmax]). `a.b_in` / `a.b_in1`, if set, hold the
// kept input biases in idx's layout ([k] or [B, kmax]).
inline void ffn_run(const at::Tensor& xf, const FfnArgs& a, const Indices& ix, at::Tensor& yf) {
  const int64_t* ip = ix.idx.data_ptr<int64_t>();
  if (!ix.per_seq) {
    ffn_dispatch(xf, a, ip, ix.k, yf);
    return;
  }
  const int64_t B = ix.idx.size(0), T = xf.size(0) / std::max<int64_t>(B, 1);
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor xb = xf.narrow(0, b * T, T);
    at::Tensor yb = yf.narrow(0, b * T, T);
    FfnArgs ab = a;
    ab.b_in = a.b_in ? a.b_in + b * ix.k : nullptr;
    ab.b_in1 = a.b_in1 ? a.b_in1 + b * ix.k : nullptr;
    ffn_dispatch(xb, ab, ip + b * ix.k, ix.length(b), yb);
  }
}

}  // namespace cpu
}  // namespace dart
