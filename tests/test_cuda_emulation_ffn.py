"""The gathered FFN decode kernels (csrc/kernels/gathered_ffn.cuh, both phases and the launcher's
plan) run on the CPU emulation of the CUDA execution model (tests/emulation.py) against float64
references: GLU and MLP with biases, every activation, 1 to 16 tokens per index set, shared and
per-sequence indices, split-K on and off, the 16-byte vector path and the element-wise fallback
(misaligned strides, offsets and widths), int32 indices, bad indices, the launcher's one-time
shared-memory opt-in and occupancy cache, and bitwise determinism across reruns and schedules.

What emulation cannot show (concurrency between CTAs, the memory model, speed, the ATen glue in
csrc/cuda/) is left to the GPU run (scripts/gpu_check.sh)."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import emulation as emu
import numpy as np
import pytest
import torch

C = ctypes.c_longlong
ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# |y - ref| <= TOL * (|ref| + mean |ref|): the output's rounding plus fp32 accumulation
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
PLAN_FIELDS = ["ok", "vec", "maxt", "ve2", "splits", "ntiles", "chunk", "ws_bytes", "smem1"]


@pytest.fixture(autouse=True)
def default_schedule():
    emu.reset_schedule()
    yield
    emu.reset_schedule()


def quantize(x32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the element bits the kernel reads, their values as float64), converted by numpy / torch
    (not by the emulation)."""
    if dtype == "float32":
        x = x32.astype(np.float32)
        return x, x.astype(np.float64)
    if dtype == "float16":
        h = x32.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    b = torch.from_numpy(np.ascontiguousarray(x32, dtype=np.float32)).to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16), b.double().numpy()


def aligned(nbytes: int, offset_bytes: int = 0) -> tuple[np.ndarray, int]:
    """A byte buffer and the address of its first usable byte: 256-aligned plus offset_bytes."""
    raw = np.full(nbytes + 512, 0xFF, dtype=np.uint8)  # NaN / -1 where nothing was written
    start = (-raw.ctypes.data) % 256 + offset_bytes
    return raw, raw.ctypes.data + start


def place(values: np.ndarray, offset_bytes: int = 0) -> tuple[np.ndarray, ctypes.c_void_p]:
    """Copies `values` into a fresh buffer at 256-byte alignment + offset_bytes."""
    raw, addr = aligned(values.nbytes, offset_bytes)
    start = addr - raw.ctypes.data
    raw[start : start + values.nbytes] = np.ascontiguousarray(values).view(np.uint8).ravel()
    return raw, ctypes.c_void_p(addr)


def act_ref(name: str, v: np.ndarray) -> np.ndarray:
    if name == "silu":
        return v / (1.0 + np.exp(-v))
    if name == "gelu":
        return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / np.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))
    return np.maximum(v, 0.0)


@dataclass
class Case:
    glu: bool = True
    dtype: str = "bfloat16"
    tokens: int = 1  # per index set (Mc)
    groups: int = 1  # sequences with their own idx (per-sequence when > 1 or per_seq)
    per_seq: bool = False
    n: int = 256
    d: int = 64
    k: int = 40
    act: str = "silu"
    bias_in: bool = False  # b_in (MLP) / b_gate (GLU)
    bias_up: bool = False  # b_up (GLU only)
    bias_out: bool = False  # b_out (MLP) / b_down (GLU)
    splits: int = 0  # 0: the plan's choice
    num_sms: int = 2
    row_pad: int = 0  # extra elements per weight row (row stride d + row_pad)
    offset: int = 0  # bytes added to every tensor's address
    int32: bool = False
    lengths: tuple[int, ...] | None = None  # per-group lengths of a padded idx [groups, k]
    seed: int = 0


def vector_path_allowed(c: Case) -> bool:
    """The glue's rule (csrc/cuda/gathered_ffn_impl.h): 16-byte aligned pointers and row strides,
    d * itemsize a multiple of 16."""
    es = ITEMSIZE[c.dtype]
    return c.d * es % 16 == 0 and (c.d + c.row_pad) * es % 16 == 0 and c.offset % 16 == 0


