"""CUDA kernels of the quantised ops (gathered_glu_ffn_q, gathered_mlp_q, linear_q;
csrc/cuda/quant_ops.cu) against the pure-PyTorch reference on the GPU: every format and group,
the decode kernels (1 to 8 tokens) and the GEMM route (more), shared / per-sequence / padded
indices, biases, int32 indices, Llama-3.1-8B shapes, opcheck, bad inputs, CUDA graphs. The kernel
cores also run on the CPU emulation in every suite run (tests/test_cuda_emulation_quant.py);
this module needs a GPU (skipped otherwise; scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch
from op_cases import kept, padded, rand
from test_ops_quant import _opcheck_cases

from dart_ext import quant
from dart_ext import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
OPS = torch.ops.dart
GLUQ, MLPQ, LINQ = OPS.gathered_glu_ffn_q.default, OPS.gathered_mlp_q.default, OPS.linear_q.default
FMT_GROUPS = [(f, g) for f in quant.FORMATS for g in quant.FORMATS[f].groups]
# the reference sums in another order; bf16 / fp16 outputs are rounded once
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture(scope="module", autouse=True)
def ext():
    import dart_ext

    for op in ("gathered_glu_ffn_q", "gathered_mlp_q", "linear_q"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dart::{op}", "CUDA"):
            pytest.skip(f"dart_ext was built without CUDA kernels (dart::{op})")
    return dart_ext


def qweights(n, d, fmt, group, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        quant.quantize_rows(torch.randn(n, d, generator=g) * d**-0.5, fmt, group).to(DEV)
        for _ in range(count)
    ]


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    torch.testing.assert_close(got, want, **TOL[dtype])


def _glu(x, qs, idx, act="silu", lengths=None, biases=(None, None, None)):
    f, g = qs[0].fmt, qs[0].group
    args = (x, *(q.tensors() for q in qs), f, g, idx, act, lengths, *biases)
    y = GLUQ(*args)
    _close(y, ref.gathered_glu_ffn_q(*args), x.dtype)
    return y


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("T", [1, 2, 3, 8, 9, 40])
def test_glu_shared_idx(fmt, group, T):
    n, d = 1024, 512
    qs = qweights(n, d, fmt, group)
    dtype = [torch.bfloat16, torch.float16, torch.float32][T % 3]
    _glu(rand((T, d), dtype, DEV), qs, kept(n, 300, DEV))


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
@pytest.mark.parametrize("B,T", [(2, 1), (3, 4), (2, 12)])
def test_glu_per_sequence_padded_biases_int32(fmt, B, T):
    n, d = 512, 256
    qs = qweights(n, d, fmt, 32, seed=B)
    idx, lens = padded(n, 200, [-1, 0, 37][:B], DEV)
    b = (rand((n,), torch.bfloat16, DEV, 1), rand((n,), torch.bfloat16, DEV, 2))
    b = (*b, rand((d,), torch.bfloat16, DEV, 3))
    x = rand((B, T, d), torch.bfloat16, DEV)
    y = _glu(x, qs, idx, "gelu_tanh", lens, b)
    y32 = GLUQ(x, *(q.tensors() for q in qs), fmt, 32, idx.int(), "gelu_tanh", lens.int(), *b)
    assert torch.equal(y, y32)


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("T", [1, 5, 20])
def test_mlp(fmt, group, T):
    n, d = 768, 256
    qs = qweights(n, d, fmt, group, count=2)
    b_in, b_out = rand((n,), torch.float16, DEV, 4), rand((d,), torch.float16, DEV, 5)
    x = rand((T, d), torch.float16, DEV)
    args = (x, qs[0].tensors(), b_in, qs[1].tensors(), b_out, fmt, group, kept(n, 200, DEV), "relu")
    _close(MLPQ(*args), ref.gathered_mlp_q(*args), x.dtype)


@pytest.mark.parametrize("fmt,group", FMT_GROUPS)
@pytest.mark.parametrize("T", [1, 4, 8, 9, 64])
def test_linear(fmt, group, T):
    n, d = 333, 1024
    (w,) = qweights(n, d, fmt, group, count=1)
    dtype = [torch.bfloat16, torch.float32][T % 2]
    bias = rand((n,), dtype, DEV, 6) if T % 3 else None
    x = rand((T, d), dtype, DEV)
    args = (x, w.tensors(), fmt, group, bias)
    _close(LINQ(*args), ref.linear_q(*args), dtype)


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_glu_llama_shape(fmt, keep):
    n, d = 14336, 4096
    qs = qweights(n, d, fmt, 32)
    _glu(rand((1, d), torch.bfloat16, DEV), qs, kept(n, round(keep * n), DEV))


def test_deterministic_and_graph_capture():
    n, d = 4096, 1024
    qs = qweights(n, d, "q4", 32)
    x = rand((1, d), torch.bfloat16, DEV)
    idx = kept(n, 2000, DEV)
    args = (x, *(q.tensors() for q in qs), "q4", 32, idx, "silu")
    first = GLUQ(*args)
    assert all(torch.equal(first, GLUQ(*args)) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = GLUQ(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.parametrize("case", range(15))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]

    def to_dev(a):
        if isinstance(a, torch.Tensor):
            return a.to(DEV)
        if isinstance(a, (list, tuple)):
            return type(a)(to_dev(v) for v in a)
        return a

    torch.library.opcheck(op, to_dev(args))


def test_bad_inputs_name_the_argument():
    n, d = 10, 64
    g4, u4, d4 = (q.tensors() for q in qweights(n, d, "q4", 32))
    x, idx = rand((3, d), device=DEV), torch.tensor([1, 2], device=DEV)
    with pytest.raises(RuntimeError, match="up data is on cpu but x is on cuda"):
        GLUQ(x, g4, [u4[0].cpu(), u4[1]], d4, "q4", 32, idx, "silu")
    with pytest.raises(RuntimeError, match="group must be 32 or 64, got 16"):
        GLUQ(x, g4, u4, d4, "q4", 16, idx, "silu")
    with pytest.raises(RuntimeError, match="gate data must be"):
        GLUQ(x, [g4[0].view(torch.int8), g4[1]], u4, d4, "q4", 32, idx, "silu")
    with pytest.raises(RuntimeError, match="idx is on cpu"):
        GLUQ(x, g4, u4, d4, "q4", 32, idx.cpu(), "silu")
    with pytest.raises(RuntimeError, match="b_down has dtype"):
        GLUQ(x, g4, u4, d4, "q4", 32, idx, "silu", None, None, None, rand((d,), torch.half, DEV))
    with pytest.raises(RuntimeError, match="bias must be 1-D"):
        LINQ(x, g4, "q4", 32, rand((d,), device=DEV))
