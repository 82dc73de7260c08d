"""The methods DART is compared with, and DART itself: one small object each, in one registry.

Code outside this module and the config parser never tests a method's name; it asks the
method what it needs and does::

    from dart.core.methods import get_method
    method = get_method(config.method)     # a Method; ValueError listing the names otherwise
    if method.selects_from_prompt: ...      # trace each prompt, select from it (prepare + hold)
    if method.needs_calibration: ...        # masks from a calibration text (handle.calibrate)
    method = method.for_config(config)      # its statistic as the config says (see below)
    h = method.statistic(h)                 # the FFN hidden activation as the method scores it

Public interface (stable):

* ``Method`` (frozen dataclass) with the fields

  - ``name``: the ``DARTConfig.method`` / ``--methods`` value;
  - ``description``: one line for help texts;
  - ``prunes``: runs with pruned FFNs at all (``dense``: no; it ignores ``layer_topk`` and
    ``total_prune``);
  - ``selects_from_prompt``: every new sequence is traced (dense) and its masks are selected
    from its own statistics (dart, dart-nodrift, griffin, random);
  - ``needs_calibration``: the masks come from one calibration text and are then frozen
    (static);
  - ``uses_drift``: drift detection re-traces a sequence whose attention drifts (dart);
  - ``uses_ema``: ``DARTConfig.ema_decay`` applies to its statistic (otherwise L2);
  - ``uses_proxies``: the ``ranking`` (output proxies) applies; a method with a ``score``
    function ignores it;
  - ``shared_mask``: one mask serves every row, whatever ``batch_policy`` says (static);
  - ``uniform_budget``: ``auto`` layers keep the same fraction ``1 - total_prune`` of their
    neurons in every layer (GRIFFIN), fixed before any prompt is seen; otherwise the ``auto``
    budget spreads ``total_prune`` over layers by sensitivity (:mod:`dart.core.budget`);
  - ``statistic(h) -> h'``: transform of the FFN hidden activation ``[..., N]`` before it is
    accumulated: one of :data:`STATISTICS` (``l2``: unchanged, so the accumulator's L2 over
    tokens is DART's statistic; ``normalized_l2``: GRIFFIN's, each token's vector
    L2-normalised over neurons). The registry's entries hold the statistic of a default config;
    :meth:`Method.for_config` the one a config runs;
  - ``own_statistic``: the name of a statistic the method always uses (griffin,
    griffin+budget: ``normalized_l2``), or None: it uses ``DARTConfig.statistic``;
  - ``score(m, generator) -> scores`` or None: replaces the ranking of the magnitudes ``m``
    (random: uniform noise from the run's seeded generator);
  - ``per_token``: a :class:`dart.core.per_token.PerTokenMode` (gate, gate-weighted, input):
    every decoded token picks its own neurons (or input columns) by magnitude thresholds
    calibrated per layer on a calibration text (``handle.calibrate``); the prompt runs dense;
    None for the mask methods;
  - ``compared_with``: the baselines whose arms at the same sparsity a report pairs it with,
    beside the unpruned reference (dart, dart-nodrift: griffin);

  and ``configure(config)``: adjusts a ``DARTConfig`` in place to what the method runs (a
  method without drift detection records ``drift.enabled = False``; one with its own
  statistic records it in ``statistic``). ``DARTConfig`` calls it. ``for_config(config)``: the
  method with ``config.statistic`` as its ``statistic`` (what the controller and
  ``handle.method`` use).
* ``METHODS``: read-only mapping name -> ``Method``, in the order of the comparison tables
  (dense, static, griffin, griffin+budget, random, dart, dart-nodrift, gate, gate-weighted,
  input).
* ``get_method(name) -> Method``.
* ``STATISTICS``: read-only mapping ``DARTConfig.statistic`` name -> transform (``l2``,
  ``normalized_l2``). EMA accumulation (``DARTConfig.ema_decay``) is separate and combines with
  either.
* ``per_token_l2_normalised(h)``: GRIFFIN's statistic, written once (the controller's
  accumulation and ``dart.runtime.export``'s in-graph selection both go through
  ``Method.statistic``).

A patched model's method (``for_config`` of its config) is ``handle.method`` (``dart.attach``)
and ``controller.method``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .per_token import PER_TOKEN_MODES, PerTokenMode

if TYPE_CHECKING:
    from .config import DARTConfig

__all__ = ["METHODS", "STATISTICS", "Method", "get_method", "per_token_l2_normalised"]


def _unchanged(h: Tensor) -> Tensor:
    return h


def per_token_l2_normalised(h: Tensor) -> Tensor:
    """GRIFFIN's statistic: each token's activation vector ``h[..., :]`` divided by its L2
    norm over neurons (fp32; an all-zero vector stays zero)."""
    h = h.float()
    return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-12)


STATISTICS: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"l2": _unchanged, "normalized_l2": per_token_l2_normalised}
)


def _uniform_noise(m: Tensor, generator: torch.Generator) -> Tensor:
    # drawn on the CPU generator so a seed gives the same masks on every device
    return torch.rand(m.shape, generator=generator).to(m.device)


@dataclass(frozen=True)
class Method:
    """What one method needs and does (see the module docstring)."""

    name: str
    description: str
    prunes: bool = True
    selects_from_prompt: bool = False
    needs_calibration: bool = False
    uses_drift: bool = False
    uses_ema: bool = False
    uses_proxies: bool = False
    shared_mask: bool = False
    uniform_budget: bool = False
    # the default config's (DARTConfig.statistic = normalized_l2 since the tuning study)
    statistic: Callable[[Tensor], Tensor] = per_token_l2_normalised
    own_statistic: str | None = None
    score: Callable[[Tensor, torch.Generator], Tensor] | None = None
    compared_with: tuple[str, ...] = ()
    per_token: PerTokenMode | None = None

    def configure(self, config: DARTConfig) -> None:
        """Make ``config`` state what this method runs (drift detection off if it has none)."""
        if not self.uses_drift and config.drift.enabled:
            config.drift = dataclasses.replace(config.drift, enabled=False)
        if self.own_statistic is not None:
            config.statistic = self.own_statistic

    def for_config(self, config: DARTConfig) -> Method:
        """This method with the statistic ``config`` runs (``config.statistic``)."""
        return dataclasses.replace(self, statistic=STATISTICS[config.statistic])


_ALL = (
    Method("dense", "the unpatched model (no pruning)", prunes=False),
    Method(
        "static",
        "one mask per layer from a calibration text, frozen for every prompt",
        needs_calibration=True,
        uses_ema=True,
        uses_proxies=True,
        shared_mask=True,
    ),
    Method(
        "griffin",
        "GRIFFIN: the same keep fraction in every layer, masks from the prompt's "
        "per-token-normalised activations, kept throughout",
        selects_from_prompt=True,
        uses_proxies=True,
        uniform_budget=True,
        statistic=per_token_l2_normalised,
        own_statistic="normalized_l2",
    ),
    Method(
        "griffin+budget",
        "GRIFFIN's statistic and frozen prompt masks with DART's auto budget over layers",
        selects_from_prompt=True,
        uses_proxies=True,
        statistic=per_token_l2_normalised,
        own_statistic="normalized_l2",
    ),
    Method(
        "random",
        "random masks of the same sizes (a sanity baseline)",
        selects_from_prompt=True,
        score=_uniform_noise,
    ),
    Method(
        "dart",
        "DART: masks from the prompt, re-traced when the attention signal drifts",
        selects_from_prompt=True,
        uses_drift=True,
        uses_ema=True,
        uses_proxies=True,
        compared_with=("griffin",),
    ),
    Method(
        "dart-nodrift",
        "DART without drift detection (masks from the prompt, never re-traced)",
        selects_from_prompt=True,
        uses_ema=True,
        uses_proxies=True,
        compared_with=("griffin",),
    ),
    Method(
        "gate",
        "per token: the whole gate, then up and down only for the neurons whose |act(gate)| "
        "passes a calibrated per-layer threshold",
        needs_calibration=True,
        per_token=PER_TOKEN_MODES["gate"],
    ),
    Method(
        "gate-weighted",
        "per token as gate, neurons ranked by |act(gate)| * |w_up_i| * |w_down_i|",
        needs_calibration=True,
        per_token=PER_TOKEN_MODES["gate-weighted"],
    ),
    Method(
        "input",
        "per token: the FFN input's small entries dropped (gate and up read the kept columns), "
        "then down only for the kept |h| (TEAL-like, calibrated per-layer thresholds)",
        needs_calibration=True,
        per_token=PER_TOKEN_MODES["input"],
    ),
)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ALL})


def get_method(name: str) -> Method:
    """The registered method called ``name``; a ValueError listing the names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)}") from None