def plan_of(c: Case, vec: bool | None = None) -> dict[str, int]:
    out = np.zeros(len(PLAN_FIELDS), dtype=np.int64)
    emu.library().dart_emu_ffn_plan(
        emu.DTYPES[c.dtype],
        c.groups,
        c.tokens,
        C(c.d),
        C(c.k),
        int(vector_path_allowed(c) if vec is None else vec),
        c.num_sms,
        C(c.splits),
        out.ctypes.data_as(ctypes.POINTER(C)),
    )
    return dict(zip(PLAN_FIELDS, out.tolist(), strict=True))


def make_inputs(c: Case) -> dict:
    assert c.k <= c.n, "idx holds distinct neurons"
    rng = np.random.default_rng(c.seed)
    rows = c.groups * c.tokens
    x32 = rng.standard_normal((rows, c.d)).astype(np.float32)
    ws32 = [(rng.standard_normal((c.n, c.d)) * c.d**-0.5).astype(np.float32) for _ in range(3)]
    nidx = c.groups if (c.per_seq or c.groups > 1) else 1
    idx = np.stack([rng.permutation(c.n)[: c.k] for _ in range(nidx)])
    if c.lengths is not None:  # padding past each length: garbage the kernels must never read
        for g, n in enumerate(c.lengths):
            idx[g, n:] = [-7, 10**9][g % 2]
    return {
        "x": quantize(x32, c.dtype),
        "w": [quantize(w, c.dtype) for w in ws32],
        "b_in": quantize(rng.standard_normal(c.n).astype(np.float32) * 0.5, c.dtype),
        "b_up": quantize(rng.standard_normal(c.n).astype(np.float32) * 0.5, c.dtype),
        "b_out": quantize(rng.standard_normal(c.d).astype(np.float32) * 0.5, c.dtype),
        "idx": idx,
    }


def reference(c: Case, inp: dict) -> np.ndarray:
    x = inp["x"][1].reshape(-1, c.tokens, c.d)
    w1, w2, wo = (w[1] for w in inp["w"])
    y = np.zeros_like(x)
    for g in range(x.shape[0]):
        rows = inp["idx"][g if len(inp["idx"]) > 1 else 0]
        if c.lengths is not None:
            rows = rows[: c.lengths[g]]
        b_out = inp["b_out"][1] if c.bias_out else 0.0
        if len(rows) == 0:  # no kept neuron (np.vectorize refuses empty inputs)
            y[g] = b_out
            continue
        pre = x[g] @ w1[rows].T + (inp["b_in"][1][rows] if c.bias_in else 0.0)
        if c.glu:
            up = x[g] @ w2[rows].T + (inp["b_up"][1][rows] if c.bias_up else 0.0)
            h = act_ref(c.act, pre) * up
        else:
            h = act_ref(c.act, pre)
        y[g] = h @ wo[rows] + b_out
    return y.reshape(-1, c.d)


