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


# -- the DARTConfig flags and the shared declaration ----------------------------------------------
def _cli(argv: list[str]) -> tuple[Any, ...]:
    """The option instances of a `dart` command line, as the CLI resolves them."""
    from dart.cli import DemoOptions, ExportOptions, build_parser
    from dart.evaluate.tasks import TASKS
    from dart.experiment import RunOptions

    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if argv[0] == "export":
        return resolve_options(given, ExportOptions)
    if argv[0] == "demo":
        return resolve_options(given, DemoOptions)
    task = TASKS[args._task] if argv[0] == "eval" else TASKS["generate"]
    return resolve_options(given, RunOptions, task.options)


NESTED = ["--dart.drift.retrace_tokens", "32", "--dart.budget.uniform_blend", "0.25",
          "--dart.layer_topk", "0-1:auto", "--dart.drift.layers=-1,-2"]  # fmt: skip
NESTED_YAML = {
    "drift": {"retrace_tokens": 32, "layers": [-1, -2]},
    "budget": {"uniform_blend": 0.25},
    "layer_topk": "0-1:auto",
}


@pytest.mark.parametrize("command", [["eval", "ppl"], ["generate"], ["eval", "mmlu"], ["demo"]])
def test_nested_flags_reach_every_arms_config(command):
    from dart.evaluate.arms import Arm, arm_config

    run = _cli([*command, *NESTED])[0]
    assert run.dart == NESTED_YAML  # the mapping a YAML `dart:` section gives
    config = arm_config(Arm("dart", 0.7), run.dart, backend=run.backend, seed=run.seed)
    assert (config.drift.retrace_tokens, config.drift.layers) == (32, (-1, -2))
    assert config.budget.uniform_blend == 0.25 and config.layer_topk == "0-1:auto"
    assert config.total_prune == 0.7 and config.budget.prune_max == 0.9  # the rest: defaults


def test_nested_flags_reach_dart_export():
    from dart.cli import export_config

    argv = ["export", "--out", "pkg", "--dart.method", "griffin", "--backend", "compact"]
    (options,) = _cli([*argv, "--dart.total_prune", "0.7", "--dart.budget.prune_max", "0.8"])
    config = export_config(options)
    assert (config.method, config.total_prune, config.backend) == ("griffin", 0.7, "compact")
    assert config.budget.prune_max == 0.8 and config.drift.enabled is False  # no drift in export
    # the defaults are what `dart export` always exported: dart at 0.5 on the gathered kernels
    config = export_config(_cli(["export", "--out", "pkg"])[0])
    assert (config.method, config.total_prune, config.backend) == ("dart", 0.5, "gathered")
    config = export_config(_cli(["export", "--out", "p", "--dart.layer_topk", "all:0.6"])[0])
    assert config.total_prune is None and config.fixed_keep_counts([10]) == [6]


def test_yaml_and_flags_give_the_same_config(tmp_path):
    import yaml

    from dart.evaluate.arms import Arm, arm_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dart": NESTED_YAML}))
    by_yaml = _cli(["eval", "ppl", "--config", str(cfg)])[0]
    by_flags = _cli(["eval", "ppl", *NESTED])[0]
    assert by_yaml.dart == by_flags.dart
    assert options_dict(by_yaml) == options_dict(by_flags)  # so the same run fingerprint
    arm = Arm("dart", 0.5)
    assert arm_config(arm, by_yaml.dart) == arm_config(arm, by_flags.dart)
    # a flag overrides its own key of the mapping and leaves the others
    cfg.write_text(yaml.safe_dump({"dart": {"drift": {"window": 8, "retrace_tokens": 16}}}))
    run = _cli(["eval", "ppl", "--config", str(cfg), "--dart.drift.retrace_tokens", "4"])[0]
    assert run.dart == {"drift": {"window": 8, "retrace_tokens": 4}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dart.drift.window", "0"], "--dart.drift.window: 0 is below the minimum 1"),
        (["--dart.drift.window", "x"], "--dart.drift.window: 'x' is not a valid int"),
        (["--dart.budget.uniform_blend", "2"], "--dart.budget.uniform_blend: 2.0 is not a numb"),
        (["--dart.budget.prune_min", "0.95"], "--dart.budget.prune_min: 0.95 is greater than"),
        (["--dart.layer_topk", "all"], "--dart.layer_topk: item 'all' of 'all' is not of the"),
        (["--dart.drift.enabled", "maybe"], "--dart.drift.enabled: 'maybe' is not a valid bool"),
    ],
)
def test_a_bad_value_names_the_flag(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cli(["eval", "ppl", *argv])


@pytest.mark.parametrize(
    "dart, message",
    [
        ({"drift": {"window": 0}}, "c.yaml: dart.drift.window: 0 is not an integer >= 1"),
        ({"drift": {"windw": 3}}, "c.yaml: dart.drift: unknown keys 'windw'"),
        ({"backend": "masked"}, "c.yaml: dart.backend is set by --backend"),
        ({"method": "dart"}, "c.yaml: dart.method is set by --methods"),
        ({"sensitivity": "raw"}, "c.yaml: dart: unknown keys 'sensitivity'"),
        ([1, 2], "c.yaml: dart: [1, 2] is not a mapping"),
    ],
)
def test_a_bad_yaml_setting_names_the_key(tmp_path, dart, message):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"dart": dart}))
    with pytest.raises(ConfigError, match=re.escape(message.replace("c.yaml", str(cfg)))):
        _cli(["eval", "ppl", "--config", str(cfg)])


