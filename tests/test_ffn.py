"""The FFN module: its backends agree with the masked reference; routing and recording."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, NO_DRIFT, prefill_and_step, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.adapters import get_adapter
from dart.core.config import BACKENDS
from dart.core.ffn import DARTFFN, DENSE, SPARSE, TRACE


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_and_pruning_changes_output(family):
    model = tiny_model(family)
    ids = random_ids()
    _, dense_step = prefill_and_step(model, ids)
    steps, selections = {}, {}
    for backend in BACKENDS:
        cfg = DARTConfig(layer_topk="all:0.5", backend=backend, drift=NO_DRIFT)
        handle = dart.attach(model, cfg)
        _, steps[backend] = prefill_and_step(model, ids)
        selections[backend] = [f.idx.clone() for f in handle.ffns]
        assert all(f.idx.shape == (2, f.width // 2) for f in handle.ffns)
        handle.detach()
    for backend in BACKENDS[1:]:
        assert all(
            torch.equal(a, b)
            for a, b in zip(selections["masked"], selections[backend], strict=False)
        )
        torch.testing.assert_close(steps[backend], steps["masked"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steps["masked"], dense_step, atol=1e-3)


def test_bf16_backends_agree():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = random_ids()
    steps = {}
    for backend in BACKENDS:
        handle = dart.attach(
            model, DARTConfig(layer_topk="all:0.5", backend=backend, drift=NO_DRIFT)
        )
        _, steps[backend] = prefill_and_step(model, ids)
        handle.detach()
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(steps[backend], steps["masked"], atol=0.1, rtol=0.05)


class _Recorder:
    """A StatsRecorder that keeps what it is given."""

    batch_size = 2
    records_inputs = False  # no ffn_inputs re-trace

    def __init__(self):
        self.activations, self.outputs = [], []

    def record_activations(self, layer, h):
        self.activations.append((layer, h.shape))

    def record_ffn_output(self, layer, x, y):
        self.outputs.append((layer, x.shape, y.shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_reports_to_a_recorder_and_routes_outside_the_schedule(backend):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    refs = adapter.layer_refs()[0]
    adapter.relayout(refs)  # the kernels read neuron-major rows
    parts = adapter.ffn_parts(refs)
    recorder = _Recorder()
    ffn = DARTFFN(parts, 0, backend, recorder)
    x = torch.randn(2, 3, model.config.hidden_size)
    dense = parts.original(x)
    assert torch.equal(ffn(x), dense)  # DENSE: the original module, nothing recorded
    assert recorder.activations == []
    ffn.mode = TRACE
    torch.testing.assert_close(ffn(x), dense)
    assert recorder.activations == [(0, (2, 3, parts.width))]
    assert recorder.outputs == [(0, (2, 3, x.shape[-1]), (2, 3, x.shape[-1]))]
    idx = torch.arange(0, parts.width, 2).expand(2, -1).contiguous()
    ffn.set_selection(idx, None)
    ffn.mode = SPARSE
    sparse = ffn(x)
    mask = torch.zeros(parts.width)
    mask[idx[0]] = 1.0
    torch.testing.assert_close(sparse, parts.down(parts.hidden(x) * mask), atol=1e-5, rtol=1e-5)
    other = idx[:, :4].contiguous()
    if backend == "masked":
        with pytest.raises(ValueError, match="gathered kernels"), ffn.routed(other):
            pass
    else:
        with ffn.routed(other):  # another selection, gathered, for these forwards only
            assert ffn.mode == SPARSE and ffn.backend == "gathered" and ffn.keep == 4
            mask = torch.zeros(parts.width)
            mask[other[0]] = 1.0
            expected = parts.down(parts.hidden(x) * mask)
            torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)
    with ffn.routed():
        assert ffn.mode == DENSE and torch.equal(ffn(x), dense)
    assert ffn.mode == SPARSE and ffn.backend == backend and torch.equal(ffn.idx, idx)
    assert ffn.keep == parts.width // 2 and ffn.parts is parts
    torch.testing.assert_close(ffn(x), sparse)


def test_unsupported_activation_needs_the_masked_backend():
    model = tiny_model("llama")
    refs = get_adapter(model).layer_refs()[0]
    parts = get_adapter(model).ffn_parts(refs)
    parts.act = "mish"
    with pytest.raises(ValueError, match="no kernel for activation 'mish'.*masked"):
        DARTFFN(parts, 0, "gathered", _Recorder())
    assert DARTFFN(parts, 0, "masked", _Recorder()).kernel_act is None
