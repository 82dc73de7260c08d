// Emulation entry points of csrc/kernels/quant_ffn.cuh (tests/test_cuda_emulation_quant.py):
// the decode plan, the decode kernels (gathered GLU / MLP and the dense linear) and the two
// prefill helpers (row dequantisation, activation rounding).
#include "../kernels/quant_ffn.cuh"

#include "dtype.h"

namespace {

using dart::kernels::QFmt;
using dart::kernels::QMat;
using dart::kernels::QMode;
using dart::kernels::QPlan;

QPlan make_plan(int fmt, int G, int Mc, long long d, long long k, int num_sms, long long splits) {
  int max_smem = 0;
  cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  QPlan plan = dart::kernels::plan_q_decode(static_cast<QFmt>(fmt), G, Mc, d, k, num_sms,
                                            static_cast<size_t>(max_smem));
  if (plan.ok && k > 0 && splits > 0) dart::kernels::q_plan_set_splits(plan, G, Mc, k, splits);
  return plan;
}

QMat mat(const void* const* m) {
  return QMat{m[0], static_cast<const uint16_t*>(m[1]), static_cast<const uint16_t*>(m[2])};
}

}  // namespace

extern "C" {

// out = [ok, maxt, vb, splits, ntiles, chunk, ws_bytes, smem1]; k = 0 plans linear_q; splits > 0
// overrides the split count (clamped as the plan clamps it).
void dart_emu_q_plan(int fmt, int G, int Mc, long long d, long long k, int num_sms,
                     long long splits, long long* out) {
  const QPlan p = make_plan(fmt, G, Mc, d, k, num_sms, splits);
  const long long v[] = {p.ok,     p.maxt,  p.vb, p.splits, p.ntiles, p.chunk,
                         static_cast<long long>(p.ws_bytes), static_cast<long long>(p.smem1)};
  for (int i = 0; i < 8; ++i) out[i] = v[i];
}

// Both decode kernels of gathered_glu_ffn_q (mode 0) / gathered_mlp_q (mode 1), or the one of
// linear_q (mode 2: w1 is W [N, d], b1 its bias, y [Mc, N], k ignored). Each matrix is three
// pointers {data, scales, mins (q4m, else null)}; w2 / wo may be null where the mode has none.
// `ws` holds the plan's ws_bytes (256-byte aligned). Returns the cudaError_t of the launch.
int dart_emu_q_decode(int dtype, int fmt, int mode, int group, const void* x,
                      const void* const* w1, const void* const* w2, const void* const* wo,
                      const void* b1, const void* b2, const void* bo, const void* idx,
                      int idx_int32, long long idx_group_stride, const void* lens,
                      int lens_int32, void* y, long long N, long long d, long long k, int G,
                      int Mc, int act, int num_sms, long long splits, void* ws) {
  const bool linear = mode == static_cast<int>(QMode::kLinear);
  const QPlan plan = make_plan(fmt, G, Mc, d, linear ? 0 : k, num_sms, splits);
  if (!plan.ok) return cudaErrorInvalidValue;
  dart::kernels::QParams p{};
  p.x = x;
  p.w1 = mat(w1);
  if (w2 != nullptr) p.w2 = mat(w2);
  if (wo != nullptr) p.wo = mat(wo);
  p.b1 = b1;
  p.b2 = b2;
  p.bo = bo;
  p.idx = idx;
  p.idx_int32 = idx_int32 != 0;
  p.idx_group_stride = idx_group_stride;
  p.lens = lens;
  p.lens_int32 = lens_int32 != 0;
  p.y = y;
  p.N = N;
  p.d = d;
  p.k = k;
  p.G = G;
  p.Mc = Mc;
  p.group = group;
  p.act = static_cast<dart::kernels::Act>(act);
  char* base = static_cast<char*>(ws);
  if (!linear) {
    p.h = reinterpret_cast<float*>(base + plan.h_off);
    p.partial = reinterpret_cast<float*>(base + plan.partial_off);
    p.counters = reinterpret_cast<int*>(base + plan.counters_off);
  }
  const QFmt f = static_cast<QFmt>(fmt);
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (static_cast<QMode>(mode)) {
      case QMode::kGlu:
        return dart::kernels::launch_q_decode<T, QMode::kGlu>(p, f, plan, num_sms, nullptr);
      case QMode::kMlp:
        return dart::kernels::launch_q_decode<T, QMode::kMlp>(p, f, plan, num_sms, nullptr);
      default:
        return dart::kernels::launch_q_decode<T, QMode::kLinear>(p, f, plan, num_sms, nullptr);
    }
  });
}

// q_dequant_rows_kernel: nsrc matrices (each {data, scales, mins}), idx int64 (null: rows 0..k-1
// of the first), lens int64 [groups] or null; out [groups, nsrc * k, d] of dtype.
int dart_emu_q_dequant_rows(int dtype, int fmt, int group, int nsrc, const void* const* mats,
                            long long d, long long N, long long k, const long long* idx,
                            long long idx_group_stride, const long long* lens, long long groups,
                            void* out, int num_sms) {
  if (nsrc < 1 || nsrc > 3) return cudaErrorInvalidValue;
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dart::kernels::QGatherParams<T> p{};
    for (int s = 0; s < nsrc; ++s) p.src[s] = mat(mats + 3 * s);
    p.nsrc = nsrc;
    p.fmt = static_cast<QFmt>(fmt);
    p.group = group;
    p.d = d;
    p.N = N;
    p.k = k;
    p.idx = reinterpret_cast<const int64_t*>(idx);
    p.idx_group_stride = idx_group_stride;
    p.lens = reinterpret_cast<const int64_t*>(lens);
    p.groups = groups;
    p.out = static_cast<T*>(out);
    return dart::kernels::launch_q_dequant_rows<T>(p, num_sms, nullptr);
  });
}

// q_round_x_kernel over numel values (a multiple of 32) of dtype.
int dart_emu_q_round_x(int dtype, const void* x, void* xr, long long numel, int num_sms) {
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dart::kernels::launch_q_round_x<T>(static_cast<const T*>(x), static_cast<T*>(xr),
                                              numel, num_sms, nullptr);
  });
}

}  // extern "C"
