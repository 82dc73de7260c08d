"""Per-layer allocation of a total pruning budget (``auto`` budgets, spec section 3 steps 2-5).

Notes:

* The budget is counted in neurons: ``sum_l p_l N_l = total_prune * sum_l N_l``. With equal
  widths this is the spec's layer formula ``p_l = B P_l / sum(P)``, ``B = total_prune * L``.
* The settings (depth protection, bounds, guards against starving a layer) are a
  :class:`~dart.core.config.BudgetConfig`.
* ``R = 1 - norm(S)`` with ``norm`` one of :data:`NORMALIZATIONS` (``BudgetConfig.normalize``).
* Prune fractions are clipped to ``[prune_min, upper]`` with ``upper = prune_max``, lowered to
  ``total_prune + cap_margin`` when ``cap_margin`` is set and to
  ``1 - min_keep_ratio (1 - total_prune)`` when ``min_keep_ratio`` is set (no layer keeps less
  than that share of the mean kept fraction; ``upper >= total_prune`` either way); a
  ``total_prune`` outside that range (or one that the clipped layers cannot absorb) is not
  reachable: the result is the clipped allocation and
  :attr:`BudgetAllocation.achieved_prune` reports the real total.
* Redistribution rounds spread the remaining difference over the layers that can still move in
  the needed direction (below ``prune_max`` when more must be pruned, above ``prune_min`` when
  less), in proportion to ``P`` (weighted by width); when all such layers have ``P = 0`` the
  difference is spread uniformly over them. Whenever the spec's "layers not at a bound" rule
  reaches the target, this gives the same result.
* ``uniform_blend = a`` then gives ``(1 - a) p_l + a t_l`` with ``t`` one of
  :data:`BLEND_TARGETS` (``BudgetConfig.blend_toward``): ``uniform``, ``total_prune`` in every
  layer (clipped the same way), or ``sensitivity``, the same allocation without the depth ramp
  (``R`` alone), so a layer the sensitivity protects stays protected. Both terms remove the same
  number of neurons, so the blend does too.
* ``keep_l = round((1 - p_l) N_l)`` with round-half-up, clamped to ``[1, N_l]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BudgetConfig, parse_total_prune

__all__ = [
    "BLEND_TARGETS",
    "NORMALIZATIONS",
    "BudgetAllocation",
    "allocate_budget",
    "allocate_budgets",
    "depth_protection",
    "max_keep_counts",
]


@dataclass(frozen=True)
class BudgetAllocation:
    """Result of :func:`allocate_budget`."""

    keep_counts: list[int]
    prune_fractions: list[float]  # p_l before rounding to whole neurons
    target_prune: float
    achieved_prune: float  # fraction of all FFN neurons removed by keep_counts


def _minmax(s: Tensor) -> Tensor:
    span = s.max() - s.min()
    return torch.zeros_like(s) if span <= 0 else (s - s.min()) / span


def _rank(s: Tensor) -> Tensor:
    """Ranks scaled to [0, 1] (ties share their mean rank): only the order of S counts."""
    below = (s[None, :] < s[:, None]).sum(1).double()
    ties = (s[None, :] == s[:, None]).sum(1).double()
    return _minmax(below + (ties - 1) / 2)


def _winsorized(s: Tensor) -> Tensor:
    """Min-max of S clipped to Tukey's fences, so one outlier layer cannot squash the rest."""
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype)).tolist()
    iqr = q3 - q1
    return _minmax(s.clamp(q1 - 1.5 * iqr, q3 + 1.5 * iqr))


# BudgetConfig.normalize -> S (float64 [L]) normalised to [0, 1] (most sensitive layer: 1)
NORMALIZATIONS = {"minmax": _minmax, "rank": _rank, "winsorized": _winsorized}


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


def _bounds(total_prune: float, b: BudgetConfig) -> tuple[float, float]:
    """``(lower, upper)``: the range every layer's prune fraction is clipped to."""
    upper = b.prune_max if b.cap_margin is None else min(b.prune_max, total_prune + b.cap_margin)
    if b.min_keep_ratio is not None:
        # relative to the mean kept share: an absolute margin that is mild at 50% (keep 40% of
        # 50%) starves a layer at 70% (keep 20% of 30%); a ratio treats the two alike
        upper = min(upper, 1.0 - b.min_keep_ratio * (1.0 - total_prune))
    return min(b.prune_min, upper), upper


def _keep(prune: float, width: int) -> int:
    """Neurons kept at prune fraction ``prune``: round-half-up, clamped to ``[1, width]``."""
    return min(max(math.floor((1.0 - float(prune)) * width + 0.5), 1), width)


