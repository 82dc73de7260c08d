// Torch-free interface of the per-token FFN hot loops (issue 26; ops in per_token_ops.cpp): the
// gate-first gathered FFN and the input-sparse (column-sparse GEMV) FFN. The loops live in
// per_token_core.inc, compiled once per instruction set (per_token_core_*.cpp) on top of the
// shared helpers of kernel_core.inc; per_token_kernels() picks the variant whose name matches
// core_kernels() (DART_CPU_CAPABILITY and the CPU decide both alike).
#pragma once

#include "kernel_core.h"

namespace dart {
namespace cpu {

// The three matrices of a gated FFN. Float weights: gate / up / down base pointers with their
// row strides (elements); gate and up are neuron-major [N, d] (row = neuron) for the gate-first
// loops and input-major [d, N] (row = input column) for the column-sparse ones; down is always
// neuron-major [N, d]. Quantised weights: q[0..2] (gate, up, down; neuron-major) in format qs.
struct PtWeights {
  const void* gate;
  int64_t sg;
  const void* up;
  int64_t su;
  const void* down;
  int64_t sd;
  Elem elem;
  Act act;
  const QMat* q = nullptr;
  QSpec qs{0, 0};
};

struct PerTokenKernels {
  const char* name;  // "default", "avx2", "avx512" (the CoreKernels variant it goes with)
  // A[t * lda + j] = act(x_t . gate[cand[j]]) for t < M, j in [j0, j1) (cand null: neuron j).
  // Each gate row is read once for all M tokens. Float weights.
  void (*gate_acts)(const float* x, int64_t M, int64_t d, const PtWeights& w, const int64_t* cand,
                    int64_t j0, int64_t j1, float* A, int64_t lda);
  // The same with quantised weights: the dots with the int8 activations xa of x.
  void (*qgate_acts)(const QAct& xa, int64_t M, int64_t d, const PtWeights& w,
                     const int64_t* cand, int64_t j0, int64_t j1, float* A, int64_t lda);
  // y[t] += coef[t * ldc + j] * (x_t . up[nid[j]]) * down[nid[j]] for t < M, j in [j0, j1):
  // up and down rows of the listed neurons only, each read once for all M tokens.
  void (*up_down)(const float* x, int64_t M, int64_t d, const PtWeights& w, const int64_t* nid,
                  const float* coef, int64_t ldc, int64_t j0, int64_t j1, float* y);
  // The same with quantised weights (xa: the int8 activations of x).
  void (*qup_down)(const QAct& xa, int64_t M, int64_t d, const PtWeights& w, const int64_t* nid,
                   const float* coef, int64_t ldc, int64_t j0, int64_t j1, float* y);
  // Column-sparse GEMV over input-major gate / up ([d, N] rows): for t < M and n in [n0, n1),
  // g[t * ldg + n] = sum_c xv[t * nk + c] * gate[cols[c]][n], u likewise with up. Only the kept
  // columns' rows are read (the part [n0, n1) of each).
  void (*colsparse_t)(const float* xv, int64_t M, const int64_t* cols, int64_t nk,
                      const PtWeights& w, int64_t n0, int64_t n1, float* g, float* u,
                      int64_t ldg);
  // The same over neuron-major gate / up ([N, d] rows): a gather of the kept entries of each row
  // (the fallback when no input-major copy is stored; it reads whole cache lines).
  void (*colsparse_rows)(const float* xv, int64_t M, const int64_t* cols, int64_t nk,
                         const PtWeights& w, int64_t n0, int64_t n1, float* g, float* u,
                         int64_t ldg);
  // y[t * ldy + c] += sum_r h[t * nr + r] * down[rows[r]][c] for t < M, c in [c0, c1).
  void (*rows_axpy)(const float* h, int64_t M, const int64_t* rows, int64_t nr,
                    const PtWeights& w, int64_t c0, int64_t c1, float* y, int64_t ldy);
};

extern const PerTokenKernels kPerTokenDefault;
#if DART_CPU_DISPATCH
extern const PerTokenKernels kPerTokenAvx2;
extern const PerTokenKernels kPerTokenAvx512;
#endif

// The variant matching core_kernels() (per_token_ops.cpp).
const PerTokenKernels& per_token_kernels();

}  // namespace cpu
}  // namespace dart
