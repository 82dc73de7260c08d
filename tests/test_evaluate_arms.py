"""Arms: methods x sparsities (+ release steps), their configs."""

from __future__ import annotations

import pytest

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


def test_uniform_arm_keeps_the_same_share_of_every_layer():
    cfg = arm_config(Arm("griffin", 0.7), uniform=True)
    assert cfg.layer_topk == "all:0.3" and cfg.total_prune is None
    assert arm_config(Arm("griffin", 0.7)).total_prune == 0.7  # the auto budget
