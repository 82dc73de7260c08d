"""CUDA kernels of the per-token ops (gate_first_glu_ffn, input_sparse_glu_ffn;
csrc/cuda/per_token_ops.cu over csrc/kernels/per_token_ffn.cuh) against the pure-PyTorch
references of dart_ext.per_token on the GPU: the CPU suite's random cases (shapes, dtypes,
activations, thresholds, candidate supersets, both policies, neuron- and input-major gate/up),
more tokens than one launch takes (chunks under "token", the whole-call union beyond), a
Llama-3.1-8B shape, determinism and CUDA-graph capture (no host sync), opcheck, bad inputs, and
a tiny model whose gathered per-token steps run these kernels. The kernel cores also run on the
CPU emulation in every suite run (tests/test_cuda_emulation_per_token.py); this module needs a
GPU (skipped otherwise; scripts/gpu_check.sh runs it)."""

from __future__ import annotations

import re

import pytest
import torch
from op_cases import rand, weights
from test_per_token_ops import (
    INPUT,
    _bad_cases,
    _case,
    _opcheck_cases,
    gap_threshold,
    gate_scores,
    hidden_magnitudes,
)
from tiny_models import random_ids, tiny_model

import dart
from dart import DARTConfig
from dart_ext.per_token import gate_first_glu_ffn, input_major, input_sparse_glu_ffn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
GATE = torch.ops.dart.gate_first_glu_ffn.default
# the kernels sum in another order than the reference; bf16 / fp16 outputs are rounded once
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture(scope="module", autouse=True)
def ext():
    import dart_ext

    for op in ("gate_first_glu_ffn", "input_sparse_glu_ffn"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dart::{op}", "CUDA"):
            pytest.skip(f"dart_ext was built without CUDA kernels (dart::{op})")
    return dart_ext


def to_dev(a):
    if isinstance(a, torch.Tensor):
        return a.to(DEV)
    if isinstance(a, (list, tuple)):
        return type(a)(to_dev(v) for v in a)
    return a


def check_pair(got, want, dtype):
    (y, read), (y_ref, read_ref) = got, want
    assert y.device.type == DEV and read.device.type == DEV
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert read.dtype == torch.float32 and read.shape == read_ref.shape
    torch.testing.assert_close(read, read_ref, rtol=0, atol=0)  # the same kept sets
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


def _gate_args(c, seed, lead=None):
    n, d, dt = c["n"], c["d"], c["dtype"]
    wg, wu, wd = weights(n, d, dt, seed=seed)
    x = rand((*(lead or c["lead"]), d), dt, seed=seed + 100)
    scale = rand((n,), seed=seed + 7).abs() + 0.5 if c["weighted"] else torch.ones(n)
    idx = None
    if c["superset"]:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(n // 2, 1)]
    thr = gap_threshold(gate_scores(x, wg, scale, c["act"], idx), c["keep"])
    return to_dev((x, wg, wu, wd, thr, scale, c["act"], idx, c["policy"]))


def _input_args(c, seed, lead=None):
    n, d, dt = c["n"], c["d"], c["dtype"]
    wg, wu, wd = weights(n, d, dt, seed=seed)
    x = rand((*(lead or c["lead"]), d), dt, seed=seed + 100)
    tx = gap_threshold(x.abs(), c["keep"])
    th = gap_threshold(hidden_magnitudes(x, wg, wu, tx, c["act"], c["policy"]), c["keep_h"])
    return to_dev((x, wg, wu, wd, tx, th, c["act"], c["policy"]))


def _run_input(args, input_major_layout):
    x, wg, wu, wd, tx, th, act, policy = args
    kg, ku = (input_major(wg), input_major(wu)) if input_major_layout else (wg, wu)
    got = INPUT(x, kg, ku, wd, tx, th, act, policy)
    return got, input_sparse_glu_ffn(*args)


@pytest.mark.parametrize("seed", range(40))
def test_gate_first_matches_reference(seed):
    c = _case(seed)
    args = _gate_args(c, seed)
    check_pair(GATE(*args), gate_first_glu_ffn(*args), c["dtype"])


@pytest.mark.parametrize("seed", range(40))
def test_input_sparse_matches_reference(seed):
    c = _case(seed)
    got, want = _run_input(_input_args(c, seed), c["input_major"])
    check_pair(got, want, c["dtype"])


@pytest.mark.parametrize("policy", ["token", "union"])
@pytest.mark.parametrize("tokens", [9, 20])
def test_more_tokens_than_one_launch(policy, tokens):
    """Chunks of 8 under "token"; under "union" the whole call chooses one set."""
    base = dict(n=300, d=96, dtype=torch.bfloat16, act="silu", keep=0.4, keep_h=0.5)
    c = dict(base, lead=(tokens,), policy=policy, superset=False, weighted=True)
    args = _gate_args(c, tokens)
    got = GATE(*args)
    check_pair(got, gate_first_glu_ffn(*args), c["dtype"])
    if policy == "union":
        assert torch.equal(got[1], got[1][:1].expand_as(got[1]))
    check_pair(*_run_input(_input_args(c, tokens), True), c["dtype"])


@pytest.mark.parametrize("keep", [0.3, 1.0])
def test_llama_shape(keep):
    n, d = 14336, 4096
    c = dict(n=n, d=d, dtype=torch.bfloat16, act="silu", keep=keep, keep_h=keep, lead=(1,))
    c.update(policy="token", superset=False, weighted=False)
    args = _gate_args(c, 3)
    check_pair(GATE(*args), gate_first_glu_ffn(*args), torch.bfloat16)
    check_pair(*_run_input(_input_args(c, 4), True), torch.bfloat16)


def test_deterministic_and_graph_capture():
    c = dict(n=4096, d=1024, dtype=torch.bfloat16, act="silu", keep=0.4, keep_h=0.4, lead=(2,))
    c.update(policy="token", superset=False, weighted=True)
    gate_args = _gate_args(c, 5)
    x, wg, wu, wd, tx, th, act, policy = _input_args(c, 6)
    input_args = (x, input_major(wg), input_major(wu), wd, tx, th, act, policy)
    for op, args in ((GATE, gate_args), (INPUT, input_args)):
        first = op(*args)
        assert all(torch.equal(first[0], op(*args)[0]) for _ in range(5))
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = op(*args)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])


