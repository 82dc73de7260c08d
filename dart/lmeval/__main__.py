"""``python -m dart.lmeval``: the comparison runner, protocol configs, reports, and lm-eval's
own command line with ``dart`` registered.

* ``python -m dart.lmeval run --tasks ... --methods ... --total-prune ...`` runs the comparison
  (:func:`dart.lmeval.runner.run_lm_eval`; the same as ``dart eval lm-eval``), with the
  ``--dart.*`` DARTConfig flags of every command (or a ``dart:`` mapping in ``--config``);
* ``python -m dart.lmeval protocol CONFIG`` the runs of a protocol config;
* ``python -m dart.lmeval report FOLDER`` shows a folder's arms side by side;
* anything else is lm-eval's own command line (``lm_eval.__main__.cli_evaluate``) after
  ``import dart`` registered the model type, with the offline tasks on its include path::

      python -m dart.lmeval --model dart \\
          --model_args pretrained=smollm2-135m,method=dart,total_prune=0.5 \\
          --tasks boolq --limit 20

The command-line parsing lives here: it uses the option machinery of :mod:`dart.options`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.config import ConfigError
from ..core.methods import METHODS
from ..options import add_options, load_yaml, options_from, resolve_options
from .model import CONTEXT_PHASES
from .registration import register
from .report import comparison_table, load_lmeval_metrics, plot_comparison
from .runner import LMEvalOptions, results_table, run_lm_eval
from .tasks import default_tasks_dir, ensure_tasks

__all__ = ["ProtocolOptions", "load_protocol", "main", "run_protocol"]


@dataclass
class ProtocolOptions:
    """Options of ``python -m dart.lmeval protocol``: which runs of a protocol config, and
    overrides of every run's options."""

    protocol: str = field(
        metadata={"help": "protocol config, e.g. configs/lmeval/paper.yaml", "positional": True}
    )
    runs: list[str] | None = field(default=None, metadata={"help": "a subset of its runs"})
    methods: list[str] | None = field(
        default=None, metadata={"help": "override the arms", "choices": tuple(METHODS)}
    )
    total_prune: list[float] | None = field(
        default=None, metadata={"help": "override the sparsities"}
    )
    limit: int | None = field(default=None, metadata={"help": "override every run's limit"})
    context: str | None = field(
        default=None, metadata={"help": "override the context phase", "choices": CONTEXT_PHASES}
    )
    out: str | None = field(default=None, metadata={"help": "parent folder of the runs"})


def load_protocol(path: str | os.PathLike) -> dict[str, LMEvalOptions]:
    """The runs of a protocol config: shared options at the top, one entry per run under
    ``runs`` (its options override the shared ones; its folder is ``<out>/<run name>``)."""
    data = load_yaml(path)
    runs = data.pop("runs", None)
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path}: needs a `runs:` mapping of run name -> options")
    out = data.pop("out", "results/lmeval")
    return {
        name: options_from(
            LMEvalOptions, {**data, "out": f"{out}/{name}", **(opts or {})}, f"{path}: {name}"
        )
        for name, opts in runs.items()
    }


def run_protocol(args: ProtocolOptions) -> None:
    """The runs of a protocol config (or ``args.runs`` of them), with ``args``' overrides."""
    runs = load_protocol(args.protocol)
    for name in args.runs or list(runs):
        if name not in runs:
            raise ConfigError(f"no run {name!r} in {args.protocol}; runs: {', '.join(runs)}")
        changes = {k: getattr(args, k) for k in ("methods", "total_prune", "limit", "context")}
        opts = replace(runs[name], **{k: v for k, v in changes.items() if v is not None})
        if args.out:
            opts = replace(opts, out=f"{args.out}/{name}")
        print(f"== {name} -> {opts.out}", flush=True)
        print(results_table(run_lm_eval(opts)), flush=True)


def _parse(parser: argparse.ArgumentParser, argv: list[str], cls: type) -> Any:
    """The options instance of ``argv``; a bad value exits with the parser's usage error."""
    try:
        (opts,) = resolve_options(vars(parser.parse_args(argv)), cls)
    except ConfigError as e:
        parser.error(str(e))
    return opts


def report(argv: list[str]) -> None:
    """``python -m dart.lmeval report FOLDER``: the arms side by side (table on stdout) and,
    with ``--figure``, the per-task and paired-difference plot."""
    parser = argparse.ArgumentParser(
        prog="python -m dart.lmeval report", description="A results folder's arms side by side."
    )
    parser.add_argument("folder", help="a dart.lmeval results folder (holds metrics.json)")
    parser.add_argument("--metric", default="acc", help="per-sample metric (default: acc)")
    parser.add_argument("--figure", default=None, help="write the plot here (.png, .pdf)")
    parser.add_argument("--title", default=None, help="the plot's title")
    args = parser.parse_args(argv)
    try:
        metrics = load_lmeval_metrics(args.folder)
        print(comparison_table(metrics, args.metric))
        if args.figure:
            print(f"figure: {plot_comparison(args.figure, metrics, args.metric, args.title)}")
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in lm-eval's arguments (``--flag v`` or ``--flag=v``)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def main(argv: list[str] | None = None) -> None:
    """See the module docstring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        parser = argparse.ArgumentParser(
            prog="python -m dart.lmeval run", description="Compare arms through lm-eval."
        )
        add_options(parser, LMEvalOptions)
        opts = _parse(parser, argv[1:], LMEvalOptions)
        print(results_table(run_lm_eval(opts)))
        return
    if argv[:1] == ["report"]:
        report(argv[1:])
        return
    if argv[:1] == ["protocol"]:
        parser = argparse.ArgumentParser(
            prog="python -m dart.lmeval protocol", description="Run a protocol config."
        )
        add_options(parser, ProtocolOptions, config=False)
        args = _parse(parser, argv[1:], ProtocolOptions)
        try:
            run_protocol(args)
        except ConfigError as e:
            parser.error(str(e))
        return
    from lm_eval.__main__ import cli_evaluate

    register()  # `import dart` did it lazily; this makes sure
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        tasks = _flag_value(argv, "--tasks")  # the offline tasks it asks for (default: all)
        names = [t.strip() for t in tasks.split(",")] if tasks else None
        argv += ["--include_path", str(ensure_tasks(default_tasks_dir(), names))]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
