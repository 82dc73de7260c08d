"""`attach` / `DARTHandle`: patching, detaching, proxies, calibration, prepare + hold."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prefill_and_step, random_ids, tiny_model

import dart
from dart import ConfigError, DARTConfig
from dart.core.config import BACKENDS


def test_attach_twice_is_refused():
    model = tiny_model()
    handle = dart.attach(model, DARTConfig(backend="masked"))
    with pytest.raises(RuntimeError, match="already has DART attached"):
        dart.attach(model, DARTConfig())
    handle.detach()
    dart.attach(model, DARTConfig()).detach()


def test_attach_overrides_are_config_fields():
    model = tiny_model()
    handle = dart.attach(model, layer_topk="all:0.5", backend="masked")
    assert handle.config.layer_topk == "all:0.5" and handle.controller.fixed_counts == [32] * 3
    handle.detach()
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.25"), layer_topk="all:0.5")
    assert handle.controller.fixed_counts == [32] * 3
    handle.detach()
    with pytest.raises(ConfigError, match="'prune_max' is now budget.prune_max"):
        dart.attach(model, prune_max=0.8)
    assert getattr(model, "_dart_handle", None) is None


def test_failed_attach_leaves_the_model_untouched():
    model = tiny_model("llama")
    model.config.hidden_act = "mish"  # no kernel: the FFNs refuse after the relayout
    state = {k: (v.clone(), v.is_contiguous()) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no kernel for activation 'mish'"):
        dart.attach(model, DARTConfig(layer_topk="all:0.5"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k][0]) and v.is_contiguous() == state[k][1], k
    assert getattr(model, "_dart_handle", None) is None


def test_ranking_with_output_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    model = tiny_model("llama")
    for ranking in ("max", "mean", "combined", "product"):
        handle = dart.attach(model, DARTConfig(ranking=ranking, layer_topk="all:0.5"))
        prefill_and_step(model, random_ids())
        assert handle.controller.proxies is not None
        handle.detach()
    assert any(tmp_path.rglob("*"))  # proxies were cached on disk


def test_calibrate_is_for_calibrated_methods():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5"))
    with pytest.raises(ValueError, match="calibrate\\(\\) is for a calibrated method"):
        handle.calibrate(random_ids(1, 30))
    handle.detach()
    static = dart.attach(model, DARTConfig(method="static", layer_topk="all:0.5"))
    with pytest.raises(RuntimeError, match="needs calibration first: handle.calibrate"):
        model(random_ids(1, 8))
    static.detach()
    assert getattr(model, "_dart_handle", None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_and_hold_score_under_context_masks(backend):
    """Log-likelihood protocol: masks from the context only, then the full text under them."""
    model = tiny_model("llama")
    context, full = random_ids(2, 8, seed=5), None
    full = torch.cat([context, random_ids(2, 4, seed=6)], 1)
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", backend=backend))
    handle.prepare(context)
    masks = [f.idx.clone() for f in handle.ffns]
    with handle.hold():
        held = model(full).logits
        model(full)  # a second forward does not re-trace
    assert all(torch.equal(a, f.idx) for a, f in zip(masks, handle.ffns, strict=True))
    assert all(f.mode == "sparse" for f in handle.ffns)
    handle.detach()
    # the same masks applied by hand through the masked reference path
    ref = dart.attach(model, DARTConfig(layer_topk="all:0.5", backend="masked"))
    ref.prepare(context)
    with ref.hold():
        expected = model(full).logits
    ref.detach()
    torch.testing.assert_close(held, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(held, model(full).logits, atol=1e-3)


def _snapshot(model):
    return {
        "modules": {n: type(m) for n, m in model.named_modules()},
        "state": {k: (v.clone(), v.is_contiguous()) for k, v in model.state_dict().items()},
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "forward": "forward" in vars(model),
    }


def _assert_untouched(model, snap):
    now = _snapshot(model)
    assert now["modules"] == snap["modules"] and now["hooks"] == snap["hooks"]
    assert now["forward"] == snap["forward"]
    for k, (v, contiguous) in snap["state"].items():
        got = model.state_dict()[k]
        assert torch.equal(got, v) and got.is_contiguous() == contiguous, k
    assert getattr(model, "_dart_handle", None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_attach_is_all_or_nothing(backend, monkeypatch):
    """A rejected attach (here a drift layer out of range, found while patching; then a failure
    injected after the hooks are in) leaves the model as it was, and a valid attach works
    afterwards (issue 24.4)."""
    model = tiny_model("llama")
    ids = random_ids()
    ref = prefill_and_step(model, ids)
    snap = _snapshot(model)
    bad = DARTConfig(layer_topk="all:0.5", backend=backend, drift={"layers": [7]})
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        dart.attach(model, bad)
    _assert_untouched(model, snap)

    from dart.core.api import DARTHandle

    def broken(self):
        raise RuntimeError("injected failure after patching")

    monkeypatch.setattr(DARTHandle, "_wrap_forward", broken)
    # the look-back re-trace wraps the model's forward: the failure comes after every patch
    cfg = DARTConfig(layer_topk="all:0.5", backend=backend, drift={"retrace": "lookback"})
    with pytest.raises(RuntimeError, match="injected failure"):
        dart.attach(model, cfg)
    _assert_untouched(model, snap)
    monkeypatch.undo()
    handle = dart.attach(model, cfg)
    prefill_and_step(model, ids)
    handle.detach()
    _assert_untouched(model, snap)
    got = prefill_and_step(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
