import json

import pytest

from dart.config import (
    ConfigError,
    DARTConfig,
    DriftConfig,
    LayerKeep,
    parse_layer_topk,
    resolve_keep_counts,
)


def test_defaults():
    c = DARTConfig()
    assert c.layer_topk == "all:auto"
    assert c.total_prune == 0.5
    assert c.masking_step == 0 and c.release_step is None and c.ema_decay is None
    assert (c.ranking, c.strategy, c.backend, c.batch_policy, c.method) == (
        "magnitude",
        "topk",
        "gathered",
        "per_sequence",
        "dart",
    )
    assert isinstance(c.drift, DriftConfig)
    assert c.drift.window == 5 and c.drift.layers == (-1,) and c.drift.pressure_trigger == 2
    assert c.drift.sigma_scale == 0.1 and c.drift.threshold_floor == 0.1


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"ranking": "foo"}, r"DARTConfig.ranking: 'foo' is not one of magnitude, max, mean"),
        ({"strategy": "x"}, r"DARTConfig.strategy: 'x' is not one of topk, auto"),
        ({"backend": "x"}, r"DARTConfig.backend: 'x' is not one of masked, gathered, compact"),
        ({"batch_policy": "x"}, r"DARTConfig.batch_policy: 'x' is not one of per_sequence"),
        ({"method": "x"}, r"DARTConfig.method: 'x' is not one of dense, static, griffin"),
        ({"proxy_source": "x"}, r"DARTConfig.proxy_source: 'x' is not one of embedding"),
        ({"sensitivity": "x"}, r"DARTConfig.sensitivity: 'x' is not one of residual, raw"),
        ({"total_prune": 1.0}, r"DARTConfig.total_prune: 1.0 is not a number in \[0.0, 1.0\)"),
        ({"total_prune": -0.1}, r"DARTConfig.total_prune"),
        ({"total_prune": float("nan")}, r"DARTConfig.total_prune"),
        ({"masking_step": -1}, r"DARTConfig.masking_step: -1 is not an integer >= 0"),
        ({"masking_step": 1.5}, r"DARTConfig.masking_step"),
        ({"masking_step": 3, "release_step": 3}, r"DARTConfig.release_step: 3 .*> masking_step"),
        ({"ema_decay": 1.0}, r"DARTConfig.ema_decay: 1.0 is not a number in \(0.0, 1.0\)"),
        ({"ema_decay": 0.0}, r"DARTConfig.ema_decay"),
        ({"depth_early": 1.5}, r"DARTConfig.depth_early"),
        ({"depth_late_floor": -1}, r"DARTConfig.depth_late_floor"),
        ({"prune_min": 0.5, "prune_max": 0.4}, r"DARTConfig.prune_min: 0.5 is greater"),
        ({"prune_max": 1.0}, r"DARTConfig.prune_max"),
        ({"seed": "a"}, r"DARTConfig.seed"),
        ({"calibration_text": 3}, r"DARTConfig.calibration_text"),
        ({"drift": 3}, r"DARTConfig.drift"),
        ({"layer_topk": "all:63.29"}, r"63.29.*not an integer"),
        ({"layer_topk": ""}, r"DARTConfig.layer_topk"),
        ({"layer_topk": "all"}, r"not of the form 'target:value'"),
        ({"layer_topk": "x:0.5"}, r"target 'x'"),
        ({"layer_topk": "3-1:0.5"}, r"0 <= a <= b"),
        ({"layer_topk": "all:0"}, r"keep fraction"),
        ({"layer_topk": "all:foo"}, r"'foo'"),
    ],
)
def test_dart_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DARTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"signal": "x"}, r"DriftConfig.signal: 'x' is not one of attn_output, attn_probs"),
        ({"window": 0}, r"DriftConfig.window: 0 is not an integer >= 1"),
        ({"layers": ()}, r"DriftConfig.layers"),
        ({"layers": ("a",)}, r"DriftConfig.layers"),
        ({"sigma_scale": -1.0}, r"DriftConfig.sigma_scale"),
        ({"threshold_floor": -0.1}, r"DriftConfig.threshold_floor"),
        ({"pressure_trigger": 0}, r"DriftConfig.pressure_trigger"),
        ({"num_buckets": 1}, r"DriftConfig.num_buckets"),
        ({"min_windows": 0}, r"DriftConfig.min_windows"),
        ({"enabled": "yes"}, r"DriftConfig.enabled"),
    ],
)
def test_drift_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DriftConfig(**kwargs)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_drift_dict_conversion_and_list_layers():
    c = DARTConfig(drift={"window": 7, "layers": [-1, -2], "signal": "attn_probs"})
    assert isinstance(c.drift, DriftConfig)
    assert c.drift.window == 7 and c.drift.layers == (-1, -2)
    with pytest.raises(ConfigError, match="unknown keys 'bogus'"):
        DARTConfig(drift={"bogus": 1})


