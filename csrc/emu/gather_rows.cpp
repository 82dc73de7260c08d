// Emulation entry point of csrc/kernels/gather_rows.cuh (tests/test_cuda_emulation.py).
#include "../kernels/gather_rows.cuh"

extern "C" {

// The fields of GatherParams, arrays of nsrc for the per-source ones (lens may be null). *unit_bytes receives the
// copy unit the launcher picks. Returns the cudaError_t of the launch.
int dart_emu_gather_rows(int nsrc, const void* const* src, const long long* src_row_stride,
                         const long long* src_rows, void* out, long long out_group_stride,
                         long long out_row_stride, long long s_base, const long long* idx,
                         long long idx_group_stride, const long long* lens, long long k,
                         long long groups,
                         long long row_bytes, int* unit_bytes) {
  dart::kernels::GatherParams p{};
  if (nsrc < 1 || nsrc > dart::kernels::kGatherMaxSrcs) return cudaErrorInvalidValue;
  p.nsrc = nsrc;
  for (int s = 0; s < nsrc; ++s) {
    p.src[s] = static_cast<const char*>(src[s]);
    p.src_row_stride[s] = src_row_stride[s];
    p.src_rows[s] = src_rows[s];
  }
  p.out = static_cast<char*>(out);
  p.out_group_stride = out_group_stride;
  p.out_row_stride = out_row_stride;
  p.s_base = s_base;
  p.idx = reinterpret_cast<const int64_t*>(idx);
  p.idx_group_stride = idx_group_stride;
  p.lens = reinterpret_cast<const int64_t*>(lens);
  p.k = k;
  p.groups = groups;
  p.row_bytes = row_bytes;
  *unit_bytes = dart::kernels::gather_unit_bytes(p);
  return dart::kernels::launch_gather_rows(p, nullptr);
}

}  // extern "C"
