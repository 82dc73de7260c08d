"""The quantised-row CUDA kernels (csrc/kernels/quant_ffn.cuh: the decode kernels of
gathered_glu_ffn_q / gathered_mlp_q / linear_q and the prefill helpers) run on the CPU emulation
of the CUDA execution model (tests/emulation.py) against the pure-PyTorch reference
(dart_ext.reference, which rounds x to int8 per block of 32 as the kernels do): every format
(q8, q4, q4m) and group (32, 64), 1 to 8 tokens per index set, shared and per-sequence (padded)
indices, split-K on and off, biases, every activation, int32 indices, ragged shapes (d past one
warp's loads, several column tiles with a short last one), bad indices and lengths, alignment and
argument refusals of the launcher, and bitwise determinism across schedules.

What emulation cannot show (speed, the memory model, the ATen glue in csrc/cuda/quant_ops.cu)
is left to the GPU run (scripts/gpu_check.sh)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import emulation as emu
import pytest
import torch

from dart_ext import quant
from dart_ext import reference as ref

C = ctypes.c_longlong
VP = ctypes.c_void_p
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
FMTS = {"q8": 0, "q4": 1, "q4m": 2}
MODES = {"glu": 0, "mlp": 1, "linear": 2}
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# |y - ref| <= TOL * (|ref| + mean |ref|): the output's rounding plus another fp32 summation order
TOL = {"float32": 3e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
PLAN_FIELDS = ["ok", "maxt", "vb", "splits", "ntiles", "chunk", "ws_bytes", "smem1"]


@pytest.fixture(autouse=True)
def default_schedule():
    emu.reset_schedule()
    yield
    emu.reset_schedule()


@dataclass
class Case:
    mode: str = "glu"
    fmt: str = "q4"
    group: int = 32
    dtype: str = "bfloat16"
    tokens: int = 1  # per index set (Mc)
    groups: int = 1  # sequences with their own idx
    per_seq: bool = False
    n: int = 200
    d: int = 128
    k: int = 40
    act: str = "silu"
    bias_in: bool = False  # b_gate / b_in / the linear's bias
    bias_up: bool = False  # b_up (GLU)
    bias_out: bool = False  # b_down / b_out
    splits: int = 0  # 0: the plan's choice
    num_sms: int = 2
    int32: bool = False
    lengths: tuple[int, ...] | None = None
    seed: int = 0


def plan_of(c: Case) -> dict[str, int]:
    out = (C * len(PLAN_FIELDS))()
    k = 0 if c.mode == "linear" else c.k
    emu.library().dart_emu_q_plan(
        FMTS[c.fmt], c.groups, c.tokens, C(c.d), C(k), c.num_sms, C(c.splits), out
    )
    return dict(zip(PLAN_FIELDS, list(out), strict=True))


def make_inputs(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    dt = DT[c.dtype]
    x = torch.randn(c.groups * c.tokens, c.d, generator=g).to(dt)
    nmat = {"glu": 3, "mlp": 2, "linear": 1}[c.mode]
    mats = [
        quant.quantize_rows(torch.randn(c.n, c.d, generator=g) * c.d**-0.5, c.fmt, c.group)
        for _ in range(nmat)
    ]
    nidx = c.groups if (c.per_seq or c.groups > 1) else 1
    idx = torch.stack([torch.randperm(c.n, generator=g)[: c.k] for _ in range(nidx)])
    if c.lengths is not None:  # padding past each length: garbage the kernels must never read
        for b, n in enumerate(c.lengths):
            idx[b, n:] = [-7, 10**9][b % 2]
    return {
        "x": x,
        "mats": mats,
        "b_in": (torch.randn(c.n, generator=g) * 0.5).to(dt),
        "b_up": (torch.randn(c.n, generator=g) * 0.5).to(dt),
        "b_out": (torch.randn(c.d, generator=g) * 0.5).to(dt),
        "idx": idx,
    }


def _mat_ptrs(m: quant.QuantRows | None):
    if m is None:
        return None
    mins = None if m.mins is None else m.mins.data_ptr()
    return (VP * 3)(m.data.data_ptr(), m.scales.data_ptr(), mins)


def aligned_bytes(nbytes: int, offset: int = 0) -> tuple[torch.Tensor, int]:
    """A byte buffer (filled with 0xff: NaN / -1 where nothing was written) and the address of
    its first usable byte, 256-aligned plus offset."""
    raw = torch.full((nbytes + 512,), 0xFF, dtype=torch.uint8)
    return raw, raw.data_ptr() + (-raw.data_ptr()) % 256 + offset


def run(c: Case, inp: dict) -> torch.Tensor:
    """Launches the decode kernels of c.mode on the emulation; returns y (x's dtype)."""
    mats = inp["mats"]
    linear = c.mode == "linear"
    idx = inp["idx"].to(torch.int32 if c.int32 else torch.int64).contiguous()
    lens = None if c.lengths is None else torch.tensor(c.lengths, dtype=torch.int64)
    x = inp["x"].contiguous()
    y = torch.full((x.shape[0], c.n if linear else c.d), float("nan"), dtype=x.dtype)
    plan = plan_of(c)
    ws, ws_addr = aligned_bytes(max(plan["ws_bytes"], 1))
    opt = {
        "b_in": inp["b_in"] if c.bias_in else None,
        "b_up": inp["b_up"] if c.bias_up and c.mode == "glu" else None,
        "b_out": inp["b_out"] if c.bias_out and not linear else None,
    }
    ptr = {key: (None if t is None else t.data_ptr()) for key, t in opt.items()}
    code = emu.library().dart_emu_q_decode(
        emu.DTYPES[c.dtype],
        FMTS[c.fmt],
        MODES[c.mode],
        c.group,
        VP(x.data_ptr()),
        _mat_ptrs(mats[0]),
        _mat_ptrs(mats[1] if c.mode == "glu" else None),
        _mat_ptrs(None if linear else mats[-1]),
        VP(ptr["b_in"]),
        VP(ptr["b_up"]),
        VP(ptr["b_out"]),
        VP(idx.data_ptr()),
        int(c.int32),
        C(idx.shape[1] if idx.shape[0] > 1 else 0),
        VP(None if lens is None else lens.data_ptr()),
        0,
        VP(y.data_ptr()),
        C(c.n),
        C(c.d),
        C(c.k),
        c.groups,
        c.tokens,
        ACTS[c.act],
        c.num_sms,
        C(c.splits),
        VP(ws_addr),
    )
    emu.check(code)
    del ws
    return y


def reference(c: Case, inp: dict) -> torch.Tensor:
    """dart_ext.reference in fp32 (x widened first: the same values, the same int8 rounding)."""
    mats = [m.tensors() for m in inp["mats"]]
    x = inp["x"].float()
    bias = {key: inp[key] if getattr(c, "bias_" + key[2:]) else None for key in ("b_in", "b_up")}
    b_out = inp["b_out"] if c.bias_out else None
    if c.mode == "linear":
        return ref.linear_q(x, mats[0], c.fmt, c.group, bias["b_in"])
    lengths = None if c.lengths is None else torch.tensor(c.lengths)
    if c.per_seq or c.groups > 1:
        x = x.reshape(c.groups, c.tokens, c.d)
        idx = inp["idx"]
    else:
        idx = inp["idx"][0]
    if c.mode == "glu":
        y = ref.gathered_glu_ffn_q(
            x, *mats, c.fmt, c.group, idx, c.act, lengths, bias["b_in"], bias["b_up"], b_out
        )
    else:
        y = ref.gathered_mlp_q(
            x, mats[0], bias["b_in"], mats[1], b_out, c.fmt, c.group, idx, c.act, lengths
        )
    return y.reshape(-1, c.d)


def assert_close(c: Case, y: torch.Tensor, want: torch.Tensor) -> None:
    y, want = y.double(), want.double()
    assert torch.isfinite(y).all(), f"{c}: unwritten or NaN outputs"
    err = (y - want).abs()
    bound = TOL[c.dtype] * (want.abs() + want.abs().mean())
    worst = int(torch.argmax(err - bound))
    assert (err <= bound).all(), (
        f"{c}: worst flat index {worst}: got {y.flatten()[worst]}, want {want.flatten()[worst]}"
    )


def check(c: Case) -> torch.Tensor:
    inp = make_inputs(c)
    y = run(c, inp)
    assert_close(c, y, reference(c, inp))
    return y


DTYPES = ["bfloat16", "float16", "float32"]


# ---------------------------------------------------------------------------------------------
# The gathered FFN ops over the decode configurations


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("mode", ["glu", "mlp"])
def test_gathered_decode_matches_reference(fmt, tokens, mode):
    i = tokens + 3 * (mode == "glu") + 5 * FMTS[fmt]  # rotate the rest over the grid
    per_seq = bool(i % 2)
    c = Case(
        mode=mode,
        fmt=fmt,
        group=(32, 64)[i % 2],
        dtype=DTYPES[i % 3],
        tokens=tokens,
        groups=2 if per_seq else 1,
        per_seq=per_seq,
        d=(128, 1088, 256)[i % 3],  # 1088: more 16-byte chunks than lanes, a short last tile
        k=150 if i % 4 < 2 else 45,
        splits=2 if i % 4 < 2 else 1,
        act=list(ACTS)[i % 4],
        bias_in=mode == "mlp",
        bias_out=mode == "mlp",
        seed=i,
    )
    plan = plan_of(c)
    assert plan["ok"] and plan["maxt"] == {1: 1, 2: 2, 3: 4, 5: 8, 8: 8}[tokens]
    assert plan["splits"] == c.splits
    check(c)


@pytest.mark.parametrize("fmt,group", [(f, g) for f in FMTS for g in (32, 64)])
def test_every_format_and_group_with_split_k(fmt, group):
    check(Case(fmt=fmt, group=group, tokens=1, d=512, n=400, k=300, splits=3, seed=group))


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", ["glu", "mlp"])
def test_every_activation(act, mode):
    check(Case(mode=mode, act=act, tokens=2, k=70, bias_in=True, bias_out=True, seed=3))


@pytest.mark.parametrize("biases", ["gate", "up", "down", "all"])
@pytest.mark.parametrize("fmt", ["q8", "q4m"])
def test_glu_biases(biases, fmt):
    c = Case(
        fmt=fmt,
        tokens=3,
        k=130,
        splits=2,
        dtype="float32",
        bias_in=biases in ("gate", "all"),
        bias_up=biases in ("up", "all"),
        bias_out=biases in ("down", "all"),
    )
    check(c)


@pytest.mark.parametrize(
    "lengths", [(0, 0, 0), (1, 150, 0), (150, 150, 150), (37, 1, 129), (64, 0, 65)]
)
@pytest.mark.parametrize("mode", ["glu", "mlp"])
def test_per_group_lengths(lengths, mode):
    """A padded idx [G, kmax] with per-group lengths: each group sums its own first lengths[g]
    neurons; the padding (out-of-range garbage) is never read; splits past a length add zeros."""
    i = sum(lengths) + (mode == "glu")
    c = Case(
        mode=mode,
        fmt=list(FMTS)[i % 3],
        dtype=DTYPES[i % 3],
        tokens=1 + i % 4,
        groups=3,
        per_seq=True,
        k=150,
        splits=1 + i % 3,
        bias_in=mode == "mlp",
        bias_out=mode == "mlp",
        int32=bool(i % 2),
        lengths=lengths,
        seed=i,
    )
    y = check(c).reshape(c.groups, c.tokens, c.d)
    for g, n in enumerate(lengths):
        if n == 0 and mode == "glu":
            assert not y[g].any(), "a group with no kept neurons gives zeros"


@pytest.mark.parametrize(
    "k,tokens,splits",
    [(1, 1, 1), (7, 2, 1), (65, 1, 0), (130, 4, 2), (600, 1, 0), (300, 8, 3)],
)
def test_ragged_k_and_splits(k, tokens, splits):
    check(Case(fmt="q4", n=max(2 * k, 64), k=k, tokens=tokens, splits=splits, dtype="float32"))


def test_int32_indices_give_the_same_bits_as_int64():
    c = Case(fmt="q8", tokens=3, groups=3, per_seq=True, k=130, splits=2, seed=5)
    inp = make_inputs(c)
    y64 = run(c, inp)
    y32 = run(replace(c, int32=True), inp)
    assert torch.equal(y64, y32)
    assert_close(c, y32, reference(c, inp))


@pytest.mark.parametrize("bad", ["negative", "n"])
@pytest.mark.parametrize("split", [1, 2])
def test_out_of_range_index_fails_the_launch(bad, split):
    c = Case(tokens=1, k=150, splits=split)
    inp = make_inputs(c)
    inp["idx"][0, 140] = -1 if bad == "negative" else c.n
    with pytest.raises(emu.EmulationError, match="idx out of range") as e:
        run(c, inp)
    assert e.value.code == 710  # cudaErrorAssert, like a device-side assert


def test_lengths_out_of_range_is_a_device_error():
    c = Case(groups=2, per_seq=True, k=40, lengths=(3, 41))
    with pytest.raises(emu.EmulationError, match="lengths out of range"):
        run(c, make_inputs(c))


def test_deterministic_across_reruns_and_schedules():
    """Bitwise equal outputs whatever order the CTAs and threads run in, with split-K (the last
    CTA of a tile differs between schedules; the order of the sums does not)."""
    c = Case(fmt="q4m", dtype="float32", tokens=2, groups=2, per_seq=True, n=300, k=256, splits=4)
    inp = make_inputs(c)
    outs = []
    for mode, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]:
        emu.set_schedule(mode, seed)
        outs.append(run(c, inp))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_close(c, outs[0], reference(c, inp))