def run(c: Case, inp: dict, vec: bool | None = None) -> np.ndarray:
    """y of the emulated decode kernels, as float64."""
    plan = plan_of(c, vec)
    assert plan["ok"], plan
    stride = c.d + c.row_pad
    keep = []

    def buf(bits: np.ndarray) -> ctypes.c_void_p:
        raw, ptr = place(bits, c.offset)
        keep.append(raw)
        return ptr

    def weight(bits: np.ndarray) -> ctypes.c_void_p:
        padded = np.zeros((c.n, stride), dtype=bits.dtype)
        padded[:, : c.d] = bits
        return buf(padded)

    x = buf(inp["x"][0])
    w1, w2, wo = (weight(w[0]) for w in inp["w"])
    idx = inp["idx"].astype(np.int32 if c.int32 else np.int64)
    idx_raw, idx_ptr = place(idx)  # an index tensor is always aligned to its element size
    lens_ptr = None
    if c.lengths is not None:
        lens = np.asarray(c.lengths, dtype=np.int32 if c.int32 else np.int64)
        lens_raw, lens_ptr = place(lens)
        keep.append(lens_raw)
    y_raw, y_addr = aligned(inp["x"][0].nbytes, c.offset)
    ws_raw, ws_addr = aligned(plan["ws_bytes"])
    code = emu.library().dart_emu_ffn_decode(
        emu.DTYPES[c.dtype],
        int(c.glu),
        x,
        w1,
        C(stride),
        w2 if c.glu else None,
        C(stride),
        wo,
        C(stride),
        buf(inp["b_in"][0]) if c.bias_in else None,
        buf(inp["b_up"][0]) if c.bias_up and c.glu else None,
        buf(inp["b_out"][0]) if c.bias_out else None,
        idx_ptr,
        int(c.int32),
        C(c.k if len(idx) > 1 or c.per_seq else 0),
        lens_ptr,
        int(c.int32),
        ctypes.c_void_p(y_addr),
        C(c.n),
        C(c.d),
        C(c.k),
        c.groups,
        c.tokens,
        ACTS[c.act],
        int(vector_path_allowed(c) if vec is None else vec),
        c.num_sms,
        C(c.splits),
        ctypes.c_void_p(ws_addr),
    )
    emu.check(code)
    start = y_addr - y_raw.ctypes.data
    bits = y_raw[start : start + inp["x"][0].nbytes].view(inp["x"][0].dtype).reshape(-1, c.d)
    if c.dtype == "float32":
        return bits.astype(np.float64)
    return emu.bits_to_float(bits, c.dtype).astype(np.float64)


def assert_close(c: Case, y: np.ndarray, ref: np.ndarray) -> None:
    assert np.isfinite(y).all(), "unwritten or NaN outputs"
    err = np.abs(y - ref)
    bound = TOL[c.dtype] * (np.abs(ref) + np.abs(ref).mean())
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{c}: worst {worst}: got {y[worst]}, want {ref[worst]}"


def check(c: Case) -> np.ndarray:
    inp = make_inputs(c)
    y = run(c, inp)
    assert_close(c, y, reference(c, inp))
    return y


# ---------------------------------------------------------------------------------------------
# Correctness over the decode configurations

DTYPES = ["bfloat16", "float16", "float32"]


@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_k"])
def test_decode_matches_float64_reference(tokens, glu, split):
    i = tokens + 2 * glu + 4 * split  # rotate dtype / act / sharing over the grid
    c = Case(
        glu=glu,
        dtype=DTYPES[i % 3],
        tokens=tokens,
        groups=2 if i % 2 else 1,
        per_seq=bool(i % 2),
        k=150 if split else 45,
        splits=2 if split else 1,
        act=list(ACTS)[i % 4],
        bias_in=not glu,
        bias_out=not glu,
        seed=i,
    )
    plan = plan_of(c)
    assert plan["vec"] == 1 and plan["splits"] == (2 if split else 1)
    assert plan["maxt"] == {1: 1, 3: 4, 8: 8, 16: 16}[tokens]
    check(c)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
def test_every_activation(act, glu):
    check(Case(glu=glu, act=act, tokens=2, k=70, bias_in=True, bias_out=True, seed=3))


@pytest.mark.parametrize(
    "lengths", [(0, 0, 0), (1, 150, 0), (150, 150, 150), (37, 1, 129), (64, 0, 65)]
)
@pytest.mark.parametrize("split", [False, True], ids=["one_split", "split_k"])
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
def test_per_group_lengths(lengths, split, glu):
    """A padded idx [G, kmax] with per-group lengths: each group sums its own first lengths[g]
    neurons; the padding (out-of-range garbage) is never read, splits past a length add zeros."""
    i = sum(lengths) + 2 * glu + split
    c = Case(
        glu=glu,
        dtype=DTYPES[i % 3],
        tokens=1 + i % 4,
        groups=3,
        per_seq=True,
        k=150,
        splits=3 if split else 1,
        act=list(ACTS)[i % 4],
        bias_in=not glu,
        bias_out=not glu,
        int32=bool(i % 2),
        lengths=lengths,
        seed=i,
    )
    y = check(c)
    rows = y.reshape(c.groups, c.tokens, c.d)
    for g, n in enumerate(lengths):
        if n == 0 and glu:
            assert not rows[g].any(), "a group with no kept neurons gives zeros"


