#!/usr/bin/env bash
# The GPU run (issues 5, 6, 15) in steps that each finish within 8 minutes on one H100/H200, so a
# lent machine's short calls (at most 10 minutes each) can run them one or two at a time:
#
#   scripts/gpu_check.sh build tests        # then, in a later call on the same machine:
#   scripts/gpu_check.sh sanitize ops
#   scripts/gpu_check.sh decode1 decode8
#   scripts/gpu_check.sh                    # all steps in this order
#
# Steps:
#   build     GPU facts; dart_ext built in place with CUDA (sm_90); the CUDA ops registered;
#   tests     the CUDA op tests (tests/test_ops_cuda.py: kernel vs reference, opcheck, graphs,
#             torch.compile, bad input; tests/test_ops_cuda_quant.py: the quantised ops), JUnit
#             XML; then the FFN ones again with the decode kernels taking every token count
#             they support (DART_CUDA_GEMM_MIN_TOKENS=17);
#   pertoken  the per-token ops' CUDA tests (tests/test_ops_cuda_per_token.py: gate-first and
#             input-sparse vs reference, both policies, chunks, graphs, a tiny model's steps);
#   sanitize  a subset of op calls (every kernel: decode with and without split-K, vector and
#             fallback paths, int32 and per-sequence idx, the chunked per-sequence GEMM path,
#             topk, gather) checked against the reference, then under compute-sanitizer
#             memcheck, racecheck and synccheck;
#   ops       bench/ops.py on Llama-3.1-8B shapes, bf16, T 1/4/8/16, keep 0.3-1.0: each arm as
#             a CUDA graph, the fraction of copy bandwidth; then the decode kernels forced at
#             every T (DART_CUDA_GEMM_MIN_TOKENS=17): the two tables give the crossover;
#   opsq      bench/ops.py --quant on Llama-3.1-8B shapes, T 1 and 4, keep 1.0/0.5/0.3: the
#             gathered GLU FFN over bf16, q8, q4 and q4m rows (issue 21), each beside a device
#             copy of the q4 bytes (the fraction of copy bandwidth per format);
#   decode1   bench/decode.py, random Llama-3.1-8B, bf16, batch 1, 50% sparsity;
#   decode8   the same at batch 8 (per-sequence indices).
# Every step has its own time limit (STEP_TIMEOUT seconds, default 470), writes its log (and JSON
# where it makes one) to $OUT (default ./gpu-out) as it goes, and appends "<step> <result>
# <seconds>" to $OUT/status.txt the moment it ends (result: ok, failed (rc), timeout), so a step
# that overruns loses nothing earlier. A failed step does not stop the later ones; the exit
# status is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
STEP_TIMEOUT="${STEP_TIMEOUT:-470}"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ALL_STEPS=(build tests pertoken sanitize ops opsq decode1 decode8)
status=0

# run_logged LOG LIMIT CMD...: CMD's output to LOG (and its tail here), CMD's exit status back
# (124 when it ran past LIMIT seconds).
run_logged() {
  local log="$1" limit="$2"
  shift 2
  timeout -k 15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 40 "$log"
  return $rc
}

step_build() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv
    git rev-parse HEAD 2>/dev/null || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  } >"$OUT/gpu.txt" 2>&1
  cat "$OUT/gpu.txt"
  DART_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    run_logged "$OUT/build.log" "$STEP_TIMEOUT" "$PY" setup.py build_ext --inplace || return
  "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/build.log"
import torch
import dart_ext

for op in ("topk_indices", "gathered_glu_ffn", "gathered_mlp", "gather_neurons_",
           "gathered_glu_ffn_q", "gathered_mlp_q", "linear_q", "gate_first_glu_ffn",
           "input_sparse_glu_ffn"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dart::{op}", "CUDA"), op
print("dart_ext", dart_ext.__file__, "has CUDA kernels")
EOF
  return "${PIPESTATUS[0]}"
}

