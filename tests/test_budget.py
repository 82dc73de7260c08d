import math

import pytest
import torch

from dart.core.budget import allocate_budget, allocate_budgets, depth_protection, max_keep_counts
from dart.core.config import BudgetConfig, ConfigError

# The spec's min-max budget (no guard): the default was this until issue 12's study chose a
# half blend (toward the sensitivity-only budget); the arithmetic tests pin it down explicitly.
MINMAX = BudgetConfig(normalize="minmax", cap_margin=None, uniform_blend=0.0)
NO_DEPTH = BudgetConfig(depth_early=0.0, depth_late=0.0, uniform_blend=0.0)


def test_depth_protection_values():
    d = depth_protection(11)  # z = 0, 0.1, ..., 1
    z = torch.arange(11, dtype=torch.float64) / 10
    exp = torch.ones(11, dtype=torch.float64)
    for i, zi in enumerate(z.tolist()):
        if zi < 0.3:
            exp[i] = 0.25 + 0.75 * zi / 0.3
        elif zi > 0.85:
            exp[i] = 0.35 + 0.65 * (1 - zi) / 0.15
    torch.testing.assert_close(d, exp)
    assert d[0] == 0.25 and d[-1] == 0.35
    assert depth_protection(1).tolist() == [0.25]
    wide = depth_protection(11, BudgetConfig(depth_early=0.5, early_floor=0.0))
    assert wide[0] == 0.0 and wide[4] == pytest.approx(0.8) and wide[5] == 1.0


def test_uniform_s_no_depth_gives_equal_fractions():
    a = allocate_budget([0.3] * 8, [100] * 8, 0.5, NO_DEPTH)
    assert a.prune_fractions == pytest.approx([0.5] * 8)
    assert a.keep_counts == [50] * 8
    assert a.achieved_prune == pytest.approx(0.5)


def test_hand_computed_example():
    # L = 3, z = 0, .5, 1; we = wl = 0 -> D = 1. S = [0, 1, 0.5] -> R = [1, 0, 0.5]
    # B = 0.4 * 3 = 1.2; p = 1.2 * R / 1.5 = [0.8, 0, 0.4] -> clip [0.8, 0.1, 0.4] (sum 1.3)
    # diff = -0.1 over layers above prune_min (0 and 2) in proportion to P: -0.1*[1, .5]/1.5
    a = allocate_budget([0.0, 1.0, 0.5], [100] * 3, 0.4, NO_DEPTH)
    exp = [0.8 - 0.1 / 1.5, 0.1, 0.4 - 0.05 / 1.5]
    assert a.prune_fractions == pytest.approx(exp)
    assert sum(a.prune_fractions) == pytest.approx(1.2)
    assert a.keep_counts == [round((1 - p) * 100) for p in exp]


@pytest.mark.parametrize("total", [0.3, 0.5, 0.7])
def test_budget_met_bounds_respected_depth_protection(total):
    torch.manual_seed(0)
    L, n = 30, 1536
    s = torch.rand(L) * 0.1 + 0.5  # nearly uniform sensitivity
    ramp = BudgetConfig(uniform_blend=0.0)  # the spec's budget: the depth ramp in full
    a = allocate_budget(s, [n] * L, total, ramp)
    assert all(0.1 - 1e-12 <= p <= 0.9 + 1e-12 for p in a.prune_fractions)
    assert sum(p * n for p in a.prune_fractions) == pytest.approx(total * n * L, rel=1e-6)
    pruned = sum(n - k for k in a.keep_counts)
    assert abs(pruned - total * n * L) <= L  # rounding: at most half a neuron per layer (+)
    assert a.achieved_prune == pytest.approx(pruned / (n * L))
    # uniform S: depth protection prunes the first and last layers less than the middle
    u = allocate_budget([1.0] * L, [n] * L, total, ramp)
    mid = u.prune_fractions[L // 2]
    assert u.prune_fractions[0] < mid and u.prune_fractions[-1] < mid
    # the default (no ramp): equal sensitivities, equal fractions
    flat = allocate_budget([1.0] * L, [n] * L, total)
    assert flat.prune_fractions == pytest.approx([total] * L)


def test_more_sensitive_layers_pruned_less():
    s = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.5, 0.5, 0.5]
    a = allocate_budget(s, [64] * 10, 0.5, NO_DEPTH)
    p = a.prune_fractions
    assert p[0] > p[1] > p[2] > p[3] > p[4] >= p[5]
    assert p[5] == pytest.approx(0.1)


