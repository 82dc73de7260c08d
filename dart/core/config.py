"""Validated configuration of DART: :class:`DARTConfig` with its nested :class:`BudgetConfig`
and :class:`DriftConfig`, the per-layer keep-spec grammar (``layer_topk``) and the tables of
accepted values (rankings, backends, ...). Method names come from the registry in
:mod:`dart.core.methods`.

``total_prune`` (the sparsity of an ``auto`` budget) is read only by ``auto`` items of
``layer_topk``: giving it with a spec that has none is a :class:`ConfigError` (the spec's own
fractions or counts decide the sparsity there). Left out, it is 0.5 (:data:`DEFAULT_TOTAL_PRUNE`).

Per-layer spec grammar (``DARTConfig.layer_topk``): comma-separated ``target:value`` items.

* ``target``: ``all``, one layer ``i`` (0-based, non-negative) or an inclusive range ``a-b``.
* ``value``: a keep fraction in (0, 1] (``1`` means keep all), an absolute neuron count (an
  integer > 1; non-integers above 1 such as ``63.29`` are rejected), ``dense`` or ``auto``.
* Later items override earlier ones. Layers not covered by any item are ``dense``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import atomic_write_text
from .methods import METHODS, get_method
from .methods import STATISTICS as _STATISTIC_TRANSFORMS

__all__ = [
    "DEFAULT_TOTAL_PRUNE",
    "registry_names",
    "STATISTICS",
    "BudgetConfig",
    "ConfigError",
    "DARTConfig",
    "DriftConfig",
    "LayerKeep",
    "parse_layer_topk",
    "parse_total_prune",
    "resolve_keep_counts",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is
    accepted."""


STATISTICS = tuple(_STATISTIC_TRANSFORMS)  # the registry in dart.core.methods
STRATEGIES = ("topk", "auto")
BATCH_POLICIES = ("per_sequence", "shared")
PROXY_SOURCES = ("embedding", "lm_head")
SENSITIVITIES = ("residual", "raw")
RETRACE_MODES = ("lookback", "ffn_inputs")
DEFAULT_TOTAL_PRUNE = 0.5

# Names of registries in modules that import this one (rankings in scoring, sparse backends in
# ffn, drift signals in drift): read from the registries on use, never copied here. Module
# attributes (``config.RANKINGS``, ``from dart.core.config import BACKENDS``) and the
# validators below go through :func:`registry_names`.
_REGISTRIES = {
    "RANKINGS": (".scoring", "RANKINGS"),
    "BACKENDS": (".ffn", "BACKENDS"),
    "DRIFT_SIGNALS": (".drift", "SIGNALS"),
}


def registry_names(name: str) -> tuple[str, ...]:
    """The registered names of ``RANKINGS``, ``BACKENDS``, ``DRIFT_SIGNALS`` or
    ``PER_TOKEN_BACKENDS`` (the backends that define a per-token pass: compact slices one
    fixed selection, which a per-token method does not have)."""
    if name == "PER_TOKEN_BACKENDS":
        from .ffn import BACKENDS, Backend

        return tuple(n for n, b in BACKENDS.items() if type(b).per_token is not Backend.per_token)
    module, attr = _REGISTRIES[name]
    return tuple(getattr(importlib.import_module(module, __package__), attr))