def test_from_dict_unknown_keys():
    with pytest.raises(ConfigError, match="unknown keys 'a', 'zz'"):
        DARTConfig.from_dict({"zz": 1, "a": 2, "total_prune": 0.3})


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip(tmp_path, suffix):
    c = DARTConfig(
        layer_topk="all:0.5,0-2:dense,5:300",
        total_prune=0.7,
        masking_step=2,
        release_step=400,
        ema_decay=0.9,
        ranking="product",
        drift=DriftConfig(signal="attn_probs", layers=(-1, 3), window=4),
        calibration_text="hello",
    )
    p = tmp_path / "sub" / f"cfg{suffix}"
    c.save(p)
    assert DARTConfig.load(p) == c
    assert DARTConfig.from_dict(c.to_dict()) == c
    assert [x.name for x in p.parent.iterdir()] == [p.name]  # no temp files left
    if suffix == ".json":
        assert json.loads(p.read_text())["drift"]["layers"] == [-1, 3]


def test_bad_suffix(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        DARTConfig().save(tmp_path / "c.txt")


# ---------------------------------------------------------------- layer spec grammar


def test_spec_all_fraction_and_default_dense():
    assert parse_layer_topk("all:0.5", 3, [10] * 3) == [LayerKeep("fraction", 0.5)] * 3
    keeps = parse_layer_topk("1:0.5", 3, [10] * 3)
    assert keeps == [LayerKeep("dense"), LayerKeep("fraction", 0.5), LayerKeep("dense")]


def test_spec_ranges_and_overrides():
    keeps = parse_layer_topk("all:0.3, 1-3:auto, 2:dense, 4:7", 6, [10] * 6)
    assert [k.kind for k in keeps] == ["fraction", "auto", "dense", "auto", "count", "fraction"]
    assert keeps[4].value == 7
    assert resolve_keep_counts(keeps, [10] * 6, auto_counts=[1, 2, 3, 4, 5, 6]) == [
        3,
        2,
        10,
        4,
        7,
        3,
    ]


def test_spec_one_means_keep_all_and_count_values():
    assert parse_layer_topk("all:1", 2, [8, 8]) == [LayerKeep("fraction", 1.0)] * 2
    assert resolve_keep_counts(parse_layer_topk("all:1", 2, [8, 8]), [8, 8]) == [8, 8]
    assert parse_layer_topk("all:63", 1, [100]) == [LayerKeep("count", 63)]
    assert parse_layer_topk("all:63.0", 1, [100]) == [LayerKeep("count", 63)]


def test_spec_rejects():
    with pytest.raises(ConfigError, match="63.29"):
        parse_layer_topk("all:63.29", 2, [100, 100])
    with pytest.raises(ConfigError, match="layer 5 .*out of range.*4 layers"):
        parse_layer_topk("5:0.5", 4, [10] * 4)
    with pytest.raises(ConfigError, match="layer 9 .*out of range"):
        parse_layer_topk("2-9:0.5", 4, [10] * 4)
    with pytest.raises(ConfigError, match="count 11 .*exceeds the width 10 of layer 1"):
        parse_layer_topk("all:11", 2, [20, 10])
    with pytest.raises(ConfigError, match="widths"):
        parse_layer_topk("all:0.5", 2, [10])


def test_resolve_keep_counts_rounding_and_auto_required():
    keeps = parse_layer_topk("all:0.01,1:0.25", 2, [10, 10])
    assert resolve_keep_counts(keeps, [10, 10]) == [1, 3]  # clamped to >= 1; 2.5 rounds up
    with pytest.raises(ConfigError, match="auto"):
        resolve_keep_counts(parse_layer_topk("all:auto", 2, [10, 10]), [10, 10])
    assert resolve_keep_counts(parse_layer_topk("all:dense", 2, [4, 6]), [4, 6]) == [4, 6]
