"""The fused CPU per-token FFN ops (issue 26; csrc/cpu/per_token_ops.cpp): gate_first_glu_ffn,
gate_first_glu_ffn_q and input_sparse_glu_ffn against their pure-PyTorch references
(dart_ext.per_token) over shapes, dtypes, thresholds, candidate supersets, token layouts and
both batch policies; opcheck; threshold 0 == the dense FFN; bad inputs named in the errors of the
CPU and the fake kernel alike; each instruction-set variant.

Thresholds are put in a wide gap of the scores they cut, so that the kernels' summation order
(not the reference's) never flips a borderline keep: the comparison is then exact in the kept
sets (``read`` equal) and within the dtype's tolerance in ``y``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from op_cases import rand, tolerance, weights
from torch._subclasses.fake_tensor import FakeTensorMode

import dart_ext  # noqa: F401  (loads the ops)
from dart_ext import quant
from dart_ext.per_token import (
    fused_gate_first_glu_ffn,
    fused_gate_first_glu_ffn_q,
    fused_input_sparse_glu_ffn,
    gate_first_glu_ffn,
    gate_first_glu_ffn_q_reference,
    input_major,
    input_sparse_glu_ffn,
)
from dart_ext.reference import apply_act

GATE = torch.ops.dart.gate_first_glu_ffn.default
GATE_Q = torch.ops.dart.gate_first_glu_ffn_q.default
INPUT = torch.ops.dart.input_sparse_glu_ffn.default
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("silu", "gelu", "gelu_tanh", "relu")


def gap_threshold(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """A threshold that keeps about ``keep`` of ``scores``, in the widest gap between sorted
    scores near that quantile (keep 1: 0, keep 0: above all)."""
    s = scores.float().flatten().sort().values
    if keep >= 1.0 or s.numel() == 0:
        return torch.tensor(0.0)
    if keep <= 0.0:
        return torch.tensor(float(s[-1]) * 2 + 1.0)
    m = s.numel()
    lo, hi = max(int(m * (1 - keep - 0.15)), 0), min(int(m * (1 - keep + 0.15)), m - 1)
    lo = min(lo, hi - 1) if hi > 0 else 0
    gaps = s[lo + 1 : hi + 1] - s[lo:hi]
    if gaps.numel() == 0:
        return torch.tensor(float(s[0]) / 2)
    i = int(gaps.argmax()) + lo
    return torch.tensor(float(s[i] + s[i + 1]) / 2)


def _groups(m: int, policy: str) -> list[slice]:
    return [slice(0, m)] if policy == "union" else [slice(t, t + 1) for t in range(m)]


def gate_scores(x, wg, scale, act, idx):
    xs = x.float().reshape(-1, x.shape[-1])
    w = wg.float() if idx is None else wg.float()[idx]
    sc = scale if idx is None else scale[idx]
    return apply_act(act, xs @ w.T).abs() * sc


def hidden_magnitudes(x, wg, wu, tx, act, policy):
    """|h| the input-sparse op thresholds (per policy group), pooled."""
    xs = x.float().reshape(-1, x.shape[-1])
    out = []
    for g in _groups(xs.shape[0], policy):
        cols = (xs[g].abs() >= tx).any(0)
        xk = xs[g] * cols
        out.append((apply_act(act, xk @ wg.float().T) * (xk @ wu.float().T)).abs().flatten())
    return torch.cat(out) if out else torch.zeros(0)


def check_pair(got, want, dtype, fp32_tol=None):
    (y, read), (y_ref, read_ref) = got, want
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype and y.is_contiguous()
    assert read.dtype == torch.float32 and read.shape == read_ref.shape
    torch.testing.assert_close(read, read_ref, rtol=0, atol=0)
    tol = fp32_tol if (fp32_tol and dtype == torch.float32) else tolerance(dtype, "cpu")
    torch.testing.assert_close(y, y_ref, **tol)


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    n, d = pick([(1, 1), (7, 5), (24, 16), (40, 33), (64, 96), (130, 40)])
    lead = pick([(1,), (3,), (2, 1), (2, 3)])
    return dict(
        n=n,
        d=d,
        lead=lead,
        dtype=pick(DTYPES),
        act=pick(ACTS),
        keep=pick([1.0, 0.7, 0.5, 0.2, 0.0]),
        keep_h=pick([1.0, 0.6, 0.3, 0.0]),
        policy=pick(["token", "union"]),
        superset=pick([False, True]),
        weighted=pick([False, True]),
        input_major=pick([False, True]),
    )


@pytest.mark.parametrize("seed", range(40))
def test_gate_first_matches_reference(seed):
    c = _case(seed)
    n, d, dt = c["n"], c["d"], c["dtype"]
    wg, wu, wd = weights(n, d, dt, seed=seed)
    x = rand((*c["lead"], d), dt, seed=seed + 100)
    scale = rand((n,), seed=seed + 7).abs() + 0.5 if c["weighted"] else torch.ones(n)
    idx = None
    if c["superset"]:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(n // 2, 1)]
    thr = gap_threshold(gate_scores(x, wg, scale, c["act"], idx), c["keep"])
    args = (x, wg, wu, wd, thr, scale, c["act"], idx, c["policy"])
    check_pair(GATE(*args), gate_first_glu_ffn(*args), dt)


@pytest.mark.parametrize("seed", range(40))
def test_input_sparse_matches_reference(seed):
    c = _case(seed)
    n, d, dt = c["n"], c["d"], c["dtype"]
    wg, wu, wd = weights(n, d, dt, seed=seed)
    x = rand((*c["lead"], d), dt, seed=seed + 100)
    tx = gap_threshold(x.abs(), c["keep"])
    th = gap_threshold(hidden_magnitudes(x, wg, wu, tx, c["act"], c["policy"]), c["keep_h"])
    kg, ku = (input_major(wg), input_major(wu)) if c["input_major"] else (wg, wu)
    got = INPUT(x, kg, ku, wd, tx, th, c["act"], c["policy"])
    check_pair(got, input_sparse_glu_ffn(x, wg, wu, wd, tx, th, c["act"], c["policy"]), dt)


@pytest.mark.parametrize("fmt,group", [("q8", 32), ("q4", 64), ("q4m", 32)])
@pytest.mark.parametrize("policy", ["token", "union"])
def test_gate_first_q_matches_reference(fmt, group, policy):
    n, d = 40, 64
    qs = [quant.quantize_rows(w, fmt, group) for w in weights(n, d, seed=3)]
    x = rand((3, d), seed=4)
    scale = torch.ones(n)
    for idx in (None, torch.tensor([5, 0, 33, 12, 7, 39])):
        w_gate = quant.dequantize_rows(qs[0])
        scores = gate_scores(quant.quantize_activations(x), w_gate, scale, "silu", idx)
        for keep in (1.0, 0.4, 0.0):
            thr = gap_threshold(scores, keep)
            args = (x, *qs, thr, scale, "silu", idx, policy)
            got = fused_gate_first_glu_ffn_q(*args)
            want = gate_first_glu_ffn_q_reference(*args)
            check_pair(got, want, torch.float32, dict(atol=1e-4, rtol=1e-4))


def _dense(x, wg, wu, wd, act):
    xf = x.float()
    return ((apply_act(act, xf @ wg.float().T) * (xf @ wu.float().T)) @ wd.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_is_the_dense_ffn(dtype):
    n, d = 48, 40
    wg, wu, wd = weights(n, d, dtype)
    x = rand((2, 3, d), dtype)
    zero = torch.tensor(0.0)
    dense = _dense(x, wg, wu, wd, "silu")
    tol = tolerance(dtype, "cpu")
    for policy in ("token", "union"):
        y, read = fused_gate_first_glu_ffn(x, wg, wu, wd, zero, torch.ones(n), "silu", None, policy)
        torch.testing.assert_close(y, dense, **tol)
        assert bool((read == 3 * n * d).all())
        for kg, ku in ((wg, wu), (input_major(wg), input_major(wu))):
            y, read = fused_input_sparse_glu_ffn(x, kg, ku, wd, zero, zero, "silu", policy)
            torch.testing.assert_close(y, dense, **tol)
            assert bool((read == 3 * n * d).all())


def test_nothing_kept_reads_only_what_the_selection_needs():
    n, d = 16, 8
    wg, wu, wd = weights(n, d)
    x = rand((2, d))
    big = torch.tensor(1e9)
    y, read = fused_gate_first_glu_ffn(x, wg, wu, wd, big, torch.ones(n), "silu")
    assert bool((y == 0).all()) and read.tolist() == [n * d, n * d]
    # no column kept: h = 0, so a threshold 0 still reads every down row (|0| >= 0), any
    # positive one none
    y, read = fused_input_sparse_glu_ffn(x, wg, wu, wd, big, torch.tensor(0.0), "silu")
    assert bool((y == 0).all()) and read.tolist() == [n * d, n * d]
    y, read = fused_input_sparse_glu_ffn(x, wg, wu, wd, big, torch.tensor(1e-30), "silu")
    assert bool((y == 0).all()) and read.tolist() == [0.0, 0.0]
    assert input_sparse_glu_ffn(x, wg, wu, wd, big, torch.tensor(1e-30), "silu")[1].tolist() == [
        0.0,
        0.0,
    ]


def test_union_keeps_one_set_for_the_call():
    n, d = 64, 32
    wg, wu, wd = weights(n, d, seed=5)
    x = rand((4, d), seed=6)
    scale = torch.ones(n)
    thr = gap_threshold(gate_scores(x, wg, scale, "silu", None), 0.3)
    _, r_tok = GATE(x, wg, wu, wd, thr, scale, "silu", None, "token")
    y_uni, r_uni = GATE(x, wg, wu, wd, thr, scale, "silu", None, "union")
    # one read for the call, at least each token's own, and the union of the token choices
    assert len(set(r_uni.tolist())) == 1 and bool((r_uni >= r_tok).all())
    kept = (gate_scores(x, wg, scale, "silu", None) >= thr).any(0)
    assert r_uni[0] == n * d + 2 * d * int(kept.sum())
    # a token computed in a union is the same as alone over the union's neurons
    idx = torch.nonzero(kept).squeeze(1)
    y0, _ = GATE(x[:1], wg, wu, wd, torch.tensor(0.0), scale, "silu", idx, "token")
    torch.testing.assert_close(y_uni[:1], y0)


def test_results_do_not_depend_on_the_thread_count():
    n, d = 512, 256
    wg, wu, wd = weights(n, d, seed=2)
    x = rand((2, d), seed=3)
    thr = gap_threshold(gate_scores(x, wg, torch.ones(n), "silu", None), 0.5)
    tx, th = gap_threshold(x.abs(), 0.6), torch.tensor(0.01)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(
                (
                    GATE(x, wg, wu, wd, thr, torch.ones(n), "silu", None, "token"),
                    INPUT(x, input_major(wg), input_major(wu), wd, tx, th, "silu", "token"),
                )
            )
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------------------------
# opcheck


def _opcheck_cases():
    n, d = 24, 32
    wg, wu, wd = weights(n, d)
    x = rand((2, d))
    t = torch.tensor(0.3)
    ones = torch.ones(n)
    qs = [quant.quantize_rows(w, "q4", 32) for w in (wg, wu, wd)]
    qt = [q.tensors() for q in qs]
    return [
        (GATE, (x, wg, wu, wd, t, ones, "silu")),
        (GATE, (x.bfloat16(), wg.bfloat16(), wu.bfloat16(), wd.bfloat16(), t, ones, "gelu")),
        (GATE, (x[None], wg, wu, wd, t, ones, "silu", torch.tensor([3, 1, 20]), "union")),
        (GATE_Q, (x, *qt, "q4", 32, t, ones, "silu")),
        (GATE_Q, (x, *qt, "q4", 32, t, ones, "relu", torch.tensor([0, 5]), "union")),
        (INPUT, (x, wg, wu, wd, t, torch.tensor(0.01), "silu")),
        (INPUT, (x, input_major(wg), input_major(wu), wd, t, torch.tensor(0.01), "silu", "union")),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------------
# Bad inputs: the CPU kernel and the fake kernel name the same argument


def _bad_cases():
    n, d = 10, 32
    wg, wu, wd = weights(n, d)
    x = rand((2, d))
    t, ones = torch.tensor(0.1), torch.ones(n)
    qt = [quant.quantize_rows(w, "q8", 32).tensors() for w in (wg, wu, wd)]
    strided = torch.randn(n, 2 * d)[:, ::2]
    return [
        ("w_up has N = 9", GATE, (x, wg, wu[:9], wd, t, ones, "silu")),
        ("w_down_t must be [N, d]", GATE, (x, wg, wu, wd[:, :8], t, ones, "silu")),
        ("threshold must be a 0-dim", GATE, (x, wg, wu, wd, torch.zeros(2), ones, "silu")),
        ("scale must be 1-D [N]", GATE, (x, wg, wu, wd, t, torch.ones(5), "silu")),
        ("unknown act 'tanh'", GATE, (x, wg, wu, wd, t, ones, "tanh")),
        ("policy must be 'token' or 'union'", GATE, (x, wg, wu, wd, t, ones, "silu", None, "all")),
        ("idx out of range", GATE, (x, wg, wu, wd, t, ones, "silu", torch.tensor([10]))),
        (
            "idx (the candidate neurons) must be 1-D",
            GATE,
            (x, wg, wu, wd, t, ones, "silu", torch.zeros(1, 2, dtype=torch.long)),
        ),
        ("w_gate has dtype", GATE, (x, wg.double(), wu, wd, t, ones, "silu")),
        (
            "down_t has N = 9",
            GATE_Q,
            (x, qt[0], qt[1], [p[:9] for p in qt[2]], "q8", 32, t, ones, "silu"),
        ),
        ("unknown quantisation format", GATE_Q, (x, *qt, "q3", 32, t, ones, "silu")),
        ("h_threshold must be a 0-dim", INPUT, (x, wg, wu, wd, t, torch.ones(1), "silu")),
        ("w_gate must be neuron-major", INPUT, (x, strided, wu, wd, t, t, "silu")),
        (
            "w_gate is input-major but w_up is neuron-major",
            INPUT,
            (x, input_major(wg), wu, wd, t, t, "silu"),
        ),
        ("x_threshold is on", INPUT, (x, wg, wu, wd, t.to("meta"), t, "silu")),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_inputs_name_the_argument(case):
    msg, op, args = _bad_cases()[case]
    if "is on" not in msg:  # a meta tensor cannot reach the CPU kernel: the fake kernel's case
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            op(*args)
    if "out of range" in msg:  # values: the CPU kernel's check (a fake tensor has none)
        return
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:

        def fake(a):
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                return mode.from_tensor(a)
            if isinstance(a, list):
                return [fake(p) for p in a]
            return a

        with pytest.raises(RuntimeError, match=re.escape(msg)):
            op(*[fake(a) for a in args])


# ------------------------------------------------------------------------------------------------
# instruction-set variants (each a subprocess: the variant is chosen once per process)

_VARIANT_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
import test_per_token_ops as t
assert torch.ops.dart.cpu_capability() == sys.argv[1]
for seed in range(12):
    t.test_gate_first_matches_reference(seed)
    t.test_input_sparse_matches_reference(seed)
t.test_gate_first_q_matches_reference("q4", 32, "token")
t.test_gate_first_q_matches_reference("q8", 32, "union")
print("checked")
"""


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_each_instruction_set_variant_matches_reference(cap):
    order = ["default", "avx2", "avx512"]
    best = torch.ops.dart.cpu_capability()
    if order.index(cap) > order.index(best):
        pytest.skip(f"this CPU runs at most {best}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, DART_CPU_CAPABILITY=cap, PYTHONPATH=root)
    p = subprocess.run(
        [sys.executable, "-c", _VARIANT_SCRIPT, cap],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and "checked" in p.stdout, p.stdout + p.stderr


def test_bench_ops_per_token_smoke(tmp_path):
    """bench/ops_per_token.py on a tiny shape: every arm timed, the reads it promises."""
    import importlib.util
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_ops_per_token", os.path.join(root, "bench", "ops_per_token.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    argv = ["--shapes", "tiny", "--tokens", "1", "2", "--reads", "0.5", "--quant", "q4"]
    argv += ["--layers", "2", "--budget", "0.01", "--max-reps", "3", "--json", str(out)]
    assert bench.main(argv) == 0
    records = json.loads(out.read_text())
    assert [(r["T"], r["policy"]) for r in records] == [(1, "token"), (2, "token"), (2, "union")]
    for r in records:
        for arm in ("dense", "dart", "gate", "input", "input_rows", "dense_q4", "gate_q4"):
            assert r[f"{arm}_us"] > 0
        assert r["dense_read"] == 1.0 and r["dart_read"] == pytest.approx(0.5, abs=0.01)
        assert 0.3 < r["input_read"] <= 1.0 and r["input_read"] == r["input_rows_read"]
