"""Typed options: one dataclass field per option, from which both the command-line flags and the
YAML config loading are derived.

The convention (every command of `dart` follows it)::

    @dataclass
    class ExportOptions:
        out: str = field(metadata={"help": "output folder"})
        max_len: int = field(default=512, metadata={"help": "static cache length"})

A field's type hint gives the flag's parsing (``int``, ``float``, ``str``, ``bool``, ``X | None``,
``list[X]``/``tuple[X, ...]`` as a comma list, ``Literal[...]`` as choices, ``dict`` as YAML
only) and ``metadata["help"]`` its help text. Optional metadata keys: ``choices`` (accepted
values), ``flag`` (a flag name other than ``--field-name``), ``positional`` (an argument
without a flag; a list takes one or more), ``repeat`` (a list given by
repeating the flag instead of a comma list), ``yaml_only`` (no flag), ``hidden`` (a flag left out
of ``--help``), ``min`` (the smallest accepted value, of a scalar or of each list item). A
``bool`` field whose default is ``True`` gets a ``--no-...`` flag.

Values are resolved as defaults < YAML file (``--config``) < flags given on the command line;
an unknown YAML key or a value of the wrong type is a :class:`~dart.core.config.ConfigError` that
names the key and what is accepted.

Two declarations are shared by every command (so they have one set of defaults):
:class:`ModelOptions` (``--model``, ``--weights``, ``--backend``, ``--seed``) and
:class:`ArmOptions` (those and the arms: ``--methods``, ``--total-prune``).

**DARTConfig flags.** An option class with a :func:`dart_field` (named ``dart``) gets one flag
per field of :class:`~dart.core.config.DARTConfig`, generated from its dataclasses and nested by
section: ``--dart.layer_topk``, ``--dart.budget.uniform_blend``, ``--dart.drift.retrace_tokens``
(types from the type hints, help from the field's ``metadata["help"]`` or the class docstring,
choices from the registries, minimums from the validators). The same keys are the YAML
``dart:`` mapping (``dart: {drift: {retrace_tokens: 32}}``); flags override it key by key. The
fields another option owns (``method``/``total_prune``: the arms; ``backend``/``seed``: the
shared options) have no ``--dart.`` flag and are refused in the mapping. The merged mapping is
checked by DARTConfig's own validation, and an error names the flag (``--dart.drift.window``)
or the YAML key. The value of the field is the mapping of the settings given (None when none
were), exactly as a YAML file gives it, so a run's fingerprint does not change with the way a
setting was given.

Commands with their own parser (``scripts/``, ``bench/``) use the two functions::

    add_dart_flags(parser)                       # the --dart.* flags
    overrides = dart_overrides(vars(args), yaml_mapping)   # dict | None, for arm_config
    config = dart_config_from(vars(args), yaml_mapping, method="dart", total_prune=0.5)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import config as _config
from .core.config import BACKENDS, ConfigError, DARTConfig
from .core.methods import METHODS
from .core.quant import Weights

__all__ = [
    "ARM_OWNED",
    "ArmOptions",
    "ModelOptions",
    "add_dart_flags",
    "add_options",
    "dart_config_from",
    "dart_field",
    "dart_overrides",
    "load_yaml",
    "options_dict",
    "options_from",
    "resolve_options",
]


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _choices(field: dataclasses.Field, tp: Any) -> tuple | None:
    if "choices" in field.metadata:
        return tuple(field.metadata["choices"])
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return None


def _element_type(tp: Any) -> Any | None:
    """The element type of ``list[X]`` / ``tuple[X, ...]``; None for other types."""
    if typing.get_origin(tp) in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _is_yaml_only(field: dataclasses.Field, tp: Any) -> bool:
    return bool(field.metadata.get("yaml_only")) or typing.get_origin(tp) is dict or tp is dict


def _scalar(value: Any, tp: Any, where: str, choices: tuple | None) -> Any:
    base = str if typing.get_origin(tp) is typing.Literal else tp
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            value = str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}: {value!r} is not a valid {name}") from None
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def coerce(field: dataclasses.Field, tp: Any, value: Any, where: str) -> Any:
    """``value`` (a YAML value or a flag's string) as the field's type; ConfigError if it is not."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if _is_yaml_only(field, tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {value!r} is not a mapping")
        return dict(value)
    choices = _choices(field, tp)
    element = _element_type(tp)
    if element is None:
        return _at_least(field, _scalar(value, tp, where, choices), where)
    if isinstance(value, str) and not field.metadata.get("repeat"):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    items = [_at_least(field, _scalar(v, element, where, choices), where) for v in value]
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _at_least(field: dataclasses.Field, value: Any, where: str) -> Any:
    """``value``, refused below the field's ``min`` metadata (a count of -5 tokens is an error,
    not a silent empty run)."""
    minimum = field.metadata.get("min")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: {value!r} is below the minimum {minimum}")
    return value


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _help(field: dataclasses.Field, tp: Any) -> str:
    if field.metadata.get("hidden"):
        return argparse.SUPPRESS
    text = field.metadata.get("help", "")
    default = field.default
    if default is not dataclasses.MISSING and default is not None and not isinstance(default, bool):
        text += f" (default: {default})"
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
        if default:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
    return text


