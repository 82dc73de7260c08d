"""Quantised weights: the formats (dart_ext.quant) and the CPU ops over them (gathered_glu_ffn_q,
gathered_mlp_q, linear_q) against the pure-PyTorch reference (dart_ext.reference), opcheck, bad
inputs with their messages, and each instruction-set variant."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from op_cases import ACTS, padded, rand, tolerance, weights

import dart_ext
from dart_ext import quant
from dart_ext import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = torch.ops.dart
GLUQ, MLPQ, LINQ = OPS.gathered_glu_ffn_q.default, OPS.gathered_mlp_q.default, OPS.linear_q.default
FORMATS = list(quant.FORMATS)
FMT_GROUPS = [(f, g) for f in FORMATS for g in quant.FORMATS[f].groups]
_REF = {GLUQ: ref.gathered_glu_ffn_q, MLPQ: ref.gathered_mlp_q, LINQ: ref.linear_q}


def qweights(n, d, fmt, group, count=3, seed=0):
    return [quant.quantize_rows(w, fmt, group) for w in weights(n, d, seed=seed, count=count)]


def check(op, args, name=""):
    """The op equals the reference (same shape, dtype, contiguity; values within the tolerance of
    x's dtype, fp32 a little looser: the int8 dots sum in another order than the reference)."""
    want = _REF[op](*args)
    got = op(*args)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), name
    tol = tolerance(got.dtype, "cpu")
    if got.dtype == torch.float32:
        tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_roundtrip_error_within_the_format_bound(fmt, group, scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 128, generator=g) * scale
    w[3] = 0.0  # an all-zero row: scale 0, exact
    w[4, :64] = 5.0 * scale  # a constant group
    q = quant.quantize_rows(w, fmt, group)
    f = quant.FORMATS[fmt]
    assert q.data.dtype == f.data_dtype and q.data.shape == (37, f.row_bytes(128))
    assert q.scales.dtype == torch.float16 and q.scales.shape == (37, 128 // group)
    assert (q.mins is not None) is f.has_min
    assert q.shape == (37, 128)
    err = (quant.dequantize_rows(q) - w).abs()
    bound = quant.error_bound(q) * (1 + 1e-5) + 1e-6 * w.abs()
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(quant.dequantize_rows(q)[3], torch.zeros(128))
    # the step is as small as the format allows: the bound is not loose
    qmax = {"q8": 127, "q4": 7, "q4m": 7.5}[fmt]
    amax = w.reshape(37, -1, group).abs().amax(-1)
    assert (quant.error_bound(q) <= amax.repeat_interleave(group, 1) / qmax * 0.51 + 1e-30).all()


def test_q4_packing_order():
    """Byte j of a 32-value block holds value j (low nibble) and value j + 16 (high nibble)."""
    w = torch.arange(-7.0, 8.0).repeat(5)[:64].reshape(1, 64)  # integers: scale 1 exactly
    w[0, 0] = 7.0
    q = quant.quantize_rows(w, "q4", 32)
    assert torch.equal(q.scales.float(), torch.ones(1, 2))
    u = (w + 8).to(torch.uint8)[0]
    for blk in range(2):
        for j in range(16):
            byte = int(q.data[0, blk * 16 + j])
            assert byte & 15 == u[blk * 32 + j] and byte >> 4 == u[blk * 32 + j + 16]


def test_q4m_beats_q4_on_one_sided_groups():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(64, 256, generator=g) + 0.5  # all positive: q4 wastes half its levels
    err = {f: (quant.dequantize_rows(quant.quantize_rows(w, f)) - w).abs().mean() for f in FORMATS}
    assert err["q4m"] < err["q4"] / 3
    assert err["q8"] < err["q4m"]


def test_bytes_per_value():
    assert quant.FORMATS["q8"].bytes_per_value(32) == 1 + 2 / 32
    assert quant.FORMATS["q4"].bytes_per_value(64) == 0.5 + 2 / 64
    q = quant.quantize_rows(torch.randn(10, 64), "q4m", 32)
    assert q.nbytes() == 10 * 64 * quant.FORMATS["q4m"].bytes_per_value(32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: quant.quantize_rows(torch.randn(4, 64), "q3"), "unknown quantisation format 'q3'"),
        (lambda: quant.quantize_rows(torch.randn(4, 64), "q8", 16), "group must be one of"),
        (lambda: quant.quantize_rows(torch.randn(4, 96), "q4", 64), "group = 64 must divide"),
        (lambda: quant.quantize_rows(torch.randn(64), "q4"), "2-D float tensor"),
        (lambda: quant.quantize_rows(torch.ones(4, 64, dtype=torch.int32), "q4"), "2-D float"),
        (lambda: quant.quantize_rows(torch.full((2, 32), float("nan")), "q8"), "must be finite"),
        (lambda: quant.quantize_rows(torch.full((2, 32), 1e9), "q8"), "too large for fp16"),
        (lambda: quant.quantize_activations(torch.randn(3, 40)), "multiple of 32"),
    ],
)
def test_format_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_activation_rounding():
    x = torch.tensor([[0.5] * 31 + [-1.0]])
    xq = quant.quantize_activations(x)
    assert xq[0, -1] == -1.0 and torch.allclose(xq[0, :31], torch.full((31,), 64 / 127))
    assert torch.equal(quant.quantize_activations(torch.zeros(2, 64)), torch.zeros(2, 64))


