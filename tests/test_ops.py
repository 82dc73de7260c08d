"""dart_ext ops: kernel vs reference, opcheck, bad inputs, torch.compile / export."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import dart_ext
from dart_ext import reference as ref

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def _weights(n, d, dtype=torch.float32, seed=0, layout="contig"):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, d, generator=g) * d**-0.5 for _ in range(3)]
    ws = [w.to(dtype) for w in ws]
    if layout == "view":  # stored [N, d] contiguous, handed over as .t() of a [d, N] view
        ws = [w.contiguous().t().t() for w in ws]  # HF param = store.t(); kernel gets param.t()
        assert all(w._base is not None and w.stride() == (w.shape[1], 1) for w in ws)
    elif layout == "rowstride":  # rows of a wider matrix
        ws = [torch.cat([w, torch.zeros_like(w[:, :3])], dim=1)[:, : w.shape[1]] for w in ws]
    return ws


def _x(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _check_glu(x, ws, idx, act, dtype=torch.float32):
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, act)
    r = ref.gathered_glu_ffn(x, *ws, idx, act)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, r, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# gathered_glu_ffn


@pytest.mark.parametrize("d", [1, 3, 17, 65])
@pytest.mark.parametrize("T", [1, 5, 300])
@pytest.mark.parametrize("act", ACTS)
def test_glu_shapes_acts(d, T, act):
    n = 40
    ws = _weights(n, d)
    x = _x((T, d))
    idx = torch.tensor([5, 0, 39, 5, 17, 2])  # unsorted, duplicate
    _check_glu(x, ws, idx, act)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("layout", ["contig", "view", "rowstride"])
def test_glu_dtypes_layouts(dtype, T, layout):
    n, d = 96, 80
    ws = _weights(n, d, dtype, layout=layout)
    x = _x((T, d), dtype)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:50]
    _check_glu(x, ws, idx, "silu", dtype)


@pytest.mark.parametrize("k", [1, 64])
@pytest.mark.parametrize("T", [1, 2, 33])
def test_glu_k_extremes_and_batched(k, T):
    n, d = 64, 33
    ws = _weights(n, d)
    x = _x((3, T, d))
    idx = torch.arange(n)[:k].flip(0)
    _check_glu(x, ws, idx, "gelu")
    # per-sequence idx
    g = torch.Generator().manual_seed(4)
    pidx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(3)])
    _check_glu(x, ws, pidx, "gelu")
    _check_glu(x[:1], ws, pidx[:1], "gelu")


def test_glu_noncontiguous_x_and_leading_shapes():
    n, d = 50, 24
    ws = _weights(n, d)
    idx = torch.tensor([1, 4, 9, 49])
    base = _x((d, 6))
    _check_glu(base.t(), ws, idx, "silu")  # transposed
    _check_glu(_x((4, 2 * d))[:, ::2], ws, idx, "silu")  # strided last dim
    _check_glu(_x((2, 3, 4, d)), ws, idx, "relu")  # 4-D
    _check_glu(_x((d,)), ws, idx, "relu")  # 1-D


def test_glu_int32_idx_and_empty():
    n, d = 20, 9
    ws = _weights(n, d)
    x = _x((3, d))
    _check_glu(x, ws, torch.tensor([3, 1], dtype=torch.int32), "silu")
    y = dart_ext.gathered_glu_ffn(x, *ws, torch.zeros(0, dtype=torch.long), "silu")
    assert torch.equal(y, torch.zeros_like(x))
    y = dart_ext.gathered_glu_ffn(x[:0], *ws, torch.tensor([1]), "silu")
    assert y.shape == (0, d)


@pytest.mark.parametrize("T", [1, 40])
def test_inputs_that_require_grad(T):
    """Inference-only ops still run on leaf tensors that require grad (a plain forward)."""
    n, d = 64, 32
    ws = [w.requires_grad_() for w in _weights(n, d)]
    x = _x((2, T, d)).requires_grad_()
    idx = torch.arange(0, n, 2)
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, "silu")
    expected = ref.gathered_glu_ffn(x.detach(), *(w.detach() for w in ws), idx, "silu")
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    b = torch.zeros(n).requires_grad_()
    y = dart_ext.gathered_mlp(x, ws[0], b, ws[2], None, idx, "gelu")
    assert y.shape == x.shape and not y.requires_grad


@pytest.mark.parametrize("T", [1, 8, 40])
@pytest.mark.parametrize("act", ACTS)
def test_glu_all_kept_equals_dense(T, act):
    n, d = 128, 64
    wg, wu, wdt = _weights(n, d)
    x = _x((2, T, d))
    y = dart_ext.gathered_glu_ffn(x, wg, wu, wdt, torch.arange(n), act)
    dense = ref.dense_glu_ffn(x, wg, wu, wdt.t(), act)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


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
    ws = _weights(n, d, dtype, seed=seed)
    x = _x((b, t, d), dtype, seed=seed + 1)
    if per_seq:
        idx = torch.randint(0, n, (b, k), generator=g)
    else:
        idx = torch.randint(0, n, (k,), generator=g)
    _check_glu(x, ws, idx, act, dtype)


# ------------------------------------------------------------------------------------------------
# gathered_mlp


@pytest.mark.parametrize("bias", ["both", "none", "in", "out"])
@pytest.mark.parametrize("T", [1, 6, 300])
@pytest.mark.parametrize("act", ACTS + ["gelu_new", "gelu_pytorch_tanh"])
def test_mlp(bias, T, act):
    n, d = 48, 19
    w_in, w_out_t, _ = _weights(n, d)
    b_in = _x((n,), seed=7) if bias in ("both", "in") else None
    b_out = _x((d,), seed=8) if bias in ("both", "out") else None
    x = _x((2, T, d))
    for idx in (torch.tensor([7, 3, 3, 47]), torch.tensor([[1, 2, 3, 4], [40, 0, 0, 9]])):
        y = dart_ext.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
        r = ref.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act)
        torch.testing.assert_close(y, r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_lowp_and_dense(dtype):
    n, d = 64, 40
    w_in, w_out_t, _ = _weights(n, d, dtype)
    b_in, b_out = _x((n,), dtype, 2), _x((d,), dtype, 3)
    x = _x((5, d), dtype)
    idx = torch.arange(n)
    y = dart_ext.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, "gelu_new")
    r = ref.gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, "gelu_new")
    torch.testing.assert_close(y, r, **TOL[dtype])
    xf = x.float()
    dense = F.linear(
        F.gelu(F.linear(xf, w_in.float(), b_in.float()), approximate="tanh"),
        w_out_t.float().t(),
        b_out.float(),
    )
    torch.testing.assert_close(y.float(), dense, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# topk_indices


def test_topk_ties_nan_and_order():
    nan, inf = float("nan"), float("inf")
    s = torch.tensor(
        [
            [1.0, 3.0, 3.0, nan, 2.0, 3.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [nan, -inf, nan, -inf, 5.0, nan],
            [-0.0, 0.0, -1.0, inf, -inf, 1.0],
        ]
    )
    got = dart_ext.topk_indices(s, 3)
    assert got.dtype == torch.int64
    assert got.tolist() == [[1, 2, 5], [0, 1, 2], [0, 1, 4], [0, 3, 5]]
    assert torch.equal(got, ref.topk_indices(s, 3))
    assert dart_ext.topk_indices(s, 1).tolist() == [[1], [0], [4], [3]]
    assert torch.equal(dart_ext.topk_indices(s, 6), torch.arange(6).expand(4, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (3, 100), (2, 3, 257)])
def test_topk_vs_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-5, 5, shape, generator=g).to(dtype)  # many ties
    n = shape[-1]
    for k in {1, 2, n // 2 or 1, n}:
        got = dart_ext.topk_indices(s, k)
        assert got.shape == (*shape[:-1], k)
        assert torch.equal(got, ref.topk_indices(s, k))
        assert torch.all(got[..., 1:] > got[..., :-1])


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
# gather_neurons_ and compact path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 5, 64])
def test_gather_neurons(dtype, d):
    n = 30
    wg, wu, wdt = _weights(n, d, dtype, layout="rowstride")
    idx = torch.tensor([4, 29, 0, 4])
    out = torch.full((2 * 4, d), 7.0, dtype=dtype)
    dart_ext.gather_neurons_(out, [wg, wu], idx)
    assert torch.equal(out, ref.gather_neurons([wg, wu], idx))
    out1 = torch.empty(4, d, dtype=dtype)
    dart_ext.gather_neurons_(out1, [wdt], idx.int())
    assert torch.equal(out1, wdt[idx])
    pidx = torch.tensor([[1, 2, 3, 4], [29, 28, 0, 0], [5, 5, 5, 5]])
    outb = torch.empty(3, 3 * 4, d, dtype=dtype)
    dart_ext.gather_neurons_(outb, [wg, wu, wdt], pidx)
    assert torch.equal(outb, ref.gather_neurons([wg, wu, wdt], pidx))


def test_gather_bias_as_column():
    b = _x((30,))
    out = torch.empty(3, 1)
    dart_ext.gather_neurons_(out, [b.view(-1, 1)], torch.tensor([2, 9, 2]))
    assert torch.equal(out.view(-1), b[[2, 9, 2]])


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
    ws = _weights(n, d, dtype)
    x = _x((B, T, d), dtype)
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
    w_in, _, w_out = _weights(n, d, dtype)
    b_in, b_out = (_x((n,), dtype, seed=3), _x((d,), dtype, seed=4)) if bias else (None, None)
    x = _x((B, T, d), dtype)
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


def test_compact_buffers_need_a_matching_batch():
    gate_up, down_c = torch.zeros(3, 8, 4), torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="same B"):
        dart_ext.compact_glu_ffn(torch.zeros(2, 1, 4), gate_up, down_c)


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    n, d = 24, 16
    ws = _weights(n, d)
    wsb = _weights(n, d, torch.bfloat16)
    idx = torch.tensor([3, 1, 20])
    cases = [
        (torch.ops.dart.topk_indices.default, (_x((3, n)), 5)),
        (torch.ops.dart.topk_indices.default, (_x((n,)).bfloat16(), n)),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((4, d)), *ws, idx, "silu")),
        (
            torch.ops.dart.gathered_glu_ffn.default,
            (_x((2, 3, d)), *ws, idx[None].expand(2, 3), "gelu"),
        ),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((1, d)).bfloat16(), *wsb, idx, "relu")),
        (torch.ops.dart.gathered_glu_ffn.default, (_x((d, 30)).t(), *ws, idx, "gelu_tanh")),
        (
            torch.ops.dart.gathered_mlp.default,
            (_x((4, d)), ws[0], _x((n,)), ws[1], _x((d,)), idx, "gelu_new"),
        ),
        (
            torch.ops.dart.gathered_mlp.default,
            (_x((2, 2, d)), ws[0], None, ws[1], None, torch.tensor([[0, 1], [5, 5]]), "relu"),
        ),
        (torch.ops.dart.gather_neurons_.default, (torch.empty(6, d), ws[:2], idx)),
        (
            torch.ops.dart.gather_neurons_.default,
            (torch.empty(2, 3, d), ws[2:], torch.tensor([[0, 1, 2], [9, 9, 9]])),
        ),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    n, d = 10, 8
    wg, wu, wdt = _weights(n, d)
    x = _x((3, d))
    idx = torch.tensor([1, 2])
    glu = dart_ext.gathered_glu_ffn
    mlp = dart_ext.gathered_mlp
    return [
        ("idx must be int64", lambda: glu(x, wg, wu, wdt, idx.float(), "silu")),
        ("idx out of range", lambda: glu(x, wg, wu, wdt, torch.tensor([0, n]), "silu")),
        ("idx out of range", lambda: glu(x, wg, wu, wdt, torch.tensor([-1]), "silu")),
        ("idx must be 1-D", lambda: glu(x, wg, wu, wdt, idx.view(1, 1, 2), "silu")),
        ("per-sequence idx", lambda: glu(x, wg, wu, wdt, idx.view(1, 2), "silu")),
        (
            "idx has B = 2",
            lambda: glu(x.view(1, 3, d), wg, wu, wdt, torch.zeros(2, 2).long(), "silu"),
        ),
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
        ("w_in has dtype", lambda: mlp(x, wg.bfloat16(), None, wdt, None, idx, "relu")),
        ("b_in must be 1-D", lambda: mlp(x, wg, torch.zeros(n + 1), wdt, None, idx, "relu")),
        ("b_out must be 1-D", lambda: mlp(x, wg, None, wdt, torch.zeros(n), idx, "relu")),
        ("unknown act", lambda: mlp(x, wg, None, wdt, None, idx, "tanh")),
        ("w_out_t has N", lambda: mlp(x, wg, None, wdt[:4], None, idx, "relu")),
        ("k must satisfy", lambda: dart_ext.topk_indices(x, 0)),
        ("k must satisfy", lambda: dart_ext.topk_indices(x, d + 1)),
        ("scores must be", lambda: dart_ext.topk_indices(x.long(), 1)),
        ("out must have S\\*k", lambda: dart_ext.gather_neurons_(torch.empty(3, d), [wg], idx)),
        (
            "srcs\\[1\\] has dtype",
            lambda: dart_ext.gather_neurons_(torch.empty(4, d), [wg, wu.bfloat16()], idx),
        ),
        ("srcs\\[0\\] has d", lambda: dart_ext.gather_neurons_(torch.empty(2, d + 1), [wg], idx)),
        (
            "idx out of range",
            lambda: dart_ext.gather_neurons_(torch.empty(2, d), [wg], torch.tensor([0, 10])),
        ),
        (
            "out must be 3-D",
            lambda: dart_ext.gather_neurons_(torch.empty(2, d), [wg], idx.view(1, 2)),
        ),
        ("srcs must hold", lambda: dart_ext.gather_neurons_(torch.empty(2, d), [], idx)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    match, fn = _bad_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=match):
        fn()


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
    ws = _weights(n, d)
    scores = _x((n,), seed=9)
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(_ffn_fn, backend=cnt, fullgraph=True, dynamic=True)
    for T in (3, 7, 11):
        x = _x((2, T, d))
        torch.testing.assert_close(f(x, *ws, scores, 8), _ffn_fn(x, *ws, scores, 8))
    assert cnt.frame_count == 1


def test_compile_inductor():
    torch._dynamo.reset()
    n, d = 32, 16
    ws = _weights(n, d)
    scores = _x((n,), seed=9)
    f = torch.compile(_ffn_fn, fullgraph=True, dynamic=True)
    for T in (2, 5):
        x = _x((T, d))
        torch.testing.assert_close(f(x, *ws, scores, 8), _ffn_fn(x, *ws, scores, 8))


class _Compact(torch.nn.Module):
    def __init__(self, n, d, k):
        super().__init__()
        ws = _weights(n, d)
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
    scores = _x((n,), seed=2)
    x = _x((2, 4, d))
    with torch.no_grad():
        y = torch.compile(m, backend=backend, fullgraph=True)(x, scores)
    idx = ref.topk_indices(scores, k)
    torch.testing.assert_close(y, ref.gathered_glu_ffn(x, m.wg, m.wu, m.wdt, idx, "silu"))
    torch.testing.assert_close(m.gate_up, ref.gather_neurons([m.wg, m.wu], idx))


class _Gathered(torch.nn.Module):
    def __init__(self, n, d, k):
        super().__init__()
        ws = _weights(n, d)
        self.wg, self.wu, self.wdt = (torch.nn.Parameter(w, requires_grad=False) for w in ws)
        self.k = k

    def forward(self, x, scores):
        idx = dart_ext.topk_indices(scores, self.k)
        return dart_ext.gathered_glu_ffn(x, self.wg, self.wu, self.wdt, idx, "silu")


def _export():
    n, d, k = 32, 16, 8
    m = _Gathered(n, d, k)
    x, scores = _x((2, 5, d)), _x((2, n), seed=4)
    dims = {"x": {1: torch.export.Dim("T", min=1, max=1024)}, "scores": None}
    ep = torch.export.export(m, (x, scores), dynamic_shapes=dims)
    return m, ep, scores


def test_export():
    m, ep, scores = _export()
    for T in (1, 9):
        x = _x((2, T, 16), seed=T)
        torch.testing.assert_close(ep.module()(x, scores), m(x, scores))
    names = {str(nd.target) for nd in ep.graph.nodes if nd.op == "call_function"}
    assert any("gathered_glu_ffn" in s for s in names) and any("topk_indices" in s for s in names)


def test_aoti_package(tmp_path):  # ~10 s on 2 cores
    m, ep, scores = _export()
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    x = _x((2, 7, 16))
    torch.testing.assert_close(loaded(x, scores), m(x, scores))


def test_deterministic_repeat():
    n, d = 512, 96
    ws = _weights(n, d)
    idx = torch.randperm(n)[:300]
    for T in (1, 4, 100):
        x = _x((T, d))
        ys = [dart_ext.gathered_glu_ffn(x, *ws, idx, "silu") for _ in range(3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_threads_do_not_change_result_much():
    n, d = 512, 96
    ws = _weights(n, d)
    idx = torch.randperm(n)[:300]
    x = _x((2, d))
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(dart_ext.gathered_glu_ffn(x, *ws, idx, "silu"))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_all_combinations_smoke():
    # every act x dtype x idx layout once, small
    n, d = 12, 10
    for act, dtype, per_seq in itertools.product(ACTS, TOL, (False, True)):
        ws = _weights(n, d, dtype)
        x = _x((2, 3, d), dtype)
        idx = torch.tensor([[0, 11, 4], [3, 3, 2]]) if per_seq else torch.tensor([0, 11, 4])
        _check_glu(x, ws, idx, act, dtype)


@pytest.mark.parametrize("T", [1, 7, 9])
def test_glu_multiblock_gemm_path(T):
    # d = 2048 -> the large-M path works in blocks of 512 neurons: k = 1100 spans 3 blocks
    n, d = 1200, 2048
    ws = _weights(n, d)
    x = _x((T, d))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:1100]
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, "silu")
    torch.testing.assert_close(y, ref.gathered_glu_ffn(x, *ws, idx, "silu"), atol=1e-4, rtol=1e-4)
    w_in, w_out_t = ws[0], ws[2]
    b_in = _x((n,), seed=3)
    y = dart_ext.gathered_mlp(x, w_in, b_in, w_out_t, None, idx, "relu")
    r = ref.gathered_mlp(x, w_in, b_in, w_out_t, None, idx, "relu")
    torch.testing.assert_close(y, r, atol=1e-4, rtol=1e-4)


def test_inference_only_no_grad():
    n, d = 8, 4
    ws = [w.requires_grad_() for w in _weights(n, d)]
    x = _x((2, d)).requires_grad_()
    idx = torch.tensor([1, 2])
    torch.library.opcheck(torch.ops.dart.gathered_glu_ffn.default, (x, *ws, idx, "silu"))
    y = dart_ext.gathered_glu_ffn(x, *ws, idx, "silu")
    assert not y.requires_grad
    b = _x((n,)).requires_grad_()
    y = dart_ext.gathered_mlp(x, ws[0], b, ws[1], None, idx, "relu")
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