def test_split_count_changes_only_rounding():
    c = Case(fmt="q8", dtype="float32", n=600, k=512, seed=9)
    inp = make_inputs(c)
    ys = {s: run(replace(c, splits=s), inp) for s in (1, 2, 8)}
    assert plan_of(replace(c, splits=8))["splits"] == 8
    for y in ys.values():
        assert_close(c, y, reference(c, inp))
    assert not torch.equal(ys[1], ys[8])  # really different reductions


# ---------------------------------------------------------------------------------------------
# linear_q


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_linear_matches_reference(fmt, tokens):
    i = tokens + FMTS[fmt]
    check(
        Case(
            mode="linear",
            fmt=fmt,
            group=(32, 64)[i % 2],
            dtype=DTYPES[i % 3],
            tokens=tokens,
            n=(77, 300)[i % 2],  # output rows not a multiple of the warps of a CTA
            d=(1088, 192)[i % 2],
            bias_in=bool(i % 2),
            seed=i,
        )
    )


def test_activation_rounding_ties_and_zero_blocks():
    """x rounded exactly as the reference: half-way values round to even (2.5 -> 2, -3.5 -> -4 at
    amax 127), an all-zero block gives zeros. A different rounding moves y by a whole weight."""
    c = Case(mode="linear", fmt="q8", dtype="float32", tokens=2, n=40, d=96)
    inp = make_inputs(c)
    x = torch.zeros(2, 96)
    x[0, :32] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5] + [0.25] * 27)
    x[0, 32:64] = torch.linspace(-1, 1, 32)  # block 2 of row 0; block 3 stays zero
    x[1] = torch.randn(96, generator=torch.Generator().manual_seed(1))
    inp["x"] = x
    y = run(c, inp)
    assert_close(c, y, reference(c, inp))
    w = quant.dequantize_rows(inp["mats"][0])
    rounded = quant.quantize_activations(x)
    assert rounded[0, 1] == 2.0 and rounded[0, 2] == -4.0 and rounded[0, 3] == 0.0
    torch.testing.assert_close(y, rounded @ w.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The plan and the launcher's refusals


def test_plan_token_bound_and_shapes():
    assert plan_of(Case(tokens=8))["ok"] and not plan_of(Case(tokens=9))["ok"]
    assert not plan_of(Case(d=48))["ok"]  # not a multiple of 32: no format has such rows
    assert not plan_of(Case(tokens=8, d=32 * 8192))["ok"]  # the rounded x overflows shared memory
    lin = plan_of(Case(mode="linear", tokens=4))
    assert lin["ok"] and lin["ws_bytes"] == 0 and lin["splits"] == 1


def test_plan_at_llama_shapes_fills_the_gpu():
    """Llama-3.1-8B (d 4096, N 14336) on 132 SMs: at one token >= 90% of two CTAs per SM at
    every keep (splits come in multiples of 8 neurons), at more tokens at least one CTA per SM,
    >= 64 neurons a split, and the partials' traffic (write + read) at most a quarter of the
    down rows' bytes."""
    for fmt in FMTS:
        for tokens, keep in [(1, 0.3), (1, 0.5), (1, 1.0), (4, 0.5), (8, 0.3)]:
            c = Case(fmt=fmt, tokens=tokens, d=4096, n=14336, k=round(keep * 14336), num_sms=132)
            p = plan_of(c)
            assert p["ok"] and p["chunk"] >= 64 and p["chunk"] % 8 == 0, (fmt, tokens, p)
            ctas = p["ntiles"] * p["splits"]
            assert ctas >= (0.9 * 264 if tokens == 1 else 132), (fmt, tokens, keep, p)
            down_bytes = c.k * quant.FORMATS[fmt].row_bytes(c.d)
            partial_bytes = 2 * p["splits"] * tokens * c.d * 4
            assert partial_bytes <= down_bytes / 4, (fmt, tokens, keep, p)


def test_launcher_refuses_misaligned_rows_and_bad_groups():
    c = Case(fmt="q8", k=20)
    inp = make_inputs(c)
    m = inp["mats"][0]
    raw = torch.zeros(m.data.numel() + 16, dtype=torch.int8)
    shifted = raw[8 : 8 + m.data.numel()].view(m.data.shape)  # 8 bytes off 16-byte alignment
    shifted.copy_(m.data)
    inp["mats"][0] = quant.QuantRows("q8", 32, shifted, m.scales)
    with pytest.raises(emu.EmulationError) as e:
        run(c, inp)
    assert e.value.code == 1  # cudaErrorInvalidValue: refused before any launch
    with pytest.raises(emu.EmulationError) as e:
        run(replace(c, group=48), make_inputs(c))
    assert e.value.code == 1


# ---------------------------------------------------------------------------------------------
# Prefill helpers


@pytest.mark.parametrize("fmt", list(FMTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_rows_gathered_and_all(fmt, dtype):
    g = torch.Generator().manual_seed(FMTS[fmt])
    n, d, k = 50, 96, 12
    mats = [quant.quantize_rows(torch.randn(n, d, generator=g), fmt, 32) for _ in range(3)]
    ptrs = (VP * 9)(*[p for m in mats for p in _mat_ptrs(m)])
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(2)])
    lens = torch.tensor([k, 5])
    idx[1, 5:] = -3  # padding: never read
    out = torch.full((2, 3 * k, d), float("nan"), dtype=DT[dtype])
    code = emu.library().dart_emu_q_dequant_rows(
        emu.DTYPES[dtype], FMTS[fmt], 32, 3, ptrs, C(d), C(n), C(k),
        VP(idx.data_ptr()), C(k), VP(lens.data_ptr()), C(2), VP(out.data_ptr()), 2,
    )  # fmt: skip
    emu.check(code)
    full = [quant.dequantize_rows(m).to(DT[dtype]) for m in mats]
    for b in range(2):
        rows = idx[b, : lens[b]]
        for s in range(3):
            block = out[b, s * k : (s + 1) * k]
            assert torch.equal(block[: len(rows)], full[s][rows])
            assert not block[len(rows) :].any()
    # no idx: the first k rows of one matrix
    out1 = torch.empty(k, d, dtype=DT[dtype])
    code = emu.library().dart_emu_q_dequant_rows(
        emu.DTYPES[dtype], FMTS[fmt], 32, 1, ptrs, C(d), C(n), C(k), None, C(0), None, C(1),
        VP(out1.data_ptr()), 2,
    )  # fmt: skip
    emu.check(code)
    assert torch.equal(out1, full[0][:k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_x_equals_quantize_activations(dtype):
    x = (torch.randn(5, 160, generator=torch.Generator().manual_seed(2)) * 3).to(DT[dtype])
    x[1, :32] = 0.0
    x[2, :5] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5]).to(DT[dtype])
    x[2, 5:32] = 0.0
    xr = torch.empty_like(x)
    emu.check(
        emu.library().dart_emu_q_round_x(
            emu.DTYPES[dtype], VP(x.data_ptr()), VP(xr.data_ptr()), C(x.numel()), 2
        )
    )
    assert torch.equal(xr, quant.quantize_activations(x).to(x.dtype))
