#!/usr/bin/env bash
# CI step: prove the CUDA sources compile and link on a machine WITHOUT a GPU.
#
#   1. a venv .venv-cuda with torch==2.14.1 (+cu130, a local wheel on these machines) is created
#      when missing;
#   2. CUDA_HOME is pointed at the real CUDA 13.0 toolkit (the nvcc on PATH may be a wrapper
#      script: we follow it), CPATH / LIBRARY_PATH at the venv's nvidia/cu13 headers and libs;
#   3. nvcc alone compiles every csrc/kernels/*.cuh (torch-free) with explicit instantiations;
#   4. setup.py builds the extension with DART_BUILD_CUDA=1 for sm_90 into a throwaway dir;
#   5. the .so must contain the CUDA kernels (sm_90 cubin + kernel symbols).
# Exits non-zero on any failure. ccache (when installed) makes rebuilds take seconds.
#
# Env: DART_CUDA_VENV (default <repo>/.venv-cuda), DART_CUDA_BUILD_DIR (default a mktemp dir,
# removed at exit), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${DART_CUDA_VENV:-$ROOT/.venv-cuda}"
PY="$VENV/bin/python"
start=$(date +%s)
log() { echo "[build_cuda $(($(date +%s) - start))s] $*"; }

# ---- 1. venv ---------------------------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  log "creating $VENV (torch==2.14.1 +cu130, ~1 min)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "torch==2.14.1" ninja setuptools wheel numpy
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# ---- 2. toolkit --------------------------------------------------------------------------------
find_cuda_home() {
  if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" && ! -L "${CUDA_HOME}" ]]; then
    # accept only a real toolkit (nvcc is a binary, not a wrapper script)
    if file -b "${CUDA_HOME}/bin/nvcc" 2>/dev/null | grep -q ELF; then echo "$CUDA_HOME"; return; fi
  fi
  local nvcc
  nvcc="$(command -v nvcc || true)"
  if [[ -n "$nvcc" ]]; then
    nvcc="$(readlink -f "$nvcc")"
    if head -c 4 "$nvcc" | grep -q "ELF"; then
      dirname "$(dirname "$nvcc")"
      return
    fi
    # a wrapper script: take the nvcc it execs
    local real
    real="$(grep -oE '/[^" ]*/bin/nvcc' "$nvcc" | head -1 || true)"
    if [[ -n "$real" && -x "$real" ]]; then
      dirname "$(dirname "$(readlink -f "$real")")"
      return
    fi
  fi
  for d in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [[ -x "$d/bin/nvcc" ]]; then readlink -f "$d"; return; fi
  done
  return 1
}
CUDA_HOME="$(find_cuda_home)" || { echo "build_cuda: no CUDA toolkit found" >&2; exit 1; }
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
NV="$SITE/nvidia/cu13"
export CPATH="$NV/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export DART_BUILD_CUDA=1
export DART_NATIVE="${DART_NATIVE:-0}"
"$CUDA_HOME/bin/nvcc" --version | tail -2
log "CUDA_HOME=$CUDA_HOME arch=$TORCH_CUDA_ARCH_LIST"

if command -v ccache >/dev/null; then
  export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$ROOT"
  export PYTORCH_NVCC="ccache $CUDA_HOME/bin/nvcc"
  NVCC=(ccache "$CUDA_HOME/bin/nvcc")
  log "ccache on"
else
  NVCC=("$CUDA_HOME/bin/nvcc")
fi

BUILD="${DART_CUDA_BUILD_DIR:-}"
if [[ -z "$BUILD" ]]; then
  BUILD="$(mktemp -d /tmp/dart-cuda-build.XXXXXX)"
  trap 'rm -rf "$BUILD"' EXIT
fi
mkdir -p "$BUILD"