def test_unequal_widths_budget_in_neurons():
    widths = [100, 400, 100, 400]
    a = allocate_budget([0.1, 0.5, 0.3, 0.2], widths, 0.5, NO_DEPTH)
    assert sum(p * w for p, w in zip(a.prune_fractions, widths, strict=True)) == pytest.approx(
        0.5 * sum(widths)
    )
    # equal S with unequal widths -> equal fractions (weights cancel)
    b = allocate_budget([1.0] * 4, widths, 0.5, NO_DEPTH)
    assert b.prune_fractions == pytest.approx([0.5] * 4)
    assert b.keep_counts == [50, 200, 50, 200]


def test_edges():
    assert allocate_budget([0.1, 0.2], [10, 20], 0.0).keep_counts == [10, 20]
    a = allocate_budget([0.1, 0.2, 0.3], [10] * 3, 0.05)  # below prune_min: unreachable
    assert all(p == pytest.approx(0.1) for p in a.prune_fractions)
    assert a.achieved_prune == pytest.approx(0.1) and a.target_prune == 0.05
    a = allocate_budget([0.1, 0.2, 0.3], [10] * 3, 0.95)  # above prune_max: clipped
    assert all(p == pytest.approx(0.9) for p in a.prune_fractions)
    one = allocate_budget([0.7], [50], 0.5)
    assert one.prune_fractions == pytest.approx([0.5]) and one.keep_counts == [25]
    assert allocate_budget([0.1, 0.2], [1, 1], 0.5).keep_counts == [1, 1]  # at least one neuron
    # all R * D zero except... -> S identical and a zero-width protection still finite
    z = allocate_budget([1.0, 1.0], [10, 10], 0.5, BudgetConfig(early_floor=0.0, late_floor=0.0))
    assert all(torch.isfinite(torch.tensor(z.prune_fractions)))
    with pytest.raises(ValueError, match="non-finite"):
        allocate_budget([float("nan"), 1.0], [10, 10], 0.5)
    with pytest.raises(ValueError, match="widths"):
        allocate_budget([1.0, 1.0], [10], 0.5)
    with pytest.raises(ConfigError, match=r"total_prune: 1.0 is not a number in \[0.0, 1.0\)"):
        allocate_budget([1.0, 1.0], [10, 10], 1.0)


def test_budget_bounds_come_from_the_config():
    a = allocate_budget([0.0, 1.0, 0.5], [100] * 3, 0.4, BudgetConfig(prune_min=0.2, prune_max=0.5))
    assert all(0.2 - 1e-12 <= p <= 0.5 + 1e-12 for p in a.prune_fractions)
    assert sum(a.prune_fractions) == pytest.approx(1.2)


# -- guards against starving a layer (BudgetConfig.normalize / cap_margin / uniform_blend) ------


def outlier_sensitivities(num_layers: int = 30, seed: int = 0) -> torch.Tensor:
    """Like SmolLM2-135M's residual sensitivities: layer 0 at 13-16, the rest 0.003-0.22."""
    g = torch.Generator().manual_seed(seed)
    s = 0.003 + 0.217 * torch.rand(num_layers, generator=g, dtype=torch.float64)
    s[0] = 14.5
    return s


@pytest.mark.parametrize(
    ("field", "registry"), [("normalize", "NORMALIZATIONS"), ("blend_toward", "BLEND_TARGETS")]
)
def test_budget_config_accepts_exactly_the_registry(field, registry):
    from dart.core import budget

    for name in getattr(budget, registry):
        assert getattr(BudgetConfig(**{field: name}), field) == name
    with pytest.raises(
        ConfigError, match=f"BudgetConfig.{field}: 'nope'.*" + ".*".join(getattr(budget, registry))
    ):
        BudgetConfig(**{field: "nope"})


