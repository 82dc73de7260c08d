"""The `dart` command (also `python -m dart`).

Every subcommand's flags are derived from typed option dataclasses (:mod:`dart.options`): the
shared :class:`~dart.experiment.RunOptions` and each task's options from the task registry
(:data:`dart.evaluate.tasks.TASKS`). YAML files (``--config``) load into the same dataclasses.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .assets.models import PACKAGED_MODELS, PackagedModel
from .core.config import ConfigError, DARTConfig
from .core.methods import get_method
from .evaluate.store import RecordStore
from .evaluate.tasks import TASKS, GenerateOptions, Task, prompt_texts
from .experiment import RunOptions, run_experiment
from .options import ModelOptions, add_options, dart_field, resolve_options
from .results import unique_folder

__all__ = ["DemoOptions", "ExportOptions", "build_parser", "export_config", "main"]

# Keys of a saved config.yaml that are not options (so a results folder's config reruns it).
SAVED_KEYS = ("task", "command")


def _default_out(run: RunOptions, name: str) -> RunOptions:
    """``run`` with a new ``results/<name>-<time>`` folder when ``--out`` was not given."""
    return run if run.out else replace(run, out=str(unique_folder("results", name)))


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (flags have no argparse defaults)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


# -- eval / generate -----------------------------------------------------------------------------
def cmd_task(task: Task, args: argparse.Namespace) -> int:
    run, options = resolve_options(_given(args), RunOptions, task.options, ignore=SAVED_KEYS)
    run = _default_out(run, task.name)
    run_experiment(task, run, options, command=args._command)
    print(f"results: {run.out}/metrics.json")
    return 0


# -- report --------------------------------------------------------------------------------------
@dataclass
class ReportOptions:
    folders: list[str] = field(metadata={"help": "results folders", "positional": True})
    out: str = field(default="results/report", metadata={"help": "report folder"})


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    (options,) = resolve_options(_given(args), ReportOptions)
    path = build_report(options.folders, options.out)
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path}")
    return 0


# -- demo ----------------------------------------------------------------------------------------
DEMO_METHODS = ["dense", "static", "griffin", "dart"]


@dataclass(kw_only=True)
class DemoOptions(ModelOptions):
    """Options of `dart demo`: the shared model options, one prompt and one sparsity (the arms
    are :data:`DEMO_METHODS`)."""

    prompt: str | None = field(
        default=None, metadata={"help": "the prompt (default: the first packaged drift prompt)"}
    )
    total_prune: float | None = field(
        default=None,
        metadata={"help": "FFN sparsity of the pruned arms (default: the packaged model's demo "
                  "sparsity, 0.3 for smollm2-135m, 0.5 for qwen2.5-coder-1.5b; else 0.3)"},
    )  # fmt: skip
    max_new_tokens: int = field(default=160, metadata={"min": 1, "help": "greedy tokens generated"})
    threads: int | None = field(default=None, metadata={"min": 1, "help": "torch CPU threads"})
    width: int = field(default=36, metadata={"min": 1, "help": "column width of the side-by-side"})
    out: str | None = field(
        default=None, metadata={"help": "results folder (default results/demo-<time>)"}
    )
    dart: dict[str, Any] | None = dart_field()


def _side_by_side(columns: dict[str, str], width: int) -> str:
    wrapped = {k: textwrap.wrap(v.replace("\n", " "), width) or [""] for k, v in columns.items()}
    rows = max(len(v) for v in wrapped.values())
    lines = ["   ".join(k.upper().ljust(width) for k in wrapped)]
    lines.append("   ".join("-" * width for _ in wrapped))
    for i in range(rows):
        cells = (v[i] if i < len(v) else "" for v in wrapped.values())
        lines.append("   ".join(c.ljust(width) for c in cells))
    return "\n".join(lines)


def _demo_total_prune(demo: DemoOptions) -> float:
    if demo.total_prune is not None:
        return demo.total_prune
    packaged = PACKAGED_MODELS.get(demo.model)
    return packaged.demo_total_prune if packaged else PackagedModel.demo_total_prune


def cmd_demo(args: argparse.Namespace) -> int:
    """Dense vs static vs GRIFFIN vs DART on one prompt: a `dart generate` run, printed side
    by side."""
    import json

    (demo,) = resolve_options(_given(args), DemoOptions)
    run = RunOptions(
        model=demo.model,
        methods=DEMO_METHODS,
        total_prune=[_demo_total_prune(demo)],
        seed=demo.seed,
        out=demo.out,
        backend=demo.backend,
        threads=demo.threads,
        weights=demo.weights,
        dart=demo.dart,
    )
    run = _default_out(run, "demo")
    prompts = [demo.prompt] if demo.prompt else []
    options = GenerateOptions(prompts=prompts, max_new_tokens=demo.max_new_tokens, batch_size=1)
    run_experiment(TASKS["generate"], run, options, command=args._command)
    records = {r["method"]: r for r in RecordStore(run.out) if r["id"] == "p0"}
    stats = json.loads((RecordStore(run.out).folder / "stats.json").read_text())
    print(f"\nprompt: {prompt_texts(options)[0]}\n")
    print(_side_by_side({m: r["text"] for m, r in records.items()}, demo.width))
    print(f"\n{'arm':<8}{'tok/s':>8}{'nominal':>9}{'effective':>11}{'refreshes':>11}  drift at")
    for method, r in records.items():
        refreshes = stats.get(f"{method}@{r['total_prune']}", {}).get("mask_refreshes", 0)
        steps = ",".join(map(str, r["events"])) or "-"
        print(
            f"{method:<8}{len(r['new_tokens']) / r['seconds']:>8.1f}{r['nominal_sparsity']:>9.2f}"
            f"{r['effective_sparsity']:>11.2f}{refreshes:>11}  {steps}"
        )
    print(f"results: {run.out}/metrics.json")
    return 0


# -- lm-eval / export ----------------------------------------------------------------------------
LM_EVAL_HELP = "the arms through lm-eval's tasks (offline), with paired differences"


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """`dart eval lm-eval`: the arms through lm-eval's tasks (dart.lmeval). Its flags are
    derived here, on use, so that other commands do not import lm-eval."""
    from .lmeval import LMEvalOptions, results_table, run_lm_eval

    parser = argparse.ArgumentParser(prog="dart eval lm-eval", description=LM_EVAL_HELP)
    add_options(parser, LMEvalOptions)
    (options,) = resolve_options(_given(parser.parse_args(args._rest)), LMEvalOptions)
    print(results_table(run_lm_eval(options)))
    return 0


@dataclass(kw_only=True)
class ExportOptions(ModelOptions):
    """Options of `dart export`: the shared model options, the static shapes of the programs and
    the one DARTConfig exported (``--dart.method``, ``--dart.total_prune``, ``--dart.layer_topk``
    ...; drift detection is off in an export)."""

    out: str = field(metadata={"help": "output folder (the package: programs + manifest.json)"})
    batch: int = field(default=1, metadata={"min": 1, "help": "fixed batch size of the programs"})
    max_len: int = field(default=512, metadata={"min": 2, "help": "static KV cache length"})
    prompt_len: int | None = field(
        default=None,
        metadata={"min": 1, "help": "fixed prompt length (default: dynamic, 1..max_len-1)"},
    )
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "calibration prompt of an auto budget (the keep counts are allocated from "
            "it at export time); default: the first packaged drift prompt"
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "weight dtype of the exported model"}
    )
    no_compile: bool = field(
        default=False, metadata={"help": "torch.export only (no AOTInductor packages)"}
    )
    # method, total_prune, layer_topk, ... of the export; backend and seed are the shared ones
    dart: dict[str, Any] | None = dart_field(owned=("backend", "seed"))


def export_config(options: ExportOptions) -> DARTConfig:
    """The DARTConfig `dart export` packages: the ``--dart.*`` settings (an ``auto`` budget
    at the default sparsity unless ``--dart.total_prune`` says otherwise), the shared backend and
    seed, drift detection off."""
    data = dict(options.dart or {})
    data.update(backend=options.backend, seed=options.seed)
    data["drift"] = {**(data.get("drift") or {}), "enabled": False}
    config = DARTConfig.from_dict(data)
    if config.total_prune is None and config.prune_target is not None:
        config.total_prune = config.prune_target  # recorded in the manifest as it runs
    return config


def cmd_export(args: argparse.Namespace) -> int:
    """`dart export`: load the model and export it into ``--out``."""
    from .runtime.export import export_decode
    from .runtime.loading import load_model

    (options,) = resolve_options(_given(args), ExportOptions)
    config = export_config(options)
    print(f"loading {options.model} ...", flush=True)
    model, tokenizer = load_model(options.model, dtype=options.dtype, weights=options.weights)
    calibration = None
    method = get_method(config.method)
    if config.has_auto and method.prunes and not method.uniform_budget:
        text = options.prompt
        if text is None:
            from .assets.data import load_drift_prompts

            text = load_drift_prompts("two_topic")[0].prompt
        calibration = tokenizer(text, return_tensors="pt")["input_ids"][:, : options.max_len]
    print("exporting ...", flush=True)
    manifest = export_decode(
        model,
        options.out,
        options.batch,
        options.max_len,
        config=config,
        calibration_ids=calibration,
        prompt_len=options.prompt_len,
        compile=not options.no_compile,
    )
    kept = sum(manifest["keep_counts"]) / sum(manifest["widths"])
    print(
        f"wrote {options.out}: keep {kept:.1%} of FFN neurons, export "
        f"{manifest['export_seconds']:.1f}s, AOTInductor {manifest['compile_seconds']:.1f}s\n"
        f"run: python scripts/run_exported.py {options.out} --prompt-ids 1,2,3 "
        "--max-new-tokens 32"
    )
    return 0


# -- the parser ----------------------------------------------------------------------------------
def _task_parser(sub: Any, name: str, task: Task, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=task.help)
    add_options(p, RunOptions, task.options)
    p.set_defaults(_run=lambda args: cmd_task(task, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dart", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug",
        dest="_debug",
        action="store_true",
        help="show the full traceback of an error (anywhere on the command line)",
    )
    sub = parser.add_subparsers(dest="_command_name", required=True)
    ev = sub.add_parser("eval", help="perplexity, MMLU, summarisation, knowledge drift")
    ev_sub = ev.add_subparsers(dest="_task", required=True)
    for name, task in TASKS.items():
        _task_parser(ev_sub, name, task, f"{task.help}; all --methods side by side")
    lm_eval = ev_sub.add_parser("lm-eval", help=LM_EVAL_HELP, add_help=False)
    lm_eval.set_defaults(_run=cmd_lm_eval, _passes_flags=True)
    _task_parser(sub, "generate", TASKS["generate"], "generate with every arm, records to JSONL")
    rep = sub.add_parser("report", help="results folders -> markdown table and plots")
    add_options(rep, ReportOptions, config=False)
    rep.set_defaults(_run=cmd_report)
    demo = sub.add_parser(
        "demo", help="dense, static, GRIFFIN and DART side by side on a two-topic prompt"
    )
    add_options(demo, DemoOptions)
    demo.set_defaults(_run=cmd_demo)
    export = sub.add_parser("export", help="torch.export + AOTInductor packages of the decode step")
    add_options(export, ExportOptions)
    export.set_defaults(_run=cmd_export)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a bad input or state the user can fix (shown as one message, no
    traceback), as opposed to a bug."""
    from .evaluate.store import FingerprintMismatchError, FolderLockedError
    from .results import CorruptFileError
    from .runtime.runner import PackageError

    return (
        ConfigError,
        FolderLockedError,
        FingerprintMismatchError,
        CorruptFileError,
        PackageError,
        ValueError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (also after a subcommand's flags): tracebacks are shown
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "_passes_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args._rest = rest
    args._command = "dart " + " ".join(argv)
    try:
        return args._run(args)
    except _expected_errors() as e:
        if debug:
            raise
        code = 2 if isinstance(e, (ConfigError, ValueError)) else 1
        hint = "" if isinstance(e, ConfigError) else " (--debug shows the traceback)"
        parser.exit(code, f"dart: error: {e}{hint}\n")


if __name__ == "__main__":
    sys.exit(main())
