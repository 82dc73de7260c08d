// Emulation entry point of csrc/kernels/topk.cuh (tests/test_cuda_emulation.py).
#include "../kernels/topk.cuh"

#include "dtype.h"

extern "C" {

// scores [rows, N] contiguous of `dtype`; out [rows, k] int64. block 0: the launcher's own
// choice (launch_topk_indices with num_sms); 256 / 1024: that block size. Returns the
// cudaError_t of the launch.
int dart_emu_topk_indices(int dtype, const void* scores, long long rows, int N, int k,
                          long long* out, int block, int num_sms) {
  return dart_emu::dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = static_cast<const T*>(scores);
    auto* o = reinterpret_cast<int64_t*>(out);
    if (block == 0) {
      return dart::kernels::launch_topk_indices<T>(s, rows, N, k, o, num_sms, nullptr);
    }
    return dart::kernels::launch_topk_indices_block<T>(s, rows, N, k, o, block, nullptr);
  });
}

}  // extern "C"
