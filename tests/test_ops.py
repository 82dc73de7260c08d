"""dart_ext ops on CPU: every op against its reference on the shared case list (op_cases), opcheck,
bad inputs, and what only the CPU build has: settings, instruction-set variants, thread-count
determinism, racing index writers, torch.compile / export / AOTInductor."""

from __future__ import annotations

import importlib.util
import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from op_cases import (
    ACTS,
    DTYPES,
    Operands,
    bad_inputs,
    check_sample,
    opcheck_inputs,
    padded,
    rand,
    sample_inputs,
    sample_names,
    tolerance,
    weights,
)

import dart_ext
from dart_ext import reference as ref

DEVICE = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_glu(x, ws, idx, act, dtype=torch.float32):
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, act)
    r = ref.gathered_glu_ffn(x, *ws, idx, act)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, r, **tolerance(dtype, DEVICE))


def _run(script: str, **env) -> subprocess.CompletedProcess:
    """Runs a Python script in a fresh process (settings are read once per process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )


# ------------------------------------------------------------------------------------------------
# The shared cases: reference, opcheck, bad inputs


@pytest.mark.parametrize("i", range(len(sample_names())), ids=sample_names())
def test_sample_matches_reference(i):
    check_sample(sample_inputs(DEVICE)[i])


@pytest.mark.parametrize("case", range(len(opcheck_inputs(DEVICE))))
def test_opcheck(case):
    op, args = opcheck_inputs(DEVICE)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(len(bad_inputs(DEVICE))))
def test_bad_inputs(case):
    match, fn = bad_inputs(DEVICE)[case]
    operands = Operands.on(DEVICE)
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(operands)


# ------------------------------------------------------------------------------------------------
# gathered_glu_ffn / gathered_mlp beyond the shared cases


@given(
    n=st.integers(1, 70),
    d=st.integers(1, 70),
    t=st.integers(1, 40),
    b=st.integers(1, 3),
    per_seq=st.booleans(),
    frac=st.floats(0.01, 1.0),
    act=st.sampled_from(ACTS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_glu_property(n, d, t, b, per_seq, frac, act, dtype, seed):
    k = max(1, int(frac * n))
    g = torch.Generator().manual_seed(seed)
    ws = weights(n, d, dtype, seed=seed)
    x = rand((b, t, d), dtype, seed=seed + 1)
    if per_seq:
        idx = torch.randint(0, n, (b, k), generator=g)
    else:
        idx = torch.randint(0, n, (k,), generator=g)
    _check_glu(x, ws, idx, act, dtype)


def test_all_combinations_smoke():
    # every act x dtype x idx layout once, small
    n, d = 12, 10
    for act, dtype, per_seq in itertools.product(ACTS, DTYPES, (False, True)):
        ws = weights(n, d, dtype)
        x = rand((2, 3, d), dtype)
        idx = torch.tensor([[0, 11, 4], [3, 3, 2]]) if per_seq else torch.tensor([0, 11, 4])
        _check_glu(x, ws, idx, act, dtype)


@pytest.mark.parametrize("T", [1, 8, 40])
@pytest.mark.parametrize("act", ACTS)
def test_glu_all_kept_equals_dense(T, act):
    n, d = 128, 64
    wg, wu, wdt = weights(n, d)
    x = rand((2, T, d))
    y = dart_ext.gathered_glu_ffn(x, wg, wu, wdt, torch.arange(n), act)
    dense = ref.dense_glu_ffn(x, wg, wu, wdt.t(), act)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_lowp_all_kept_equals_dense(dtype):
    n, d = 64, 40
    w_in, w_out_t, _ = weights(n, d, dtype)
    b_in, b_out = rand((n,), dtype, seed=2), rand((d,), dtype, seed=3)
    x = rand((5, d), dtype)
    y = dart_ext.gathered_mlp(x, w_in, b_in, w_out_t, b_out, torch.arange(n), "gelu_new")
    xf = x.float()
    dense = F.linear(
        F.gelu(F.linear(xf, w_in.float(), b_in.float()), approximate="tanh"),
        w_out_t.float().t(),
        b_out.float(),
    )
    torch.testing.assert_close(y.float(), dense, **tolerance(dtype, DEVICE))


@pytest.mark.parametrize("T", [1, 40])
def test_inputs_that_require_grad(T):
    """Inference-only ops still run on leaf tensors that require grad (a plain forward)."""
    n, d = 64, 32
    ws = [w.requires_grad_() for w in weights(n, d)]
    x = rand((2, T, d)).requires_grad_()
    idx = torch.arange(0, n, 2)
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, "silu")
    expected = ref.gathered_glu_ffn(x.detach(), *(w.detach() for w in ws), idx, "silu")
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    b = torch.zeros(n).requires_grad_()
    y = dart_ext.gathered_mlp(x, ws[0], b, ws[2], None, idx, "gelu")
    assert y.shape == x.shape and not y.requires_grad


def test_inference_only_no_grad():
    n, d = 8, 4
    ws = [w.requires_grad_() for w in weights(n, d)]
    x = rand((2, d)).requires_grad_()
    idx = torch.tensor([1, 2])
    torch.library.opcheck(torch.ops.dart.gathered_glu_ffn.default, (x, *ws, idx, "silu"))
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, "silu")
    assert not y.requires_grad
    b = rand((n,)).requires_grad_()
    y = dart_ext.gathered_mlp(x, ws[0], b, ws[1], None, idx, "relu")
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------------
# topk_indices beyond the shared cases


@given(
    rows=st.integers(1, 4),
    n=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    levels=st.integers(1, 50),
)
def test_topk_property(rows, n, frac, seed, levels):
    k = min(n, max(1, round(frac * n)))
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (rows, n), generator=g).float()
    s[torch.rand(rows, n, generator=g) < 0.05] = float("nan")
    assert torch.equal(dart_ext.topk_indices(s, k), ref.topk_indices(s, k))


# ------------------------------------------------------------------------------------------------
# compact path (gather_neurons_ into buffers, then compact_glu_ffn / compact_mlp)


def _kept(n, k, per_seq, batch, seed=5):
    g = torch.Generator().manual_seed(seed)
    if per_seq:
        return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
    return torch.randperm(n, generator=g)[:k]


# T: decode shapes (the kernel route over the compact rows) and prefill shapes (torch GEMMs)
@pytest.mark.parametrize("T", [1, 5, 12])
@pytest.mark.parametrize("per_seq", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_glu_ffn_matches_gathered(T, per_seq, dtype):
    n, d, B, k = 64, 32, 2, 20
    ws = weights(n, d, dtype)
    x = rand((B, T, d), dtype)
    idx = _kept(n, k, per_seq, B)
    lead = (B,) if per_seq else ()
    gate_up = torch.empty(*lead, 2 * k, d, dtype=dtype)
    down_c = torch.empty(*lead, k, d, dtype=dtype)
    dart_ext.gather_neurons_(gate_up, ws[:2], idx)
    dart_ext.gather_neurons_(down_c, ws[2:], idx)
    y = dart_ext.compact_glu_ffn(x, gate_up, down_c, "silu")
    r = ref.gathered_glu_ffn(x, *ws, idx, "silu")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, r, **tol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 12])
@pytest.mark.parametrize("per_seq", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_mlp_matches_gathered(bias, T, per_seq, dtype):
    n, d, B, k = 48, 24, 3, 17
    w_in, _, w_out = weights(n, d, dtype)
    b_in, b_out = (rand((n,), dtype, seed=3), rand((d,), dtype, seed=4)) if bias else (None, None)
    x = rand((B, T, d), dtype)
    idx = _kept(n, k, per_seq, B)
    lead = (B,) if per_seq else ()
    w_in_c, w_out_c = torch.empty(*lead, k, d, dtype=dtype), torch.empty(*lead, k, d, dtype=dtype)
    dart_ext.gather_neurons_(w_in_c, [w_in], idx)
    dart_ext.gather_neurons_(w_out_c, [w_out], idx)
    b_in_c = None
    if bias:
        b_in_c = torch.empty(*lead, k, 1, dtype=dtype)
        dart_ext.gather_neurons_(b_in_c, [b_in.view(-1, 1)], idx)
        b_in_c = b_in_c.squeeze(-1)
    y = dart_ext.compact_mlp(x, w_in_c, b_in_c, w_out_c, b_out, "gelu_tanh")
    r = ref.gathered_mlp(x, w_in, b_in, w_out, b_out, idx, "gelu_tanh")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, r, **tol)


@pytest.mark.parametrize("T", [1, 12])
@pytest.mark.parametrize("lengths", [(0, 20, 3), (20, 20, 20), (1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_with_lengths_matches_gathered(T, lengths, dtype):
    """Padded per-sequence buffers (zero rows past each length, as gather_neurons_ leaves them)
    give each row its own neurons on both routes, GLU and plain."""
    n, d, B, kmax = 64, 32, 3, 20
    ws = weights(n, d, dtype)
    b_in = rand((n,), dtype, seed=3)
    x = rand((B, T, d), dtype)
    idx, lens = padded(n, kmax, lengths)
    gate_up = torch.full((B, 2 * kmax, d), 7.0, dtype=dtype)
    down_c = torch.full((B, kmax, d), 7.0, dtype=dtype)
    b_in_c = torch.full((B, kmax, 1), 7.0, dtype=dtype)
    dart_ext.gather_neurons_(gate_up, ws[:2], idx, lens)
    dart_ext.gather_neurons_(down_c, ws[2:], idx, lens)
    dart_ext.gather_neurons_(b_in_c, [b_in.view(-1, 1)], idx, lens)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    y = dart_ext.compact_glu_ffn(x, gate_up, down_c, "silu", lens)
    torch.testing.assert_close(y, ref.gathered_glu_ffn(x, *ws, idx, "silu", lens), **tol)
    w_in_c = gate_up[:, :kmax]
    y = dart_ext.compact_mlp(x, w_in_c, b_in_c.squeeze(-1), down_c, None, "gelu_tanh", lens)
    r = ref.gathered_mlp(x, ws[0], b_in, ws[2], None, idx, "gelu_tanh", lens)
    torch.testing.assert_close(y, r, **tol)
    with pytest.raises(ValueError, match="lengths need per-sequence buffers"):
        dart_ext.compact_glu_ffn(x[0], gate_up[0], down_c[0], "silu", lens)


def test_compact_buffers_need_a_matching_batch():
    gate_up, down_c = torch.zeros(3, 8, 4), torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="same B"):
        dart_ext.compact_glu_ffn(torch.zeros(2, 1, 4), gate_up, down_c)


# ------------------------------------------------------------------------------------------------
# bad inputs under fake tensors (the fake kernels check like the CPU kernels)


def test_bad_inputs_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, d = 10, 8
    with FakeTensorMode():
        x = torch.empty(3, d)
        wg, wu, wdt = (torch.empty(n, d) for _ in range(3))
        with pytest.raises(RuntimeError, match="unknown act"):
            dart_ext.gathered_glu_ffn(x, wg, wu, wdt, torch.zeros(2, dtype=torch.long), "x")
        with pytest.raises(RuntimeError, match="w_up"):
            dart_ext.gathered_glu_ffn(x, wg, wu[:, :3], wdt, torch.zeros(2).long(), "silu")
        with pytest.raises(RuntimeError, match="idx must be int64"):
            dart_ext.gathered_glu_ffn(x, wg, wu, wdt, torch.zeros(2), "silu")


# ------------------------------------------------------------------------------------------------
# torch.compile / export


def _ffn_fn(x, wg, wu, wdt, scores, k: int):
    idx = torch.ops.dart.topk_indices(scores, k)
    return torch.ops.dart.gathered_glu_ffn(x, wg, wu, wdt, idx, "silu") * 2


def test_compile_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    n, d = 32, 16
    ws = weights(n, d)
    scores = rand((n,), seed=9)
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(_ffn_fn, backend=cnt, fullgraph=True, dynamic=True)
    for T in (3, 7, 11):
        x = rand((2, T, d))
        torch.testing.assert_close(f(x, *ws, scores, 8), _ffn_fn(x, *ws, scores, 8))
    assert cnt.frame_count == 1


def test_compile_inductor():
    torch._dynamo.reset()
    n, d = 32, 16
    ws = weights(n, d)
    scores = rand((n,), seed=9)
    f = torch.compile(_ffn_fn, fullgraph=True, dynamic=True)
    for T in (2, 5):
        x = rand((T, d))
        torch.testing.assert_close(f(x, *ws, scores, 8), _ffn_fn(x, *ws, scores, 8))


class _Compact(torch.nn.Module):
    def __init__(self, n, d, k):
        super().__init__()
        ws = weights(n, d)
        self.wg, self.wu, self.wdt = (torch.nn.Parameter(w, requires_grad=False) for w in ws)
        self.register_buffer("gate_up", torch.zeros(2 * k, d))
        self.register_buffer("down_c", torch.zeros(k, d))
        self.k = k

    def forward(self, x, scores):
        idx = torch.ops.dart.topk_indices(scores, self.k)
        torch.ops.dart.gather_neurons_(self.gate_up, [self.wg, self.wu], idx)
        torch.ops.dart.gather_neurons_(self.down_c, [self.wdt], idx)
        return dart_ext.compact_glu_ffn(x, self.gate_up, self.down_c, "silu")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_mutating_gather(backend):
    torch._dynamo.reset()
    n, d, k = 32, 16, 10
    m = _Compact(n, d, k)
    scores = rand((n,), seed=2)
    x = rand((2, 4, d))
    with torch.no_grad():
        y = torch.compile(m, backend=backend, fullgraph=True)(x, scores)
    idx = ref.topk_indices(scores, k)
    torch.testing.assert_close(y, ref.gathered_glu_ffn(x, m.wg, m.wu, m.wdt, idx, "silu"))
    torch.testing.assert_close(m.gate_up, ref.gather_neurons([m.wg, m.wu], idx))


class _Gathered(torch.nn.Module):
    def __init__(self, n, d, k):
        super().__init__()
        ws = weights(n, d)
        self.wg, self.wu, self.wdt = (torch.nn.Parameter(w, requires_grad=False) for w in ws)
        self.k = k

    def forward(self, x, scores):
        idx = dart_ext.topk_indices(scores, self.k)
        return dart_ext.gathered_glu_ffn(x, self.wg, self.wu, self.wdt, idx, "silu")


def _export():
    n, d, k = 32, 16, 8
    m = _Gathered(n, d, k)
    x, scores = rand((2, 5, d)), rand((2, n), seed=4)
    dims = {"x": {1: torch.export.Dim("T", min=1, max=1024)}, "scores": None}
    ep = torch.export.export(m, (x, scores), dynamic_shapes=dims)
    return m, ep, scores


def test_export():
    m, ep, scores = _export()
    for T in (1, 9):
        x = rand((2, T, 16), seed=T)
        torch.testing.assert_close(ep.module()(x, scores), m(x, scores))
    names = {str(nd.target) for nd in ep.graph.nodes if nd.op == "call_function"}
    assert any("gathered_glu_ffn" in s for s in names) and any("topk_indices" in s for s in names)


def test_aoti_package(tmp_path):  # ~10 s on 2 cores
    m, ep, scores = _export()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    x = rand((2, 7, 16))
    torch.testing.assert_close(loaded(x, scores), m(x, scores))


# ------------------------------------------------------------------------------------------------
# determinism: bitwise across repeats and thread counts


def test_deterministic_repeat():
    n, d = 512, 96
    ws = weights(n, d)
    idx = torch.randperm(n)[:300]
    for T in (1, 4, 100):
        x = rand((T, d))
        ys = [dart_ext.gathered_glu_ffn(x, *ws, idx, "silu") for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_does_not_change_result(dtype):
    """The decode-shape kernels (tokens below the GEMM threshold) and the gather promise bitwise
    the same result for 1, 2 and 4 threads (work is cut by shape, partials summed in order)."""
    n, d, B = 512, 96, 2
    ws = weights(n, d, dtype)
    b_in = rand((n,), dtype, seed=3)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:300]
    idx_b = torch.stack([idx, idx.flip(0)])
    x = rand((B, 3, d), dtype)

    def run():
        out = torch.empty(B, 2 * 300, d, dtype=dtype)
        dart_ext.gather_neurons_(out, ws[:2], idx_b)
        return [
            dart_ext.gathered_glu_ffn(x, *ws, idx, "silu"),
            dart_ext.gathered_glu_ffn(x, *ws, idx_b, "silu"),
            dart_ext.gathered_mlp(x[0], ws[0], b_in, ws[2], None, idx, "gelu"),
            out,
        ]

    old = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results[threads] = run()
    finally:
        torch.set_num_threads(old)
    for threads in (2, 4):
        for a, b in zip(results[1], results[threads], strict=True):
            assert torch.equal(a, b), threads


# ------------------------------------------------------------------------------------------------
# the ops read a private copy of idx: another thread writing the caller's idx mid-call can make a
# call fail its range check, never read out of bounds (before: segfaults and garbage rows)

_RACE_SCRIPT = """
import threading, torch, dart_ext
n, d, k = 4096, 1024, 2048
torch.manual_seed(0)
w = [torch.randn(n, d) for _ in range(3)]
idx = torch.randperm(n)[:k]
good = idx[k // 2].item()
x = torch.randn({T}, d)
out = torch.empty(2 * k, d)
expected = {call}
stop = False

def writer():
    while not stop:
        idx[k // 2] = 1 << 40
        idx[k // 2] = good

t = threading.Thread(target=writer)
t.start()
ok = rejected = 0
try:
    for _ in range({calls}):
        try:
            y = {call}
        except RuntimeError as e:
            assert "idx out of range" in str(e), e
            rejected += 1
            continue
        assert torch.equal(y, expected)
        ok += 1
finally:
    stop = True
    t.join()
print("ok", ok, "rejected", rejected)
"""

_RACE_CALLS = [
    ("1", "dart_ext.gathered_glu_ffn(x, *w, idx, 'silu')"),
    ("16", "dart_ext.gathered_glu_ffn(x, *w, idx, 'silu')"),
    ("1", "dart_ext.gathered_mlp(x, w[0], None, w[1], None, idx, 'relu')"),
    ("16", "dart_ext.gathered_mlp(x, w[0], None, w[1], None, idx, 'relu')"),
    ("1", "(dart_ext.gather_neurons_(out, w[:2], idx), out.clone())[1]"),
]


def test_idx_written_by_another_thread():
    """T = 1: the decode kernels; T = 16: gather + GEMM; and the gather op."""
    script = "\n".join(_RACE_SCRIPT.format(T=t, call=call, calls=40) for t, call in _RACE_CALLS)
    p = _run(script)
    assert p.returncode == 0 and p.stdout.count("ok") == len(_RACE_CALLS), p.stdout + p.stderr


# ------------------------------------------------------------------------------------------------
# settings: one parser (C++), one error


def test_gemm_min_tokens_is_read_by_one_parser():
    p = _run(
        """
        import torch, dart_ext
        print(dart_ext.ops.KERNEL_MAX_TOKENS, torch.ops.dart.cpu_gemm_min_tokens())
        """,
        DART_CPU_GEMM_MIN_TOKENS=" 3",
    )
    assert p.returncode == 0 and p.stdout.split() == ["3", "3"], p.stdout + p.stderr


@pytest.mark.parametrize("value", ["abc", "0"])
def test_bad_gemm_min_tokens_is_one_clear_error(value):
    p = _run("import dart_ext", DART_CPU_GEMM_MIN_TOKENS=value)
    assert p.returncode != 0
    assert "DART_CPU_GEMM_MIN_TOKENS must be an integer >= 1" in p.stderr, p.stderr
    assert f"got '{value}'" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------------------
# instruction-set variants: one portable binary, hot loops picked at run time

_VARIANT_SCRIPT = """
import torch, dart_ext
from tests.op_cases import GLU, MLP, check_sample, sample_inputs
assert torch.ops.dart.cpu_capability() == "{cap}", torch.ops.dart.cpu_capability()
samples = [s for s in sample_inputs("cpu") if s.op in (GLU, MLP)]
for s in samples:
    check_sample(s)
print("checked", len(samples))
"""


def _capabilities() -> list[str]:
    best = torch.ops.dart.cpu_capability()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_each_instruction_set_variant_matches_reference(cap):
    if cap not in _capabilities():
        pytest.skip(f"this CPU runs at most {torch.ops.dart.cpu_capability()}")
    p = _run(_VARIANT_SCRIPT.format(cap=cap), DART_CPU_CAPABILITY=cap)
    assert p.returncode == 0 and "checked" in p.stdout, p.stdout + p.stderr


def test_unknown_or_unsupported_capability_is_a_clear_error():
    script = "import torch, dart_ext; torch.ops.dart.cpu_capability()"
    p = _run(script, DART_CPU_CAPABILITY="sse9")
    assert p.returncode != 0
    assert "DART_CPU_CAPABILITY must be one of default, avx2, avx512, got 'sse9'" in p.stderr
    if "avx512" not in _capabilities():
        p = _run(script, DART_CPU_CAPABILITY="avx512")
        assert p.returncode != 0 and "runs at most" in p.stderr, p.stderr


@pytest.mark.parametrize("native", [None, "0", "1"])
def test_default_build_is_portable(native, monkeypatch):
    """The default build compiles no file for the build machine's CPU: -march=native is the
    DART_NATIVE=1 opt-in (the hot loops pick AVX-512 / AVX2 / baseline at run time instead)."""
    spec = importlib.util.spec_from_file_location("dart_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    if native is None:
        monkeypatch.delenv("DART_NATIVE", raising=False)
    else:
        monkeypatch.setenv("DART_NATIVE", native)
    (ext,) = setup.get_extensions()
    assert ("-march=native" in ext.extra_compile_args["cxx"]) is (native == "1")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_library_uses_wide_vectors_only_in_dispatched_variants():
    """The built library runs on any x86-64 CPU: AVX registers (ymm / zmm) appear only in the
    AVX2 / AVX-512 variants of the hot loops, which run after the CPU check (before: every
    kernel compiled with -march=native, SIGILL on an older CPU)."""
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 only")
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", dart_ext._C.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wide, function = set(), ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line[line.index("<") + 1 : -2]
        elif "%ymm" in line or "%zmm" in line:
            wide.add(function)
    if any("::portable::" in f for f in wide):
        pytest.skip("built with DART_NATIVE=1 (-march=native): not portable by request")
    # the hot loops' variants (kernel_core.inc: avx2/avx512, per_token_core.inc: pt_avx2/...)
    dispatched = re.compile(r"::(pt_)?avx(2|512)::")
    outside = sorted(f for f in wide if not dispatched.search(f))
    assert not outside, outside[:5]


def test_compile_caches_are_keyed_to_this_build_of_the_library():
    # A graph compiled against another build (another op signature) must never be reused.
    import hashlib

    import dart_ext

    digest = hashlib.sha256(open(dart_ext._C.__file__, "rb").read()).hexdigest()[:16]
    assert f"dart_ext={digest}" in torch.compiler.config.cache_key_tag.split(";")