def test_help_lists_the_nested_flags_and_the_arms_own_none():
    from dart.cli import build_parser
    from dart.options import _leaves

    def help_of(argv: list[str]) -> str:
        sub = build_parser()._subparsers._group_actions[0].choices[argv[0]]
        for name in argv[1:]:
            sub = sub._subparsers._group_actions[0].choices[name]
        return sub.format_help()

    text = help_of(["eval", "ppl"])
    for leaf in _leaves():
        owned = leaf.path in ("method", "total_prune", "backend", "seed")
        assert (leaf.flag in text) != owned, leaf.path  # the arms and shared options set those
    assert "{attn_output,attn_probs,attn_content}" in text and "(default: 64)" in text
    for argv in (["generate"], ["demo"], ["export"]):
        assert "--dart.drift.retrace_tokens" in help_of(argv)
    assert "--dart.total_prune" in help_of(["export"])  # export packages one DARTConfig
    assert "--dart.backend" not in help_of(["export"])  # --backend, shared by every command


def test_every_setting_has_help_and_every_name_setting_its_choices():
    from dart.options import _choices_of, _leaves, _setting_help

    for leaf in _leaves():
        assert _setting_help(leaf) != leaf.path, f"{leaf.path}: no help"
        if leaf.type is str and leaf.path != "layer_topk":  # a name out of a table
            assert _choices_of(leaf.path), f"{leaf.path}: no choices"


def test_one_declaration_of_the_shared_options():
    from dart.cli import DemoOptions, ExportOptions
    from dart.experiment import RunOptions
    from dart.lmeval.runner import LMEvalOptions
    from dart.options import ArmOptions, ModelOptions

    for cls in (RunOptions, LMEvalOptions):
        assert issubclass(cls, ArmOptions)
    for cls in (DemoOptions, ExportOptions):
        assert issubclass(cls, ModelOptions)
    shared = {f.name: f for f in dataclasses.fields(ArmOptions)}
    for cls in (RunOptions, LMEvalOptions, DemoOptions, ExportOptions):
        for f in dataclasses.fields(cls):
            if f.name in shared and f.name != "total_prune":  # demo: one optional sparsity
                assert f is shared[f.name] or f == shared[f.name], (cls, f.name)


def test_run_options_keep_their_fingerprint_keys():
    """A run's fingerprint holds its resolved options: the shared declaration and the flags
    must not add or rename a key (records of an unchanged config keep resuming), and a changed
    setting must change it."""
    from dart.evaluate.store import run_fingerprint

    run = _cli(["eval", "ppl"])[0]
    assert set(options_dict(run)) == {
        "model", "weights", "methods", "total_prune", "seed", "out", "backend", "calibration",
        "calibration_tokens", "accelerator", "devices", "strategy", "threads", "quiet",
        "stop_after", "dart",
    }  # fmt: skip
    assert run.dart is None  # as before: no settings given

    def fp(argv):
        return run_fingerprint("ppl", options_dict(_cli(["eval", "ppl", *argv])[0]), {}, {})

    assert fp([]) == fp([]) and fp(["--dart.drift.window", "8"]) != fp([])


def test_the_api_for_commands_with_their_own_parser():
    from dart.options import add_dart_flags, dart_config_from, dart_overrides

    parser = argparse.ArgumentParser()
    add_dart_flags(parser)
    args = parser.parse_args(["--dart.drift.window", "7", "--dart.ranking", "max"])
    yaml_mapping = {"drift": {"window": 5, "sigma_scale": 0.2}}
    assert dart_overrides(args, yaml_mapping) == {
        "drift": {"window": 7, "sigma_scale": 0.2}, "ranking": "max"}  # fmt: skip
    assert dart_overrides(parser.parse_args([])) is None
    config = dart_config_from(args, yaml_mapping, method="griffin", total_prune=0.6)
    assert (config.method, config.total_prune, config.drift.window) == ("griffin", 0.6, 7)
    assert config.drift.sigma_scale == 0.2 and config.ranking == "max"
    with pytest.raises(SystemExit):  # the arms' fields are not flags here
        parser.parse_args(["--dart.total_prune", "0.5"])
    with pytest.raises(ConfigError, match=re.escape("--dart.drift.window: 0 is below")):
        dart_config_from(parser.parse_args(["--dart.drift.window", "0"]), method="dart")


def test_a_setting_without_help_gets_its_docstring_clause():
    from dart.core.config import BudgetConfig, DriftConfig
    from dart.options import _doc_help

    assert _doc_help(BudgetConfig, "cap_margin").startswith("cap_margin: no layer prunes more")
    assert _doc_help(DriftConfig, "num_buckets").startswith("num_buckets is the number of log")
    assert _doc_help(DriftConfig, "no_such_field") == ""
