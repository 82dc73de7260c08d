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
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .core.config import ConfigError

__all__ = ["add_options", "load_yaml", "options_dict", "options_from", "resolve_options"]


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


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    for field, _ in _fields(cls):
        missing = field.default is dataclasses.MISSING
        if missing and field.default_factory is dataclasses.MISSING and field.name not in values:
            raise ConfigError(f"{source}: {field.name} ({_flag(field)}) is required")
    return cls(**values)


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
    source = str(config) if config else "options"
    data = {k: v for k, v in load_yaml(config).items() if k not in ignore} if config else {}
    fields = [_fields(cls) for cls in classes]
    known = {f.name for own in fields for f, _ in own}
    _check_known(data, known, source)
    _check_known(given, known, "command line")
    out = []
    for cls, own in zip(classes, fields, strict=True):
        values = {}
        for f, tp in own:
            if f.name in given:
                values[f.name] = coerce(f, tp, given[f.name], _flag(f))
            elif f.name in data:
                values[f.name] = coerce(f, tp, data[f.name], f"{source}: {f.name}")
        out.append(_build(cls, values, source))
    return tuple(out)


def options_dict(*instances: Any) -> dict[str, Any]:
    """The fields of option instances as one flat dict (tuples as lists, for YAML/JSON)."""
    out: dict[str, Any] = {}
    for obj in instances:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