def test_lengths_out_of_range_is_a_device_error():
    c = Case(groups=2, per_seq=True, k=40, lengths=(3, 41))
    with pytest.raises(emu.EmulationError, match="lengths out of range"):
        run(c, make_inputs(c))


@pytest.mark.parametrize("tokens,split", [(1, False), (3, True), (16, True)])
@pytest.mark.parametrize("biases", ["gate", "up", "down", "all"])
def test_glu_biases(tokens, split, biases):
    """GLU with Llama's mlp_bias: b_gate / b_up [N] inside the activation product, b_down [d]
    on y; each alone and all three, with one split and split-K."""
    c = Case(
        glu=True,
        dtype="float32" if tokens == 1 else "bfloat16",
        tokens=tokens,
        k=150 if split else 45,
        splits=2 if split else 1,
        bias_in=biases in ("gate", "all"),
        bias_up=biases in ("up", "all"),
        bias_out=biases in ("down", "all"),
        lengths=None,
    )
    check(c)


@pytest.mark.parametrize("bias_in,bias_out", [(True, False), (False, True), (False, False)])
def test_mlp_biases_each_alone(bias_in, bias_out):
    check(Case(glu=False, act="gelu", tokens=3, k=33, bias_in=bias_in, bias_out=bias_out))


@pytest.mark.parametrize(
    "dtype,d,row_pad,offset",
    [
        ("bfloat16", 60, 0, 0),  # d * 2 bytes not a multiple of 16
        ("bfloat16", 64, 3, 0),  # odd row stride
        ("float16", 64, 0, 2),  # every pointer 2 bytes off
        ("float32", 66, 1, 4),  # all of it
    ],
)
@pytest.mark.parametrize("glu", [True, False], ids=["glu", "mlp"])
def test_fallback_path_on_misaligned_layouts(dtype, d, row_pad, offset, glu):
    c = Case(
        glu=glu,
        dtype=dtype,
        d=d,
        row_pad=row_pad,
        offset=offset,
        tokens=3,
        k=150,
        splits=2,
        bias_in=True,
        bias_out=True,
        per_seq=True,
        groups=2,
    )
    assert plan_of(c)["vec"] == 0 and plan_of(c)["maxt"] == 16
    check(c)


def test_vector_path_faults_on_a_misaligned_row_stride():
    """The alignment rule is load-bearing: the 16-byte path on a row stride that breaks it
    faults (the emulation checks every vector access) instead of reading garbage."""
    c = Case(row_pad=4, tokens=1)  # bf16 rows 8 bytes apart from 16-byte alignment
    with pytest.raises(emu.EmulationError, match="misaligned"):
        run(c, make_inputs(c), vec=True)


@pytest.mark.parametrize(
    "k,tokens,splits",
    [
        (1, 1, 1),  # one neuron: a unit of NPW with NPW - 1 dead neurons
        (7, 2, 1),  # k not a multiple of NPW
        (1100, 1, 1),  # one split longer than a slab (1024 neurons at 1 token): two slabs
        (300, 16, 1),  # the same at 16 tokens (slabs of 256)
        (600, 2, 0),  # the plan's own split count, ragged last split
        (130, 4, 2),  # last split of 2 neurons
    ],
)
def test_ragged_units_slabs_and_splits(k, tokens, splits):
    check(Case(n=max(2 * k, 64), k=k, tokens=tokens, splits=splits, dtype="float32", seed=k))


def test_int32_indices_give_the_same_bits_as_int64():
    c = Case(tokens=3, groups=3, per_seq=True, k=130, splits=2, seed=5)
    inp = make_inputs(c)
    y64 = run(c, inp)
    c.int32 = True
    y32 = run(c, inp)
    assert np.array_equal(y64, y32)
    assert_close(c, y32, reference(c, inp))


