#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 as one prepared run (the device tool's machine: one H100/H200,
# torch 2.11 + CUDA 13.0 preinstalled, no network). About 10 minutes:
#   1. build dart_ext with CUDA from source against the machine's torch (sm_90);
#   2. the CUDA op tests (kernel vs reference, opcheck, CUDA graphs, torch.compile);
#   3. op-level table on Llama-3.1-8B shapes;
#   4. end-to-end decode on a random Llama-3.1-8B (bf16, batch 1 and 8, 50% and 70%).
# Logs and JSON land in $OUT (or ./gpu-out). Each step runs even if an earlier one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
fail() { echo "!! failed: $1"; status=1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
DART_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5 || fail build
python -m pytest -q -m cuda tests/test_ops_cuda.py 2>&1 | tee "$OUT/test_ops_cuda.log" |
  tail -5 || fail test_ops_cuda
python bench/ops.py --device cuda --shapes llama-3.1-8b --tokens 1 16 --dtypes bfloat16 \
  --json "$OUT/ops.json" 2>&1 | tee "$OUT/ops.log" | tail -30 || fail bench/ops
python bench/decode.py --device cuda --model random:llama-3.1-8b --dtypes bfloat16 \
  --batch 1,8 --sparsity 0.5,0.7 --new-tokens 64 --rounds 3 \
  --arms dense_compiled,dart_gathered_compiled,dart_compact_compiled \
  --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -30 || fail bench/decode
exit $status
