"""Per-token modes on quantised models (``dart.quantize``): ``gate`` and ``gate-weighted`` run the
fused ``gate_first_glu_ffn_q`` over the quantised rows; ``input`` is refused (a quantised
32-value block cannot skip single entries of x), leaving the model as it was.

Calibration scores the gate through ``linear_q`` (x rounded to int8 per block, as the fused
kernel rounds it), so the masked emulation on the quantised model is the fused kernel's
reference; the meters count the quantised format's bytes.
"""

from __future__ import annotations

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
from dart.runtime.fast import FastGenerator

FORMATS = ("q8", "q4", "q4m")
GATE_MODES = ("gate", "gate-weighted")
# bytes per weight entry of each format (group 32): 32 values + an fp16 scale (+ an fp16 min)
ENTRY_BYTES = {"q8": 34 / 32, "q4": 18 / 32, "q4m": 20 / 32}


def _quantised(fmt, seed=0, layers=2):
    model = tiny_model("llama", layers=layers, seed=seed)
    dart.quantize(model, fmt)
    return model


@pytest.mark.parametrize("method", GATE_MODES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_gate_first_equals_its_reference(fmt, method):
    """The fused kernel over quantised rows (gathered) == the masked emulation over the same
    rows (linear_q scores, dequantised down), outputs and measured bytes alike."""
    model = _quantised(fmt)
    ids = random_ids(2, 12)
    outs = {}
    with torch.no_grad():
        for backend in ("masked", "gathered"):
            handle = calibrated(model, method, backend, total_prune=0.4)
            outs[backend] = (prompt_step_logits(model, ids)[1], handle.stats())
            handle.detach()
    # fp32 sums in another order (measured ~1e-6 apart); a neuron kept by one path and not
    # the other moves the logits by ~1e-2
    torch.testing.assert_close(outs["gathered"][0], outs["masked"][0], rtol=1e-4, atol=1e-4)
    got, ref = outs["gathered"][1], outs["masked"][1]
    assert got["ffn_bytes_read"] == pytest.approx(ref["ffn_bytes_read"])
    assert 0.45 < got["ffn_bytes_read_fraction"] < 0.8  # it pruned


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_threshold_zero_equals_the_dense_quantised_model(fmt):
    model = _quantised(fmt)
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = prompt_step_logits(model, ids)
        handle = calibrated(model, "gate", "gathered", layer_topk="all:1")
        assert all(t == [0.0, 0.0] for t in handle.per_token_state()["thresholds"])
        got = prompt_step_logits(model, ids)
    torch.testing.assert_close(got[0], ref[0])  # the prompt: dense
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    st = handle.stats()
    assert st["ffn_bytes_read_fraction"] == pytest.approx(1.0)
    # the meters count the format's bytes: 2 rows x 2 tokens, 2 layers, 3 N d entries each
    n, d = model.config.intermediate_size, model.config.hidden_size
    assert st["ffn_bytes_dense"] == pytest.approx(4 * 2 * 3 * n * d * ENTRY_BYTES[fmt])
    handle.detach()


def test_quantised_gate_steps_run_the_fused_quantised_kernel():
    model = _quantised("q4")
    handle = calibrated(model, "gate", "gathered", total_prune=0.4)
    with torch.no_grad(), torch.profiler.profile() as prof:
        prompt_step_logits(model, random_ids(1, 10))
    names = {e.name for e in prof.events()}
    assert "dart::gate_first_glu_ffn_q" in names
    assert not any(n.startswith("dart_per_token::") for n in names)
    handle.detach()


def test_quantised_gate_in_hf_generate_and_fast_generator_compiled_equals_eager():
    model = _quantised("q4")
    ids = random_ids(1, 10)
    handle = calibrated(model, "gate", "gathered", total_prune=0.4)
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=6, do_sample=False)
    hf_fraction = handle.stats()["ffn_bytes_read_fraction"]
    assert 0.45 < hf_fraction < 0.8
    eager, compiled = fast_eager_and_compiled(model, handle, ids)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert torch.equal(eager.tokens[0], hf[0, ids.shape[1] :])
    fraction = eager.stats["ffn_bytes_read_fraction"]
    assert 0.45 < fraction < 0.8
    assert compiled.stats["ffn_bytes_read_fraction"] == pytest.approx(fraction, abs=1e-9)
    handle.detach()


def test_quantised_thresholds_need_no_recompile():
    model = _quantised("q8")
    ids = random_ids(1, 10)
    handle = calibrated(model, "gate-weighted", "gathered", total_prune=0.3)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    fast = FastGenerator(model, handle, max_len=32, compile=False)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    fast.generate(ids, max_new_tokens=4)
    state = handle.per_token_state()
    state["thresholds"] = [[t * 1.5 for t in row] for row in state["thresholds"]]
    handle.load_per_token_state(state)
    fast.generate(ids, max_new_tokens=4)
    assert counter.frame_count == 1
    handle.detach()


def test_quantised_thresholds_carry_the_quantised_fingerprint():
    """Thresholds of the fp model (or of another format) do not load on the quantised one."""
    fp = tiny_model("llama", layers=2)
    fp_state = calibrated(fp, "gate", "gathered", total_prune=0.3).per_token_state()
    q4 = _quantised("q4")
    handle = calibrated(q4, "gate", "gathered", total_prune=0.3)
    with pytest.raises(ValueError, match="another model"):
        handle.load_per_token_state(fp_state)
    handle.detach()
    q8_state = calibrated(_quantised("q8"), "gate", "gathered", total_prune=0.3).per_token_state()
    handle = calibrated(q4, "gate", "gathered", total_prune=0.3)
    with pytest.raises(ValueError, match="another model"):
        handle.load_per_token_state(q8_state)
    handle.detach()


@pytest.mark.parametrize("fmt", FORMATS)
def test_input_mode_on_a_quantised_model_is_refused_leaving_it_unchanged(fmt):
    model = _quantised(fmt)
    snapshot = {n: t.clone() for n, t in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.raises(ValueError, match=f"'input'.*'{fmt}'"):
        dart.attach(model, DARTConfig(method="input", total_prune=0.3))
    assert list(model.modules()) == modules
    assert all(torch.equal(t, snapshot[n]) for n, t in model.state_dict().items())
    assert getattr(model, "_dart_handle", None) is None
