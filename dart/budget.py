"""Per-layer allocation of a total pruning budget (``auto`` budgets, spec section 3 steps 2-5).

Notes:

* The budget is counted in neurons: ``sum_l p_l N_l = total_prune * sum_l N_l``. With equal
  widths this is the spec's layer formula ``p_l = B P_l / sum(P)``, ``B = total_prune * L``.
* Prune fractions are clipped to ``[prune_min, prune_max]``, so a ``total_prune`` outside that
  range (or one that the clipped layers cannot absorb) is not reachable: the result is the
  clipped allocation and :attr:`BudgetAllocation.achieved_prune` reports the real total.
* Redistribution rounds spread the remaining difference over the layers that can still move in
  the needed direction (below ``prune_max`` when more must be pruned, above ``prune_min`` when
  less), in proportion to ``P`` (weighted by width); when all such layers have ``P = 0`` the
  difference is spread uniformly over them. Whenever the spec's "layers not at a bound" rule
  reaches the target, this gives the same result.
* ``keep_l = round((1 - p_l) N_l)`` with round-half-up, clamped to ``[1, N_l]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BudgetAllocation", "allocate_budget", "auto_keep_counts", "depth_protection"]


@dataclass(frozen=True)
class BudgetAllocation:
    """Result of :func:`allocate_budget`."""

    keep_counts: list[int]
    prune_fractions: list[float]  # p_l before rounding to whole neurons
    target_prune: float
    achieved_prune: float  # fraction of all FFN neurons removed by keep_counts


def depth_protection(
    num_layers: int,
    depth_early: float = 0.3,
    depth_late: float = 0.15,
    early_floor: float = 0.25,
    late_floor: float = 0.35,
) -> Tensor:
    """``D_l`` (float64 ``[L]``): ramps from ``early_floor`` at the first layer and from
    ``late_floor`` at the last layer up to 1, with ``z = l / (L - 1)`` (``L = 1``: ``z = 0``)."""
    z = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
    d = torch.ones(num_layers, dtype=torch.float64)
    if depth_late > 0:
        late = late_floor + (1 - late_floor) * (1 - z) / depth_late
        d = torch.where(z > 1 - depth_late, late, d)
    if depth_early > 0:
        early = early_floor + (1 - early_floor) * z / depth_early
        d = torch.where(z < depth_early, early, d)
    return d


def allocate_budget(
    sensitivity: Tensor | Sequence[float],
    widths: Sequence[int],
    total_prune: float,
    depth_early: float = 0.3,
    depth_late: float = 0.15,
    early_floor: float = 0.25,
    late_floor: float = 0.35,
    prune_min: float = 0.1,
    prune_max: float = 0.9,
    rounds: int = 10,
) -> BudgetAllocation:
    """Distribute ``total_prune`` (fraction of all FFN neurons) over layers by sensitivity."""
    s = torch.as_tensor(sensitivity, dtype=torch.float64).detach().cpu().reshape(-1)
    n = torch.as_tensor(list(widths), dtype=torch.float64)
    num_layers = s.numel()
    if num_layers == 0 or n.numel() != num_layers:
        raise ValueError(
            f"sensitivity has {num_layers} layers but widths has {n.numel()} (need equal, >= 1)"
        )
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"sensitivity: non-finite values {s.tolist()}")
    if bool((n < 1).any()):
        raise ValueError(f"widths: {list(widths)} must all be >= 1")
    if not 0.0 <= total_prune < 1.0:
        raise ValueError(f"total_prune: {total_prune!r} is not in [0, 1)")
    if not 0.0 <= prune_min <= prune_max < 1.0:
        raise ValueError(f"prune_min/prune_max: {prune_min!r}/{prune_max!r} need 0<=min<=max<1")
    widths_i = [int(x) for x in widths]
    if total_prune == 0.0:
        return BudgetAllocation(widths_i, [0.0] * num_layers, 0.0, 0.0)

    span = s.max() - s.min()
    r = torch.ones_like(s) if span <= 0 else 1.0 - (s - s.min()) / span
    p_weight = r * depth_protection(num_layers, depth_early, depth_late, early_floor, late_floor)
    if p_weight.sum() <= 0:
        p_weight = torch.ones_like(s)

    budget = total_prune * n.sum()  # neurons to remove
    p = (budget * p_weight / (p_weight * n).sum()).clamp(prune_min, prune_max)
    tol = 1e-9 * float(n.sum())
    for _ in range(rounds):
        diff = budget - (p * n).sum()
        if abs(float(diff)) <= tol:
            break
        free = p < prune_max if diff > 0 else p > prune_min
        if not bool(free.any()):
            break
        wsum = (p_weight * n)[free].sum()
        if wsum > 0:
            delta = diff * p_weight / wsum
        else:
            delta = diff / n[free].sum() * torch.ones_like(p)
        p = torch.where(free, p + delta, p).clamp(prune_min, prune_max)

    keep = [
        min(max(math.floor((1.0 - float(pl)) * nl + 0.5), 1), nl)
        for pl, nl in zip(p.tolist(), widths_i, strict=True)
    ]
    achieved = 1.0 - sum(keep) / sum(widths_i)
    return BudgetAllocation(keep, [float(x) for x in p.tolist()], float(total_prune), achieved)


def auto_keep_counts(
    sensitivity: Tensor | Sequence[float],
    widths: Sequence[int],
    total_prune: float,
    depth_early: float = 0.3,
    depth_late: float = 0.15,
    early_floor: float = 0.25,
    late_floor: float = 0.35,
    prune_min: float = 0.1,
    prune_max: float = 0.9,
    rounds: int = 10,
) -> list[int]:
    """Per-layer keep counts of :func:`allocate_budget` (use that for the prune fractions)."""
    return allocate_budget(
        sensitivity,
        widths,
        total_prune,
        depth_early,
        depth_late,
        early_floor,
        late_floor,
        prune_min,
        prune_max,
        rounds,
    ).keep_counts