step_tests() {
  local rc=0
  run_logged "$OUT/tests.log" 360 "$PY" -m pytest -q -m cuda tests/test_ops_cuda.py \
    tests/test_ops_cuda_quant.py \
    -p no:cacheprovider --durations=15 --junitxml="$OUT/tests.xml" || rc=1
  # the decode kernels at 8 to 16 tokens too (by default those take the GEMM route)
  DART_CUDA_GEMM_MIN_TOKENS=17 run_logged "$OUT/tests_decode_kernels.log" 160 "$PY" -m pytest \
    -q -m cuda tests/test_ops_cuda.py -p no:cacheprovider -k "glu or mlp or graph or compile" \
    --junitxml="$OUT/tests_decode_kernels.xml" || rc=1
  return $rc
}

step_pertoken() {
  run_logged "$OUT/tests_per_token.log" 300 "$PY" -m pytest -q -m cuda \
    tests/test_ops_cuda_per_token.py -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/tests_per_token.xml"
}

# The sanitizer subset: every CUDA kernel of dart on shapes that keep it short, each result
# compared with dart_ext.reference (a wrong value fails the step, not only a sanitizer report).
write_sanitize_subset() {
  cat >"$OUT/sanitize_subset.py" <<'EOF'
import sys

import torch

import dart_ext
from dart_ext import quant
from dart_ext import reference as ref

quick = "--quick" in sys.argv  # racecheck / synccheck: the decode kernels only
large = not quick and "--no-large" not in sys.argv  # the Llama-3.1-8B-sized chunked case
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def weights(n, d, dtype, pad=0, count=3):
    return [
        (torch.randn(n, d + pad, device=dev, generator=gen) * d**-0.5).to(dtype)[:, :d]
        for _ in range(count)
    ]


def idx_for(n, k, batch=None, int32=False):
    rows = [torch.randperm(n, device=dev, generator=gen)[:k] for _ in range(batch or 1)]
    idx = torch.stack(rows) if batch else rows[0]
    return idx.int() if int32 else idx


def close(name, y, r, dtype):
    torch.testing.assert_close(y, r, atol=TOL[dtype], rtol=TOL[dtype], msg=lambda m: f"{name}: {m}")
    print("ok", name, flush=True)


def glu(name, tokens, batch=None, dtype=torch.bfloat16, n=4096, d=1024, keep=0.4, **kw):
    pad, int32 = kw.get("pad", 0), kw.get("int32", False)
    ws = weights(n, d, dtype, pad)
    idx = idx_for(n, int(keep * n), batch, int32)
    shape = (batch, tokens, d) if batch else (tokens, d)
    x = torch.randn(*shape, device=dev, generator=gen).to(dtype)
    y = torch.ops.dart.gathered_glu_ffn(x, *ws, idx, "silu")
    close(name, y, ref.gathered_glu_ffn(x, *ws, idx.long(), "silu"), dtype)


def mlp(name, tokens, batch=None, dtype=torch.float16, n=2048, d=512, keep=0.5):
    w_in, w_out_t = weights(n, d, dtype, count=2)
    b_in = torch.randn(n, device=dev, generator=gen).to(dtype)
    b_out = torch.randn(d, device=dev, generator=gen).to(dtype)
    idx = idx_for(n, int(keep * n), batch)
    shape = (batch, tokens, d) if batch else (tokens, d)
    x = torch.randn(*shape, device=dev, generator=gen).to(dtype)
    y = torch.ops.dart.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, "gelu_tanh")
    close(name, y, ref.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, "gelu_tanh"), dtype)