def add_options(parser: argparse.ArgumentParser, *classes: type, config: bool = True) -> None:
    """Add one flag per field of the option dataclasses ``classes`` (and ``--config``).

    Flags have no argparse defaults: only the flags given end up in the namespace, so they
    override the YAML file, which overrides the dataclass defaults (see
    :func:`resolve_options`)."""
    S = argparse.SUPPRESS
    if config:
        parser.add_argument("--config", default=S, help="YAML file of options (flags override it)")
    for cls in classes:
        for field, tp in _fields(cls):
            if DART in field.metadata:
                add_dart_flags(parser, exclude=field.metadata[DART])
                continue
            if _is_yaml_only(field, _unwrap_optional(tp)[0]):
                continue
            base, _ = _unwrap_optional(tp)
            help_text = _help(field, tp)
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if field.metadata.get("positional"):
                nargs = "+" if _element_type(base) is not None else None
                parser.add_argument(field.name, nargs=nargs, help=help_text)
                continue
            kw: dict[str, Any] = {"dest": field.name, "default": S, "help": help_text}
            if base is bool:
                if field.default is True:
                    name = "--no-" + field.name.replace("_", "-")
                    parser.add_argument(name, action="store_false", **kw)
                else:
                    parser.add_argument(_flag(field), action="store_true", **kw)
                continue
            if field.metadata.get("repeat"):
                kw["action"] = "append"
            element = _element_type(base)
            choices = _choices(field, base)
            if element is None and base in (int, float):
                kw["type"] = base  # argparse converts first, so its choices check sees numbers
            if choices is not None and element is None:
                kw["choices"] = choices
            if element is not None:
                kw["metavar"] = f"{field.name.upper()}[,...]"
                if choices is not None and kw["help"] is not argparse.SUPPRESS:
                    kw["help"] += f"; each one of {','.join(map(str, choices))}"
            if required and not config:
                kw["required"] = True
            parser.add_argument(_flag(field), **kw)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML options file as a dict (keys with ``-`` read as ``_``)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_known(data: Mapping[str, Any], known: set[str], source: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown keys {', '.join(map(repr, unknown))}; accepted: "
            f"{', '.join(sorted(known))}"
        )


def _build(
    cls: type, values: dict[str, Any], source: str, flags: Mapping[str, Any] | None = None
) -> Any:
    """An instance of ``cls``; its DARTConfig field (if any) is the YAML mapping in ``values``
    with the ``--dart.*`` entries of ``flags`` over it, validated (:func:`dart_overrides`)."""
    for field, _ in _fields(cls):
        missing = field.default is dataclasses.MISSING
        if missing and field.default_factory is dataclasses.MISSING and field.name not in values:
            raise ConfigError(f"{source}: {field.name} ({_flag(field)}) is required")
    obj = cls(**values)
    for field, _ in _fields(cls):
        if DART in field.metadata:
            owned = field.metadata[DART]
            # the command's own backend and seed are what the config is checked with
            shared = {k: getattr(obj, k) for k in ("backend", "seed") if k in owned}
            shared = {k: v for k, v in shared.items() if v is not None}
            given = flags or {}
            value = dart_overrides(
                given, values.get(field.name), source=source, owned=owned, fields=shared
            )
            setattr(obj, field.name, value)
    return obj