@pytest.mark.parametrize("case", [0, 1, 2, 5, 6])  # the fp cases (gate_first_glu_ffn_q: CPU)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, to_dev(args))


@pytest.mark.parametrize("case", range(15))
def test_bad_inputs_name_the_argument(case):
    msg, op, args = _bad_cases()[case]
    if op not in (GATE, INPUT) or "is on" in msg:
        pytest.skip("a CPU-only op or a meta-tensor case")
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        op(*to_dev(args))


def test_a_cpu_weight_is_refused_naming_it():
    wg, wu, wd = weights(10, 32)
    x = rand((2, 32), device=DEV)
    t, ones = torch.tensor(0.1, device=DEV), torch.ones(10, device=DEV)
    with pytest.raises(RuntimeError, match="w_up is on cpu"):
        GATE(x, wg.to(DEV), wu, wd.to(DEV), t, ones, "silu")


@pytest.mark.parametrize("method", ["gate", "input"])
def test_tiny_model_steps_run_the_cuda_kernels(method):
    """A tiny model on the GPU: the gathered per-token steps are the CUDA ops (the input mode
    over its input-major copies, made at attach) and equal the masked emulation."""
    ids = random_ids(2, 12).to(DEV)
    outs = {}
    for backend in ("masked", "gathered"):
        model = tiny_model("llama").to(DEV)
        handle = dart.attach(model, DARTConfig(method=method, backend=backend, total_prune=0.4))
        handle.calibrate(random_ids(1, 40, seed=7).to(DEV))
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = model(ids, use_cache=True)
            step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        names = {e.name for e in prof.events()}
        outs[backend] = (step.logits, handle.stats()["ffn_bytes_read_fraction"])
        if backend == "gathered":
            fused = (
                "dart::input_sparse_glu_ffn" if method == "input" else "dart::gate_first_glu_ffn"
            )
            assert fused in names and not any(n.startswith("dart_per_token::") for n in names)
            if method == "input":
                assert all(f.pt_layout0.device.type == DEV for f in handle.ffns)
        handle.detach()
    torch.testing.assert_close(outs["gathered"][0], outs["masked"][0], rtol=1e-4, atol=1e-4)
    assert outs["gathered"][1] == pytest.approx(outs["masked"][1], abs=1e-6)