def __getattr__(name: str) -> tuple[str, ...]:
    if name in _REGISTRIES or name == "PER_TOKEN_BACKENDS":
        return registry_names(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _choice(owner: str, name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{owner}.{name}: {value!r} is not one of {', '.join(accepted)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(owner: str, name: str, value: Any, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{owner}.{name}: {value!r} is not an integer >= {low}")


def _real_in(
    owner: str, name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> None:
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        where = f"{owner}.{name}" if name else owner
        raise ConfigError(f"{where}: {value!r} is not a number in {lo}{low}, {high}{hi}")


def parse_total_prune(value: Any, setting: str = "DARTConfig.total_prune") -> float:
    """``total_prune`` as a float in [0, 1): a number or its text (``"0.5"``). The one place it
    is converted and checked; ``setting`` names it in the message (e.g. ``--total-prune``)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass  # reported below with the text as given
    _real_in(setting, "", value, 0.0, 1.0, low_open=False, high_open=True)
    return float(value)


class _Section:
    """A nested section of :class:`DARTConfig` (a dataclass): plain-dict round trip."""

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them."""
        _check_keys(cls, data)
        return cls(**data)


@dataclass
class BudgetConfig(_Section):
    """How an ``auto`` budget spreads ``total_prune`` over layers (spec section 3).

    ``sensitivity``: the layer statistic (``residual``: ``cos(r, r + f)``; ``raw``: ``cos(r, f)``,
    the reference code); ``depth_early``/``depth_late``: the fractions of depth at either end
    that are protected, ramping up from ``early_floor``/``late_floor`` (see
    :func:`dart.core.budget.depth_protection`); ``prune_min``/``prune_max``: bounds of any layer's
    prune fraction.

    Guards against starving a layer (default: ``uniform_blend = 1`` toward ``sensitivity``, the
    budget from the sensitivities alone without the depth ramp, chosen by calibration perplexity
    on SmolLM2-135M and Qwen2.5-Coder-1.5B together, docs/results/budget/README.md; 0 with no
    cap is the spec's min-max budget):
    ``normalize``: how the sensitivities ``S`` become ``R`` in [0, 1] (``minmax``; ``rank``: by
    their ranks; ``winsorized``: ``S`` clipped to Tukey's fences ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]``
    first, so one outlier layer does not squash the others to ``R ~ 1``); ``cap_margin``: no
    layer prunes more than ``min(prune_max, total_prune + cap_margin)`` (None: ``prune_max``);
    ``min_keep_ratio`` ``c`` in [0, 1]: no layer keeps fewer than ``c (1 - total_prune)`` of its
    neurons, ``c`` times the mean kept share, so the cap scales with the sparsity (at 70%,
    ``c = 2/3`` keeps at least 20% of every layer; None: no such cap);
    ``uniform_blend`` in [0, 1]: the final fractions are ``(1 - a) p_auto + a t`` with ``t`` set
    by ``blend_toward``: ``uniform`` (``total_prune`` in every layer) or ``sensitivity`` (the
    budget from ``R`` alone, without the depth ramp: a layer the sensitivity protects, such as an
    outlier first layer, stays protected).
    """

    sensitivity: str = "residual"
    depth_early: float = 0.3
    depth_late: float = 0.15
    early_floor: float = 0.25
    late_floor: float = 0.35
    prune_min: float = 0.1
    prune_max: float = 0.9
    normalize: str = "minmax"
    cap_margin: float | None = None
    min_keep_ratio: float | None = None
    # the budget study on both models: the depth ramp starves the middle layers (80-83% at 70%
    # on Qwen2.5-Coder-1.5B); R alone keeps the layers it protects and spreads the rest evenly
    uniform_blend: float = 1.0
    blend_toward: str = "sensitivity"  # the generation check: "uniform" pruned layer 0

    def __post_init__(self) -> None:
        o = "BudgetConfig"
        _choice(o, "sensitivity", self.sensitivity, SENSITIVITIES)
        # The budget's registries (budget.py imports this module, so import them on use).
        from .budget import BLEND_TARGETS, NORMALIZATIONS

        _choice(o, "normalize", self.normalize, tuple(NORMALIZATIONS))
        _choice(o, "blend_toward", self.blend_toward, tuple(BLEND_TARGETS))
        if self.cap_margin is not None:
            _real_in(o, "cap_margin", self.cap_margin, 0.0, 1.0, low_open=False, high_open=False)
        if self.min_keep_ratio is not None:
            _real_in(o, "min_keep_ratio", self.min_keep_ratio, 0.0, 1.0, low_open=False,
                     high_open=False)  # fmt: skip
        _real_in(o, "uniform_blend", self.uniform_blend, 0.0, 1.0, low_open=False, high_open=False)
        for name in ("depth_early", "depth_late", "early_floor", "late_floor"):
            _real_in(o, name, getattr(self, name), 0.0, 1.0, low_open=False, high_open=False)
        _real_in(o, "prune_min", self.prune_min, 0.0, 1.0, low_open=False, high_open=True)
        _real_in(o, "prune_max", self.prune_max, 0.0, 1.0, low_open=False, high_open=True)
        if self.prune_min > self.prune_max:
            raise ConfigError(
                f"{o}.prune_min: {self.prune_min!r} is greater than prune_max ({self.prune_max!r})"
            )


# Flat DARTConfig keys of earlier versions -> where they live now (named in the error).
_MOVED_KEYS = {
    "sensitivity": "budget.sensitivity",
    "depth_early": "budget.depth_early",
    "depth_late": "budget.depth_late",
    "depth_early_floor": "budget.early_floor",
    "depth_late_floor": "budget.late_floor",
    "prune_min": "budget.prune_min",
    "prune_max": "budget.prune_max",
}


@dataclass
class DriftConfig(_Section):
    """Drift detection settings (spec section 5).

    ``tau = mu - max(sigma_scale * sigma, threshold_floor)``; ``layers`` are decoder layer indices
    (negative = from the end); ``num_buckets`` is the number of log-spaced relative-distance
    buckets of the ``attn_probs`` feature; ``content_bits`` the number of hash bits of the
    ``attn_content`` feature (``2^bits`` key-content clusters); ``min_windows`` (>= 2) is the
    number of complete trace windows a baseline and threshold are built from: a trace that
    ends with fewer keeps collecting windows from the following tokens, and the previous
    baseline and threshold stay in use until it has them (see :mod:`dart.core.drift`).

    ``retrace_tokens`` (R) is how many recent tokens a re-trace rebuilds the row's mask and
    baseline from (see ``retrace``); 0 or None: none (the row traces the next
    ``max(masking_step, 1)`` passes, the old behaviour, in either mode).
    ``retrace_blend`` in [0, 1) mixes the statistics the old mask was built from into the new
    ones (``blend * old + (1 - blend) * recomputed``, per token; 0: the R tokens alone).

    ``retrace`` is how a drift event rebuilds the row's mask: ``ffn_inputs`` (the default)
    keeps each layer's FFN inputs of the row's last R tokens in a ring buffer and at the event
    computes only the FFN hidden activations of those inputs (no attention, no cache rewind,
    no down projection) to rebuild the statistics, and the new mask is used from the very next
    pass; with the ``attn_output`` signal its drift baseline is replayed from a ring of the
    same tokens' signal (see :mod:`dart.core.retrace`). ``lookback`` recomputes the last R
    positions (R - 1 earlier tokens and the new one) densely through the whole model in one
    forward (cache rewound, attention and FFN dense). On SmolLM2 switch streams the two tie at
    50% and ``ffn_inputs`` leads at 70%, for 22-37% less FFN work (docs/RESULTS.md).
    """

    enabled: bool = True
    signal: str = "attn_output"
    window: int = 5
    layers: tuple[int, ...] = (-1,)
    sigma_scale: float = 0.1
    threshold_floor: float = 0.1
    pressure_trigger: int = 3  # tuning study: 2 re-traced every ~70 tokens
    num_buckets: int = 16
    min_windows: int = 2
    retrace_tokens: int | None = 64
    retrace_blend: float = 0.0
    content_bits: int = 4
    retrace: str = "ffn_inputs"

    def __post_init__(self) -> None:
        o = "DriftConfig"
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{o}.enabled: {self.enabled!r} is not a bool (true or false)")
        _choice(o, "signal", self.signal, registry_names("DRIFT_SIGNALS"))
        _int_at_least(o, "window", self.window, 1)
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = (self.layers,)
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ConfigError(
                f"{o}.layers: {self.layers!r} is not a non-empty sequence of layer indices"
            )
        if not all(_is_int(x) for x in self.layers):
            raise ConfigError(f"{o}.layers: {self.layers!r} must contain only integers")
        self.layers = tuple(self.layers)
        _real_in(o, "sigma_scale", self.sigma_scale, 0.0, math.inf, low_open=False, high_open=True)
        _real_in(
            o, "threshold_floor", self.threshold_floor, 0.0, 2.0, low_open=False, high_open=False
        )
        _int_at_least(o, "pressure_trigger", self.pressure_trigger, 1)
        _int_at_least(o, "num_buckets", self.num_buckets, 2)
        _int_at_least(o, "min_windows", self.min_windows, 2)
        if self.retrace_tokens is None:
            self.retrace_tokens = 0
        _int_at_least(o, "retrace_tokens", self.retrace_tokens, 0)
        _real_in(o, "retrace_blend", self.retrace_blend, 0.0, 1.0, low_open=False, high_open=True)
        _choice(o, "retrace", self.retrace, RETRACE_MODES)
        _int_at_least(o, "content_bits", self.content_bits, 1)
        if self.content_bits > 12:
            raise ConfigError(f"{o}.content_bits: {self.content_bits} is not <= 12 (4096 clusters)")


# --------------------------------------------------------------------------------------------
# Per-layer spec grammar


@dataclass(frozen=True)
class LayerKeep:
    """How many neurons one layer keeps: ``kind`` in fraction | count | dense | auto."""

    kind: str
    value: float | int | None = None


_Item = tuple[str, tuple[int, int] | None, LayerKeep]  # (raw item, (lo, hi) or None=all, keep)


def _parse_value(item: str, text: str) -> LayerKeep:
    t = text.strip().lower()
    if t == "dense":
        return LayerKeep("dense")
    if t == "auto":
        return LayerKeep("auto")
    try:
        v = float(t)
    except ValueError:
        raise ConfigError(
            f"DARTConfig.layer_topk: value {text!r} in item {item!r} is not a keep fraction in "
            "(0, 1], an integer neuron count > 1, 'dense' or 'auto'"
        ) from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(
            f"DARTConfig.layer_topk: value {text!r} in item {item!r} must be a keep fraction in "
            "(0, 1] or an integer neuron count > 1"
        )
    if v <= 1.0:
        return LayerKeep("fraction", v)
    if not v.is_integer():
        raise ConfigError(
            f"DARTConfig.layer_topk: value {text!r} in item {item!r} is above 1 but not an "
            "integer: a neuron count must be a whole number (a fraction must be in (0, 1])"
        )
    return LayerKeep("count", int(v))


def _parse_target(item: str, text: str) -> tuple[int, int] | None:
    t = text.strip().lower()
    if t == "all":
        return None
    parts = t.split("-")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"DARTConfig.layer_topk: target {text!r} in item {item!r} is not 'all', a layer "
            "index 'i' or a range 'a-b'"
        ) from None
    if lo < 0 or hi < lo:
        raise ConfigError(
            f"DARTConfig.layer_topk: target {text!r} in item {item!r} must be a non-negative "
            "layer index or a range 'a-b' with 0 <= a <= b"
        )
    return (lo, hi)


def _parse_items(spec: str) -> list[_Item]:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"DARTConfig.layer_topk: {spec!r} is not a non-empty spec of 'target:value' items"
        )
    items: list[_Item] = []
    for raw in spec.split(","):
        item = raw.strip()
        if item.count(":") != 1:
            raise ConfigError(
                f"DARTConfig.layer_topk: item {item!r} of {spec!r} is not of the form "
                "'target:value' (target all | i | a-b; value fraction | count | dense | auto)"
            )
        target, value = item.split(":")
        items.append((item, _parse_target(item, target), _parse_value(item, value)))
    return items


def parse_layer_topk(spec: str, num_layers: int, widths: list[int]) -> list[LayerKeep]:
    """Parse a per-layer spec into one :class:`LayerKeep` per layer (uncovered layers: dense)."""
    if len(widths) != num_layers:
        raise ConfigError(f"widths has {len(widths)} entries but num_layers is {num_layers}")
    keeps = [LayerKeep("dense")] * num_layers
    for item, rng, keep in _parse_items(spec):
        if rng is None:
            lo, hi = 0, num_layers - 1
        else:
            lo, hi = rng
            if hi >= num_layers:
                raise ConfigError(
                    f"DARTConfig.layer_topk: layer {hi} in item {item!r} is out of range: the "
                    f"model has {num_layers} layers (0..{num_layers - 1})"
                )
        for layer in range(lo, hi + 1):
            if keep.kind == "count" and keep.value > widths[layer]:
                raise ConfigError(
                    f"DARTConfig.layer_topk: count {keep.value} in item {item!r} exceeds the "
                    f"width {widths[layer]} of layer {layer}"
                )
            keeps[layer] = keep
    return keeps


def resolve_keep_counts(
    keeps: list[LayerKeep], widths: list[int], auto_counts: list[int] | None = None
) -> list[int]:
    """Per-layer keep counts: dense -> width; fraction f -> round(f * width) clamped to
    [1, width]; count -> itself; auto -> ``auto_counts[l]`` (from :mod:`dart.core.budget`)."""
    if len(keeps) != len(widths):
        raise ConfigError(f"{len(keeps)} layer keeps for {len(widths)} widths")
    out: list[int] = []
    for layer, (keep, n) in enumerate(zip(keeps, widths, strict=True)):
        if keep.kind == "dense":
            k = n
        elif keep.kind == "fraction":
            k = min(max(math.floor(keep.value * n + 0.5), 1), n)
        elif keep.kind == "count":
            k = int(keep.value)
        elif keep.kind == "auto":
            if auto_counts is None:
                raise ConfigError(
                    f"layer {layer} is 'auto' but no auto_counts were given (compute them with "
                    "dart.core.budget.allocate_budget(...).keep_counts from the traced "
                    "sensitivities)"
                )
            k = min(max(int(auto_counts[layer]), 1), n)
        else:  # pragma: no cover - LayerKeep is only built by the parser
            raise ConfigError(f"unknown LayerKeep kind {keep.kind!r}")
        if not 1 <= k <= n:
            raise ConfigError(f"layer {layer}: keep count {k} is not in [1, {n}]")
        out.append(k)
    return out


# --------------------------------------------------------------------------------------------


@dataclass
class DARTConfig:
    """Everything that defines one DART (or baseline) run. See docs/DART_SPEC.md.

    ``method`` is a name of the registry :data:`dart.core.methods.METHODS`; the method adjusts the
    config to what it runs (e.g. drift detection off for every method but ``dart``,
    ``statistic`` set to ``normalized_l2`` for the GRIFFIN methods).
    ``statistic``: the per-token transform of the FFN activations before they are accumulated
    (``l2``: none, DART's L2 over tokens; ``normalized_l2``: GRIFFIN's, each token's vector
    divided by its L2 norm over neurons); ``ema_decay`` (an EMA over tokens instead of the L2)
    combines with either.
    ``telemetry_every`` N > 0 measures the mask on every N-th decode pass (recall of the top-|h|
    neurons, :mod:`dart.core.telemetry`; a diagnostic that computes every FFN densely too); 0: off.
    ``total_prune`` is the sparsity of ``auto`` items of ``layer_topk`` (None: 0.5, see
    :attr:`prune_target`); with a spec without ``auto`` it must be left out.

    Per-token methods (``gate``, ``gate-weighted``, ``input``; :mod:`dart.core.per_token`):
    ``total_prune`` is the share of the FFN weight bytes left unread per decoded token, spread
    over the ``auto`` layers by ``per_token_allocation`` (``greedy``: TEAL's allocation by the
    layers' error curves on the calibration text; ``uniform``: the same keep everywhere); a
    fraction item of ``layer_topk`` is the layer's keep of every knob (neurons, or input columns
    and neurons). ``batch_policy`` chooses how a batch of sequences selects at each decode step:
    ``per_sequence`` (default) lets every sequence's token keep its own neurons (the fused
    kernels' ``token`` policy: each output is its own choice's); ``shared`` keeps one set for
    the whole step, the union of the sequences' choices, and computes every sequence over it
    (the ``union`` policy: at least as many neurons for everyone, and ``read`` counts the
    union). Either way a batch step streams each kept weight row once.
    """

    layer_topk: str = "all:auto"
    total_prune: float | None = None
    masking_step: int = 0
    release_step: int | None = None
    ema_decay: float | None = None
    statistic: str = "normalized_l2"  # tuning study (docs/history/RESULTS-2026-12.md)
    ranking: str = "magnitude"
    strategy: str = "topk"
    drift: DriftConfig = field(default_factory=DriftConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    backend: str = "gathered"
    batch_policy: str = "per_sequence"
    method: str = "dart"
    proxy_source: str = "embedding"
    seed: int = 0
    telemetry_every: int = 0
    per_token_allocation: str = "uniform"  # it beat greedy for input, the best mode

    def __post_init__(self) -> None:
        o = "DARTConfig"
        self.drift = _nested(o, "drift", self.drift, DriftConfig)
        self.budget = _nested(o, "budget", self.budget, BudgetConfig)
        _choice(o, "method", self.method, tuple(METHODS))
        _parse_items(self.layer_topk)
        if self.total_prune is not None:
            self.total_prune = parse_total_prune(self.total_prune)
            if not self.has_auto and get_method(self.method).prunes:
                raise ConfigError(
                    f"{o}.total_prune: {self.total_prune!r} is only read by 'auto' items of "
                    f"layer_topk, and {self.layer_topk!r} has none, so it would be ignored: "
                    f"leave total_prune out and set the sparsity in layer_topk (e.g. "
                    f"'all:{1 - self.total_prune:g}' keeps {1 - self.total_prune:.0%} of every "
                    f"layer), or use layer_topk='all:auto' with total_prune={self.total_prune:g}"
                )
        _int_at_least(o, "masking_step", self.masking_step, 0)
        _int_at_least(o, "telemetry_every", self.telemetry_every, 0)
        if self.release_step is not None and (
            not _is_int(self.release_step) or self.release_step <= self.masking_step
        ):
            raise ConfigError(
                f"{o}.release_step: {self.release_step!r} is not None or an integer > "
                f"masking_step ({self.masking_step})"
            )
        if self.ema_decay is not None:
            _real_in(o, "ema_decay", self.ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        _choice(o, "statistic", self.statistic, STATISTICS)
        _choice(o, "ranking", self.ranking, registry_names("RANKINGS"))
        _choice(o, "strategy", self.strategy, STRATEGIES)
        _choice(o, "backend", self.backend, registry_names("BACKENDS"))
        _choice(o, "batch_policy", self.batch_policy, BATCH_POLICIES)
        _choice(o, "proxy_source", self.proxy_source, PROXY_SOURCES)
        _choice(o, "per_token_allocation", self.per_token_allocation, ("greedy", "uniform"))
        self._check_per_token()
        if not _is_int(self.seed):
            raise ConfigError(f"{o}.seed: {self.seed!r} is not an integer")
        get_method(self.method).configure(self)

    def _check_per_token(self) -> None:
        mode = get_method(self.method).per_token
        if mode is None:
            return
        o = "DARTConfig"
        per_token_backends = registry_names("PER_TOKEN_BACKENDS")
        if self.backend not in per_token_backends:
            raise ConfigError(
                f"{o}.backend: {self.backend!r} cannot run method {self.method!r} (a per-token "
                f"selection has no fixed rows to slice); use one of {', '.join(per_token_backends)}"
            )
        target = self.prune_target
        if target is not None and 1.0 - target < mode.min_read - 1e-9:
            raise ConfigError(
                f"{o}.total_prune: {target!r} leaves {1 - target:.3f} of the FFN bytes, but "
                f"method {self.method!r} reads at least {mode.min_read:.3f} (the gate it reads "
                f"whole, and 5% of what it selects): use total_prune <= {1 - mode.min_read:.3f}"
            )

    # ---------------------------------------------------------------- derived values
    @property
    def has_auto(self) -> bool:
        """Whether any item of ``layer_topk`` is ``auto`` (a budget allocated at run time)."""
        return any(keep.kind == "auto" for _, _, keep in _parse_items(self.layer_topk))

    @property
    def prune_target(self) -> float | None:
        """The sparsity the ``auto`` budget allocates (``total_prune``, default 0.5); None
        when no layer is ``auto`` or the method does not prune."""
        if not self.has_auto or not get_method(self.method).prunes:
            return None
        return DEFAULT_TOTAL_PRUNE if self.total_prune is None else self.total_prune

    def layer_keeps(self, widths: list[int]) -> list[LayerKeep]:
        """``layer_topk`` resolved against a model's FFN widths (one entry per layer)."""
        return parse_layer_topk(self.layer_topk, len(widths), widths)

    def fixed_keep_counts(self, widths: list[int]) -> list[int] | None:
        """Per-layer keep counts fixed before any prompt is seen: every width for a method that
        does not prune, ``round((1 - total_prune) * width)`` for the ``auto`` layers of a method
        with a uniform budget (GRIFFIN), None when an ``auto`` budget decides them at run time."""
        method = get_method(self.method)
        if not method.prunes:
            return list(widths)
        keeps = self.layer_keeps(widths)
        if any(keep.kind == "auto" for keep in keeps):
            if not method.uniform_budget:
                return None
            uniform = LayerKeep("fraction", 1.0 - self.prune_target)  # GRIFFIN: same k everywhere
            keeps = [uniform if keep.kind == "auto" else keep for keep in keeps]
        return resolve_keep_counts(keeps, widths)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-safe): ``drift`` and ``budget`` nested, tuples as lists."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["drift"] = self.drift.to_dict()
        d["budget"] = self.budget.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DARTConfig:
        """Build from a dict; unknown keys raise :class:`ConfigError` naming them (keys of
        earlier versions: naming where they moved)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"DARTConfig.from_dict: expected a mapping, got {type(data).__name__}"
            )
        moved = [f"{k!r} is now {_MOVED_KEYS[k]}" for k in data if k in _MOVED_KEYS]
        if moved:
            raise ConfigError(
                f"DARTConfig: {'; '.join(moved)} (a nested section, e.g. "
                "budget: {depth_early: 0.3, prune_max: 0.9})"
            )
        _check_keys(cls, data)
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``.yaml``/``.yml``/``.json`` atomically and durably."""
        p = Path(path)
        atomic_write_text(p, _dump(self.to_dict(), p))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DARTConfig:
        """Read a config written by :meth:`save` (or by hand)."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config path {str(p)!r}: suffix must be one of .yaml, .yml, .json")
        return cls.from_dict(data if data is not None else {})


def _nested(owner: str, name: str, value: Any, kind: type) -> Any:
    if isinstance(value, dict):
        return kind.from_dict(value)
    if not isinstance(value, kind):
        raise ConfigError(f"{owner}.{name}: {value!r} is not a {kind.__name__} or a dict")
    return value


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown keys {', '.join(map(repr, unknown))}; accepted keys are "
            f"{', '.join(sorted(known))}"
        )


def _dump(data: dict[str, Any], path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    if suffix == ".json":
        return json.dumps(data, indent=2) + "\n"
    raise ConfigError(f"config path {str(path)!r}: suffix must be one of .yaml, .yml, .json")
