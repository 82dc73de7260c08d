"""CUDA kernels of the dart ops vs dart_ext.reference: shapes, dtypes, layouts, opcheck, CUDA
graphs, torch.compile and bad inputs. Runs only where a GPU is present (skipped otherwise)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def ext():
    import dart_ext

    for op in ("topk_indices", "gathered_glu_ffn", "gathered_mlp", "gather_neurons_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dart::{op}", "CUDA"):
            pytest.skip(f"dart_ext was built without CUDA kernels (dart::{op})")
    return dart_ext


def _ref():
    from dart_ext import reference

    return reference


def _weights(n, d, dtype=torch.float32, seed=0, layout="contig", count=3):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, d, generator=g) * d**-0.5).to(dtype) for _ in range(count)]
    ws = [w.to(DEV) for w in ws]
    if layout == "view":  # [N, d] storage handed over as param.t() of a [d, N] view
        ws = [w.contiguous().t().t() for w in ws]
    elif layout == "rowstride":  # rows of a wider matrix (misaligned rows: fallback path)
        ws = [torch.cat([w, torch.zeros_like(w[:, :3])], dim=1)[:, :d] for w in ws]
    return ws


def _x(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def _idx(n, k, seed=2, batch=None):
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randperm(n, generator=g)[:k].to(DEV)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]).to(DEV)


def _close(y, r, dtype):
    assert y.shape == r.shape and y.dtype == r.dtype and y.device == r.device
    torch.testing.assert_close(y, r, **TOL[dtype])


def _glu(x, ws, idx, act="silu", dtype=torch.float32):
    y = torch.ops.dart.gathered_glu_ffn(x, *ws, idx, act)
    r = _ref().gathered_glu_ffn(x, *ws, idx, act)
    _close(y, r, dtype)
    return y


# ------------------------------------------------------------------------------------------------
# gathered_glu_ffn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13, 16, 17, 64, 512])
@pytest.mark.parametrize("nd", [(40, 17), (96, 64), (512, 256), (2816, 1024)])
def test_glu_shared_idx(dtype, T, nd):
    n, d = nd
    ws = _weights(n, d, dtype)
    x = _x((T, d), dtype)
    _glu(x, ws, _idx(n, max(1, n // 3)), "silu", dtype)


@pytest.mark.parametrize("act", ACTS + ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("T", [1, 4, 300])
def test_glu_acts(act, T):
    n, d = 256, 128
    ws = _weights(n, d)
    _glu(_x((T, d)), ws, _idx(n, 100), act)


@pytest.mark.parametrize("k", [1, 2, 63, 64, 65, 511, 512])
@pytest.mark.parametrize("T", [1, 16, 40])
def test_glu_k_extremes(k, T):
    n, d = 512, 256
    ws = _weights(n, d, torch.bfloat16)
    _glu(_x((T, d), torch.bfloat16), ws, _idx(n, k), "silu", torch.bfloat16)


def test_glu_duplicate_unsorted_idx():
    n, d = 64, 96
    ws = _weights(n, d)
    idx = torch.tensor([5, 0, 63, 5, 17, 2, 5], device=DEV)
    for T in (1, 7, 100):
        _glu(_x((T, d)), ws, idx)
    _glu(_x((T, d)), ws, idx.int())  # int32 accepted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2, 3, 8])
@pytest.mark.parametrize("T", [1, 4, 16, 33])
def test_glu_per_sequence(dtype, B, T):
    n, d = 384, 128
    ws = _weights(n, d, dtype)
    _glu(_x((B, T, d), dtype), ws, _idx(n, 150, batch=B), "silu", dtype)


@pytest.mark.parametrize("layout", ["view", "rowstride"])
@pytest.mark.parametrize("T", [1, 8, 200])
def test_glu_layouts(layout, T):
    n, d = 300, 136
    ws = _weights(n, d, torch.bfloat16, layout=layout)
    _glu(_x((T, d), torch.bfloat16), ws, _idx(n, 120), "silu", torch.bfloat16)


def test_glu_misaligned_and_noncontiguous_x():
    n, d, T = 128, 64, 3
    ws = _weights(n, d)
    idx = _idx(n, 50)
    buf = _x((T * d + 1,))
    _glu(buf[1:].view(T, d), ws, idx)  # data pointer not 16-byte aligned
    _glu(_x((d, T)).t(), ws, idx)  # non-contiguous
    _glu(_x((2, 3, 4, d)), ws, idx)  # any leading shape with a shared idx
    _glu(_x((d,)), ws, idx)  # 1-D x


def test_glu_empty_and_k0():
    n, d = 32, 16
    ws = _weights(n, d)
    y = torch.ops.dart.gathered_glu_ffn(_x((0, d)), *ws, _idx(n, 4), "silu")
    assert y.shape == (0, d)
    y = torch.ops.dart.gathered_glu_ffn(
        _x((3, d)), *ws, torch.empty(0, dtype=torch.long, device=DEV), "silu"
    )
    assert torch.equal(y, torch.zeros(3, d, device=DEV))


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_glu_llama_shape(T, keep):
    n, d = 14336, 4096
    ws = _weights(n, d, torch.bfloat16)
    k = int(n * keep)
    _glu(_x((T, d), torch.bfloat16), ws, torch.sort(_idx(n, k)).values, "silu", torch.bfloat16)


def test_glu_deterministic():
    n, d = 2048, 512
    ws = _weights(n, d, torch.bfloat16)
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
    r = _ref().gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
    _close(y, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 5, 16, 100])
@pytest.mark.parametrize("act", ["gelu_tanh", "relu"])
def test_mlp_shared(dtype, bias, T, act):
    n, d = 768, 192
    w_in, w_out_t = _weights(n, d, dtype, count=2)
    b_in = _x((n,), dtype, seed=5) if bias else None
    b_out = _x((d,), dtype, seed=6) if bias else None
    _mlp(_x((T, d), dtype), w_in, b_in, w_out_t, b_out, _idx(n, 300), act, dtype)


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("T", [1, 9, 20])
def test_mlp_per_sequence(B, T):
    n, d = 256, 64
    w_in, w_out_t = _weights(n, d, count=2)
    b_in, b_out = _x((n,), seed=5), _x((d,), seed=6)
    idx = _idx(n, 90, batch=B)
    _mlp(_x((B, T, d)), w_in, b_in, w_out_t, b_out, idx, "gelu")
    _mlp(_x((B, T, d)), w_in, None, w_out_t, b_out, idx, "silu")


def test_mlp_odd_d_and_k_all():
    n, d = 50, 23
    w_in, w_out_t = _weights(n, d, count=2)
    b_in, b_out = _x((n,), seed=5), _x((d,), seed=6)
    idx = torch.arange(n, device=DEV)
    for T in (1, 3, 64):
        _mlp(_x((T, d)), w_in, b_in, w_out_t, b_out, idx, "relu")


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
    assert torch.equal(y, _ref().topk_indices(s, k))


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
        assert torch.equal(torch.ops.dart.topk_indices(s, k), _ref().topk_indices(s, k)), k
    nan_row = torch.full((n,), float("nan"), device=DEV)
    assert torch.equal(torch.ops.dart.topk_indices(nan_row, 2), torch.arange(2, device=DEV))


def test_topk_faster_than_torch():
    s = _x((1, 14336))
    k = 4300
    for _ in range(3):
        torch.ops.dart.topk_indices(s, k)
        torch.sort(torch.topk(s, k).indices)
    torch.cuda.synchronize()

    def t(fn, it=200):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(it):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / it

    ours = t(lambda: torch.ops.dart.topk_indices(s, k))
    theirs = t(lambda: torch.sort(torch.topk(s, k).indices))
    print(f"topk_indices {ours * 1e3:.1f} us vs torch.topk+sort {theirs * 1e3:.1f} us")
    assert ours < theirs * 1.2


# ------------------------------------------------------------------------------------------------
# gather_neurons_


def _gather_ref(srcs, idx):
    ref = _ref()
    fn = getattr(ref, "gather_neurons", None)
    if fn is not None:
        return fn(srcs, idx)
    out = torch.empty(0)
    ref.gather_neurons_(out, srcs, idx)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 64, 4096])
@pytest.mark.parametrize("S", [1, 3, 9])
def test_gather_shared(dtype, d, S):
    n, k = 100, 37
    srcs = _weights(n, d, dtype, count=S)
    idx = _idx(n, k)
    out = torch.full((S * k, d), 7.0, dtype=dtype, device=DEV)
    torch.ops.dart.gather_neurons_(out, srcs, idx)
    assert torch.equal(out, _gather_ref(srcs, idx))


@pytest.mark.parametrize("B", [1, 3, 8])
def test_gather_per_sequence_and_strided_out(B):
    n, d, k = 64, 40, 20
    srcs = _weights(n, d, torch.bfloat16, count=2, layout="view")
    idx = _idx(n, k, batch=B)
    out = torch.zeros(B, 2 * k, d, dtype=torch.bfloat16, device=DEV)
    torch.ops.dart.gather_neurons_(out, srcs, idx)
    assert torch.equal(out, _gather_ref(srcs, idx))
    wide = torch.zeros(B, 2 * k, d + 5, dtype=torch.bfloat16, device=DEV)
    torch.ops.dart.gather_neurons_(wide[..., :d], srcs, idx)  # out with a row stride
    assert torch.equal(wide[..., :d], out) and not wide[..., d:].any()


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    n, d = 96, 64
    ws = _weights(n, d)
    idx = _idx(n, 40)
    idx_b = _idx(n, 40, batch=2)
    b_in, b_out = _x((n,), seed=5), _x((d,), seed=6)
    return [
        (torch.ops.dart.topk_indices.default, (_x((3, n)), 10)),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((2, d)), *ws, idx, "silu")),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((40, d)), *ws, idx, "gelu")),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((2, 3, d)), *ws, idx_b, "relu")),
        (torch.ops.dart.gathered_mlp.default, (_x((2, d)), ws[0], b_in, ws[1], b_out, idx, "relu")),
        (torch.ops.dart.gathered_mlp.default, (_x((33, d)), ws[0], None, ws[1], None, idx, "silu")),
        (torch.ops.dart.gather_neurons_.default, (torch.empty(80, d, device=DEV), ws[:2], idx)),
        (
            torch.ops.dart.gather_neurons_.default,
            (torch.empty(2, 120, d, device=DEV), ws, idx_b),
        ),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


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
    ws = _weights(n, d, torch.bfloat16)
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
    ws = _weights(n, d)
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
# bad inputs


def _bad_cases():
    n, d = 10, 8
    wg, wu, wdt = _weights(n, d)
    x = _x((3, d))
    idx = torch.tensor([1, 2], device=DEV)
    glu = torch.ops.dart.gathered_glu_ffn
    mlp = torch.ops.dart.gathered_mlp
    gather = torch.ops.dart.gather_neurons_
    return [
        ("idx must be int64", lambda: glu(x, wg, wu, wdt, idx.float(), "silu")),
        ("idx must be 1-D", lambda: glu(x, wg, wu, wdt, idx.view(1, 1, 2), "silu")),
        ("per-sequence idx", lambda: glu(x, wg, wu, wdt, idx.view(1, 2), "silu")),
        ("idx has B = 2", lambda: glu(x.view(1, 3, d), wg, wu, wdt, idx.repeat(2, 1), "silu")),
        ("unknown act 'swiglu'.*accepted", lambda: glu(x, wg, wu, wdt, idx, "swiglu")),
        ("w_up.*d = 8", lambda: glu(x, wg, wu[:, :4], wdt, idx, "silu")),
        ("w_down_t has N = 9", lambda: glu(x, wg, wu, wdt[:9], idx, "silu")),
        ("w_gate must be 2-D", lambda: glu(x, wg[0], wu, wdt, idx, "silu")),
        (
            "w_down_t must have unit stride",
            lambda: glu(x, wg, wu, wdt.t().contiguous().t(), idx, "silu"),
        ),
        ("w_gate has dtype", lambda: glu(x, wg.double(), wu, wdt, idx, "silu")),
        ("x must be float32", lambda: glu(x.double(), wg, wu, wdt, idx, "silu")),
        ("w_up is on cpu", lambda: glu(x, wg, wu.cpu(), wdt, idx, "silu")),
        ("idx is on cpu", lambda: glu(x, wg, wu, wdt, idx.cpu(), "silu")),
        ("w_in has dtype", lambda: mlp(x, wg.bfloat16(), None, wdt, None, idx, "relu")),
        (
            "b_in must be 1-D",
            lambda: mlp(x, wg, torch.zeros(n + 1, device=DEV), wdt, None, idx, "relu"),
        ),
        (
            "b_out must be 1-D",
            lambda: mlp(x, wg, None, wdt, torch.zeros(n, device=DEV), idx, "relu"),
        ),
        ("unknown act", lambda: mlp(x, wg, None, wdt, None, idx, "tanh")),
        ("w_out_t has N", lambda: mlp(x, wg, None, wdt[:4], None, idx, "relu")),
        ("k must satisfy", lambda: torch.ops.dart.topk_indices(x, 0)),
        ("k must satisfy", lambda: torch.ops.dart.topk_indices(x, d + 1)),
        ("scores must be", lambda: torch.ops.dart.topk_indices(x.long(), 1)),
        ("out must have S\\*k", lambda: gather(torch.empty(3, d, device=DEV), [wg], idx)),
        (
            "srcs\\[1\\] has dtype",
            lambda: gather(torch.empty(4, d, device=DEV), [wg, wu.bfloat16()], idx),
        ),
        ("srcs\\[0\\] has d", lambda: gather(torch.empty(2, d + 1, device=DEV), [wg], idx)),
        ("out must be 3-D", lambda: gather(torch.empty(2, d, device=DEV), [wg], idx.view(1, 2))),
        ("srcs must hold", lambda: gather(torch.empty(2, d, device=DEV), [], idx)),
    ]


@pytest.mark.parametrize("case", range(26))
def test_bad_inputs(case):
    match, fn = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn()
    torch.cuda.synchronize()  # the context is still healthy


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
