"""CUDA kernels of the dart ops: the shared case list (op_cases: reference, opcheck, bad inputs)
on the GPU, plus what is CUDA's own: tile-boundary shapes, large shapes, CUDA graphs,
torch.compile and on-device index checks. Runs only where a GPU is present (skipped otherwise)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from op_cases import (
    ACTS,
    DTYPES,
    Operands,
    bad_inputs,
    check_sample,
    kept,
    opcheck_inputs,
    rand,
    sample_inputs,
    sample_names,
    tolerance,
    weights,
)

from dart_ext import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def ext():
    import dart_ext

    for op in ("topk_indices", "gathered_glu_ffn", "gathered_mlp", "gather_neurons_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dart::{op}", "CUDA"):
            pytest.skip(f"dart_ext was built without CUDA kernels (dart::{op})")
    return dart_ext


def _x(shape, dtype=torch.float32, seed=1):
    return rand(shape, dtype, DEV, seed)


def _idx(n, k, seed=2, batch=None):
    return kept(n, k, DEV, seed, batch)


def _close(y, r, dtype):
    assert y.shape == r.shape and y.dtype == r.dtype and y.device == r.device
    torch.testing.assert_close(y, r, **tolerance(dtype, DEV))


def _glu(x, ws, idx, act="silu", dtype=torch.float32):
    y = torch.ops.dart.gathered_glu_ffn(x, *ws, idx, act)
    _close(y, ref.gathered_glu_ffn(x, *ws, idx, act), dtype)
    return y


# ------------------------------------------------------------------------------------------------
# The shared cases: reference, opcheck, bad inputs


@pytest.mark.parametrize("i", range(len(sample_names())), ids=sample_names())
def test_sample_matches_reference(i):
    check_sample(sample_inputs(DEV)[i])


@pytest.mark.parametrize("case", range(len(opcheck_inputs("cpu"))))
def test_opcheck(case):
    op, args = opcheck_inputs(DEV)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("case", range(len(bad_inputs(DEV))))
def test_bad_inputs(case):
    match, fn = bad_inputs(DEV)[case]
    operands = Operands.on(DEV)
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn(operands)
    torch.cuda.synchronize()  # the context is still healthy


# ------------------------------------------------------------------------------------------------
# gathered_glu_ffn: tile boundaries and large shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13, 16, 17, 64, 512])
@pytest.mark.parametrize("nd", [(40, 17), (96, 64), (512, 256), (2816, 1024)])
def test_glu_shared_idx(dtype, T, nd):
    n, d = nd
    ws = weights(n, d, dtype, device=DEV)
    x = _x((T, d), dtype)
    _glu(x, ws, _idx(n, max(1, n // 3)), "silu", dtype)


@pytest.mark.parametrize("act", ACTS + ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("T", [1, 4, 300])
def test_glu_acts(act, T):
    n, d = 256, 128
    ws = weights(n, d, device=DEV)
    _glu(_x((T, d)), ws, _idx(n, 100), act)


@pytest.mark.parametrize("k", [1, 2, 63, 64, 65, 511, 512])
@pytest.mark.parametrize("T", [1, 16, 40])
def test_glu_k_extremes(k, T):
    n, d = 512, 256
    ws = weights(n, d, torch.bfloat16, device=DEV)
    _glu(_x((T, d), torch.bfloat16), ws, _idx(n, k), "silu", torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2, 3, 8])
@pytest.mark.parametrize("T", [1, 4, 16, 33])
def test_glu_per_sequence(dtype, B, T):
    n, d = 384, 128
    ws = weights(n, d, dtype, device=DEV)
    _glu(_x((B, T, d), dtype), ws, _idx(n, 150, batch=B), "silu", dtype)


@pytest.mark.parametrize("layout", ["view", "rowstride"])
@pytest.mark.parametrize("T", [1, 8, 200])
def test_glu_layouts(layout, T):
    n, d = 300, 136
    ws = weights(n, d, torch.bfloat16, layout=layout, device=DEV)
    _glu(_x((T, d), torch.bfloat16), ws, _idx(n, 120), "silu", torch.bfloat16)


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_glu_llama_shape(T, keep):
    n, d = 14336, 4096
    ws = weights(n, d, torch.bfloat16, device=DEV)
    k = int(n * keep)
    _glu(_x((T, d), torch.bfloat16), ws, torch.sort(_idx(n, k)).values, "silu", torch.bfloat16)


def test_glu_deterministic():
    n, d = 2048, 512
    ws = weights(n, d, torch.bfloat16, device=DEV)
    idx = _idx(n, 1500)
    for T in (1, 4, 100):
        x = _x((T, d), torch.bfloat16)
        a = torch.ops.dart.gathered_glu_ffn(x, *ws, idx, "silu")
        b = torch.ops.dart.gathered_glu_ffn(x, *ws, idx, "silu")
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# gathered_mlp


def _mlp(x, w_in, b_in, w_out_t, b_out, idx, act, dtype=torch.float32):
    y = torch.ops.dart.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
    r = ref.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
    _close(y, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 5, 16, 100])
@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_mlp_shared(dtype, bias, T, act):
    n, d = 768, 192
    w_in, w_out_t = weights(n, d, dtype, count=2, device=DEV)
    b_in = _x((n,), dtype, seed=5) if bias else None
    b_out = _x((d,), dtype, seed=6) if bias else None
    _mlp(_x((T, d), dtype), w_in, b_in, w_out_t, b_out, _idx(n, 300), act, dtype)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("T", [1, 9, 20])
def test_mlp_per_sequence(B, T):
    n, d = 256, 64
    w_in, w_out_t = weights(n, d, count=2, device=DEV)
    b_in, b_out = _x((n,), seed=5), _x((d,), seed=6)
    idx = _idx(n, 90, batch=B)
    _mlp(_x((B, T, d)), w_in, b_in, w_out_t, b_out, idx, "gelu")
    _mlp(_x((B, T, d)), w_in, None, w_out_t, b_out, idx, "silu")


# ------------------------------------------------------------------------------------------------
# topk_indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1,), (7,), (1000,), (14336,), (32768,), (3, 5, 600), (64, 4096), (300, 1536)]
)
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_topk_vs_reference(dtype, shape, frac):
    n = shape[-1]
    k = max(1, int(n * frac))
    s = _x(shape, dtype, seed=n)
    y = torch.ops.dart.topk_indices(s, k)
    assert y.dtype == torch.int64 and y.shape == (*shape[:-1], k)
    assert torch.equal(y, ref.topk_indices(s, k))


@pytest.mark.parametrize("n", [5, 256, 14336])
def test_topk_ties_nan_inf_zero(n):
    g = torch.Generator().manual_seed(n)
    s = torch.randint(0, 4, (4, n), generator=g).float()  # many ties
    s[1, ::3] = float("nan")
    s[2, ::2] = float("-inf")
    s[3] = 0.0
    s[3, ::2] = -0.0
    s = s.to(DEV)
    for k in sorted({1, n // 4 or 1, n // 2 or 1, n - 1 or 1, n}):
        assert torch.equal(torch.ops.dart.topk_indices(s, k), ref.topk_indices(s, k)), k
    nan_row = torch.full((n,), float("nan"), device=DEV)
    assert torch.equal(torch.ops.dart.topk_indices(nan_row, 2), torch.arange(2, device=DEV))


# ------------------------------------------------------------------------------------------------
# gather_neurons_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 64, 4096])
@pytest.mark.parametrize("S", [1, 3, 9])
def test_gather_shared(dtype, d, S):
    n, k = 100, 37
    srcs = weights(n, d, dtype, count=S, device=DEV)
    idx = _idx(n, k)
    out = torch.full((S * k, d), 7.0, dtype=dtype, device=DEV)
    torch.ops.dart.gather_neurons_(out, srcs, idx)
    assert torch.equal(out, ref.gather_neurons(srcs, idx))


@pytest.mark.parametrize("B", [1, 3, 8])
def test_gather_per_sequence_and_strided_out(B):
    n, d, k = 64, 40, 20
    srcs = weights(n, d, torch.bfloat16, count=2, layout="view", device=DEV)
    idx = _idx(n, k, batch=B)
    out = torch.zeros(B, 2 * k, d, dtype=torch.bfloat16, device=DEV)
    torch.ops.dart.gather_neurons_(out, srcs, idx)
    assert torch.equal(out, ref.gather_neurons(srcs, idx))
    wide = torch.zeros(B, 2 * k, d + 5, dtype=torch.bfloat16, device=DEV)
    torch.ops.dart.gather_neurons_(wide[..., :d], srcs, idx)  # out with a row stride
    assert torch.equal(wide[..., :d], out) and not wide[..., d:].any()


# ------------------------------------------------------------------------------------------------
# CUDA graphs and torch.compile


def _pipeline(x, wg, wu, wdt, scores, k: int, out):
    idx = torch.ops.dart.topk_indices(scores, k)
    y = torch.ops.dart.gathered_glu_ffn(x, wg, wu, wdt, idx, "silu")
    torch.ops.dart.gather_neurons_(out, [wg, wu], idx)
    return y


@pytest.mark.parametrize("T", [1, 4, 64])
def test_cuda_graph_capture_replay(T):
    n, d, k = 1024, 256, 300
    ws = weights(n, d, torch.bfloat16, device=DEV)
    x = _x((T, d), torch.bfloat16)
    scores = _x((n,), seed=3)
    out = torch.empty(2 * k, d, dtype=torch.bfloat16, device=DEV)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _pipeline(x, *ws, scores, k, out)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = _pipeline(x, *ws, scores, k, out)

    for seed in (10, 11, 12):
        x.copy_(_x((T, d), torch.bfloat16, seed=seed))
        scores.copy_(_x((n,), seed=seed + 100))
        graph.replay()
        torch.cuda.synchronize()
        out_eager = torch.empty_like(out)
        y_eager = _pipeline(x, *ws, scores, k, out_eager)
        assert torch.equal(y_static, y_eager)
        assert torch.equal(out, out_eager)


@pytest.mark.parametrize("T", [1, 48])
def test_torch_compile_fullgraph(T):
    n, d, k = 512, 128, 200
    ws = weights(n, d, device=DEV)
    x = _x((T, d))
    scores = _x((n,), seed=3)
    out_c = torch.empty(2 * k, d, device=DEV)
    out_e = torch.empty(2 * k, d, device=DEV)
    torch._dynamo.reset()
    fn = torch.compile(_pipeline, fullgraph=True)
    y_c = fn(x, *ws, scores, k, out_c)
    y_e = _pipeline(x, *ws, scores, k, out_e)
    torch.testing.assert_close(y_c, y_e)
    assert torch.equal(out_c, out_e)


# ------------------------------------------------------------------------------------------------
# out-of-range indices


_OOR_SCRIPT = """
import torch, dart_ext
n, d = 10, 8
w = [torch.randn(n, d, device="cuda") for _ in range(3)]
x = torch.randn({T}, d, device="cuda")
idx = torch.tensor({idx}, device="cuda")
{call}
torch.cuda.synchronize()
print("NO ERROR")
"""


@pytest.mark.parametrize(
    "call",
    [
        "torch.ops.dart.gathered_glu_ffn(x, *w, idx, 'silu')",
        "torch.ops.dart.gathered_mlp(x, w[0], None, w[1], None, idx, 'relu')",
        "torch.ops.dart.gather_neurons_(torch.empty(2, d, device='cuda'), [w[0]], idx)",
    ],
)
@pytest.mark.parametrize("T", [1, 40])
@pytest.mark.parametrize("idx", ["[0, 10]", "[-1, 3]"])
def test_idx_out_of_range_is_a_device_assert(call, T, idx):
    """Out-of-range indices are checked on the device (no host sync): the kernel stops with a
    device-side assert naming the argument; checked in a subprocess (it poisons the context)."""
    script = textwrap.dedent(_OOR_SCRIPT).format(T=T, idx=idx, call=call)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "NO ERROR" not in out, out
    assert "device-side assert" in out or "idx out of range" in out, out
