"""Op test cases shared by the CPU (test_ops.py) and CUDA (test_ops_cuda.py) tests, in the
pattern of pytorch/extension-cpp: one `sample_inputs(device)` list of every op, checked against
one reference (`dart_ext.reference`), one `opcheck_inputs(device)` list for torch.library.opcheck,
and one `bad_inputs(device)` list of calls that must raise a named error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

import dart_ext
from dart_ext import reference as ref

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_TOL = {  # fp32 accumulation in every kernel; CUDA sums in a different order
    ("cpu", torch.float32): dict(atol=2e-5, rtol=2e-5),
    ("cuda", torch.float32): dict(atol=2e-4, rtol=2e-4),
    ("cpu", torch.bfloat16): dict(atol=2e-2, rtol=2e-2),
    ("cuda", torch.bfloat16): dict(atol=3e-2, rtol=3e-2),
    ("cpu", torch.float16): dict(atol=2e-3, rtol=2e-3),
    ("cuda", torch.float16): dict(atol=5e-3, rtol=5e-3),
}

OPS = torch.ops.dart
GLU, MLP, TOPK, GATHER = (
    OPS.gathered_glu_ffn.default,
    OPS.gathered_mlp.default,
    OPS.topk_indices.default,
    OPS.gather_neurons_.default,
)


def tolerance(dtype: torch.dtype, device: str) -> dict:
    return _TOL[(torch.device(device).type, dtype)]


def weights(n, d, dtype=torch.float32, device="cpu", seed=0, layout="contig", count=3):
    """`count` weights [n, d] scaled like a linear layer. layout: "contig"; "view" (stored [n, d]
    contiguous and handed over as .t() of a [d, n] view, as HF parameters are); "rowstride" (rows
    of a wider matrix)."""
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, d, generator=g) * d**-0.5).to(dtype).to(device) for _ in range(count)]
    if layout == "view":
        ws = [w.contiguous().t().t() for w in ws]
        assert all(w._base is not None and w.stride() == (w.shape[1], 1) for w in ws)
    elif layout == "rowstride":
        ws = [torch.cat([w, torch.zeros_like(w[:, :3])], dim=1)[:, :d] for w in ws]
    return ws


def rand(shape, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def kept(n, k, device="cpu", seed=2, batch=None):
    """k distinct kept neurons of n in random order: [k], or [batch, k] per sequence."""
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.randperm(n, generator=g)[:k].to(device)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)]).to(device)


# ------------------------------------------------------------------------------------------------
# Samples: every op on many shapes, dtypes, layouts and edge cases


class Sample(NamedTuple):
    name: str
    op: torch._ops.OpOverload
    args: tuple


_REFERENCE = {
    GLU: ref.gathered_glu_ffn,
    MLP: ref.gathered_mlp,
    TOPK: ref.topk_indices,
    GATHER: lambda out, srcs, idx, lengths=None: ref.gather_neurons(srcs, idx, lengths),
}

# Per-row lengths of a padded idx [B, kmax]: none kept, one, all kmax, and mixtures
LENGTH_SETS = {"zeros": (0, 0, 0), "ones": (1, 1, 1), "full": (-1, -1, -1), "mixed": (0, -1, 1)}


def padded(n, kmax, lengths, device="cpu", seed=9, dtype=torch.int64):
    """A padded per-sequence idx [B, kmax] and its lengths [B] (-1 in `lengths`: kmax): row b's
    first lengths[b] entries are distinct kept neurons, the rest garbage no kernel may read
    (out of range, negative, huge)."""
    lens = [kmax if n_ < 0 else n_ for n_ in lengths]
    idx = kept(n, kmax, seed=seed, batch=len(lens))
    garbage = torch.tensor([-1, n, 2**31 - 1, -(2**31)])
    for b, n_ in enumerate(lens):
        idx[b, n_:] = garbage[(torch.arange(kmax - n_) + b) % 4]
    return idx.to(dtype).to(device), torch.tensor(lens, dtype=dtype, device=device)


def _glu_samples(dev):
    mixed = torch.tensor([5, 0, 39, 5, 17, 2], device=dev)  # unsorted, with a duplicate
    for d in (1, 3, 17, 65):
        ws = weights(40, d, device=dev)
        for t in (1, 5, 300):
            for act in ACTS:
                yield f"glu-d{d}-T{t}-{act}", GLU, (rand((t, d), device=dev), *ws, mixed, act)
    for dtype in DTYPES:
        for layout in ("contig", "view", "rowstride"):
            ws = weights(96, 80, dtype, dev, layout=layout)
            idx = kept(96, 50, dev, seed=3)
            for t in (1, 7, 64):
                name = f"glu-{dtype}-{layout}-T{t}".replace("torch.", "")
                yield name, GLU, (rand((t, 80), dtype, dev), *ws, idx, "silu")
    ws = weights(64, 33, device=dev)
    for k in (1, 64):
        shared = torch.arange(64, device=dev)[:k].flip(0)
        per_seq = kept(64, k, dev, seed=4, batch=3)
        for t in (1, 2, 33):
            x = rand((3, t, 33), device=dev)
            yield f"glu-k{k}-T{t}-batched", GLU, (x, *ws, shared, "gelu")
            yield f"glu-k{k}-T{t}-per-seq", GLU, (x, *ws, per_seq, "gelu")
            yield f"glu-k{k}-T{t}-per-seq-B1", GLU, (x[:1], *ws, per_seq[:1], "gelu")
    yield from _glu_length_samples(dev)
    yield from _glu_bias_samples(dev)
    ws = weights(50, 24, device=dev)
    idx = torch.tensor([1, 4, 9, 49], device=dev)
    buf = rand((3 * 24 + 1,), device=dev)
    for name, x in (
        ("transposed", rand((24, 6), device=dev).t()),
        ("strided-last-dim", rand((4, 48), device=dev)[:, ::2]),
        ("misaligned", buf[1:].view(3, 24)),
        ("4d", rand((2, 3, 4, 24), device=dev)),
        ("1d", rand((24,), device=dev)),
    ):
        yield f"glu-x-{name}", GLU, (x, *ws, idx, "silu")
    ws = weights(20, 9, device=dev)
    x = rand((3, 9), device=dev)
    idx32 = torch.tensor([3, 1], dtype=torch.int32, device=dev)
    yield "glu-int32-idx", GLU, (x, *ws, idx32, "silu")
    yield "glu-k0", GLU, (x, *ws, torch.zeros(0, dtype=torch.long, device=dev), "silu")
    yield "glu-no-tokens", GLU, (x[:0], *ws, torch.tensor([1], device=dev), "silu")
    w0 = [torch.zeros(20, 0, device=dev) for _ in range(3)]
    yield "glu-d0", GLU, (torch.zeros(3, 0, device=dev), *w0, idx[:2], "silu")
    # d = 2048: the CPU GEMM route works in blocks of 512 neurons, so k = 1100 spans 3 blocks
    ws = weights(1200, 2048, device=dev)
    idx = kept(1200, 1100, dev, seed=1)
    for t in (1, 7, 9):
        yield f"glu-multiblock-T{t}", GLU, (rand((t, 2048), device=dev), *ws, idx, "silu")


def _glu_bias_samples(dev):
    """Llama's mlp_bias: b_gate / b_up [N] and b_down [d], each alone and all three, on both CPU
    routes (T = 1 decode loop, T = 9 GEMM), shared, per-sequence and padded idx."""
    n, d = 64, 40
    for dtype in DTYPES:
        ws = weights(n, d, dtype, dev)
        bias = (rand((n,), dtype, dev, 11), rand((n,), dtype, dev, 12), rand((d,), dtype, dev, 13))
        shared, per_seq = kept(n, 30, dev), kept(n, 30, dev, seed=5, batch=3)
        pidx, lens = padded(n, 30, (0, -1, 5), dev)
        for which in ("gate", "up", "down", "all"):
            b = [
                t if which in (nm, "all") else None for nm, t in zip(BIAS_NAMES, bias, strict=True)
            ]
            for t in (1, 9):
                x = rand((3, t, d), dtype, dev)
                tag = f"{which}-{dtype}-T{t}".replace("torch.", "")
                yield f"glu-bias-{tag}-shared", GLU, (x, *ws, shared, "silu", None, *b)
                yield f"glu-bias-{tag}-per-seq", GLU, (x, *ws, per_seq, "gelu", None, *b)
                yield f"glu-bias-{tag}-lengths", GLU, (x, *ws, pidx, "relu", lens, *b)
    ws = weights(20, 9, device=dev)
    b = (rand((20,), device=dev), rand((20,), device=dev, seed=3), rand((9,), device=dev))
    yield "glu-bias-k0", GLU, (rand((3, 9), device=dev), *ws, kept(20, 0, dev), "silu", None, *b)


BIAS_NAMES = ("gate", "up", "down")


def _glu_length_samples(dev):
    """Padded per-sequence idx with per-row lengths on both CPU routes (decode loop / GEMM) and
    the CUDA decode kernels (one split and split-K) and GEMM path."""
    for dtype in DTYPES:
        for n, d, kmax in ((64, 33, 40), (300, 64, 256)):
            ws = weights(n, d, dtype, dev)
            for tag, lengths in LENGTH_SETS.items():
                for idx_dtype in (torch.int64, torch.int32):
                    idx, lens = padded(n, kmax, lengths, dev, dtype=idx_dtype)
                    for t in (1, 3, 40):
                        x = rand((3, t, d), dtype, dev)
                        it = str(idx_dtype).replace("torch.", "")
                        name = f"glu-lengths-{tag}-{dtype}-N{n}-{it}-T{t}".replace("torch.", "")
                        yield name, GLU, (x, *ws, idx, "silu", lens)


def _mlp_samples(dev):
    w_in, w_out_t, _ = weights(48, 19, device=dev)
    biases = {"both": (0, 1), "none": (), "in": (0,), "out": (1,)}
    b = (rand((48,), device=dev, seed=7), rand((19,), device=dev, seed=8))
    shared = torch.tensor([7, 3, 3, 47], device=dev)
    per_seq = torch.tensor([[1, 2, 3, 4], [40, 0, 0, 9]], device=dev)
    for bias, which in biases.items():
        b_in = b[0] if 0 in which else None
        b_out = b[1] if 1 in which else None
        for t in (1, 6, 300):
            x = rand((2, t, 19), device=dev)
            for act in ACTS + ["gelu_new", "gelu_pytorch_tanh"]:
                for kind, idx in (("shared", shared), ("per-seq", per_seq)):
                    name = f"mlp-bias-{bias}-T{t}-{act}-{kind}"
                    yield name, MLP, (x, w_in, b_in, w_out_t, b_out, idx, act)
    for tag, lengths in LENGTH_SETS.items():
        idx, lens = padded(48, 30, lengths, dev)
        for bias, which in biases.items():
            for t in (1, 6, 40):
                x = rand((3, t, 19), device=dev)
                b_in = b[0] if 0 in which else None
                b_out = b[1] if 1 in which else None
                name = f"mlp-lengths-{tag}-bias-{bias}-T{t}"
                yield name, MLP, (x, w_in, b_in, w_out_t, b_out, idx, "gelu_tanh", lens)
    for dtype in DTYPES:
        w_in, w_out_t, _ = weights(64, 40, dtype, dev)
        b_in, b_out = rand((64,), dtype, dev, 2), rand((40,), dtype, dev, 3)
        name = f"mlp-{dtype}-all-kept".replace("torch.", "")
        idx = torch.arange(64, device=dev)
        yield name, MLP, (rand((5, 40), dtype, dev), w_in, b_in, w_out_t, b_out, idx, "gelu_new")
    w_in, w_out_t, _ = weights(1200, 2048, device=dev)
    b_in = rand((1200,), device=dev, seed=3)
    idx = kept(1200, 1100, dev, seed=1)
    for t in (1, 9):
        x = rand((t, 2048), device=dev)
        yield f"mlp-multiblock-T{t}", MLP, (x, w_in, b_in, w_out_t, None, idx, "relu")


def _topk_samples(dev):
    nan, inf = float("nan"), float("inf")
    ties = torch.tensor(
        [
            [1.0, 3.0, 3.0, nan, 2.0, 3.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [nan, -inf, nan, -inf, 5.0, nan],
            [-0.0, 0.0, -1.0, inf, -inf, 1.0],
        ],
        device=dev,
    )
    for k in (1, 3, 6):
        yield f"topk-ties-nan-k{k}", TOPK, (ties, k)
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for shape in ((7,), (3, 100), (2, 3, 257), (14336,), (64, 4096)):
            s = torch.randint(-5, 5, shape, generator=g).to(dtype).to(dev)  # many ties
            n = shape[-1]
            for k in sorted({1, 2, n // 2 or 1, n}):
                name = f"topk-{dtype}-{'x'.join(map(str, shape))}-k{k}".replace("torch.", "")
                yield name, TOPK, (s, k)


def _gather_samples(dev):
    idx = torch.tensor([4, 29, 0, 4], device=dev)
    per_seq = torch.tensor([[1, 2, 3, 4], [29, 28, 0, 0], [5, 5, 5, 5]], device=dev)
    for dtype in DTYPES:
        for d in (1, 5, 64):
            wg, wu, wdt = weights(30, d, dtype, dev, layout="rowstride")
            tag = f"{dtype}-d{d}".replace("torch.", "")
            out = torch.full((8, d), 7.0, dtype=dtype, device=dev)
            yield f"gather-{tag}-shared", GATHER, (out, [wg, wu], idx)
            out1 = torch.empty(4, d, dtype=dtype, device=dev)
            yield f"gather-{tag}-int32", GATHER, (out1, [wdt], idx.int())
            outb = torch.empty(3, 12, d, dtype=dtype, device=dev)
            yield f"gather-{tag}-per-seq", GATHER, (outb, [wg, wu, wdt], per_seq)
    for dtype in DTYPES:
        ws = weights(30, 5, dtype, dev, layout="rowstride")
        for tag, lengths in LENGTH_SETS.items():
            pidx, lens = padded(30, 6, lengths, dev)
            out = torch.full((3, 18, 5), 7.0, dtype=dtype, device=dev)
            name = f"gather-lengths-{tag}-{dtype}".replace("torch.", "")
            yield name, GATHER, (out, ws, pidx, lens)
            yield name + "-int32", GATHER, (out[:, :6].clone(), ws[:1], pidx.int(), lens.int())
    b = rand((30,), device=dev)
    yield "gather-bias-column", GATHER, (torch.empty(3, 1, device=dev), [b.view(-1, 1)], idx[:3])
    srcs = weights(64, 40, torch.bfloat16, dev, count=2, layout="view")
    wide = torch.zeros(3, 40, 45, dtype=torch.bfloat16, device=dev)
    yield "gather-strided-out", GATHER, (wide[..., :40], srcs, kept(64, 20, dev, batch=3))
    srcs = weights(100, 4096, device=dev, count=9)
    out = torch.empty(9 * 37, 4096, device=dev)
    yield "gather-9-srcs-d4096", GATHER, (out, srcs, kept(100, 37, dev))


@functools.cache
def sample_inputs(device: str) -> tuple[Sample, ...]:
    """Every op on many shapes, dtypes, layouts and edge cases (built once per device)."""
    gens = (_glu_samples, _mlp_samples, _topk_samples, _gather_samples)
    return tuple(Sample(*s) for gen in gens for s in gen(device))


def sample_names() -> list[str]:
    return [s.name for s in sample_inputs("cpu")]


def check_sample(sample: Sample) -> None:
    """The op's result equals the reference: bitwise for the index ops, within the dtype's
    tolerance for the FFN ops (shape, dtype, device and contiguity always exact)."""
    expected = _REFERENCE[sample.op](*sample.args)
    got = sample.op(*sample.args)
    if sample.op == GATHER:
        got = sample.args[0]
    assert got.shape == expected.shape and got.dtype == expected.dtype, sample.name
    assert got.device == expected.device, sample.name
    if sample.op in (TOPK, GATHER):
        assert torch.equal(got, expected), sample.name
        return
    assert got.is_contiguous(), sample.name
    tol = tolerance(got.dtype, got.device.type)
    torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{sample.name}: {m}")


# ------------------------------------------------------------------------------------------------
# opcheck


def opcheck_inputs(device: str) -> list[tuple[torch._ops.OpOverload, tuple]]:
    n, d = 96, 64
    ws = weights(n, d, device=device)
    wsb = weights(n, d, torch.bfloat16, device)
    idx = kept(n, 40, device)
    idx_b = kept(n, 40, device, batch=2)
    b_in, b_out = rand((n,), device=device, seed=5), rand((d,), device=device, seed=6)
    idx3, lens3 = padded(n, 40, (3, 40, 0), device)
    idx4, lens4 = padded(n, 40, (0, -1, 7), device, dtype=torch.int32)
    return [
        (TOPK, (rand((3, n), device=device), 10)),
        (TOPK, (rand((n,), torch.bfloat16, device), n)),
        (GLU, (rand((2, d), device=device), *ws, idx, "silu")),
        (GLU, (rand((40, d), device=device), *ws, idx, "gelu")),
        (GLU, (rand((2, 3, d), device=device), *ws, idx_b, "relu")),
        (GLU, (rand((1, d), torch.bfloat16, device), *wsb, idx, "relu")),
        (GLU, (rand((d, 30), device=device).t(), *ws, idx, "gelu_tanh")),
        (MLP, (rand((2, d), device=device), ws[0], b_in, ws[1], b_out, idx, "gelu_new")),
        (MLP, (rand((2, 33, d), device=device), ws[0], None, ws[1], None, idx_b, "relu")),
        (GATHER, (torch.empty(80, d, device=device), ws[:2], idx)),
        (GATHER, (torch.empty(2, 120, d, device=device), ws, idx_b)),
        (GLU, (rand((3, 2, d), device=device), *ws, idx4, "silu", lens4)),
        (GLU, (rand((3, 20, d), device=device), *ws, idx3, "gelu", lens3)),
        (GLU, (rand((2, d), device=device), *ws, idx, "silu", None, b_in, b_in * 2, b_out)),
        (GLU, (rand((3, 20, d), device=device), *ws, idx3, "gelu", lens3, None, b_in, None)),
        (
            MLP,
            (rand((3, 1, d), device=device), ws[0], b_in, ws[1], b_out, idx3, "relu", lens3),
        ),
        (GATHER, (torch.empty(3, 80, d, device=device), ws[:2], idx3, lens3.int())),
    ]


# ------------------------------------------------------------------------------------------------
# Bad inputs: (what the error must say, the call), the same on every device


class Operands(NamedTuple):
    """Tensors of the bad-input calls, built when a call runs (never at collection)."""

    device: str
    x: torch.Tensor
    wg: torch.Tensor
    wu: torch.Tensor
    wdt: torch.Tensor
    idx: torch.Tensor

    def empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=self.device)

    @classmethod
    def on(cls, device: str) -> Operands:
        return cls(
            device,
            rand((3, 8), device=device),
            *weights(10, 8, device=device),
            torch.tensor([1, 2], device=device),
        )


N, D = 10, 8  # of Operands


def bad_inputs(device: str) -> list[tuple[str, Callable[[Operands], object]]]:
    """(what the error must say, a call on `Operands.on(device)` that must raise it)."""
    cases = [
        ("idx must be int64", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx.float(), "silu")),
        ("idx must be 1-D", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx.view(1, 1, 2), "silu")),
        ("per-sequence idx", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx.view(1, 2), "silu")),
        (
            "idx has B = 2",
            lambda o: GLU(o.x.view(1, 3, D), o.wg, o.wu, o.wdt, o.idx.repeat(2, 1), "silu"),
        ),
        ("unknown act 'swiglu'.*accepted", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "swiglu")),
        ("w_up.*d = 8", lambda o: GLU(o.x, o.wg, o.wu[:, :4], o.wdt, o.idx, "silu")),
        ("w_down_t has N = 9", lambda o: GLU(o.x, o.wg, o.wu, o.wdt[:9], o.idx, "silu")),
        ("w_gate must be 2-D", lambda o: GLU(o.x, o.wg[0], o.wu, o.wdt, o.idx, "silu")),
        (
            "w_down_t must have unit stride",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt.t().contiguous().t(), o.idx, "silu"),
        ),
        ("w_gate has dtype", lambda o: GLU(o.x, o.wg.double(), o.wu, o.wdt, o.idx, "silu")),
        ("x must be float32", lambda o: GLU(o.x.double(), o.wg, o.wu, o.wdt, o.idx, "silu")),
        (
            "b_gate must be 1-D \\[N\\] = \\[10\\]",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "silu", None, o.empty(N + 1)),
        ),
        (
            "b_up must be 1-D \\[N\\]",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "silu", None, None, o.empty(1, N)),
        ),
        (
            "b_down must be 1-D \\[d\\] = \\[8\\]",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "silu", None, None, None, o.empty(N)),
        ),
        (
            "b_up (has dtype|must be on x's device with x's dtype)",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "silu", None, None, o.empty(N).double()),
        ),
        ("w_in has dtype", lambda o: MLP(o.x, o.wg.bfloat16(), None, o.wdt, None, o.idx, "relu")),
        ("b_in must be 1-D", lambda o: MLP(o.x, o.wg, o.empty(N + 1), o.wdt, None, o.idx, "relu")),
        ("b_out must be 1-D", lambda o: MLP(o.x, o.wg, None, o.wdt, o.empty(N), o.idx, "relu")),
        ("unknown act", lambda o: MLP(o.x, o.wg, None, o.wdt, None, o.idx, "tanh")),
        ("w_out_t has N", lambda o: MLP(o.x, o.wg, None, o.wdt[:4], None, o.idx, "relu")),
        ("k must satisfy", lambda o: TOPK(o.x, 0)),
        ("k must satisfy", lambda o: TOPK(o.x, D + 1)),
        ("scores must be", lambda o: TOPK(o.x.long(), 1)),
        ("out must have S\\*k", lambda o: GATHER(o.empty(3, D), [o.wg], o.idx)),
        ("srcs\\[1\\] has dtype", lambda o: GATHER(o.empty(4, D), [o.wg, o.wu.bfloat16()], o.idx)),
        ("srcs\\[0\\] has d", lambda o: GATHER(o.empty(2, D + 1), [o.wg], o.idx)),
        ("out must be 3-D", lambda o: GATHER(o.empty(2, D), [o.wg], o.idx.view(1, 2))),
        ("srcs must hold", lambda o: GATHER(o.empty(2, D), [], o.idx)),
        # out overlapping itself, idx or a source (as torch's own in-place ops refuse)
        (
            "out has elements that share memory",
            lambda o: GATHER(o.empty(1, D).expand(4, D), [o.wg], o.idx.repeat(2)),
        ),
        ("out shares memory with idx", lambda o: _gather_into_idx(o.wg)),
        ("out shares memory with srcs\\[1\\]", lambda o: GATHER(o.wu[2:6], [o.wg, o.wu], o.idx)),
        ("out shares memory with srcs\\[0\\]", lambda o: GATHER(o.wg[:2], [o.wg], o.idx)),
    ]
    # per-row lengths of a padded idx [B, kmax]
    cases += [
        (
            "lengths need a per-sequence idx",
            lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx, "silu", _on(o, [1])),
        ),
        ("lengths must be int64", lambda o: GLU(*_batched(o), "silu", _on(o, [1.0]))),
        (
            "lengths must be 1-D \\[B\\] = \\[1\\]",
            lambda o: GLU(*_batched(o), "silu", _on(o, [1, 1])),
        ),
        ("lengths must be 1-D", lambda o: MLP(*_batched_mlp(o), "relu", _on(o, [[1]]))),
        (
            "lengths need a per-sequence idx",
            lambda o: GATHER(o.empty(2, D), [o.wg], o.idx, _on(o, [1])),
        ),
        (
            "lengths must be 1-D",
            lambda o: GATHER(o.empty(1, 2, D), [o.wg], o.idx[None], _on(o, [1, 2])),
        ),
    ]
    # compact_* (Python): one check for both routes (T = 1: kernel route on CPU, T = 20: GEMMs)
    for t in (1, 20):
        cases += [
            (
                "gate_up must be \\[2k, d\\] = \\[4, 8\\], got \\[5, 8\\]",
                lambda o, t=t: dart_ext.compact_glu_ffn(_x(o, t), o.empty(5, D), _down(o)),
            ),
            (
                "gate_up must be \\[2k, d\\] = \\[4, 8\\], got \\[4, 7\\]",
                lambda o, t=t: dart_ext.compact_glu_ffn(_x(o, t), _gate_up(o)[:, :7], _down(o)),
            ),
            (
                "down_c must be .*x's dtype",
                lambda o, t=t: dart_ext.compact_glu_ffn(_x(o, t), _gate_up(o), _down(o).double()),
            ),
            (
                "x must be \\[..., d\\] with d >= 1",
                lambda o, t=t: dart_ext.compact_glu_ffn(
                    _x(o, t)[:, :0], _gate_up(o)[:, :0], _down(o)[:, :0]
                ),
            ),
            (
                "w_in_c must be \\[k, d\\] = \\[2, 8\\], got \\[3, 8\\]",
                lambda o, t=t: dart_ext.compact_mlp(
                    _x(o, t), _gate_up(o)[:3], None, _down(o), None, "relu"
                ),
            ),
            (
                "b_in_c must be \\[k\\]",
                lambda o, t=t: dart_ext.compact_mlp(
                    _x(o, t), _down(o), o.empty(1), _down(o), None, "relu"
                ),
            ),
            (
                "x must be \\[..., d\\] with d >= 1",
                lambda o, t=t: dart_ext.compact_mlp(
                    _x(o, t)[:, :0], _down(o)[:, :0], None, _down(o)[:, :0], None, "relu"
                ),
            ),
        ]
    if torch.device(device).type == "cpu":  # CUDA checks the range on the device (test_ops_cuda)
        cases += [
            (
                "lengths\\[0\\] = 3 is not in \\[0, kmax\\]",
                lambda o: GLU(*_batched(o), "silu", _on(o, [3])),
            ),
            (
                "lengths\\[0\\] = -1",
                lambda o: GATHER(o.empty(1, 2, D), [o.wg], o.idx[None], _on(o, [-1])),
            ),
            ("idx out of range.*row 0", lambda o: GLU(*_batched(o, [1, N]), "silu", _on(o, [2]))),
            ("idx out of range", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, _on(o, [0, N]), "silu")),
            ("idx out of range", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, _on(o, [-1]), "silu")),
            ("idx out of range", lambda o: MLP(o.x, o.wg, None, o.wdt, None, _on(o, [N]), "relu")),
            ("idx out of range", lambda o: GATHER(o.empty(2, D), [o.wg], _on(o, [0, N]))),
        ]
    else:
        cases += [
            ("w_up is on cpu", lambda o: GLU(o.x, o.wg, o.wu.cpu(), o.wdt, o.idx, "silu")),
            ("idx is on cpu", lambda o: GLU(o.x, o.wg, o.wu, o.wdt, o.idx.cpu(), "silu")),
        ]
    return cases


def _on(o: Operands, values: list[int]) -> torch.Tensor:
    return torch.tensor(values, device=o.device)


def _batched(o: Operands, idx: list[int] | None = None) -> tuple:
    """GLU operands with one sequence: x [1, 3, D] and a per-sequence idx [1, 2]."""
    ix = o.idx[None] if idx is None else _on(o, [idx])
    return o.x[None], o.wg, o.wu, o.wdt, ix


def _batched_mlp(o: Operands) -> tuple:
    return o.x[None], o.wg, None, o.wdt, None, o.idx[None]


def _x(o: Operands, tokens: int) -> torch.Tensor:  # x of compact_*: tokens [T, D]
    return rand((tokens, D), device=o.device)


def _gate_up(o: Operands) -> torch.Tensor:  # [2k, D], k = 2
    return rand((4, D), device=o.device)


def _down(o: Operands) -> torch.Tensor:  # [k, D]
    return rand((2, D), device=o.device)


def _gather_into_idx(src: torch.Tensor) -> None:
    """gather_neurons_ with an out that is a float view of idx's own memory."""
    k, d = 4, src.shape[1]
    storage = torch.zeros(k * d, dtype=torch.int64, device=src.device)
    idx = storage[:k]
    idx.copy_(torch.tensor([1, 2, 3, 4]))
    out = storage.view(torch.float32)[: k * d].view(k, d)
    GATHER(out, [src], idx)
