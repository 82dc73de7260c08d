import json

import pytest

from dart.core.config import (
    BudgetConfig,
    ConfigError,
    DARTConfig,
    DriftConfig,
    LayerKeep,
    parse_layer_topk,
    parse_total_prune,
    resolve_keep_counts,
)


def test_defaults():
    c = DARTConfig()
    assert c.layer_topk == "all:auto"
    assert c.total_prune is None and c.prune_target == 0.5 and c.has_auto
    assert c.budget == BudgetConfig() and c.budget.sensitivity == "residual"
    assert c.masking_step == 0 and c.release_step is None and c.ema_decay is None
    assert (c.ranking, c.strategy, c.backend, c.batch_policy, c.method) == (
        "magnitude",
        "topk",
        "gathered",
        "per_sequence",
        "dart",
    )
    assert isinstance(c.drift, DriftConfig)
    assert c.drift.window == 5 and c.drift.layers == (-1,) and c.drift.pressure_trigger == 3
    assert c.drift.retrace_tokens == 64 and c.statistic == "normalized_l2"
    assert c.budget.uniform_blend == 1.0 and c.budget.cap_margin is None
    assert c.budget.min_keep_ratio is None
    assert c.budget.blend_toward == "sensitivity"
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
        ({"total_prune": 1.0}, r"DARTConfig.total_prune: 1.0 is not a number in \[0.0, 1.0\)"),
        ({"total_prune": -0.1}, r"DARTConfig.total_prune"),
        ({"total_prune": float("nan")}, r"DARTConfig.total_prune"),
        ({"masking_step": -1}, r"DARTConfig.masking_step: -1 is not an integer >= 0"),
        ({"masking_step": 1.5}, r"DARTConfig.masking_step"),
        ({"masking_step": 3, "release_step": 3}, r"DARTConfig.release_step: 3 .*> masking_step"),
        ({"ema_decay": 1.0}, r"DARTConfig.ema_decay: 1.0 is not a number in \(0.0, 1.0\)"),
        ({"ema_decay": 0.0}, r"DARTConfig.ema_decay"),
        ({"total_prune": "half"}, r"DARTConfig.total_prune: 'half' is not a number"),
        ({"seed": "a"}, r"DARTConfig.seed"),
        ({"drift": 3}, r"DARTConfig.drift"),
        ({"budget": 3}, r"DARTConfig.budget: 3 is not a BudgetConfig or a dict"),
        ({"budget": {"depth_early_floor": 0.2}}, r"BudgetConfig: unknown keys 'depth_early_floor'"),
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


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"sensitivity": "x"}, r"BudgetConfig.sensitivity: 'x' is not one of residual, raw"),
        ({"depth_early": 1.5}, r"BudgetConfig.depth_early"),
        ({"late_floor": -1}, r"BudgetConfig.late_floor"),
        ({"prune_min": 0.5, "prune_max": 0.4}, r"BudgetConfig.prune_min: 0.5 is greater"),
        ({"prune_max": 1.0}, r"BudgetConfig.prune_max"),
    ],
)
def test_budget_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        BudgetConfig(**kwargs)
    with pytest.raises(ConfigError, match=pattern):
        DARTConfig(budget=kwargs)


@pytest.mark.parametrize(
    "old, new",
    [
        ("depth_early", "budget.depth_early"),
        ("depth_late", "budget.depth_late"),
        ("depth_early_floor", "budget.early_floor"),
        ("depth_late_floor", "budget.late_floor"),
        ("prune_min", "budget.prune_min"),
        ("prune_max", "budget.prune_max"),
        ("sensitivity", "budget.sensitivity"),
    ],
)
def test_old_flat_keys_say_where_they_moved(old, new):
    with pytest.raises(ConfigError, match=f"'{old}' is now {new}"):
        DARTConfig.from_dict({"layer_topk": "all:auto", old: 0.2})


def test_total_prune_only_with_auto():
    """total_prune is read by 'auto' items only: with a fixed spec it would be ignored."""
    with pytest.raises(ConfigError, match=r"'all:0.3' has none.*'all:0.5' keeps 50%"):
        DARTConfig(layer_topk="all:0.3", total_prune=0.5)
    with pytest.raises(ConfigError, match=r"layer_topk='all:auto' with total_prune=0.7"):
        DARTConfig.from_dict({"layer_topk": "0-1:dense,all:10", "total_prune": 0.7})
    fixed = DARTConfig(layer_topk="all:0.3")
    assert fixed.total_prune is None and fixed.prune_target is None
    assert DARTConfig(layer_topk="all:0.3,2:auto", total_prune=0.7).prune_target == 0.7
    assert DARTConfig(total_prune="0.25").total_prune == 0.25  # text, converted once
    # a method that does not prune ignores both: any sparsity is accepted with any spec
    dense = DARTConfig(method="dense", layer_topk="all:0.3", total_prune=0.0)
    assert dense.prune_target is None and dense.fixed_keep_counts([4, 6]) == [4, 6]


def test_parse_total_prune_is_the_one_check():
    assert parse_total_prune("0.5") == 0.5 and parse_total_prune(0) == 0.0
    for bad in ("x", 1.0, -0.1, float("nan"), None, True):
        with pytest.raises(ConfigError, match=r"--total-prune: .* is not a number in \[0.0, 1.0\)"):
            parse_total_prune(bad, "--total-prune")


def test_fixed_keep_counts():
    assert DARTConfig(layer_topk="all:0.5,1:dense").fixed_keep_counts([10, 8]) == [5, 8]
    assert DARTConfig().fixed_keep_counts([10, 8]) is None  # auto: decided per prompt


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
    with pytest.raises(ConfigError, match="unknown keys 'depth'.*budget"):
        DARTConfig.from_dict({"depth": 1})


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip(tmp_path, suffix):
    c = DARTConfig(
        layer_topk="all:0.5,0-2:dense,5:300,6:auto",
        total_prune=0.7,
        masking_step=2,
        release_step=400,
        ema_decay=0.9,
        ranking="product",
        drift=DriftConfig(signal="attn_probs", layers=(-1, 3), window=4),
        budget=BudgetConfig(sensitivity="raw", depth_early=0.2, prune_max=0.8),
    )
    p = tmp_path / "sub" / f"cfg{suffix}"
    c.save(p)
    assert DARTConfig.load(p) == c
    assert DARTConfig.from_dict(c.to_dict()) == c
    assert [x.name for x in p.parent.iterdir()] == [p.name]  # no temp files left
    if suffix == ".json":
        assert json.loads(p.read_text())["drift"]["layers"] == [-1, 3]
        assert json.loads(p.read_text())["budget"]["prune_max"] == 0.8


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