# ---- 3. torch-free kernels with nvcc alone ------------------------------------------------------
CHECK="$BUILD/kernels_check.cu"
{
  for h in csrc/kernels/*.cuh; do echo "#include \"$ROOT/$h\""; done
  cat <<'EOF'
// explicit instantiations: every launcher for one element type (bf16)
namespace dart { namespace kernels {
template cudaError_t launch_topk_indices<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int, int, int64_t*, int, cudaStream_t);
template cudaError_t launch_topk_indices_block<__half>(const __half*, int64_t, int, int, int64_t*, int, cudaStream_t);
template cudaError_t launch_topk_indices_block<float>(const float*, int64_t, int, int, int64_t*, int, cudaStream_t);
template FfnPlan plan_ffn_decode<__nv_bfloat16>(int, int, int64_t, int64_t, bool, int, size_t);
template cudaError_t launch_ffn_decode<__nv_bfloat16, true>(FfnParams, const FfnPlan&, int, cudaStream_t);
template cudaError_t launch_ffn_decode<__nv_bfloat16, false>(FfnParams, const FfnPlan&, int, cudaStream_t);
template cudaError_t launch_glu_act_mul<__nv_bfloat16>(const __nv_bfloat16*, int64_t, __nv_bfloat16*, int64_t, int64_t, Act, const GluBias<__nv_bfloat16>&, int, cudaStream_t);
template cudaError_t launch_mlp_bias_act<__nv_bfloat16>(__nv_bfloat16*, int64_t, int64_t, const __nv_bfloat16*, const int64_t*, int64_t, const int64_t*, int64_t, int64_t, Act, int, cudaStream_t);
template cudaError_t launch_q_decode<__nv_bfloat16, QMode::kGlu>(QParams, QFmt, const QPlan&, int, cudaStream_t);
template cudaError_t launch_q_decode<__nv_bfloat16, QMode::kMlp>(QParams, QFmt, const QPlan&, int, cudaStream_t);
template cudaError_t launch_q_decode<__half, QMode::kLinear>(QParams, QFmt, const QPlan&, int, cudaStream_t);
template cudaError_t launch_q_dequant_rows<__nv_bfloat16>(const QGatherParams<__nv_bfloat16>&, int, cudaStream_t);
template cudaError_t launch_q_round_x<float>(const float*, float*, int64_t, int, cudaStream_t);
template cudaError_t launch_pt_gate_first<__nv_bfloat16>(const PtFfnArgs&, void*, int, cudaStream_t);
template cudaError_t launch_pt_input_sparse<__half>(const PtFfnArgs&, void*, int, cudaStream_t);
template cudaError_t launch_pt_gate_first<float>(const PtFfnArgs&, void*, int, cudaStream_t);
}}
EOF
} >"$CHECK"
ARCH_NUM="${TORCH_CUDA_ARCH_LIST%%[;+ ]*}"
ARCH_NUM="${ARCH_NUM//./}"
log "nvcc alone: csrc/kernels/*.cuh (sm_$ARCH_NUM)"
"${NVCC[@]}" -std=c++17 -O3 -arch="sm_$ARCH_NUM" --expt-relaxed-constexpr -Werror all-warnings \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  -c "$CHECK" -o "$BUILD/kernels_check.o"

# ---- 4. the extension via setup.py -------------------------------------------------------------
log "setup.py build_ext (DART_BUILD_CUDA=1, MAX_JOBS=$MAX_JOBS)"
"$PY" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"

# ---- 5. the .so holds the CUDA kernels -----------------------------------------------------------
SO="$(find "$BUILD/lib" -name '_C*.so' | head -1)"
[[ -n "$SO" ]] || { echo "build_cuda: no _C*.so produced" >&2; exit 1; }
log "built $SO ($(du -h "$SO" | cut -f1))"
SYMS="$(nm -C "$SO")"
missing=0
for kern in topk_indices_kernel gather_rows_kernel ffn_phase1_kernel ffn_phase2_kernel \
  glu_act_mul_kernel mlp_bias_act_kernel qdot_kernel qdown_kernel q_dequant_rows_kernel \
  q_round_x_kernel pt_gate_kernel pt_mask_kernel pt_rows_kernel pt_count_kernel; do
  if grep -q "dart::kernels::$kern" <<<"$SYMS"; then
    echo "  ok: $kern"
  else
    echo "  MISSING: $kern" >&2
    missing=1
  fi
done
for impl in topk_indices_cuda gather_neurons_cuda gathered_glu_ffn_cuda gathered_mlp_cuda \
  gathered_glu_ffn_q_cuda gathered_mlp_q_cuda linear_q_cuda gate_first_glu_ffn_cuda \
  input_sparse_glu_ffn_cuda; do
  if grep -q "dart::cuda::.*$impl" <<<"$SYMS"; then echo "  ok: $impl"; else
    echo "  MISSING: $impl" >&2
    missing=1
  fi
done
if command -v cuobjdump >/dev/null; then
  if cuobjdump --list-elf "$SO" 2>/dev/null | grep -q "sm_$ARCH_NUM"; then
    echo "  ok: sm_$ARCH_NUM cubin embedded"
  else
    echo "  MISSING: sm_$ARCH_NUM cubin" >&2
    missing=1
  fi
fi
[[ $missing == 0 ]] || exit 1
log "CUDA build OK"