# ------------------------------------------------------------------------------------------------
# Ops against the reference


def _glu_args(x, qs, idx, act="silu", lengths=None, biases=(None, None, None)):
    f, g = qs[0].fmt, qs[0].group
    return (x, *(q.tensors() for q in qs), f, g, idx, act, lengths, *biases)


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("tokens", [1, 3, 9])  # 9: the GEMM route (DART_CPU_GEMM_MIN_TOKENS 8)
def test_glu_matches_reference(fmt, group, tokens):
    n, d = 70, 128
    qs = qweights(n, d, fmt, group)
    mixed = torch.tensor([5, 0, 69, 5, 17, 2])  # unsorted, with a duplicate
    for name, idx in (("mixed", mixed), ("k=N", torch.arange(n)), ("k=0", mixed[:0])):
        for act in ACTS:
            x = rand((tokens, d), seed=len(act))
            check(GLUQ, _glu_args(x, qs, idx, act), f"{fmt}/{group}/T{tokens}/{name}/{act}")


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_glu_dtypes_biases_and_per_sequence(fmt, group, dtype):
    n, d = 48, 64
    qs = qweights(n, d, fmt, group, seed=3)
    bias = (rand((n,), dtype, seed=4), rand((n,), dtype, seed=5), rand((d,), dtype, seed=6))
    per_seq = torch.stack([torch.randperm(n)[:20] for _ in range(3)])
    pidx, lens = padded(n, 20, (0, -1, 7))
    for tokens in (1, 2, 9):
        x = rand((3, tokens, d), dtype)
        # no bias, b_gate / b_up / b_down each alone, all three
        for which in (None, 0, 1, 2, "all"):
            b = tuple(t if which in (i, "all") else None for i, t in enumerate(bias))
            tag = f"{fmt}/{group}/{dtype}/T{tokens}/bias-{which}"
            check(GLUQ, _glu_args(x, qs, per_seq, "gelu", None, b), tag + "/per-seq")
            check(GLUQ, _glu_args(x, qs, pidx, "silu", lens, b), tag + "/lengths")


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
def test_mlp_matches_reference(fmt, group):
    n, d = 40, 64
    w_in, w_out = qweights(n, d, fmt, group, count=2, seed=7)
    b_in, b_out = rand((n,), seed=8), rand((d,), seed=9)
    idx = torch.tensor([7, 3, 3, 39])
    pidx, lens = padded(n, 12, (3, 0, -1))
    for tokens in (1, 5, 9):
        x = rand((3, tokens, d), seed=tokens)
        for bi, bo in ((b_in, b_out), (None, None), (b_in, None)):
            for ix, ln in ((idx, None), (pidx, lens)):
                args = (x, w_in.tensors(), bi, w_out.tensors(), bo, fmt, group, ix, "gelu_tanh", ln)
                check(MLPQ, args, f"{fmt}/{group}/T{tokens}")


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 9, 20])
def test_linear_matches_reference(fmt, group, tokens):
    (w,) = qweights(33, 192, fmt, group, count=1, seed=10)  # odd row count: the pair loop's tail
    for dtype in (torch.float32, torch.bfloat16):
        x = rand((tokens, 192), dtype, seed=11)
        bias = rand((33,), dtype, seed=12)
        check(LINQ, (x, w.tensors(), fmt, group, bias), f"{fmt}/{group}/T{tokens}/{dtype}")
        check(LINQ, (x[None], w.tensors(), fmt, group, None), f"{fmt}/{group}/T{tokens}/3-D")


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
def test_long_rows_match_reference(fmt, group):
    """Rows of 22 blocks: the SIMD loops take the scales 8 blocks at a time (two full chunks and a
    tail of 6); neuron tiles of 4 with a tail (k = 7, 37), and 4-row dense tiles with a tail."""
    n, d = 37, 704
    qs = qweights(n, d, fmt, group, seed=13)
    idx = torch.tensor([36, 0, 5, 21, 8, 8, 30])
    for tokens in (1, 2, 5):
        x = rand((tokens, d), seed=14 + tokens)
        for name, ix in (("k=7", idx), ("k=N", torch.arange(n))):
            check(GLUQ, _glu_args(x, qs, ix, "silu"), f"{fmt}/{group}/T{tokens}/{name}")
        check(LINQ, (x, qs[0].tensors(), fmt, group, None), f"{fmt}/{group}/T{tokens}/linear")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("blocks", [1, 3, 11])
