import pytest
import torch

from dart.budget import allocate_budget, depth_protection
from dart.config import BudgetConfig, ConfigError

NO_DEPTH = BudgetConfig(depth_early=0.0, depth_late=0.0)


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
    a = allocate_budget(s, [n] * L, total)
    assert all(0.1 - 1e-12 <= p <= 0.9 + 1e-12 for p in a.prune_fractions)
    assert sum(p * n for p in a.prune_fractions) == pytest.approx(total * n * L, rel=1e-6)
    pruned = sum(n - k for k in a.keep_counts)
    assert abs(pruned - total * n * L) <= L  # rounding: at most half a neuron per layer (+)
    assert a.achieved_prune == pytest.approx(pruned / (n * L))
    # uniform S: depth protection prunes the first and last layers less than the middle
    u = allocate_budget([1.0] * L, [n] * L, total)
    mid = u.prune_fractions[L // 2]
    assert u.prune_fractions[0] < mid and u.prune_fractions[-1] < mid


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
