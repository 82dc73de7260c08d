// The one TORCH_LIBRARY(dart, m) block: every op schema of the `dart` namespace lives here.
// Backend kernels live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(dart, CPU, m)) and csrc/cuda/*.cu
// (TORCH_LIBRARY_IMPL(dart, CUDA, m)); fake (meta) kernels are in dart_ext/ops.py, which
// set_python_module points torch at so torch.compile / export find them.
#include <torch/library.h>

#ifndef DART_NO_PYTHON
// Python module stub (pattern of pytorch/extension-cpp): `from dart_ext import _C` loads this
// shared library, whose static initialisers register the ops. No Python functions are bound.
// The CMake (C++-only) build defines DART_NO_PYTHON and omits it.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // doc
      -1,    // size of per-interpreter state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}
#else
// C++-only (CMake) build: an exported symbol a C++ program can reference so the linker keeps this
// library (and with it the op registrations) even with --as-needed.
extern "C" int dart_ops_anchor() { return 1; }
#endif

TORCH_LIBRARY(dart, m) {
  m.set_python_module("dart_ext.ops");
  // idx is [k] (shared) or [B, k] (per sequence); `lengths` [B] makes a per-sequence idx padded:
  // row b uses its first lengths[b] entries, the rest are never read.
  m.def("topk_indices(Tensor scores, int k) -> Tensor");
  m.def(
      "gathered_glu_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor idx, "
      "str act, Tensor? lengths=None, Tensor? b_gate=None, Tensor? b_up=None, "
      "Tensor? b_down=None) -> Tensor");
  m.def(
      "gathered_mlp(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out_t, Tensor? b_out, "
      "Tensor idx, str act, Tensor? lengths=None) -> Tensor");
  // Quantised weights (formats of dart_ext/quant.py): each matrix is Tensor[] {data, scales} or
  // {data, scales, mins}; `fmt` (q8, q4, q4m) and `group` (32, 64) hold for all of a call's.
  m.def(
      "gathered_glu_ffn_q(Tensor x, Tensor[] gate, Tensor[] up, Tensor[] down_t, str fmt, "
      "int group, Tensor idx, str act, Tensor? lengths=None, Tensor? b_gate=None, "
      "Tensor? b_up=None, Tensor? b_down=None) -> Tensor");
  m.def(
      "gathered_mlp_q(Tensor x, Tensor[] w_in, Tensor? b_in, Tensor[] w_out_t, Tensor? b_out, "
      "str fmt, int group, Tensor idx, str act, Tensor? lengths=None) -> Tensor");
  m.def("linear_q(Tensor x, Tensor[] w, str fmt, int group, Tensor? bias=None) -> Tensor");
  // Per-token FFNs (issue 26; references and contracts in dart_ext/per_token.py): each returns
  // (y, read), read [...] fp32 = weight entries each token read. policy: 'token' (every token its
  // own choice) or 'union' (one choice for all tokens of the call).
  m.def(
      "gate_first_glu_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, "
      "Tensor threshold, Tensor scale, str act, Tensor? idx=None, str policy='token') "
      "-> (Tensor, Tensor)");
  m.def(
      "gate_first_glu_ffn_q(Tensor x, Tensor[] gate, Tensor[] up, Tensor[] down_t, str fmt, "
      "int group, Tensor threshold, Tensor scale, str act, Tensor? idx=None, "
      "str policy='token') -> (Tensor, Tensor)");
  m.def(
      "input_sparse_glu_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, "
      "Tensor x_threshold, Tensor h_threshold, str act, str policy='token') -> (Tensor, Tensor)");
  m.def("gather_neurons_(Tensor(a!) out, Tensor[] srcs, Tensor idx, Tensor? lengths=None) -> ()");
  // Settings of the CPU kernels as this process runs them (csrc/cpu/config.cpp parses the
  // environment once; Python reads them here instead of parsing the variables again).
  m.def("cpu_gemm_min_tokens() -> int");
  m.def("cpu_capability() -> str");
}

// Inference-only ops: outputs of the functional ops never require grad (the Autograd key falls
// through to the backend kernel), so a backward through them fails with torch's usual "does not
// require grad" error instead of silently producing wrong gradients. gather_neurons_ keeps the
// default autograd fallback (it bumps out's version counter, as in-place ops must).
TORCH_LIBRARY_IMPL(dart, Autograd, m) {
  m.impl("topk_indices", torch::CppFunction::makeFallthrough());
  m.impl("gathered_glu_ffn", torch::CppFunction::makeFallthrough());
  m.impl("gathered_mlp", torch::CppFunction::makeFallthrough());
  m.impl("gathered_glu_ffn_q", torch::CppFunction::makeFallthrough());
  m.impl("gathered_mlp_q", torch::CppFunction::makeFallthrough());
  m.impl("linear_q", torch::CppFunction::makeFallthrough());
  m.impl("gate_first_glu_ffn", torch::CppFunction::makeFallthrough());
  m.impl("gate_first_glu_ffn_q", torch::CppFunction::makeFallthrough());
  m.impl("input_sparse_glu_ffn", torch::CppFunction::makeFallthrough());
}