def options_from(cls: type, data: Mapping[str, Any], source: str = "options") -> Any:
    """An instance of the option dataclass ``cls`` from ``data``: values coerced to the field
    types; unknown keys, wrong types and missing required values raise ConfigError."""
    fields = _fields(cls)
    _check_known(data, {f.name for f, _ in fields}, source)
    values = {
        f.name: coerce(f, tp, data[f.name], f"{source}: {f.name}")
        for f, tp in fields
        if f.name in data
    }
    return _build(cls, values, source)


def resolve_options(
    given: Mapping[str, Any], *classes: type, ignore: tuple[str, ...] = ()
) -> tuple[Any, ...]:
    """One instance per class of ``classes`` from defaults < the YAML file ``given['config']``
    < the other entries of ``given`` (the flags given, by field name). Keys of the YAML file in
    ``ignore`` are dropped (a saved ``config.yaml`` also holds e.g. ``task`` and ``command``)."""
    given = dict(given)
    config = given.pop("config", None)
    flags = {k: given.pop(k) for k in list(given) if k.startswith(f"{DART}.")}
    source = str(config) if config else "options"
    data = {k: v for k, v in load_yaml(config).items() if k not in ignore} if config else {}
    fields = [_fields(cls) for cls in classes]
    known = {f.name for own in fields for f, _ in own}
    _check_known(data, known, source)
    _check_known(given, known, "command line")
    if flags and not any(DART in f.metadata for own in fields for f, _ in own):
        raise ConfigError(f"this command takes no DARTConfig settings: {', '.join(flags)}")
    out = []
    for cls, own in zip(classes, fields, strict=True):
        values = {}
        for f, tp in own:
            if f.name in given:
                values[f.name] = coerce(f, tp, given[f.name], _flag(f))
            elif f.name in data:
                values[f.name] = coerce(f, tp, data[f.name], f"{source}: {f.name}")
        out.append(_build(cls, values, source, flags))
    return tuple(out)


def options_dict(*instances: Any) -> dict[str, Any]:
    """The fields of option instances as one flat dict (tuples as lists, for YAML/JSON)."""
    out: dict[str, Any] = {}
    for obj in instances:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# -- the declaration every command shares ---------------------------------------------------------
@dataclass(kw_only=True)
class ModelOptions:
    """The model and how its arms run: shared by every command (one set of defaults)."""

    model: str = dataclasses.field(
        default="smollm2-135m", metadata={"help": "packaged model name or a local HF folder"}
    )
    weights: Weights = dataclasses.field(
        default="fp",
        metadata={"help": "fp (the model's own weights) or quantised q8, q4, q4m (dart.quantize)"},
    )
    backend: str = dataclasses.field(
        default="gathered", metadata={"help": "sparse FFN backend", "choices": BACKENDS}
    )
    seed: int = dataclasses.field(
        default=0, metadata={"help": "seed of torch, of sampling and of the random method"}
    )


@dataclass(kw_only=True)
class ArmOptions(ModelOptions):
    """:class:`ModelOptions` and the arms compared: every method at every sparsity."""

    methods: list[str] = dataclasses.field(
        default_factory=lambda: ["dense", "static", "griffin", "dart"],
        metadata={"help": "comma list of methods", "choices": tuple(METHODS)},
    )
    total_prune: list[float] = dataclasses.field(
        default_factory=lambda: [0.5],
        metadata={"help": "FFN sparsity: one value or a comma list (one arm per value)"},
    )


# -- DARTConfig flags -----------------------------------------------------------------------------
DART = "dart"  # the option field, the YAML key and the flag prefix (--dart.drift.window)
# DARTConfig fields set elsewhere on a command that runs arms: the arm sets method and
# total_prune, ModelOptions backend and seed.
ARM_OWNED = ("method", "total_prune", "backend", "seed")
_OWNER_FLAG = {
    "method": "--methods",
    "total_prune": "--total-prune",
    "backend": "--backend",
    "seed": "--seed",
}


def dart_field(owned: tuple[str, ...] = ARM_OWNED) -> Any:
    """The ``dart`` field of an option class: the ``--dart.*`` flags and the YAML ``dart:``
    mapping of DARTConfig settings, except the fields in ``owned`` (set by other options)."""
    return dataclasses.field(
        default=None,
        metadata={
            "help": "DARTConfig settings of every arm (flags --dart.<field>, "
            "--dart.<section>.<field>; YAML: a `dart:` mapping)",
            DART: tuple(owned),
        },
    )


