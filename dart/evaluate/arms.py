"""Arms of a comparison: (method, total_prune[, release_step]) and how to attach each one."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..api import DARTHandle, attach
from ..config import METHODS, ConfigError, DARTConfig

__all__ = ["ARM_METHODS", "Arm", "arm_config", "attach_arm", "parse_arms"]

# Method names accepted by --methods: the library's methods plus DART without drift detection.
ARM_METHODS: tuple[str, ...] = (*METHODS, "dart-nodrift")


@dataclass(frozen=True)
class Arm:
    """One arm: ``label`` names it in records (``dart``, ``dart-r200``, ``dart-nodrift``...)."""

    method: str
    total_prune: float = 0.0
    release_step: int | None = None

    @property
    def label(self) -> str:
        return self.method if self.release_step is None else f"{self.method}-r{self.release_step}"

    @classmethod
    def reference(cls) -> Arm:
        """The dense arm every comparison is measured against."""
        return cls("dense", 0.0)

    @property
    def is_reference(self) -> bool:
        return self.method == "dense"

    @property
    def needs_calibration(self) -> bool:
        return self.method == "static"

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
    """Arms of a run: dense once (sparsity 0), every other method at every sparsity; with
    ``release_steps`` DART additionally runs once per release step (the release-step sweep)."""
    names = _split(methods)
    bad = [m for m in names if m not in ARM_METHODS]
    if bad or not names:
        raise ConfigError(f"unknown methods {bad or names}; accepted: {', '.join(ARM_METHODS)}")
    prunes = [float(p) for p in _split(total_prune)]
    if not prunes:
        raise ConfigError("--total-prune needs at least one value")
    for p in prunes:
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"--total-prune {p} is not in [0, 1)")
    releases = [int(r) for r in _split(release_steps)]
    arms: list[Arm] = []
    for name in names:
        if name == "dense":
            arms.append(Arm("dense", 0.0))
            continue
        for p in prunes:
            arms.append(Arm(name, p))
            if name == "dart":
                arms.extend(Arm(name, p, r) for r in releases)
    return list(dict.fromkeys(arms))


def arm_config(
    arm: Arm, overrides: dict[str, Any] | None = None, **fields: Any
) -> DARTConfig | None:
    """DARTConfig of an arm: ``overrides`` (the YAML ``dart:`` section) then the arm's fields;
    None for the reference arm, which runs the model unpatched."""
    if arm.is_reference:
        return None
    data = copy.deepcopy(overrides or {})
    data.update(fields)
    method = "dart" if arm.method == "dart-nodrift" else arm.method
    drift = dict(data.get("drift") or {})
    drift["enabled"] = arm.method == "dart" and drift.get("enabled", True)
    data.update(method=method, total_prune=arm.total_prune, drift=drift)
    if arm.release_step is not None:
        data["release_step"] = arm.release_step
    return DARTConfig.from_dict(data)


def attach_arm(
    model: torch.nn.Module, config: DARTConfig, calibration_ids: torch.Tensor | None = None
) -> DARTHandle:
    """Attach an arm's config; ``method='static'`` is calibrated on ``calibration_ids``."""
    handle = attach(model, config)
    if config.method == "static":
        if calibration_ids is None:
            handle.detach()
            raise ValueError("method 'static' needs calibration token ids")
        device = next(model.parameters()).device
        handle.calibrate(calibration_ids.to(device), max_tokens=calibration_ids.shape[-1])
    return handle
