"""Arms: methods x sparsities (+ release steps), their configs."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from dart.core.adapters import get_adapter
from dart.core.controller import Controller
from dart.core.methods import get_method
from dart.evaluate import (
    Arm,
    arm_config,
    parse_arms,
)


def test_parse_arms():
    arms = parse_arms("dense,static,dart", "0.5,0.7", "100")
    labels = [(a.label, a.total_prune) for a in arms]
    assert labels == [
        ("dense", 0.0),
        ("static", 0.5),
        ("static", 0.7),
        ("dart", 0.5),
        ("dart-r100", 0.5),
        ("dart", 0.7),
        ("dart-r100", 0.7),
    ]
    with pytest.raises(ValueError, match="unknown methods"):
        parse_arms("dense,foo", "0.5")
    with pytest.raises(ValueError):
        parse_arms("dart", "1.5")
    assert arm_config(Arm("dart", 0.5)).drift.enabled
    assert not arm_config(Arm("dart-nodrift", 0.5)).drift.enabled
    assert arm_config(Arm("dart", 0.7, 100)).release_step == 100
    assert arm_config(Arm("griffin", 0.5), {"backend": "masked"}).backend == "masked"


def test_reference_arm_and_what_arms_need_come_from_the_method_registry():
    assert Arm.reference() == Arm("dense", 0.0) and Arm.reference().is_reference
    assert arm_config(Arm("dense")) is None  # the reference runs the model unpatched
    assert Arm("static", 0.5).needs_calibration and not Arm("dart", 0.5).needs_calibration
    # the release-step sweep is for methods with drift detection only
    assert parse_arms("dart-nodrift,griffin", "0.5", "100") == [
        Arm("dart-nodrift", 0.5),
        Arm("griffin", 0.5),
    ]


def test_griffin_arm_keeps_the_same_share_of_every_layer():
    cfg = arm_config(Arm("griffin", 0.7))
    assert cfg.total_prune == 0.7 and get_method(cfg.method).uniform_budget
    adapter = get_adapter(tiny_model("llama"))
    parts = [adapter.ffn_parts(r) for r in adapter.layer_refs()]
    counts = Controller(cfg, parts).fixed_counts
    assert counts == [round(0.3 * p.width) for p in parts]
    budget = arm_config(Arm("griffin+budget", 0.7))  # DART's auto budget: counts per prompt
    assert Controller(budget, parts).fixed_counts is None