@dataclass(frozen=True)
class _Leaf:
    """One DARTConfig setting: ``path`` is ``field`` or ``section.field``."""

    path: str
    field: dataclasses.Field
    type: Any
    owner: type

    @property
    def flag(self) -> str:
        return f"--{DART}.{self.path}"


def _leaves() -> list[_Leaf]:
    out: list[_Leaf] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out.append(_Leaf(prefix + f.name, f, hints[f.name], cls))

    walk(DARTConfig, "")
    return out


def _sections() -> dict[str, type]:
    """Section name -> its dataclass (``drift`` -> DriftConfig); "" is DARTConfig."""
    hints = typing.get_type_hints(DARTConfig)
    nested = {f.name: hints[f.name] for f in dataclasses.fields(DARTConfig)}
    return {"": DARTConfig, **{k: v for k, v in nested.items() if dataclasses.is_dataclass(v)}}


def _choices_of(path: str) -> tuple | None:
    """Accepted values of a DARTConfig setting, from the tables and registries its validation
    checks against (an attribute renamed in dart.core fails here, loudly)."""
    from .core.budget import BLEND_TARGETS, NORMALIZATIONS

    table = {
        "method": tuple(METHODS),
        "statistic": _config.STATISTICS,
        "ranking": _config.RANKINGS,
        "strategy": _config.STRATEGIES,
        "backend": _config.BACKENDS,
        "batch_policy": _config.BATCH_POLICIES,
        "proxy_source": _config.PROXY_SOURCES,
        "per_token_allocation": ("greedy", "uniform"),
        "drift.signal": _config.DRIFT_SIGNALS,
        "drift.retrace": _config.RETRACE_MODES,
        "budget.sensitivity": _config.SENSITIVITIES,
        "budget.normalize": tuple(NORMALIZATIONS),
        "budget.blend_toward": tuple(BLEND_TARGETS),
    }
    return tuple(table[path]) if path in table else None


# The smallest accepted value of the integer settings (the validators' bounds), checked when
# the flag is read so that the message names the flag before anything else runs.
_MINIMUM = {
    "masking_step": 0,
    "telemetry_every": 0,
    "drift.window": 1,
    "drift.pressure_trigger": 1,
    "drift.num_buckets": 2,
    "drift.min_windows": 2,
    "drift.retrace_tokens": 0,
    "drift.content_bits": 1,
}

# One line of help per setting (the class docstrings of dart.core.config say more). A field's
# own metadata["help"] wins; a setting missing here falls back to its docstring clause.
_HELP = {
    "layer_topk": "per-layer keep spec: comma list of target:value (target all|i|a-b; value a "
    "keep fraction in (0,1], a neuron count, dense or auto)",
    "total_prune": "sparsity of the auto budget (none: 0.5; only with auto items in layer_topk)",
    "masking_step": "forward passes traced densely before a mask is built (0 or 1: the prompt "
    "pass alone)",
    "release_step": "forward pass after which every row runs dense again; none: never",
    "ema_decay": "an EMA over tokens with this decay instead of the L2; none: the L2",
    "statistic": "per-token transform of the FFN activations before accumulation (l2: none; "
    "normalized_l2: GRIFFIN's, each token over its L2 norm)",
    "ranking": "how neurons are ranked from the accumulated statistic",
    "strategy": "how the kept neurons are chosen from the ranking",
    "method": "the method (a name of dart.core.methods.METHODS)",
    "backend": "sparse FFN backend",
    "batch_policy": "one mask per sequence of a batch, or one shared by the batch",
    "proxy_source": "vocabulary matrix the neurons' output proxies are computed from",
    "seed": "seed of the random method",
    "telemetry_every": "measure the mask's recall on every N-th decode pass (a diagnostic that "
    "also computes every FFN densely); 0: off",
    "per_token_allocation": "per-token methods: spread total_prune over layers greedily by "
    "their error curves, or uniformly",
    "drift.enabled": "drift detection on (the method may turn it off)",
    "drift.signal": "the attention feature drift is measured on",
    "drift.window": "tokens per trace window",
    "drift.retrace": "how a drift event rebuilds masks: lookback (recompute the last "
    "retrace_tokens positions densely) or ffn_inputs (from a ring of their FFN inputs)",
    "drift.layers": "decoder layers whose attention is watched (negative: from the end)",
    "drift.sigma_scale": "threshold tau = mu - max(sigma_scale * sigma, threshold_floor)",
    "drift.threshold_floor": "smallest margin of the threshold below the baseline mean",
    "drift.pressure_trigger": "consecutive drifting windows that trigger a re-trace",
    "drift.num_buckets": "log-spaced relative-distance buckets of the attn_probs feature",
    "drift.min_windows": "complete trace windows a baseline and threshold are built from",
    "drift.retrace_tokens": "look-back R of a re-trace: the last R positions recomputed densely "
    "(0 or none: trace the next passes instead)",
    "drift.retrace_blend": "share in [0, 1) of the old mask's statistics mixed into a re-trace's",
    "drift.content_bits": "hash bits of the attn_content feature (2^bits key-content clusters)",
    "budget.sensitivity": "layer statistic of the auto budget (residual: cos(r, r + f); raw: "
    "cos(r, f))",
    "budget.depth_early": "fraction of depth at the start that is protected",
    "budget.depth_late": "fraction of depth at the end that is protected",
    "budget.early_floor": "protection ramp's floor at the start",
    "budget.late_floor": "protection ramp's floor at the end",
    "budget.prune_min": "smallest prune fraction of any layer",
    "budget.prune_max": "largest prune fraction of any layer",
    "budget.normalize": "how the layer sensitivities become R in [0, 1]",
    "budget.cap_margin": "no layer prunes more than total_prune + cap_margin; none: prune_max",
    "budget.min_keep_ratio": "no layer keeps less than this share of the mean kept fraction "
    "(1 - total_prune); none: no such cap",
    "budget.uniform_blend": "blend a in [0, 1] of the final fractions toward blend_toward",
    "budget.blend_toward": "the blend's target: total_prune everywhere (uniform) or the budget "
    "from the sensitivities alone",
}