def per_token(name, tokens, dtype=torch.bfloat16, n=2048, d=512, policy="token"):
    from dart_ext import per_token as pt

    wg, wu, wd = weights(n, d, dtype)
    x = torch.randn(tokens, d, device=dev, generator=gen).to(dtype)
    scale = torch.ones(n, device=dev)
    t = torch.tensor(0.1, device=dev)
    args = (x, wg, wu, wd, t, scale, "silu", None, policy)
    got = torch.ops.dart.gate_first_glu_ffn(*args)
    want = pt.gate_first_glu_ffn(*args)
    close(name + " gate-first", got[0], want[0], dtype)
    iargs = (x, pt.input_major(wg), pt.input_major(wu), wd, t, t * 0.1, "silu", policy)
    got = torch.ops.dart.input_sparse_glu_ffn(*iargs)
    want = pt.input_sparse_glu_ffn(x, wg, wu, wd, t, t * 0.1, "silu", policy)
    close(name + " input-sparse", got[0], want[0], dtype)


def qmats(n, d, fmt, group, count):
    g = torch.Generator(device=dev).manual_seed(n + d)
    return [
        quant.quantize_rows(torch.randn(n, d, device=dev, generator=g) * d**-0.5, fmt, group)
        for _ in range(count)
    ]


def gluq(name, tokens, fmt, batch=None, n=4096, d=1024, keep=0.4, group=32, padded=False):
    qs = qmats(n, d, fmt, group, 3)
    idx = idx_for(n, int(keep * n), batch, int32=padded)
    lens = None
    if padded:  # second row half as long, its padding out of range
        lens = torch.full((batch,), idx.shape[1], device=dev, dtype=torch.int32)
        lens[1] = idx.shape[1] // 2
        idx[1, idx.shape[1] // 2 :] = -1
    shape = (batch, tokens, d) if batch else (tokens, d)
    x = torch.randn(*shape, device=dev, generator=gen).to(torch.bfloat16)
    args = (x, *(q.tensors() for q in qs), fmt, group, idx, "silu", lens)
    y = torch.ops.dart.gathered_glu_ffn_q(*args)
    close(name, y, ref.gathered_glu_ffn_q(*args), torch.bfloat16)


def linq(name, tokens, fmt, n=1000, d=2048, dtype=torch.float16):
    (w,) = qmats(n, d, fmt, 64, 1)
    x = torch.randn(tokens, d, device=dev, generator=gen).to(dtype)
    bias = torch.randn(n, device=dev, generator=gen).to(dtype)
    args = (x, w.tensors(), fmt, 64, bias)
    close(name, torch.ops.dart.linear_q(*args), ref.linear_q(*args), dtype)


glu("glu T=1 split-K", 1)
gluq("glu_q q4 T=1 split-K", 1, "q4")
gluq("glu_q q8 T=3 per-sequence padded int32", 3, "q8", batch=2, padded=True)
gluq("glu_q q4m T=8 group 64", 8, "q4m", group=64, keep=0.1)
linq("linear_q q4 T=1", 1, "q4")
glu("glu T=3 per-sequence int32", 3, batch=3, int32=True)
glu("glu T=7 fp32 fallback (odd row stride)", 7, dtype=torch.float32, pad=1, n=1024, d=256)
mlp("mlp T=2 biases", 2)
glu("glu T=1 k=1 no split", 1, n=64, d=256, keep=1 / 64)
per_token("per-token T=1", 1)
per_token("per-token T=5 union fp32", 5, dtype=torch.float32, policy="union")
if not quick:
    glu("glu T=20 GEMM path", 20)
    gluq("glu_q q4 T=12 per-sequence GEMM path", 12, "q4", batch=2)
    linq("linear_q q8 T=20 GEMM path", 20, "q8")
    if large:  # two chunks of the per-sequence GEMM path (176 MB of gathered rows each)
        glu("glu T=9 per-sequence chunked GEMM path", 9, batch=2, n=14336, d=4096, keep=0.5)
    mlp("mlp T=12 per-sequence GEMM path", 12, batch=2)
    scores = torch.rand(4, 14336, device=dev, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(dart_ext.topk_indices(scores, 5000), ref.topk_indices(scores, 5000))
    print("ok topk", flush=True)
    w = weights(512, 256, torch.bfloat16, count=2)
    idx = idx_for(512, 100)
    out = torch.empty(200, 256, device=dev, dtype=torch.bfloat16)
    dart_ext.gather_neurons_(out, w, idx)
    torch.testing.assert_close(out, torch.cat([w[0][idx], w[1][idx]]))
    print("ok gather_neurons_", flush=True)
torch.cuda.synchronize()
print("subset done", flush=True)
EOF
}

step_sanitize() {
  write_sanitize_subset
  local cs
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  local rc=0
  run_logged "$OUT/sanitize_plain.log" 120 "$PY" "$OUT/sanitize_subset.py" || rc=1
  if [[ -z "$cs" ]]; then
    echo "compute-sanitizer not found" | tee "$OUT/sanitize_memcheck.log"
    return 1
  fi
  # each tool has its own limit, so a slow one leaves the others' reports
  run_logged "$OUT/sanitize_memcheck.log" 200 "$cs" --tool memcheck --error-exitcode 3 \
    --target-processes all "$PY" "$OUT/sanitize_subset.py" --no-large || rc=1
  run_logged "$OUT/sanitize_racecheck.log" 90 "$cs" --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 --target-processes all "$PY" "$OUT/sanitize_subset.py" --quick || rc=1
  run_logged "$OUT/sanitize_synccheck.log" 60 "$cs" --tool synccheck --error-exitcode 3 \
    --target-processes all "$PY" "$OUT/sanitize_subset.py" --quick || rc=1
  return $rc
}

step_ops() {
  local rc=0
  run_logged "$OUT/ops.log" 230 "$PY" bench/ops.py --device cuda --shapes llama-3.1-8b \
    --tokens 1 4 8 16 --dtypes bf16 --keeps 1.0 0.7 0.5 0.3 --budget 0.5 --max-reps 30 \
    --json "$OUT/ops.json" || rc=1
  DART_CUDA_GEMM_MIN_TOKENS=17 run_logged "$OUT/ops_decode_kernels.log" 200 "$PY" bench/ops.py \
    --device cuda --shapes llama-3.1-8b --tokens 4 8 16 --dtypes bf16 --keeps 0.7 0.5 0.3 \
    --budget 0.5 --max-reps 30 --json "$OUT/ops_decode_kernels.json" || rc=1
  return $rc
}

step_opsq() {
  run_logged "$OUT/opsq.log" 300 "$PY" bench/ops.py --quant --device cuda \
    --shapes llama-3.1-8b --tokens 1 4 --keeps 1.0 0.5 0.3 --budget 0.5 --max-reps 30 \
    --json "$OUT/opsq.json"
}

decode_bench() {
  local batch="$1"
  run_logged "$OUT/decode$batch.log" "$STEP_TIMEOUT" "$PY" bench/decode.py --device cuda \
    --model random:llama-3.1-8b --dtypes bfloat16 --batch "$batch" --sparsity 0.5 \
    --new-tokens 64 --rounds 2 --arms dense_compiled,dart_gathered_compiled,dart_compact_compiled \
    --json "$OUT/decode$batch.json"
}
step_decode1() { decode_bench 1; }
step_decode8() { decode_bench 8; }

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
  if ! declare -F "step_$step" >/dev/null; then
    echo "unknown step '$step'; steps: ${ALL_STEPS[*]}" >&2
    exit 2
  fi
done
for step in "${steps[@]}"; do
  echo "== $step (limit ${STEP_TIMEOUT}s) =="
  start=$(date +%s)
  "step_$step"
  rc=$?
  secs=$(($(date +%s) - start))
  case $rc in
    0) result=ok ;;
    124 | 137) result=timeout ;;
    *) result="failed($rc)" ;;
  esac
  [[ $rc == 0 ]] || status=1
  echo "$step $result ${secs}s" | tee -a "$OUT/status.txt"
done
exit $status
