"""Arms of a comparison: (method, total_prune[, release_step]) and how to attach each one.

What an arm runs is asked of its method object (:mod:`dart.core.methods`), never of its name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.api import DARTHandle, attach
from ..core.config import ConfigError, DARTConfig, parse_total_prune
from ..core.methods import METHODS, Method, get_method

__all__ = ["Arm", "arm_config", "attach_arm", "folder_arms", "parse_arms"]


@dataclass(frozen=True)
class Arm:
    """One arm: ``label`` names it in records (``dart``, ``dart-r200``, ``dart-nodrift``...).
    ``name``, when given, is the label (a grid point of the tuning study: one method under
    several DARTConfig overrides, each its own arm)."""

    method: str
    total_prune: float = 0.0
    release_step: int | None = None
    name: str | None = None

    @classmethod
    def reference(cls) -> Arm:
        """The unpruned arm every comparison is measured against."""
        return cls(next(m.name for m in METHODS.values() if not m.prunes), 0.0)

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def is_reference(self) -> bool:
        return not self.spec.prunes

    @property
    def needs_calibration(self) -> bool:
        return self.spec.needs_calibration

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        return self.method if self.release_step is None else f"{self.method}-r{self.release_step}"

    @property
    def key(self) -> tuple[str, float]:
        return (self.label, round(float(self.total_prune), 6))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.label,
            "base_method": self.method,
            "total_prune": self.total_prune,
            "release_step": self.release_step,
        }


def folder_arms(arms: Sequence[Arm], records: Iterable[dict[str, Any]]) -> list[Arm]:
    """``arms`` (this run's), then every other arm that ``records`` (a results folder's, each
    carrying :meth:`Arm.to_dict`) hold: a folder filled by several runs (other ``--methods``,
    other sparsities) is summarised whole, not as its last run (``claim_arm`` has bound every
    arm there to one configuration)."""
    out, known = list(arms), {a.key for a in arms}
    for r in records:
        arm = Arm(r["base_method"], r["total_prune"], r.get("release_step"), r["method"])
        if arm.key not in known:
            known.add(arm.key)
            out.append(arm)
    return out


def _split(value: str | list | tuple | float | None) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)):
        return [value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_arms(
    methods: str | list[str],
    total_prune: str | float | list[float],
    release_steps: str | list[int] | None = None,
) -> list[Arm]:
    """Arms of a run: an unpruned method once (sparsity 0), every other method at every
    sparsity; with ``release_steps`` each drift-detecting method (DART) additionally runs once
    per release step (the release-step sweep)."""
    names = _split(methods)
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ConfigError(f"unknown methods {bad or names}; accepted: {', '.join(METHODS)}")
    prunes = [parse_total_prune(p, "--total-prune") for p in _split(total_prune)]
    if not prunes:
        raise ConfigError("--total-prune needs at least one value")
    releases = [int(r) for r in _split(release_steps)]
    arms: list[Arm] = []
    for name in names:
        method = get_method(name)
        if not method.prunes:
            arms.append(Arm(name, 0.0))
            continue
        for p in prunes:
            arms.append(Arm(name, p))
            if method.uses_drift:
                arms.extend(Arm(name, p, r) for r in releases)
    return list(dict.fromkeys(arms))


def arm_config(
    arm: Arm, overrides: dict[str, Any] | None = None, **fields: Any
) -> DARTConfig | None:
    """DARTConfig of an arm: ``overrides`` (the YAML ``dart:`` section) then the arm's fields;
    None for the reference arm, which runs the model unpatched. The arm's sparsity is the
    ``total_prune`` of the ``auto`` budget (a method with ``uniform_budget``, GRIFFIN, spreads it
    as the same share of every layer)."""
    if arm.is_reference:
        return None
    data = copy.deepcopy(overrides or {})
    data.update(fields)
    drift = dict(data.get("drift") or {})
    drift["enabled"] = arm.spec.uses_drift and drift.get("enabled", True)
    data.update(method=arm.method, drift=drift)
    data["total_prune"] = arm.total_prune
    if arm.release_step is not None:
        data["release_step"] = arm.release_step
    return DARTConfig.from_dict(data)


def attach_arm(
    model: torch.nn.Module, config: DARTConfig, calibration_ids: torch.Tensor | None = None
) -> DARTHandle:
    """Attach an arm's config; a method that needs calibration (static) is calibrated on
    ``calibration_ids``."""
    handle = attach(model, config)
    if handle.method.needs_calibration:
        if calibration_ids is None:
            handle.detach()
            raise ValueError(f"method {config.method!r} needs calibration token ids")
        device = next(model.parameters()).device
        handle.calibrate(calibration_ids.to(device), max_tokens=calibration_ids.shape[-1])
    return handle
