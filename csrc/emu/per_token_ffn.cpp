// Emulation entry points of csrc/kernels/per_token_ffn.cuh (tests/test_cuda_emulation_per_token.py):
// the whole launch sequence of gate_first_glu_ffn / input_sparse_glu_ffn on one token chunk.
#include "../kernels/per_token_ffn.cuh"

#include <vector>

#include "dtype.h"

extern "C" {

// Runs the op on M tokens. gate-first: w_gate / w_up [N, d], scale [N] fp32, threshold;
// input-sparse: w_gate / w_up given INPUT-major [d, N], threshold = x threshold, h_threshold.
// unite: the policy "union"; thr_ptr: non-zero passes the thresholds by pointer (the CUDA glue's
// way) instead of by value.
// The workspace (pt_layout's bytes) is allocated here, filled with 0xff (reads before writes see
// NaN / -1). Returns the cudaError_t of the launches.
int dart_emu_pt_ffn(int dtype, int input_sparse, const void* x, const void* w_gate,
                    const void* w_up, long long w_stride, const void* w_down_t,
                    long long wd_stride, const float* scale, float threshold, float h_threshold,
                    long long N, long long d, int M, int act, int vec, int num_sms,
                    long long splits, int unite, int thr_ptr, void* y, float* read) {
  dart::kernels::PtFfnArgs a{};
  a.x = x;
  a.w_gate = w_gate;
  a.w_up = w_up;
  a.w_stride = w_stride;
  a.w_down_t = w_down_t;
  a.wd_stride = wd_stride;
  a.scale = scale;
  a.threshold = threshold;
  a.h_threshold = h_threshold;
  // the emulation's "device memory" is host memory: the kernels read these locals
  a.threshold_ptr = thr_ptr ? &threshold : nullptr;
  a.h_threshold_ptr = thr_ptr ? &h_threshold : nullptr;
  a.unite = unite != 0;
  a.N = N;
  a.d = d;
  a.M = M;
  a.act = static_cast<dart::kernels::Act>(act);
  a.y = y;
  a.read = read;
  a.vec_ok = vec != 0;
  a.splits = splits;
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t bytes = dart::kernels::pt_layout<T>(a, input_sparse != 0, num_sms).bytes;
    std::vector<unsigned char> buf(bytes + 256, 0xff);
    void* ws = buf.data() + (256 - reinterpret_cast<uintptr_t>(buf.data()) % 256);
    return input_sparse ? dart::kernels::launch_pt_input_sparse<T>(a, ws, num_sms, nullptr)
                        : dart::kernels::launch_pt_gate_first<T>(a, ws, num_sms, nullptr);
  });
}

}  // extern "C"
