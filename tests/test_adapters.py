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


def _biased_model(family: str) -> torch.nn.Module:
    """A tiny model whose FFN projections all carry non-zero biases (Llama: `mlp_bias=True`)."""
    import transformers as tf
    from tiny_models import tiny_config

    torch.manual_seed(0)
    config = tiny_config(family)
    if family == "llama":
        config.mlp_bias = True
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            elif "bias" in name:  # HF initialises biases to zero: make them matter
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_biases_reach_every_backend(family, backend):
    """Keeping all neurons but one, every backend gives the masked reference's logits and stays
    close to the unpatched model: no backend drops a gate/up/down (in/out) bias (issue 24.1)."""
    model = _biased_model(family)
    ids = random_ids()
    dense = prefill_and_step(model, ids)
    width = get_adapter(model).ffn_parts(get_adapter(model).layer_refs()[0]).width
    cfg = {"layer_topk": f"all:{width - 1}", "drift": {"enabled": False}}
    handle = dart.attach(model, DARTConfig(backend="masked", **cfg))
    reference = prefill_and_step(model, ids)
    handle.detach()
    handle = dart.attach(model, DARTConfig(backend=backend, **cfg))
    got = prefill_and_step(model, ids)
    handle.detach()
    for ours, ref, full in zip(got, reference, dense, strict=True):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
        assert (ours - full).abs().max() < 0.05  # one neuron of 64 per layer is gone
