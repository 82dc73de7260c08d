"""The methods registry: what each method says it does, and that a patched model does it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import NO_DRIFT, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.methods import METHODS, get_method, per_token_l2_normalised
from dart.core.scoring import ActivationAccumulator


def test_registry_names_and_lookup():
    assert list(METHODS) == [
        "dense",
        "static",
        "griffin",
        "griffin+budget",
        "random",
        "dart",
        "dart-nodrift",
        "gate",
        "gate-weighted",
        "input",
    ]
    assert all(get_method(name).name == name for name in METHODS)
    with pytest.raises(ValueError, match="'x' is not one of dense, static, griffin"):
        get_method("x")
    with pytest.raises(TypeError):
        METHODS["new"] = METHODS["dart"]  # read-only


def replace_description(method):
    return dataclasses.replace(method, description="")


def test_what_each_method_needs():
    prompt = {n for n, m in METHODS.items() if m.selects_from_prompt}
    assert prompt == {"griffin", "griffin+budget", "random", "dart", "dart-nodrift"}
    calibrated = ["static", "gate", "gate-weighted", "input"]
    assert [n for n, m in METHODS.items() if m.needs_calibration] == calibrated
    per_token = {n: m.per_token.name for n, m in METHODS.items() if m.per_token is not None}
    assert per_token == {"gate": "gate", "gate-weighted": "gate-weighted", "input": "input"}
    assert [n for n, m in METHODS.items() if m.uses_drift] == ["dart"]
    assert [n for n, m in METHODS.items() if not m.prunes] == ["dense"]
    assert {n for n, m in METHODS.items() if m.uses_ema} == {"static", "dart", "dart-nodrift"}
    assert [n for n, m in METHODS.items() if m.score is not None] == ["random"]
    assert [n for n, m in METHODS.items() if m.shared_mask] == ["static"]
    assert [n for n, m in METHODS.items() if m.uniform_budget] == ["griffin"]
    paired = {n: m.compared_with for n, m in METHODS.items() if m.compared_with}
    assert paired == {"dart": ("griffin",), "dart-nodrift": ("griffin",)}
    # GRIFFIN with DART's budget is GRIFFIN in every other respect
    same = dataclasses.replace(
        METHODS["griffin+budget"], name="griffin", description="", uniform_budget=True
    )
    assert same == replace_description(METHODS["griffin"])
    # DART without drift is DART in every other respect
    same = dataclasses.replace(
        METHODS["dart-nodrift"], name="dart", description="", uses_drift=True
    )
    assert same == dataclasses.replace(METHODS["dart"], description="")


def test_configure_turns_drift_off_for_methods_without_it():
    for name, method in METHODS.items():
        cfg = DARTConfig(method=name, layer_topk="all:0.5", drift={"window": 3})
        assert cfg.drift.enabled == method.uses_drift and cfg.drift.window == 3
    assert DARTConfig.from_dict(DARTConfig(method="dart-nodrift").to_dict()).drift.enabled is False


def test_griffin_statistic_vs_naive():
    """GRIFFIN's prompt statistic: each token's vector L2-normalised over neurons, then the L2
    norm over the valid tokens per neuron (the accumulator after one pass)."""
    torch.manual_seed(3)
    h = torch.randn(2, 4, 5)
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    acc = ActivationAccumulator([5])
    acc.reset(2)
    acc.update(0, get_method("griffin").statistic(h), valid)
    out = acc.magnitudes(0)
    for i in range(2):
        toks = [h[i, j] / h[i, j].norm() for j in range(4) if valid[i, j]]
        torch.testing.assert_close(out[i], torch.stack(toks).norm(dim=0))
    assert torch.equal(per_token_l2_normalised(torch.zeros(1, 3)), torch.zeros(1, 3))
    l2 = get_method("dart").for_config(DARTConfig(statistic="l2"))
    assert l2.statistic(h) is h  # DART's plain L2 is one setting away


def test_random_scores_are_seeded():
    score = get_method("random").score
    m = torch.ones(2, 7)
    a = score(m, torch.Generator().manual_seed(5))
    b = score(m, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == m.shape and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_generate(method):
    model = tiny_model("llama")
    cfg = DARTConfig(method=method, layer_topk="all:0.5")
    handle = dart.attach(model, cfg)
    if get_method(method).needs_calibration:
        with pytest.raises(RuntimeError, match="calibration"):
            model.generate(random_ids(1), max_new_tokens=3, do_sample=False)
        handle.calibrate(random_ids(1, 30, seed=9))
    out = model.generate(random_ids(2), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)
    stats = handle.stats()
    assert stats["method"] == method
    expected = 0.0 if method == "dense" else 0.5
    mode = get_method(method).per_token
    if mode is not None:  # a share of the bytes: the gate is read whole, keep 0.5 of the rest
        expected = 1.0 - mode.read_fraction([0.5] * len(mode.knobs))
        assert 0.0 < stats["effective_sparsity"] < 1.0
    assert stats["nominal_sparsity"] == pytest.approx(expected, abs=0.02)
    if method in ("static",):
        assert all(f.idx.dim() == 1 for f in handle.ffns)
    assert handle.controller.monitors_drift == (method == "dart")
    handle.detach()


# The "griffin" arm before it became real GRIFFIN (copied from dart/core/methods.py at core c6faea9,
# plus own_statistic, which the config's statistic setting added since): GRIFFIN's statistic
# under DART's auto budget. "griffin+budget" must reproduce it exactly.
OLD_GRIFFIN = dart.core.methods.Method(
    "griffin",
    "GRIFFIN: masks from the prompt's per-token-normalised activations, kept throughout",
    selects_from_prompt=True,
    uses_proxies=True,
    statistic=per_token_l2_normalised,
    own_statistic="normalized_l2",
)


def prompt_masks(method: str, total_prune: float, ids: torch.Tensor):
    model = tiny_model("llama", layers=4)
    cfg = DARTConfig(method=method, total_prune=total_prune, drift=NO_DRIFT)
    handle = dart.attach(model, cfg)
    model(ids, use_cache=True)
    masks = [f.idx.clone() for f in handle.ffns]
    counts = handle.stats()["keep_counts"]
    handle.detach()
    return masks, counts


@pytest.mark.parametrize("total_prune", [0.5, 0.7])
def test_griffin_budget_reproduces_the_old_griffin_arm(monkeypatch, total_prune):
    ids = random_ids(2, 12, seed=4)
    new_masks, new_counts = prompt_masks("griffin+budget", total_prune, ids)
    registry = dict(METHODS, griffin=OLD_GRIFFIN)
    monkeypatch.setattr(dart.core.methods, "METHODS", registry)
    old_masks, old_counts = prompt_masks("griffin", total_prune, ids)
    assert new_counts == old_counts
    assert len(set(new_counts)) > 1  # the auto budget: not the same k everywhere
    for new, old in zip(new_masks, old_masks, strict=True):
        assert torch.equal(new, old)


@pytest.mark.parametrize("total_prune", [0.5, 0.7])
def test_griffin_keeps_the_same_fraction_in_every_layer(total_prune):
    """Real GRIFFIN: k = round((1 - total_prune) N) in every layer, fixed before the prompt (no
    sensitivity traced), each row's mask the top-k of its normalised prompt statistic."""
    model = tiny_model("llama", layers=4)
    handle = dart.attach(model, DARTConfig(method="griffin", total_prune=total_prune))
    widths = handle.stats()["widths"]
    expected = [int((1 - total_prune) * n + 0.5) for n in widths]
    assert handle.stats()["keep_counts"] == expected
    model(random_ids(2, 12, seed=4), use_cache=True)
    assert not handle.controller.needs_sensitivity
    assert handle.stats()["keep_counts"] == expected
    assert handle.stats()["nominal_sparsity"] == pytest.approx(total_prune, abs=0.01)
    for layer, ffn in enumerate(handle.ffns):
        top = handle.controller.acc.magnitudes(layer).topk(expected[layer], dim=-1).indices
        assert torch.equal(ffn.idx.sort(-1).values, top.sort(-1).values)
    handle.detach()