def _doc_help(owner: type, name: str) -> str:
    """The clause of ``owner``'s docstring that starts with ``name`` (rst markup dropped)."""
    doc = " ".join((owner.__doc__ or "").split())
    for m in re.finditer(rf"(?:^|[.;:] )(``{name}``(?:/``\w+``)*[^;]*?)(?:\. |; |\.$|$)", doc):
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", m.group(1)).replace("``", "")
        return text[:240]
    return ""


def _setting_help(leaf: _Leaf) -> str:
    """The help of a setting: its metadata, the table, its docstring clause, or its path."""
    text = leaf.field.metadata.get("help") or _HELP.get(leaf.path)
    return text or _doc_help(leaf.owner, leaf.field.name) or leaf.path


def _leaf_help(leaf: _Leaf) -> str:
    text = _setting_help(leaf)
    default = leaf.field.default
    if leaf.field.default_factory is not dataclasses.MISSING:
        default = leaf.field.default_factory()
    shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def add_dart_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ARM_OWNED) -> None:
    """Add a ``--dart.<path>`` flag per DARTConfig setting but those in ``exclude`` (in their
    own argument group). Flags have no argparse default: only those given reach the namespace
    (as ``dart.<path>`` keys, read by :func:`dart_overrides`)."""
    group = parser.add_argument_group(
        "DARTConfig settings (every arm; YAML: the same keys under a `dart:` mapping)"
    )
    for leaf in _leaves():
        if leaf.path in exclude:
            continue
        base, optional = _unwrap_optional(leaf.type)
        kw: dict[str, Any] = {
            "dest": f"{DART}.{leaf.path}",
            "default": argparse.SUPPRESS,
            "help": _leaf_help(leaf),
        }
        choices = _choices_of(leaf.path)
        if choices is not None and not optional:
            kw["choices"] = choices
        elif base is bool:
            kw["metavar"] = "{true,false}"
        elif _element_type(base) is not None:
            kw["metavar"] = "N[,...]"
            kw["help"] += f"; a negative first value as {leaf.flag}=-1"
        else:
            name = {int: "INT", float: "FLOAT"}.get(base, "TEXT")
            kw["metavar"] = f"{name}|none" if optional else name
        group.add_argument(leaf.flag, **kw)


def _coerce_leaf(leaf: _Leaf, value: Any, where: str) -> Any:
    """A flag's text as the setting's type (lists, not tuples: as YAML gives them)."""
    _, optional = _unwrap_optional(leaf.type)
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    meta = {"min": _MINIMUM[leaf.path]} if leaf.path in _MINIMUM else {}
    choices = _choices_of(leaf.path)
    if choices is not None:
        meta["choices"] = choices
    value = coerce(dataclasses.field(metadata=meta), leaf.type, value, where)
    return list(value) if isinstance(value, tuple) else value