def max_keep_counts(
    widths: Sequence[int], total_prune: float, budget: BudgetConfig | None = None
) -> list[int]:
    """The most neurons :func:`allocate_budget` can keep in each layer for this ``total_prune``
    and ``budget``, whatever the sensitivities (every fraction it returns is at least the lower
    bound). Per-row budgets size their padded index tensors ``[B, kmax]`` with it, so the shapes
    depend on the config alone, never on which prompts share a batch."""
    total_prune = parse_total_prune(total_prune, "total_prune")
    widths_i = [int(x) for x in widths]
    if total_prune == 0.0:
        return widths_i
    lower, _ = _bounds(total_prune, budget or BudgetConfig())
    return [_keep(lower, n) for n in widths_i]


def allocate_budgets(
    sensitivities: Tensor,
    widths: Sequence[int],
    total_prune: float,
    budget: BudgetConfig | None = None,
) -> list[BudgetAllocation]:
    """One :func:`allocate_budget` per row of ``sensitivities`` ``[B, L]``: each sequence's
    budget from its own statistics alone, so batch-mates cannot change it."""
    s = torch.as_tensor(sensitivities).detach().cpu()
    if s.dim() != 2:
        raise ValueError(f"sensitivities must be [B, L], got shape {tuple(s.shape)}")
    return [allocate_budget(row, widths, total_prune, budget) for row in s]


def _spread(
    p_weight: Tensor, n: Tensor, total_prune: float, lower: float, upper: float, rounds: int
) -> Tensor:
    """Prune fractions proportional to ``p_weight`` that remove ``total_prune`` of all neurons
    (widths ``n``), clipped to ``[lower, upper]`` with redistribution rounds."""
    if p_weight.sum() <= 0:
        p_weight = torch.ones_like(p_weight)
    budget_neurons = total_prune * n.sum()  # neurons to remove
    p = (budget_neurons * p_weight / (p_weight * n).sum()).clamp(lower, upper)
    tol = 1e-9 * float(n.sum())
    for _ in range(rounds):
        diff = budget_neurons - (p * n).sum()
        if abs(float(diff)) <= tol:
            break
        free = p < upper if diff > 0 else p > lower
        if not bool(free.any()):
            break
        wsum = (p_weight * n)[free].sum()
        if wsum > 0:
            delta = diff * p_weight / wsum
        else:
            delta = diff / n[free].sum() * torch.ones_like(p)
        p = torch.where(free, p + delta, p).clamp(lower, upper)
    return p


def _uniform_target(
    r: Tensor, n: Tensor, total_prune: float, lower: float, upper: float, rounds: int
) -> Tensor:
    """Every layer at ``total_prune`` (clipped to the bounds)."""
    return torch.full_like(r, min(max(total_prune, lower), upper))


def _sensitivity_target(
    r: Tensor, n: Tensor, total_prune: float, lower: float, upper: float, rounds: int
) -> Tensor:
    """The budget by sensitivity alone (no depth ramp): layers ``R`` protects stay protected."""
    return _spread(r.clone(), n, total_prune, lower, upper, rounds)


# BudgetConfig.blend_toward -> the allocation the auto budget is blended with
BLEND_TARGETS = {"uniform": _uniform_target, "sensitivity": _sensitivity_target}


def allocate_budget(
    sensitivity: Tensor | Sequence[float],
    widths: Sequence[int],
    total_prune: float,
    budget: BudgetConfig | None = None,
    rounds: int = 10,
) -> BudgetAllocation:
    """Distribute ``total_prune`` (fraction of all FFN neurons) over layers by sensitivity,
    as ``budget`` says (default :class:`~dart.core.config.BudgetConfig`)."""
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

    r = 1.0 - NORMALIZATIONS[b.normalize](s)
    lower, upper = _bounds(total_prune, b)
    p = _spread(r * depth_protection(num_layers, b), n, total_prune, lower, upper, rounds)
    if b.uniform_blend > 0:
        target = BLEND_TARGETS[b.blend_toward](r, n, total_prune, lower, upper, rounds)
        p = (1.0 - b.uniform_blend) * p + b.uniform_blend * target

    keep = [_keep(pl, nl) for pl, nl in zip(p.tolist(), widths_i, strict=True)]
    achieved = 1.0 - sum(keep) / sum(widths_i)
    return BudgetAllocation(keep, [float(x) for x in p.tolist()], float(total_prune), achieved)
