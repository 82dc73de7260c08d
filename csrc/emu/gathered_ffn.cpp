// Emulation entry points of the decode path of csrc/kernels/gathered_ffn.cuh
// (tests/test_cuda_emulation_ffn.py).
#include "../kernels/gathered_ffn.cuh"

#include "dtype.h"

namespace {

dart::kernels::FfnPlan make_plan(int dtype, int G, int Mc, long long d, long long k, int vec,
                                 int num_sms, long long splits) {
  dart::kernels::FfnPlan plan;
  dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    int max_smem = 0;
    cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
    plan = dart::kernels::plan_ffn_decode<T>(G, Mc, d, k, vec != 0, num_sms,
                                             static_cast<size_t>(max_smem));
    if (plan.ok && splits > 0) dart::kernels::plan_set_splits(plan, G, Mc, k, splits);
    return cudaSuccess;
  });
  return plan;
}

}  // namespace

extern "C" {

// The plan of the decode path: out = [ok, vec, maxt, ve2, splits, ntiles, chunk, ws_bytes,
// smem1]. splits > 0 overrides the plan's split-K factor (clamped as the plan clamps it).
void dart_emu_ffn_plan(int dtype, int G, int Mc, long long d, long long k, int vec, int num_sms,
                       long long splits, long long* out) {
  const dart::kernels::FfnPlan p = make_plan(dtype, G, Mc, d, k, vec, num_sms, splits);
  const long long v[] = {p.ok,     p.vec,   p.maxt,
                         p.ve2,    p.splits, p.ntiles,
                         p.chunk,  static_cast<long long>(p.ws_bytes),
                         static_cast<long long>(p.smem1)};
  for (int i = 0; i < 9; ++i) out[i] = v[i];
}

// Runs both decode kernels with the plan dart_emu_ffn_plan returns for the same arguments;
// `ws` holds at least its ws_bytes (256-byte aligned); `lens` (null: none) holds the per-group
// lengths; b1 / b2 / bo (null: none) are the biases of w1 (b_in / b_gate), w2 (b_up) and y. Returns the cudaError_t of the launch.
int dart_emu_ffn_decode(int dtype, int glu, const void* x, const void* w1, long long w1_stride,
                        const void* w2, long long w2_stride, const void* wo, long long wo_stride,
                        const void* b1, const void* b2, const void* bo, const void* idx,
                        int idx_int32,
                        long long idx_group_stride, const void* lens, int lens_int32, void* y,
                        long long N, long long d,
                        long long k, int G, int Mc, int act, int vec, int num_sms,
                        long long splits, void* ws) {
  const dart::kernels::FfnPlan plan = make_plan(dtype, G, Mc, d, k, vec, num_sms, splits);
  if (!plan.ok) return cudaErrorInvalidValue;
  dart::kernels::FfnParams p{};
  p.x = x;
  p.w1 = w1;
  p.w1_stride = w1_stride;
  p.w2 = w2;
  p.w2_stride = w2_stride;
  p.wo = wo;
  p.wo_stride = wo_stride;
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
  p.act = static_cast<dart::kernels::Act>(act);
  char* base = static_cast<char*>(ws);
  p.h = reinterpret_cast<float*>(base + plan.h_off);
  p.partial = reinterpret_cast<float*>(base + plan.partial_off);
  p.counters = reinterpret_cast<int*>(base + plan.counters_off);
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return glu ? dart::kernels::launch_ffn_decode<T, true>(p, plan, num_sms, nullptr)
               : dart::kernels::launch_ffn_decode<T, false>(p, plan, num_sms, nullptr);
  });
}

}  // extern "C"