def _check_mapping(data: Any, owned: tuple[str, ...], source: str) -> None:
    """Refuse a ``dart:`` mapping that is not one, or names unknown or owned settings."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {DART}: {data!r} is not a mapping of DARTConfig settings")
    sections = _sections()
    for key, value in data.items():
        if key in owned:
            raise ConfigError(
                f"{source}: {DART}.{key} is set by {_OWNER_FLAG.get(key, key)} (a shared option "
                "of the command), not in the dart mapping"
            )
        if key in sections and key:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {DART}.{key}: {value!r} is not a mapping")
            _check_known(
                {str(k) for k in value},
                {f.name for f in dataclasses.fields(sections[key])},
                f"{source}: {DART}.{key}",
            )
    known = {f.name for f in dataclasses.fields(DARTConfig)} - set(owned)
    _check_known({str(k) for k in data}, known, f"{source}: {DART}")


def _name_settings(message: str, flags: set[str], source: str) -> str:
    """DARTConfig's message with its settings named as the user gave them: the flag
    (``--dart.drift.window``) or the YAML key (``c.yaml: dart.drift.window``)."""
    prefix = {name.__name__: f"{key}." if key else "" for key, name in _sections().items()}

    def name(m: re.Match) -> str:
        path = prefix[m.group(1)] + m.group(2)
        return f"--{DART}.{path}" if path in flags else f"{source}: {DART}.{path}"

    pattern = rf"\b({'|'.join(prefix)})\.(\w+)"
    return re.sub(pattern, name, message)


def dart_overrides(
    given: Mapping[str, Any] | argparse.Namespace,
    yaml: Mapping[str, Any] | None = None,
    *,
    source: str = "options",
    owned: tuple[str, ...] = ARM_OWNED,
    fields: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The DARTConfig settings of a command line: the YAML ``dart:`` mapping ``yaml`` (from
    ``source``) overridden key by key by the ``--dart.*`` flags in ``given`` (a namespace or
    its ``vars``); None when neither gives any. Checked by DARTConfig's validation with
    ``fields`` (e.g. the command's backend and seed) added; a ConfigError names the flag or
    the YAML key."""
    given = vars(given) if isinstance(given, argparse.Namespace) else given
    leaves = {leaf.path: leaf for leaf in _leaves()}
    flags = {k[len(DART) + 1 :]: v for k, v in given.items() if k.startswith(f"{DART}.")}
    unknown = sorted(set(flags) - set(leaves))
    if unknown:
        names = ", ".join(f"--{DART}.{u}" for u in unknown)
        raise ConfigError(f"unknown DARTConfig settings {names}")
    if yaml is not None:
        _check_mapping(yaml, owned, source)
    for path in flags:
        if path in owned:
            raise ConfigError(f"--{DART}.{path}: set by {_OWNER_FLAG.get(path, path)} instead")
    if yaml is None and not flags:
        return None
    merged = copy.deepcopy(dict(yaml or {}))
    for path, value in flags.items():
        leaf = leaves[path]
        value = _coerce_leaf(leaf, value, leaf.flag)
        *section, name = path.split(".")
        target = merged
        for key in section:
            target = target.setdefault(key, {})
        target[name] = value
    _validate(merged, fields or {}, set(flags), source)
    return merged


def _validate(merged: Mapping[str, Any], fields: Mapping[str, Any], flags: set[str], source: str):
    try:
        DARTConfig.from_dict({**copy.deepcopy(dict(merged)), **fields})
    except ConfigError as e:
        raise ConfigError(_name_settings(str(e), flags, source)) from None


def dart_config_from(
    given: Mapping[str, Any] | argparse.Namespace,
    yaml: Mapping[str, Any] | None = None,
    *,
    source: str = "options",
    **fields: Any,
) -> DARTConfig:
    """The DARTConfig of a command line: :func:`dart_overrides` of ``given`` over ``yaml``,
    then ``fields`` (e.g. ``method=...``, ``total_prune=...``, which win); an error names the
    flag or YAML key."""
    overrides = dart_overrides(given, yaml, source=source, owned=tuple(fields), fields=fields)
    return DARTConfig.from_dict({**(overrides or {}), **fields})