def test_statistics_registry():
    from dart.core.config import STATISTICS as CONFIG_STATISTICS
    from dart.core.methods import STATISTICS

    assert tuple(STATISTICS) == CONFIG_STATISTICS == ("l2", "normalized_l2")
    assert STATISTICS["normalized_l2"] is per_token_l2_normalised
    for name, method in METHODS.items():  # the registry holds a default config's statistic
        cfg = DARTConfig(method=name, layer_topk="all:0.5")
        assert method.for_config(cfg) == method
    # the GRIFFIN methods always use their own statistic, and the config records it
    for name in ("griffin", "griffin+budget"):
        assert DARTConfig(method=name, statistic="l2").statistic == "normalized_l2"
    with pytest.raises(ValueError, match="DARTConfig.statistic: 'l1' is not one of l2"):
        DARTConfig(statistic="l1")


def test_dart_with_griffins_statistic_is_griffin_budget():
    """``statistic="normalized_l2"`` reaches DART's accumulation (through the registry): DART
    without drift then builds exactly the masks of griffin+budget; with ``l2`` it does not."""
    ids = random_ids(2, 12, seed=4)
    masks = {}
    for name, statistic in (("griffin+budget", None), ("dart", "normalized_l2"), ("dart", "l2")):
        model = tiny_model("llama", layers=4)
        extra = {} if statistic is None else {"statistic": statistic}
        handle = dart.attach(model, DARTConfig(method=name, drift=NO_DRIFT, **extra))
        model(ids, use_cache=True)
        assert handle.method.statistic is dart.core.methods.STATISTICS[handle.config.statistic]
        masks[(name, statistic)] = [f.idx.clone() for f in handle.ffns]
        handle.detach()
    griffin, normalized, plain = masks.values()
    assert all(torch.equal(a, b) for a, b in zip(griffin, normalized, strict=True))
    same = [a.shape == b.shape and torch.equal(a, b) for a, b in zip(griffin, plain, strict=True)]
    assert not all(same)
