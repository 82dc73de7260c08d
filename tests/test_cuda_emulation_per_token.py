"""The per-token sparse FFN kernels (csrc/kernels/per_token_ffn.cuh: gate-first and input-sparse,
the whole launch sequence of each) run on the CPU emulation of the CUDA execution model
(tests/emulation.py) against the pure-PyTorch reference ops of dart_ext/per_token.py: outputs
within the dtype's tolerance and the per-token `read` counts exactly equal, over dtypes, 1 to 8
tokens, every activation, thresholds that keep everything / part / nothing, split-K on and off,
the 16-byte vector path and the element-wise fallback, both policies (token, union), thresholds
by value and from device memory, and bitwise determinism across schedules.

Thresholds are put in the middle of a wide gap between the reference's own scores, so that the
kernels' other summation order cannot move a neuron across the threshold (a token's kept set is
a discontinuous function of its scores)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

import emulation as emu
import pytest
import torch

from dart_ext import per_token as pt
from dart_ext.reference import apply_act

C = ctypes.c_longlong
VP = ctypes.c_void_p
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 3e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
DTYPES = list(DT)


@pytest.fixture(autouse=True)
def default_schedule():
    emu.reset_schedule()
    yield
    emu.reset_schedule()


@dataclass
class Case:
    op: str = "gate"  # gate (gate-first) or input (input-sparse)
    dtype: str = "bfloat16"
    tokens: int = 1
    n: int = 300
    d: int = 128
    act: str = "silu"
    keep: float = 0.5  # target share kept (1.0: threshold 0; 0.0: above every score)
    h_keep: float = 0.5  # input-sparse: share of h kept
    norm_scale: bool = False  # gate-first: scale_i = |w_up_i| |w_down_i| instead of ones
    vec: bool = True
    splits: int = 0
    num_sms: int = 2
    seed: int = 0
    policy: str = "token"  # or "union": one kept set for all the call's tokens
    thr_ptr: bool = False  # thresholds read by the kernels from memory (the CUDA glue's way)


def _gap_threshold(scores: torch.Tensor, keep: float) -> float:
    """A threshold that keeps about `keep` of `scores`, in the middle of the widest gap between
    neighbouring scores around that quantile (0 keeps all, above the maximum keeps none)."""
    if keep >= 1.0:
        return 0.0
    s = scores.flatten().double().sort().values
    if keep <= 0.0:
        return float(s[-1]) * 2 + 1.0
    lo = int(len(s) * (1 - keep) * 0.8)
    hi = max(lo + 2, int(len(s) * (1 - keep) * 1.2))
    window = s[lo:hi]
    gaps = window[1:] - window[:-1]
    i = int(torch.argmax(gaps))
    return float((window[i] + window[i + 1]) / 2)


def make_inputs(c: Case) -> dict:
    g = torch.Generator().manual_seed(c.seed)
    dt = DT[c.dtype]
    x = torch.randn(c.tokens, c.d, generator=g).to(dt)
    wg, wu, wd = ((torch.randn(c.n, c.d, generator=g) * c.d**-0.5).to(dt) for _ in range(3))
    scale = (wu.float().norm(dim=1) * wd.float().norm(dim=1)) if c.norm_scale else torch.ones(c.n)
    xf = x.double()
    if c.op == "gate":
        a = apply_act(c.act, xf @ wg.double().T)
        thr = _gap_threshold(a.abs() * scale.double(), c.keep)
        h_thr = 0.0
    else:
        thr = _gap_threshold(xf.abs(), c.keep)
        xm = torch.where(xf.abs() >= thr, xf, torch.zeros_like(xf))
        h = apply_act(c.act, xm @ wg.double().T) * (xm @ wu.double().T)
        h_thr = _gap_threshold(h.abs(), c.h_keep)
    return {"x": x, "w": (wg, wu, wd), "scale": scale, "thr": thr, "h_thr": h_thr}


def run(c: Case, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    wg, wu, wd = inp["w"]
    if c.op == "input":  # the kernels take gate and up input-major [d, N]
        wg, wu = wg.t().contiguous(), wu.t().contiguous()
    x = inp["x"].contiguous()
    y = torch.full_like(x, float("nan"))
    read = torch.full((c.tokens,), float("nan"))
    scale = inp["scale"].float().contiguous()
    sparse = int(c.op == "input")
    code = emu.library().dart_emu_pt_ffn(
        emu.DTYPES[c.dtype],
        sparse,
        VP(x.data_ptr()),
        VP(wg.data_ptr()),
        VP(wu.data_ptr()),
        C(wg.stride(0)),
        VP(wd.data_ptr()),
        C(wd.stride(0)),
        VP(scale.data_ptr()),
        ctypes.c_float(inp["thr"]),
        ctypes.c_float(inp["h_thr"]),
        C(c.n),
        C(c.d),
        c.tokens,
        ACTS[c.act],
        int(c.vec),
        c.num_sms,
        C(c.splits),
        int(c.policy == "union"),
        int(c.thr_ptr),
        VP(y.data_ptr()),
        VP(read.data_ptr()),
    )
    emu.check(code)
    return y, read


def reference(c: Case, inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    wg, wu, wd = inp["w"]
    x = inp["x"].float()  # the same values; fp32 output
    thr = torch.tensor(inp["thr"], dtype=torch.float32)
    if c.op == "gate":
        return pt.gate_first_glu_ffn(x, wg, wu, wd, thr, inp["scale"], c.act, None, c.policy)
    h_thr = torch.tensor(inp["h_thr"], dtype=torch.float32)
    return pt.input_sparse_glu_ffn(x, wg, wu, wd, thr, h_thr, c.act, c.policy)


def check(c: Case) -> tuple[torch.Tensor, torch.Tensor]:
    inp = make_inputs(c)
    y, read = run(c, inp)
    want, want_read = reference(c, inp)
    assert torch.equal(read, want_read), f"{c}: read {read} != {want_read}"
    y, want = y.double(), want.double()
    assert torch.isfinite(y).all(), f"{c}: unwritten or NaN outputs"
    err = (y - want).abs()
    bound = TOL[c.dtype] * (want.abs() + want.abs().mean()) + 1e-30
    worst = int(torch.argmax(err - bound))
    assert (err <= bound).all(), (
        f"{c}: worst {worst}: got {y.flatten()[worst]}, want {want.flatten()[worst]}"
    )
    return y, read


@pytest.mark.parametrize("op", ["gate", "input"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.2])
def test_matches_reference(op, tokens, keep):
    i = tokens + 3 * int(keep * 10) + (op == "input")
    check(
        Case(
            op=op,
            dtype=DTYPES[i % 3],
            tokens=tokens,
            keep=keep,
            h_keep=[1.0, 0.5, 0.3][i % 3],
            act=list(ACTS)[i % 4],
            n=(300, 520)[i % 2],
            d=(128, 96)[i % 2],
            norm_scale=bool(i % 2),
            splits=(1, 3)[i % 2],
            seed=i,
        )
    )


@pytest.mark.parametrize("op", ["gate", "input"])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("keep", [0.5, 0.15])
def test_union_policy_matches_reference(op, tokens, keep):
    i = tokens + int(keep * 20) + (op == "input")
    c = Case(
        op=op,
        policy="union",
        dtype=DTYPES[i % 3],
        tokens=tokens,
        keep=keep,
        h_keep=keep,
        act=list(ACTS)[i % 4],
        splits=(1, 3)[i % 2],
        thr_ptr=bool(i % 2),
        seed=100 + i,
    )
    y, read = check(c)
    assert torch.equal(read, read[:1].expand_as(read))  # every token reports the call's reads
    if tokens > 1:  # the union keeps more than any one token: a token-policy result differs
        _, own = check(replace(c, policy="token"))
        assert (read >= own).all() and (read > own).any()


@pytest.mark.parametrize("op", ["gate", "input"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_thresholds_from_memory_match_thresholds_by_value(op, dtype):
    c = Case(op=op, dtype=dtype, tokens=3, keep=0.4, seed=11)
    inp = make_inputs(c)
    by_value = run(c, inp)
    from_memory = run(replace(c, thr_ptr=True), inp)
    assert torch.equal(by_value[0], from_memory[0]) and torch.equal(by_value[1], from_memory[1])


@pytest.mark.parametrize("op", ["gate", "input"])
def test_nothing_kept_gives_zeros_and_the_base_read(op):
    c = Case(op=op, tokens=3, keep=0.0, h_keep=0.0, dtype="float32")
    y, read = check(c)
    assert not y.any()
    base = c.n * c.d if op == "gate" else 0
    assert torch.equal(read, torch.full((3,), float(base)))


@pytest.mark.parametrize("op", ["gate", "input"])
@pytest.mark.parametrize("dtype,d", [("bfloat16", 60), ("float16", 68), ("float32", 66)])
def test_fallback_path(op, dtype, d):
    check(Case(op=op, dtype=dtype, d=d, tokens=3, vec=False, splits=2, seed=d))


@pytest.mark.parametrize("op", ["gate", "input"])
@pytest.mark.parametrize("act", list(ACTS))
def test_every_activation(op, act):
    check(Case(op=op, act=act, tokens=2, keep=0.4, dtype="float32", seed=7))


@pytest.mark.parametrize("op", ["gate", "input"])
def test_deterministic_across_schedules(op):
    c = Case(op=op, dtype="float32", tokens=4, n=600, keep=0.5, splits=4)
    inp = make_inputs(c)
    outs = []
    for mode, seed in [("forward", 0), ("reverse", 0), ("random", 1)]:
        emu.set_schedule(mode, seed)
        outs.append(run(c, inp))
    assert all(torch.equal(outs[0][0], o[0]) and torch.equal(outs[0][1], o[1]) for o in outs)


def test_more_tokens_than_a_launch_takes_is_refused():
    c = Case(tokens=9)
    with pytest.raises(emu.EmulationError) as e:
        run(c, make_inputs(replace(c, tokens=9)))
    assert e.value.code == 1  # cudaErrorInvalidValue: the glue splits tokens into chunks


def test_gate_first_refuses_tokens_whose_x_overflows_shared_memory():
    c = Case(tokens=8, d=8192, n=16, dtype="float32")  # 8 x 8192 fp32 = 256 KB > the opt-in
    with pytest.raises(emu.EmulationError) as e:
        run(c, make_inputs(c))
    assert e.value.code == 1
