"""Model-family adapters: every family patches and restores exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, prefill_and_step, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.adapters import SUPPORTED_FAMILIES, get_adapter
from dart.core.config import BACKENDS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_everything_is_identical_and_detach_restores(family, backend):
    model = tiny_model(family)
    ids = random_ids()
    ref_prefill, ref_step = prefill_and_step(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = dart.attach(model, DARTConfig(layer_topk="all:1.0", backend=backend))
    prefill, step = prefill_and_step(model, ids)
    assert torch.equal(prefill, ref_prefill) and torch.equal(step, ref_step)
    handle.detach()
    # a pruning attach re-lays weights out; detach must restore them bit for bit
    handle = dart.attach(model, DARTConfig(total_prune=0.5, backend=backend))
    prefill_and_step(model, ids)
    handle.detach()
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(restored[k], v) and restored[k].is_contiguous() == v.is_contiguous(), k
    prefill, step = prefill_and_step(model, ids)
    assert torch.equal(prefill, ref_prefill) and torch.equal(step, ref_step)


def test_unsupported_model_lists_families():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(ValueError, match="supported families: llama.*gpt2.*opt"):
        dart.attach(model, DARTConfig())


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_reproduce_the_original_ffn(family):
    """`hidden` then `down` is the original module's forward; the weight views are neuron-major
    rows of one width, and relayout/restore keep the parameter values."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert model.config.model_type in SUPPORTED_FAMILIES
    x = torch.randn(2, 3, model.config.hidden_size)
    for refs in adapter.layer_refs():
        before = {n: p.clone() for n, p in refs.layer.named_parameters()}
        adapter.relayout(refs)
        parts = adapter.ffn_parts(refs)
        assert parts.w_up.shape[0] == parts.w_down_t.shape[0] == parts.width
        assert parts.w_down_t.is_contiguous()
        torch.testing.assert_close(parts.down(parts.hidden(x)), parts.original(x))
        adapter.restore(refs)
        assert all(torch.equal(p, before[n]) for n, p in refs.layer.named_parameters())