def test_minmax_budget_starves_the_middle_of_an_outlier_model():
    """The issue-12 failure the guards fix: min-max squashes every layer but 0 to R ~ 1, so the
    depth ramp alone decides and the middle layers lose ~86% of their neurons at 70%. The
    default (the sensitivity-only budget, no ramp) keeps them near total_prune and layer 0 at
    the lower bound."""
    a = allocate_budget(outlier_sensitivities(), [1536] * 30, 0.7, MINMAX)
    mid = a.prune_fractions[9:25]
    assert min(mid) > 0.85 and max(mid) - min(mid) < 0.01
    default = allocate_budget(outlier_sensitivities(), [1536] * 30, 0.7)
    assert BudgetConfig().uniform_blend == 1.0 and BudgetConfig().blend_toward == "sensitivity"
    assert max(default.prune_fractions[1:]) < 0.73 and default.prune_fractions[0] == 0.1


@pytest.mark.parametrize("normalize", ["rank", "winsorized"])
def test_robust_normalisation_spreads_the_budget_by_sensitivity(normalize):
    s = outlier_sensitivities()
    cfg = BudgetConfig(normalize=normalize, depth_early=0.0, depth_late=0.0, uniform_blend=0.0)
    a = allocate_budget(s, [1536] * 30, 0.5, cfg)
    p = torch.tensor(a.prune_fractions)
    rest = s[1:]
    # layer 0 stays the most protected; among the others, more sensitive -> pruned less
    assert p[0] == p.min()
    hi, lo = int(rest.argmax()) + 1, int(rest.argmin()) + 1
    assert p[hi] < p[lo] - 0.3
    minmax = torch.tensor(allocate_budget(s, [1536] * 30, 0.5, NO_DEPTH).prune_fractions)
    assert p[1:].std() > 5 * minmax[1:].std()  # min-max: all the same but layer 0


def test_rank_and_winsorized_hand_computed():
    from dart.core.budget import NORMALIZATIONS

    s = torch.tensor([3.0, 1.0, 1.0, 2.0, 100.0], dtype=torch.float64)
    # below + (ties - 1) / 2 = [3, 0.5, 0.5, 2, 4] (the tied 1s share 0.5); min-max: -0.5, / 3.5
    torch.testing.assert_close(
        NORMALIZATIONS["rank"](s), torch.tensor([2.5, 0, 0, 1.5, 3.5], dtype=torch.float64) / 3.5
    )
    # Q1 = 1, Q3 = 3, IQR = 2: fences [-2, 6]; 100 -> 6; min-max over [1, 6]
    torch.testing.assert_close(
        NORMALIZATIONS["winsorized"](s),
        torch.tensor([0.4, 0.0, 0.0, 0.2, 1.0], dtype=torch.float64),
    )
    assert NORMALIZATIONS["rank"](torch.ones(4, dtype=torch.float64)).tolist() == [0.0] * 4


@pytest.mark.parametrize("total", [0.5, 0.7])
def test_cap_margin_bounds_every_layer(total):
    s = outlier_sensitivities()
    a = allocate_budget(s, [1536] * 30, total, BudgetConfig(cap_margin=0.1))
    assert max(a.prune_fractions) <= total + 0.1 + 1e-12
    assert sum(a.prune_fractions) == pytest.approx(30 * total)
    assert a.achieved_prune == pytest.approx(total, abs=1 / 1536)
    # a margin of 0 is the uniform budget (every layer must prune exactly total_prune)
    z = allocate_budget(s, [1536] * 30, total, BudgetConfig(cap_margin=0.0))
    assert z.prune_fractions == pytest.approx([total] * 30)


