"""Per-token selection modes (issue 26): gate, gate-weighted, input.

Each mode equals dense at threshold 0, the reference ops (dart_ext.per_token) equal the masked
emulation, a compiled step equals eager, calibration is deterministic and reaches its byte
target, thresholds carry their model's fingerprint, and bad input is refused with the model
left as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from tiny_models import (
    calibrated,
    fast_eager_and_compiled,
    prompt_step_logits,
    random_ids,
    tiny_model,
)

import dart
from dart import DARTConfig
from dart.core.config import ConfigError
from dart.core.per_token import KEEP_GRID, PER_TOKEN_MODES, allocate_keeps, threshold_for_keep
from dart.evaluate.perplexity import llamacpp_windows, score_chunk_cached
from dart.runtime.fast import FastGenerator
from dart_ext.per_token import gate_first_glu_ffn, input_sparse_glu_ffn

MODES = tuple(PER_TOKEN_MODES)
BACKENDS = ("masked", "gathered")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODES)
def test_threshold_zero_equals_dense(method, backend):
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = prompt_step_logits(model, ids)
        handle = calibrated(model, method, backend, layer_topk="all:1")
        assert all(t == [0.0, 0.0] for t in handle.per_token_state()["thresholds"])
        got = prompt_step_logits(model, ids)
    torch.testing.assert_close(got[0], ref[0])  # the prompt: dense
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)  # per token, all kept
    assert handle.stats()["ffn_bytes_read_fraction"] == pytest.approx(1.0)
    handle.detach()


@pytest.mark.parametrize("method", MODES)
def test_gathered_equals_masked_and_meters_agree(method):
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    outs = {}
    with torch.no_grad():
        for backend in BACKENDS:
            handle = calibrated(model, method, backend, total_prune=0.4)
            outs[backend] = (
                prompt_step_logits(model, ids)[1],
                handle.stats()["ffn_bytes_read_fraction"],
            )
            handle.detach()
    torch.testing.assert_close(outs["gathered"][0], outs["masked"][0], rtol=1e-4, atol=1e-4)
    assert outs["gathered"][1] == pytest.approx(outs["masked"][1], abs=1e-6)
    assert outs["masked"][1] < 0.9  # it pruned


def _weights(n=24, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).to(dtype) for _ in range(3)]


def _masked_gate(x, wg, wu, wd, t, scale, act):
    a = torch.nn.functional.silu(x.float() @ wg.float().T)
    keep = a.abs() * scale >= t
    h = a * (x.float() @ wu.float().T) * keep
    read = wg.numel() + 2 * wg.shape[1] * keep.sum(-1).float()
    return (h @ wd.float()).to(x.dtype), read


def _masked_input(x, wg, wu, wd, tx, th, act):
    xm = x.float() * (x.float().abs() >= tx)
    h = torch.nn.functional.silu(xm @ wg.float().T) * (xm @ wu.float().T)
    keep = h.abs() >= th
    n, d = wg.shape
    read = 2 * n * (x.float().abs() >= tx).sum(-1).float() + d * keep.sum(-1).float()
    return ((h * keep) @ wd.float()).to(x.dtype), read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 5, 16), (0, 16)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.5, 1e9])
def test_reference_ops_equal_emulated_masks(dtype, shape, t):
    wg, wu, wd = _weights(dtype=dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    thr = torch.tensor(t)
    scale = torch.rand(24, generator=torch.Generator().manual_seed(2)) + 0.5
    y, read = gate_first_glu_ffn(x, wg, wu, wd, thr, scale, "silu")
    y_ref, read_ref = _masked_gate(x, wg, wu, wd, t, scale, "silu")
    # fp32: the gathered sums run in another order than the masked matmuls (measured up to
    # 1.6e-5 apart); a wrong mask is off by a whole neuron's contribution (~1e-1).
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(read, read_ref.reshape(shape[:-1]))
    y, read = input_sparse_glu_ffn(x, wg, wu, wd, thr, thr * 2, "silu")
    y_ref, read_ref = _masked_input(x, wg, wu, wd, t, 2 * t, "silu")
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(read, read_ref.reshape(shape[:-1]))


def test_reference_ops_pass_opcheck():
    wg, wu, wd = _weights()
    x = torch.randn(3, 16)
    torch.library.opcheck(
        gate_first_glu_ffn, (x, wg, wu, wd, torch.tensor(0.2), torch.ones(24), "silu")
    )
    torch.library.opcheck(
        input_sparse_glu_ffn, (x, wg, wu, wd, torch.tensor(0.2), torch.tensor(0.1), "gelu")
    )


def test_reference_ops_refuse_bad_input():
    wg, wu, wd = _weights()
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="w_up"):
        gate_first_glu_ffn(x, wg, wu[:, :8], wd, torch.tensor(0.0), torch.ones(24), "silu")
    with pytest.raises(ValueError, match="scale"):
        gate_first_glu_ffn(x, wg, wu, wd, torch.tensor(0.0), torch.ones(5), "silu")
    with pytest.raises(ValueError, match="threshold"):
        gate_first_glu_ffn(x, wg, wu, wd, torch.zeros(2), torch.ones(24), "silu")
    with pytest.raises(ValueError, match="act"):
        input_sparse_glu_ffn(x, wg, wu, wd, torch.tensor(0.0), torch.tensor(0.0), "tanh")


@pytest.mark.parametrize(
    "method,backend", [("gate", "gathered"), ("input", "gathered"), ("input", "masked")]
)
def test_compiled_step_equals_eager(method, backend):
    model = tiny_model("llama")
    ids = random_ids(2, 10)
    handle = calibrated(model, method, backend, total_prune=0.4)
    state = handle.per_token_state()
    ref = FastGenerator(model, handle, max_len=32, compile=False).generate(ids, max_new_tokens=8)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fast = FastGenerator(model, handle, max_len=32, compile=False)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    handle.reset()
    got = fast.generate(ids, max_new_tokens=8)
    assert torch.equal(got.tokens, ref.tokens)
    assert counter.frame_count == 1
    # thresholds are inputs of the graph: new ones (another calibration) need no recompile
    state["thresholds"] = [[t * 1.5 for t in row] for row in state["thresholds"]]
    handle.load_per_token_state(state)
    fast.generate(ids, max_new_tokens=4)
    assert counter.frame_count == 1
    fraction = got.stats["ffn_bytes_read_fraction"]
    assert 0.4 < fraction < 0.9  # the meter counts inside the compiled step too
    handle.detach()


@pytest.mark.parametrize("method", MODES)
def test_gathered_cpu_steps_run_the_fused_kernels(method):
    """On CPU the gathered backend's per-token steps are the fused ops (dart::*), not the
    reference ops (dart_per_token::*); the input mode reads its input-major gate / up copies,
    which the handle counts as extra state."""
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    handle = calibrated(model, method, "gathered", total_prune=0.4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        prompt_step_logits(model, ids)
    names = {e.name for e in prof.events()}
    fused = "dart::input_sparse_glu_ffn" if method == "input" else "dart::gate_first_glu_ffn"
    assert fused in names and not any(n.startswith("dart_per_token::") for n in names)
    layout = [getattr(f, "pt_layout0", None) for f in handle.ffns]
    if method == "input":
        n, d = handle.ffns[0].parts.w_up.shape
        assert all(t is not None and t.shape == (n, d) and t.stride() == (1, n) for t in layout)
        extra = handle.stats()["extra_state_bytes_total"]
        assert extra >= sum(2 * t.numel() * t.element_size() for t in layout)
    else:
        assert all(t is None for t in layout)
    handle.detach()


def test_inductor_compiled_step_equals_eager_and_keeps_the_meter():
    """FastGenerator's own compile (inductor) over the fused input kernel: the same tokens and
    the same measured bytes as eager (the meters are buffers a compiled step adds to)."""
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    handle = calibrated(model, "input", "gathered", total_prune=0.4)
    eager, compiled = fast_eager_and_compiled(model, handle, ids)
    assert torch.equal(compiled.tokens, eager.tokens)
    fraction = eager.stats["ffn_bytes_read_fraction"]
    assert 0.4 < fraction < 0.9
    assert compiled.stats["ffn_bytes_read_fraction"] == pytest.approx(fraction, abs=1e-9)
    handle.detach()


def test_export_refuses_per_token_methods_clearly():
    from dart.runtime.export import DARTExportModule

    model = tiny_model("llama")
    handle = calibrated(model, "gate", "gathered", total_prune=0.3)
    try:
        with pytest.raises(ValueError, match="not 'gate'"):
            DARTExportModule(handle, 1, 32, list(handle.controller.widths))
    finally:
        handle.detach()


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
@pytest.mark.parametrize("method", MODES)
def test_calibration_is_deterministic_and_reaches_the_byte_target(method, allocation):
    model = tiny_model("llama", layers=4)
    states = []
    for _ in range(2):
        handle = calibrated(model, method, total_prune=0.45, per_token_allocation=allocation)
        states.append(handle.per_token_state())
        handle.detach()
    assert states[0] == states[1]
    mode = PER_TOKEN_MODES[method]
    nominal = sum(mode.read_fraction([k] * len(mode.knobs)) for k in states[0]["keeps"]) / 4
    assert nominal == pytest.approx(0.55, abs=0.05 * 2 / 3 / 4 + 1e-6)  # one grid step
    if allocation == "uniform":
        assert len(set(states[0]["keeps"])) == 1


def test_measured_bytes_follow_the_thresholds():
    model = tiny_model("llama", layers=2)
    ids = random_ids(1, 8)
    handle = calibrated(model, "gate", total_prune=0.3)
    state = handle.per_token_state()
    with torch.no_grad():
        for value, expected in ((0.0, 1.0), (1e9, 1 / 3)):  # all kept; only the gate read
            state["thresholds"] = [[value, 0.0]] * 2
            handle.load_per_token_state(state)
            handle.reset()
            prompt_step_logits(model, ids)
            assert handle.stats()["ffn_bytes_read_fraction"] == pytest.approx(expected)
    handle.detach()


def test_greedy_allocation_prunes_the_cheap_layer_first():
    mode = PER_TOKEN_MODES["input"]
    flat = [0.0] * len(KEEP_GRID)
    steep = [float(i) for i in range(len(KEEP_GRID))]
    keeps = allocate_keeps(mode, [steep, flat], [1.0, 1.0], 0.75, "greedy")
    assert keeps == [1.0, 0.5]
    assert allocate_keeps(mode, [steep, flat], [1.0, 1.0], 0.75, "uniform") == [0.75, 0.75]
    with pytest.raises(ValueError, match="out of reach"):
        allocate_keeps(PER_TOKEN_MODES["gate"], [flat], [1.0], 0.2, "greedy")


def test_threshold_for_keep():
    s = torch.arange(100.0)
    assert threshold_for_keep(s, 1.0) == 0.0
    assert (s >= threshold_for_keep(s, 0.3)).sum() == 30
    with pytest.raises(ValueError, match="keep"):
        threshold_for_keep(s, 0.0)


def _same_model(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.state_dict().items())


def test_bad_configs_are_refused_naming_the_option():
    with pytest.raises(ConfigError, match="backend"):
        DARTConfig(method="gate", backend="compact")
    with pytest.raises(ConfigError, match="total_prune"):
        DARTConfig(method="gate", total_prune=0.7)  # the gate alone is a third of the bytes
    with pytest.raises(ConfigError, match="layer_topk"):
        DARTConfig(method="input", layer_topk="all:0")
    with pytest.raises(ConfigError, match="per_token_allocation"):
        DARTConfig(method="input", per_token_allocation="best")


def test_thresholds_of_another_model_are_refused():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    handle = calibrated(model, "input", total_prune=0.4)
    state = handle.per_token_state()
    handle.detach()
    handle = calibrated(other, "input", total_prune=0.4)
    before = handle.per_token_state()
    with pytest.raises(ValueError, match="another model"):
        handle.load_per_token_state(state)
    assert handle.per_token_state() == before  # nothing changed
    state["fingerprint"] = before["fingerprint"]
    with pytest.raises(ValueError, match="method"):
        handle.load_per_token_state({**state, "method": "gate"})
    handle.detach()


def test_a_mode_the_model_cannot_run_leaves_it_as_it_was():
    model = tiny_model("gpt2")  # no gate
    snapshot = {n: p.clone() for n, p in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.raises(ValueError, match="gated FFN"):
        dart.attach(model, DARTConfig(method="gate", total_prune=0.3))
    assert list(model.modules()) == modules and _same_model(model, snapshot)
    assert getattr(model, "_dart_handle", None) is None


def test_uncalibrated_per_token_method_is_refused():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(method="gate", total_prune=0.3))
    with pytest.raises(RuntimeError, match="calibrate"):
        model(random_ids(1, 4))
    handle.detach()


def test_llamacpp_windows_and_cached_scoring():
    ws = llamacpp_windows(1100, 256, chunks=None)
    assert [(w.begin, w.end, w.score_from, w.prep_len) for w in ws] == [
        (0, 256, 129, 128),
        (256, 512, 129, 128),
        (512, 768, 129, 128),
        (768, 1024, 129, 128),
    ]
    assert len(llamacpp_windows(1100, 256, chunks=2)) == 2
    with pytest.raises(ValueError, match="chunk"):
        llamacpp_windows(100, 256)
    # dense: the cached second half scores what one full forward scores
    model = tiny_model("llama")
    ids = random_ids(1, 32)[0]
    with torch.no_grad():
        r = score_chunk_cached(model, ids, 17, 16)
        logits = model(ids[None]).logits[0, 16:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[17:], reduction="sum")
    assert r["tokens"] == 15 and math.isclose(r["nll"], float(nll), rel_tol=1e-5)