@pytest.mark.parametrize("bad", ["negative", "n"])
def test_out_of_range_index_fails_the_launch(bad):
    c = Case(tokens=1, k=10)
    inp = make_inputs(c)
    inp["idx"][0, 7] = -1 if bad == "negative" else c.n
    with pytest.raises(emu.EmulationError, match="idx out of range") as e:
        run(c, inp)
    assert e.value.code == 710  # cudaErrorAssert, like a device-side assert


def test_deterministic_across_reruns_and_schedules():
    """Bitwise equal outputs whatever order the CTAs and threads run in, with split-K (the last
    CTA of a tile differs between schedules; the order of the sums does not)."""
    c = Case(glu=True, dtype="float32", tokens=2, groups=2, per_seq=True, k=256, splits=4)
    inp = make_inputs(c)
    outs = []
    for mode, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]:
        emu.set_schedule(mode, seed)
        outs.append(run(c, inp))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert_close(c, outs[0], reference(c, inp))


def test_split_count_changes_only_rounding():
    c = Case(dtype="float32", tokens=1, n=600, k=512, seed=9)
    inp = make_inputs(c)
    ys = {s: run(Case(**{**c.__dict__, "splits": s}), inp) for s in (1, 2, 8)}
    assert plan_of(Case(**{**c.__dict__, "splits": 8}))["splits"] == 8
    for y in ys.values():
        assert_close(c, y, reference(c, inp))
    assert not np.array_equal(ys[1], ys[8])  # really different reductions


def test_plan_fills_whole_waves_with_bounded_partial_traffic():
    """Llama-3.1-8B shapes on 132 SMs (2 phase-2 CTAs each): the split count fills >= 90% of
    the resident CTA slots of every wave, >= 64 neurons a split, the partials' traffic under
    1/8 of the down rows'."""
    for tokens, keep in [(1, 0.3), (1, 0.5), (1, 0.7), (2, 0.5), (4, 0.5), (7, 0.3)]:
        c = Case(dtype="bfloat16", tokens=tokens, d=4096, n=14336, k=round(keep * 14336))
        plan = plan_of(Case(**{**c.__dict__, "num_sms": 132}))
        assert plan["ok"] and plan["vec"] and plan["chunk"] % 8 == 0 and plan["chunk"] >= 64
        ctas = plan["ntiles"] * plan["splits"]
        waves = -(-ctas // 264)
        fill = c.k * plan["ntiles"] / (waves * 264 * plan["chunk"])
        assert fill >= 0.9, (tokens, keep, plan, fill)
        partial_bytes = 2 * plan["splits"] * tokens * c.d * 4
        assert partial_bytes <= c.k * c.d * 2 / 8


def test_shared_memory_opt_in_and_occupancy_are_set_once():
    """Phase 1 needs more than 48 KB of dynamic shared memory here (16 tokens of fp32, d = 1024):
    the launcher opts each kernel in once, at the device maximum, before any launch that needs
    it, and queries the occupancy once per shared-memory size, not per call."""
    small = Case(dtype="float32", tokens=9, d=1024, n=40, k=16, splits=1, glu=False)
    large = Case(**{**small.__dict__, "tokens": 16})
    assert plan_of(large)["smem1"] > 48 << 10 and plan_of(small)["maxt"] == 16
    inputs = {c.tokens: (c, make_inputs(c)) for c in (small, large)}
    emu.reset_counters()
    for c, inp in inputs.values():
        run(c, inp)
    first = (emu.counter("func_set_attribute"), emu.counter("occupancy_queries"))
    assert first[0] <= 1 and first[1] <= 2
    for _ in range(2):
        for c, inp in reversed(list(inputs.values())):
            assert_close(c, run(c, inp), reference(c, inp))
    assert (emu.counter("func_set_attribute"), emu.counter("occupancy_queries")) == first