@pytest.mark.parametrize("total", [0.5, 0.7])
def test_min_keep_ratio_keeps_a_share_of_the_mean_in_every_layer(total):
    """No layer keeps less than c (1 - total) of its neurons: the cap scales with the sparsity
    (an absolute cap_margin does not), and the total is still met."""
    s = outlier_sensitivities()
    c = 0.9
    a = allocate_budget(s, [1536] * 30, total, BudgetConfig(min_keep_ratio=c, uniform_blend=0.0))
    free = allocate_budget(s, [1536] * 30, total, BudgetConfig(uniform_blend=0.0))
    upper = min(0.9, 1 - c * (1 - total))
    assert max(free.prune_fractions) > upper + 0.01  # the cap binds on this S
    assert max(a.prune_fractions) == pytest.approx(upper)
    assert sum(a.prune_fractions) == pytest.approx(30 * total)
    # the floor on kept neurons, after rounding to whole neurons
    assert min(a.keep_counts) >= math.floor(c * (1 - total) * 1536)
    # a ratio of 1 is the uniform budget; of 0, no cap beyond prune_max
    one = allocate_budget(s, [1536] * 30, total, BudgetConfig(min_keep_ratio=1.0))
    assert one.prune_fractions == pytest.approx([total] * 30)
    zero = allocate_budget(s, [1536] * 30, total, BudgetConfig(min_keep_ratio=0.0))
    assert zero.prune_fractions == pytest.approx(
        allocate_budget(s, [1536] * 30, total).prune_fractions
    )


def test_min_keep_ratio_and_cap_margin_take_the_tighter_bound():
    s, widths = outlier_sensitivities(), [1536] * 30
    both = BudgetConfig(min_keep_ratio=0.5, cap_margin=0.05, uniform_blend=0.0)
    # at 50%: the margin caps at 0.55, the ratio at 0.75
    assert max(allocate_budget(s, widths, 0.5, both).prune_fractions) == pytest.approx(0.55)
    loose = BudgetConfig(min_keep_ratio=0.9, cap_margin=0.3, uniform_blend=0.0)
    # at 50%: the ratio caps at 0.55, the margin at 0.8
    assert max(allocate_budget(s, widths, 0.5, loose).prune_fractions) == pytest.approx(0.55)


def test_uniform_blend_interpolates_toward_uniform():
    s, widths = outlier_sensitivities(), [1536] * 30
    auto = allocate_budget(s, widths, 0.7, MINMAX)
    half = allocate_budget(s, widths, 0.7, BudgetConfig(uniform_blend=0.5, blend_toward="uniform"))
    full = allocate_budget(s, widths, 0.7, BudgetConfig(uniform_blend=1.0, blend_toward="uniform"))
    assert full.prune_fractions == pytest.approx([0.7] * 30)
    exp = [0.5 * p + 0.35 for p in auto.prune_fractions]
    assert half.prune_fractions == pytest.approx(exp)


def test_blend_toward_sensitivity_keeps_protected_layers_protected():
    """Blending toward the sensitivity-only budget flattens the depth ramp but leaves the outlier
    first layer (R = 0) at the lower bound, where the uniform blend prunes it."""
    s, widths = outlier_sensitivities(), [1536] * 30
    auto = allocate_budget(s, widths, 0.5, MINMAX)
    uniform = allocate_budget(
        s, widths, 0.5, BudgetConfig(uniform_blend=0.5, blend_toward="uniform")
    )
    toward = BudgetConfig(uniform_blend=0.5, blend_toward="sensitivity")
    sens = allocate_budget(s, widths, 0.5, toward)
    flat_cfg = BudgetConfig(uniform_blend=1.0, blend_toward="sensitivity")
    flat = allocate_budget(s, widths, 0.5, flat_cfg)
    assert auto.prune_fractions[0] == pytest.approx(0.1) == sens.prune_fractions[0]
    assert uniform.prune_fractions[0] == pytest.approx(0.3)
    # full blend: R alone, no depth ramp (S is flat after layer 0, so are these fractions)
    rest = flat.prune_fractions[1:]
    assert max(rest) - min(rest) < 0.05 and flat.prune_fractions[0] == pytest.approx(0.1)
    pairs = zip(auto.prune_fractions, flat.prune_fractions, strict=True)
    exp = [0.5 * a + 0.5 * f for a, f in pairs]
    assert sens.prune_fractions == pytest.approx(exp)
    assert max(sens.prune_fractions) < max(auto.prune_fractions)  # the middle is spared
    assert sens.achieved_prune == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("normalize", ["minmax", "rank", "winsorized"])