def test_odd_block_counts_match_reference(fmt, blocks):
    """Rows of an odd number of 32-value blocks (group 32): AVX-512 dots two blocks per 512-bit
    vector, so the last block of a row (and the only one at d = 32) takes the one-block loop."""
    n, d = 9, 32 * blocks
    qs = qweights(n, d, fmt, 32, seed=20 + blocks)
    idx = torch.tensor([8, 0, 3, 5, 1])
    for tokens in (1, 2, 5):
        x = rand((tokens, d), seed=30 + tokens)
        check(GLUQ, _glu_args(x, qs, idx, "silu"), f"{fmt}/{blocks} blocks/T{tokens}")
        check(LINQ, (x, qs[0].tensors(), fmt, 32, None), f"{fmt}/{blocks} blocks/T{tokens}/linear")


def test_typed_wrappers():
    n, d = 30, 64
    gate, up, down = qweights(n, d, "q4m", 32)
    x, idx = rand((2, d)), torch.tensor([1, 2, 29])
    b = rand((n,))
    y = dart_ext.ops.gathered_glu_ffn_q(x, gate, up, down, idx, b_up=b)
    want = ref.gathered_glu_ffn_q(
        x, gate.tensors(), up.tensors(), down.tensors(), "q4m", 32, idx, "silu", b_up=b
    )
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    y = dart_ext.ops.gathered_mlp_q(x, gate, None, down, None, idx, "relu")
    assert y.shape == x.shape
    assert dart_ext.ops.linear_q(x, up).shape == (2, n)
    with pytest.raises(ValueError, match="share format and group.*up: q8/32"):
        dart_ext.ops.gathered_glu_ffn_q(
            x, gate, quant.quantize_rows(torch.randn(n, d), "q8"), down, idx
        )


def test_quantised_op_close_to_float_op():
    """End to end on Gaussian weights: q8 is within ~1.5% of the fp32 FFN over the original
    weights, q4 within ~20% and q4m within ~15% (three quantised matrices compound: measured
    0.011-0.014, 0.155-0.193 and 0.130-0.149 over six seeds). Seeded, so it is deterministic."""
    n, d = 256, 256
    ws = weights(n, d, seed=13)
    x = rand((8, d), seed=14)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(15))[:100]
    want = ref.gathered_glu_ffn(x, *ws, idx, "silu")
    for fmt, limit in (("q8", 0.02), ("q4", 0.22), ("q4m", 0.17)):
        qs = [quant.quantize_rows(w, fmt) for w in ws]
        got = dart_ext.ops.gathered_glu_ffn_q(x, *qs, idx)
        assert (got - want).norm() / want.norm() < limit, fmt


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    n, d = 48, 64
    cases = []
    for fmt, group in (("q8", 32), ("q4", 64), ("q4m", 32)):
        qs = qweights(n, d, fmt, group)
        idx, pidx = torch.tensor([3, 1, 40]), padded(n, 10, (2, -1))
        b = (rand((n,), seed=1), rand((n,), seed=2), rand((d,), seed=3))
        cases += [
            (GLUQ, _glu_args(rand((2, d)), qs, idx)),
            (GLUQ, _glu_args(rand((2, 9, d)), qs, pidx[0], "gelu", pidx[1], b)),
            (
                MLPQ,
                (
                    rand((1, d)),
                    qs[0].tensors(),
                    b[0],
                    qs[2].tensors(),
                    b[2],
                    fmt,
                    group,
                    idx,
                    "relu",
                ),
            ),
            (LINQ, (rand((3, d), torch.bfloat16), qs[1].tensors(), fmt, group, None)),
            (LINQ, (rand((10, d)), qs[1].tensors(), fmt, group, b[0])),
        ]
    return cases


@pytest.mark.parametrize("case", range(15))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# Bad inputs: the CPU kernel and the fake kernel name the same argument


