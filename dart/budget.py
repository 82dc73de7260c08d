"""Per-layer allocation of a total pruning budget (``auto`` budgets, spec section 3 steps 2-5).

Notes:

* The budget is counted in neurons: ``sum_l p_l N_l = total_prune * sum_l N_l``. With equal
  widths this is the spec's layer formula ``p_l = B P_l / sum(P)``, ``B = total_prune * L``.
* The settings (depth protection, bounds) are a :class:`~dart.config.BudgetConfig`.
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

from .config import BudgetConfig, parse_total_prune

__all__ = ["BudgetAllocation", "allocate_budget", "depth_protection"]


@dataclass(frozen=True)
class BudgetAllocation:
    """Result of :func:`allocate_budget`."""

    keep_counts: list[int]
    prune_fractions: list[float]  # p_l before rounding to whole neurons
    target_prune: float
    achieved_prune: float  # fraction of all FFN neurons removed by keep_counts


def depth_protection(num_layers: int, budget: BudgetConfig | None = None) -> Tensor:
    """``D_l`` (float64 ``[L]``): ramps from ``early_floor`` at the first layer and from
    ``late_floor`` at the last layer up to 1, with ``z = l / (L - 1)`` (``L = 1``: ``z = 0``)."""
    b = budget or BudgetConfig()
    z = torch.arange(num_layers, dtype=torch.float64) / max(num_layers - 1, 1)
    d = torch.ones(num_layers, dtype=torch.float64)
    if b.depth_late > 0:
        late = b.late_floor + (1 - b.late_floor) * (1 - z) / b.depth_late
        d = torch.where(z > 1 - b.depth_late, late, d)
    if b.depth_early > 0:
        early = b.early_floor + (1 - b.early_floor) * z / b.depth_early
        d = torch.where(z < b.depth_early, early, d)
    return d


def allocate_budget(
    sensitivity: Tensor | Sequence[float],
    widths: Sequence[int],
    total_prune: float,
    budget: BudgetConfig | None = None,
    rounds: int = 10,
) -> BudgetAllocation:
    """Distribute ``total_prune`` (fraction of all FFN neurons) over layers by sensitivity,
    as ``budget`` says (default :class:`~dart.config.BudgetConfig`)."""
    b = budget or BudgetConfig()
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
    total_prune = parse_total_prune(total_prune, "total_prune")
    widths_i = [int(x) for x in widths]
    if total_prune == 0.0:
        return BudgetAllocation(widths_i, [0.0] * num_layers, 0.0, 0.0)

    span = s.max() - s.min()
    r = torch.ones_like(s) if span <= 0 else 1.0 - (s - s.min()) / span
    p_weight = r * depth_protection(num_layers, b)
    if p_weight.sum() <= 0:
        p_weight = torch.ones_like(s)

    budget_neurons = total_prune * n.sum()  # neurons to remove
    p = (budget_neurons * p_weight / (p_weight * n).sum()).clamp(b.prune_min, b.prune_max)
    tol = 1e-9 * float(n.sum())
    for _ in range(rounds):
        diff = budget_neurons - (p * n).sum()
        if abs(float(diff)) <= tol:
            break
        free = p < b.prune_max if diff > 0 else p > b.prune_min
        if not bool(free.any()):
            break
        wsum = (p_weight * n)[free].sum()
        if wsum > 0:
            delta = diff * p_weight / wsum
        else:
            delta = diff / n[free].sum() * torch.ones_like(p)
        p = torch.where(free, p + delta, p).clamp(b.prune_min, b.prune_max)

    keep = [
        min(max(math.floor((1.0 - float(pl)) * nl + 0.5), 1), nl)
        for pl, nl in zip(p.tolist(), widths_i, strict=True)
    ]
    achieved = 1.0 - sum(keep) / sum(widths_i)
    return BudgetAllocation(keep, [float(x) for x in p.tolist()], float(total_prune), achieved)