@pytest.mark.parametrize("toward", ["uniform", "sensitivity"])
@pytest.mark.parametrize(
    ("cap_margin", "min_keep_ratio"), [(None, None), (0.05, None), (0.15, None), (None, 0.6)]
)
@pytest.mark.parametrize("blend", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("total", [0.3, 0.5, 0.7])
def test_guarded_budgets_meet_total_prune_in_neurons(
    normalize, toward, cap_margin, min_keep_ratio, blend, total
):
    s = outlier_sensitivities(12, seed=3)
    widths = [64, 96, 128, 64, 256, 64, 100, 128, 64, 96, 200, 64]  # unequal widths
    cfg = BudgetConfig(
        normalize=normalize,
        cap_margin=cap_margin,
        min_keep_ratio=min_keep_ratio,
        uniform_blend=blend,
        blend_toward=toward,
    )
    a = allocate_budget(s, widths, total, cfg)
    pruned = sum(p * n for p, n in zip(a.prune_fractions, widths, strict=True))
    assert pruned == pytest.approx(total * sum(widths), rel=1e-6)
    removed = sum(n - k for n, k in zip(widths, a.keep_counts, strict=True))
    assert abs(removed - total * sum(widths)) <= len(widths) / 2 + 1e-9
    upper = 0.9 if cap_margin is None else min(0.9, total + cap_margin)
    if min_keep_ratio is not None:
        upper = min(upper, 1 - min_keep_ratio * (1 - total))
    assert all(0.1 - 1e-12 <= p <= upper + 1e-12 for p in a.prune_fractions)


@pytest.mark.parametrize(
    "field, value",
    [
        ("normalize", "zscore"),
        ("cap_margin", -0.1),
        ("cap_margin", 2.0),
        ("min_keep_ratio", -0.1),
        ("min_keep_ratio", 1.5),
        ("uniform_blend", 1.5),
        ("blend_toward", "flat"),
    ],
)
def test_guard_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"BudgetConfig.{field}"):
        BudgetConfig(**{field: value})


@pytest.mark.parametrize(
    "budget",
    [
        BudgetConfig(),
        BudgetConfig(prune_min=0.0),
        BudgetConfig(prune_min=0.3, cap_margin=0.1),
        BudgetConfig(prune_min=0.3, min_keep_ratio=0.8),
        BudgetConfig(uniform_blend=0.5, normalize="rank"),
        BudgetConfig(prune_min=0.6, prune_max=0.7),
    ],
)
@pytest.mark.parametrize("total", [0.0, 0.05, 0.5, 0.9])
def test_max_keep_counts_bound_every_allocation(budget, total):
    """kmax (the padded width of per-row budgets) is never exceeded, whatever S is."""
    widths = [64, 100, 37, 512, 64, 7]
    kmax = max_keep_counts(widths, total, budget)
    assert all(1 <= k <= n for k, n in zip(kmax, widths, strict=True))
    g = torch.Generator().manual_seed(0)
    cases = [torch.rand(6, generator=g) ** 4 * 10 for _ in range(50)] + [torch.zeros(6)]
    cases += [torch.tensor([100.0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 0, 0, 100.0])]
    for s in cases:
        keep = allocate_budget(s, widths, total, budget).keep_counts
        assert all(k <= m for k, m in zip(keep, kmax, strict=True)), (s, keep, kmax)
    if total == 0.0:
        assert kmax == widths


def test_allocate_budgets_is_one_allocation_per_row():
    s = torch.tensor([[0.1, 5.0, 0.2, 0.3], [2.0, 0.1, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0]])
    widths = [40, 40, 80, 40]
    rows = allocate_budgets(s, widths, 0.5)
    assert [r.keep_counts for r in rows] == [
        allocate_budget(row, widths, 0.5).keep_counts for row in s
    ]
    assert rows[0].keep_counts != rows[1].keep_counts
    with pytest.raises(ValueError, match="\\[B, L\\]"):
        allocate_budgets(s[0], widths, 0.5)
