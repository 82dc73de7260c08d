"""Typed options: flags and YAML keys derived from one dataclass declaration per option."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from dart.core.config import ConfigError
from dart.options import add_options, options_dict, options_from, resolve_options


@dataclass
class Example:
    name: str = field(metadata={"help": "a required name"})
    size: int = field(default=3, metadata={"help": "a size"})
    rate: float | None = field(default=None, metadata={"help": "a rate"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "a mode"})
    level: int = field(default=1, metadata={"help": "a level", "choices": (1, 2, 3)})
    values: list[float] = field(default_factory=lambda: [0.5], metadata={"help": "values"})
    lines: list[str] = field(
        default_factory=list, metadata={"help": "a line", "flag": "--line", "repeat": True}
    )
    verbose: bool = field(default=False, metadata={"help": "talk"})
    chat: bool = field(default=True, metadata={"help": "chat template"})
    extra: dict[str, Any] | None = field(default=None, metadata={"help": "YAML only"})


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_options(p, Example, **kw)
    return p


def _given(argv: list[str]) -> dict[str, Any]:
    return vars(_parser().parse_args(argv))


def test_flags_parse_into_typed_fields():
    (o,) = resolve_options(
        _given(
            ["--name", "n", "--size", "4", "--rate", "0.1", "--mode", "slow", "--level", "2"]
            + ["--values", "0.5,0.7", "--line", "a, b", "--line", "c", "--verbose", "--no-chat"]
        ),
        Example,
    )
    assert o == Example("n", 4, 0.1, "slow", 2, [0.5, 0.7], ["a, b", "c"], True, False, None)


def test_only_given_flags_override_defaults():
    assert _given(["--name", "n"]) == {"name": "n"}  # nothing else lands in the namespace
    (o,) = resolve_options(_given(["--name", "n"]), Example)
    assert o == Example("n")


def test_every_field_has_a_flag_with_its_help_but_yaml_only_ones():
    text = _parser().format_help()
    for f in dataclasses.fields(Example):
        if f.name == "extra":
            assert "--extra" not in text
        elif f.name == "chat":
            assert "--no-chat" in text
        else:
            assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in text
        assert f.name == "extra" or f.metadata["help"] in text
    assert "(default: 3)" in text and "{fast,slow}" in text


@pytest.mark.parametrize(
    "argv",
    [["--name", "n", "--mode", "medium"], ["--name", "n", "--level", "4"], ["--size", "x"]],
)
def test_bad_flags_are_argparse_errors(argv):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


def test_yaml_loads_into_the_same_dataclass_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: y\nsize: 5\nvalues: [0.1, 0.2]\nextra: {a: 1}\nchat: false\n")
    (o,) = resolve_options({**_given(["--size", "6"]), "config": str(cfg)}, Example)
    assert (o.name, o.size, o.values, o.extra, o.chat) == ("y", 6, [0.1, 0.2], {"a": 1}, False)
    cfg.write_text("name: y\nvalues: 0.3\n")  # a scalar for a list field
    (o,) = resolve_options({"config": str(cfg)}, Example)
    assert o.values == [0.3]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"name": "n", "sise": 3}, "unknown keys 'sise'; accepted: chat, extra"),
        ({"name": "n", "size": 2.5}, "size: 2.5 is not a valid int"),
        ({"name": "n", "size": True}, "size: True is not a valid int"),
        ({"name": "n", "mode": "medium"}, "mode: 'medium' is not one of fast, slow"),
        ({"name": "n", "values": [0.5, "x"]}, "values: 'x' is not a valid float"),
        ({"name": "n", "verbose": "yes"}, "verbose: 'yes' is not a valid bool"),
        ({"name": "n", "extra": [1]}, "extra: [1] is not a mapping"),
        ({"size": 2}, "name (--name) is required"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        options_from(Example, data, "c.yaml")


def test_options_dict_is_flat_and_yaml_safe():
    d = options_dict(Example("n"))
    assert d["name"] == "n" and d["values"] == [0.5] and d["extra"] is None
    assert options_from(Example, d) == Example("n")  # a saved dict loads back


def test_positional_list():
    @dataclass
    class Folders:
        folders: list[str] = field(metadata={"help": "folders", "positional": True})

    p = argparse.ArgumentParser()
    add_options(p, Folders, config=False)
    (o,) = resolve_options(vars(p.parse_args(["a", "b"])), Folders)
    assert o.folders == ["a", "b"]