def _bad_cases():
    n, d = 10, 64
    g4, u4, d4 = (q.tensors() for q in qweights(n, d, "q4", 32))
    g8 = qweights(n, d, "q8", 32, count=1)[0].tensors()
    m4 = qweights(n, d, "q4m", 32, count=1)[0].tensors()
    x, idx = rand((3, d)), torch.tensor([1, 2])

    def glu(gate=g4, up=u4, down=d4, fmt="q4", group=32, ix=idx, xx=x, b=(None, None, None)):
        return lambda: GLUQ(xx, gate, up, down, fmt, group, ix, "silu", None, *b)

    return [
        ("unknown quantisation format 'q5'; accepted: q8, q4, q4m", glu(fmt="q5")),
        ("group must be 32 or 64, got 16", glu(group=16)),
        ("group = 64 must divide d = 96", lambda: LINQ(rand((1, 96)), g8, "q8", 64, None)),
        ("gate must hold \\[data, scales\\] for this format, got 3 tensors", glu(gate=m4)),
        ("up must hold \\[data, scales, mins\\]", glu(gate=m4, up=u4, down=d4, fmt="q4m")),
        ("gate data must be torch.uint8|gate data must be Byte", glu(gate=g8)),
        (
            "down_t scales must be torch.float16|down_t scales must be Half",
            glu(down=[d4[0], d4[1].float()]),
        ),
        ("up data must be \\[N, 32\\] = \\[10, 32\\]", glu(up=[u4[0][:, :16], u4[1]])),
        ("up scales must be \\[N, 2\\]", glu(up=[u4[0], u4[1][:, :1]])),
        ("down_t has N = 9 rows but gate has N = 10", glu(down=[d4[0][:9], d4[1][:9]])),
        ("gate data must have unit stride", glu(gate=[g4[0].t().contiguous().t(), g4[1]])),
        ("idx out of range", glu(ix=torch.tensor([0, n]))),
        ("idx must be int64", glu(ix=idx.float())),
        ("x must be float32", glu(xx=x.double())),
        ("b_up must be 1-D \\[N\\] = \\[10\\]", glu(b=(None, rand((n + 1,)), None))),
        ("b_down must be 1-D \\[d\\] = \\[64\\]", glu(b=(None, None, rand((n,))))),
        ("unknown act", lambda: MLPQ(x, g4, None, d4, None, "q4", 32, idx, "tanh", None)),
        (
            "bias must be 1-D \\[N \\(w's rows\\)\\] = \\[10\\]",
            lambda: LINQ(x, g4, "q4", 32, rand((d,))),
        ),
        (
            "lengths need a per-sequence idx",
            lambda: GLUQ(x, g4, u4, d4, "q4", 32, idx, "silu", idx),
        ),
    ]


@pytest.mark.parametrize("case", range(19))
@pytest.mark.parametrize("mode", ["cpu", "fake"])
def test_bad_inputs(case, mode):
    match, call = _bad_cases()[case]
    if mode == "fake" and match == "idx out of range":
        pytest.skip("index values are data: only the kernel sees them")
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with (
            FakeTensorMode(allow_non_fake_inputs=True),
            pytest.raises((RuntimeError, ValueError), match=match),
        ):
            call()
        return
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()


# ------------------------------------------------------------------------------------------------
# Instruction-set variants and determinism

_VARIANT_SCRIPT = """
import torch, dart_ext
import test_ops_quant as t
assert torch.ops.dart.cpu_capability() == "{cap}", torch.ops.dart.cpu_capability()
for fmt, group in t.FMT_GROUPS:
    for tokens in (1, 3, 9):
        t.test_glu_matches_reference(fmt, group, tokens)
    t.test_linear_matches_reference(fmt, group, 1)
    t.test_mlp_matches_reference(fmt, group)
    t.test_long_rows_match_reference(fmt, group)
for fmt in t.FORMATS:
    t.test_odd_block_counts_match_reference(fmt, 3)
print("checked")
"""


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_each_instruction_set_variant_matches_reference(cap):
    order = ["default", "avx2", "avx512"]
    if order.index(cap) > order.index(torch.ops.dart.cpu_capability()):
        pytest.skip(f"this CPU runs at most {torch.ops.dart.cpu_capability()}")
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_VARIANT_SCRIPT.format(cap=cap))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.join(ROOT, "tests"),
        env={
            **os.environ,
            "PYTHONPATH": ROOT + os.pathsep + os.path.join(ROOT, "tests"),
            "DART_CPU_CAPABILITY": cap,
        },
    )
    assert p.returncode == 0 and "checked" in p.stdout, p.stdout + p.stderr


def test_thread_count_does_not_change_result():
    qs = qweights(600, 256, "q4", 32)
    x, idx = rand((2, 256)), torch.randperm(600)[:500]
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(GLUQ(*_glu_args(x, qs, idx)))
            outs.append(LINQ(x, qs[0].tensors(), "q4", 32, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
