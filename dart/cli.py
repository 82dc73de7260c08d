"""The `dart` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
import types
import typing
from pathlib import Path

import torch

from .api import attach
from .config import DARTConfig
from .data import load_drift_prompts, load_text
from .export import ExportOptions, export_command
from .generation import generate
from .models import load_model
from .results import plot_drift, write_json

__all__ = ["main"]

DEMO_ARMS = ("dense", "static", "dart")


def _arm_config(arm: str, args: argparse.Namespace) -> DARTConfig:
    return DARTConfig(
        method=arm,
        total_prune=args.total_prune,
        backend=args.backend,
        drift={"enabled": arm == "dart"},
    )


def _side_by_side(columns: dict[str, str], width: int) -> str:
    wrapped = {k: textwrap.wrap(v.replace("\n", " "), width) or [""] for k, v in columns.items()}
    rows = max(len(v) for v in wrapped.values())
    lines = ["   ".join(k.upper().ljust(width) for k in wrapped)]
    lines.append("   ".join("-" * width for _ in wrapped))
    for i in range(rows):
        cells = (v[i] if i < len(v) else "" for v in wrapped.values())
        lines.append("   ".join(c.ljust(width) for c in cells))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads) if args.threads else None
    out = Path(args.out)
    print(f"loading {args.model} ...", flush=True)
    model, tokenizer = load_model(args.model)
    prompt = args.prompt or load_drift_prompts("two_topic")[0].prompt
    calibration = load_text("wiki", split="calibration")[:4000]
    records, texts, traces, events = [], {}, {}, {}
    for arm in DEMO_ARMS:
        cfg = _arm_config(arm, args)
        handle = attach(model, cfg)
        try:
            if arm == "static":
                handle.calibrate(calibration, tokenizer, max_tokens=512)
            result = generate(model, tokenizer, [prompt], args.max_new_tokens, progress=f"{arm:>6}")
            stats = handle.stats()
            history = handle.drift_history()
        finally:
            handle.detach()
        texts[arm] = result.texts[0]
        prompt_len = result.prompt_tokens
        if history:
            traces[arm] = [(s - prompt_len, sim, tau) for s, sim, tau in history[0]]
            events[arm] = [e["step"] for e in stats["drift_events"]]
        records.append(
            {
                "method": arm,
                "total_prune": 0.0 if arm == "dense" else args.total_prune,
                "backend": args.backend,
                "tokens_per_s": result.tokens_per_s,
                "new_tokens": len(result.new_tokens[0]),
                "prefill_seconds": result.prefill_seconds,
                "nominal_sparsity": stats["nominal_sparsity"],
                "effective_sparsity": stats["effective_sparsity"],
                "mask_refreshes": stats["mask_refreshes"],
                "drift_events": stats["drift_events"],
                "keep_counts": stats["keep_counts"],
                "extra_state_bytes": stats["extra_state_bytes_total"],
                "text": result.texts[0],
            }
        )
        write_json(
            out / "config.json",
            {
                "args": vars(args),
                "configs": {r["method"]: _arm_config(r["method"], args).to_dict() for r in records},
            },
        )
        write_json(out / "metrics.json", records)
    print(f"\nprompt: {prompt}\n")
    print(_side_by_side(texts, args.width))
    print()
    header = f"{'arm':<8}{'tok/s':>8}{'nominal':>9}{'effective':>11}{'refreshes':>11}  drift at"
    print(header)
    for r in records:
        steps = ",".join(str(e["step"]) for e in r["drift_events"]) or "-"
        print(
            f"{r['method']:<8}{r['tokens_per_s']:>8.1f}{r['nominal_sparsity']:>9.2f}"
            f"{r['effective_sparsity']:>11.2f}{r['mask_refreshes']:>11}  {steps}"
        )
    if traces:
        title = f"DART drift signal: {prompt[:60]}"
        png = plot_drift(out / "drift.png", traces, events, title=title)
        print(f"\ndrift plot: {png}")
    print(f"results: {out}/metrics.json")
    return 0


# -- eval / generate / report -------------------------------------------------------------------
EVAL_TASKS = ("ppl", "mmlu", "summarize", "drift")
COMMON_DEFAULTS: dict = {
    "model": "smollm2-135m",
    "methods": "dense,static,griffin,dart",
    "total_prune": "0.5",
    "seed": 0,
    "backend": "gathered",
    "limit": None,
    "max_tokens": None,
    "batch_size": 4,
    "calibration": "wiki",
    "calibration_tokens": 512,
    "accelerator": "auto",
    "devices": 1,
    "strategy": "auto",
    "threads": None,
    "quiet": False,
    "stop_after": None,
    "out": None,
    "dart": None,  # DARTConfig overrides (YAML only), e.g. {drift: {window: 8}}
}
TASK_DEFAULTS: dict[str, dict] = {
    "ppl": {"corpus": "wiki", "text_file": None, "window": 512, "stride": 256, "split": "eval"},
    "mmlu": {"shots": 5, "subjects": None, "n_per_subject": None, "split": "test", "leaky": False},
    "summarize": {
        "max_new_tokens": 128,
        "max_prompt_tokens": 768,
        "split": "eval",
        "compile": False,
    },
    "drift": {"max_new_tokens": 200, "release_steps": None, "compile": False},
    "generate": {
        "prompts": None,
        "prompts_file": None,
        "max_new_tokens": 128,
        "chat": True,
        "compile": False,
    },
}


def _common_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # only flags given on the command line override the YAML config
    p.add_argument("--config", default=S, help="YAML file of options (flags override it)")
    p.add_argument("--model", default=S, help="packaged model name or a local HF folder")
    p.add_argument("--methods", default=S, help="comma list of dense,static,griffin,random,dart")
    p.add_argument("--total-prune", default=S, help="FFN sparsity: one value or a comma list")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--out", default=S, help="results folder (rerunning resumes it)")
    p.add_argument("--backend", default=S, choices=("masked", "gathered", "compact"))
    p.add_argument("--limit", type=int, default=S, help="cap on samples")
    p.add_argument("--max-tokens", type=int, default=S, help="cap on evaluated tokens")
    p.add_argument("--batch-size", type=int, default=S, help="prompts per generate call")
    p.add_argument("--calibration", default=S, help="corpus of the static calibration text")
    p.add_argument("--calibration-tokens", type=int, default=S)
    p.add_argument("--accelerator", default=S, help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--devices", type=int, default=S, help="Lightning devices (processes)")
    p.add_argument("--strategy", default=S, help="Lightning strategy (auto, ddp, ddp_spawn)")
    p.add_argument("--threads", type=int, default=S, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", default=S, help="no progress bars")
    p.add_argument("--stop-after", type=int, default=S, help=argparse.SUPPRESS)


def _task_options(task: str, p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    if task == "ppl":
        p.add_argument("--corpus", default=S, choices=("wiki", "c4", "tiny"))
        p.add_argument("--text-file", default=S, help="a local text file instead of a corpus")
        p.add_argument("--window", type=int, default=S)
        p.add_argument("--stride", type=int, default=S)
        p.add_argument("--split", default=S, choices=("eval", "calibration", "all"))
    elif task == "mmlu":
        p.add_argument("--shots", type=int, default=S, choices=range(6))
        p.add_argument("--subjects", default=S, help="comma list (default: all 57)")
        p.add_argument("--n-per-subject", type=int, default=S)
        p.add_argument("--split", default=S, choices=("test", "dev"))
        p.add_argument(
            "--leaky",
            action="store_true",
            default=S,
            help="the reference code's protocol: masks from context + answer",
        )
    elif task == "summarize":
        p.add_argument("--max-new-tokens", type=int, default=S)
        p.add_argument("--max-prompt-tokens", type=int, default=S)
        p.add_argument("--split", default=S, choices=("eval", "calibration"))
    elif task == "drift":
        p.add_argument("--max-new-tokens", type=int, default=S)
        p.add_argument("--release-steps", default=S, help="comma list: DART release-step sweep")
    elif task == "generate":
        p.add_argument("--prompt", dest="prompts", action="append", default=S)
        p.add_argument("--prompts-file", default=S, help="one prompt per line")
        p.add_argument("--max-new-tokens", type=int, default=S)
        p.add_argument("--no-chat", dest="chat", action="store_false", default=S)
    if task in ("summarize", "drift", "generate"):
        p.add_argument(
            "--compile",
            action="store_true",
            default=S,
            help="generate in the compiled static-cache loop (dart.fast), same greedy tokens",
        )


def resolve_options(task: str, given: dict) -> dict:
    """defaults < YAML (``--config``) < flags given on the command line."""
    opts = {**COMMON_DEFAULTS, **TASK_DEFAULTS[task]}
    config = given.pop("config", None)
    if config:
        import yaml

        data = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        data.pop("task", None)
        unknown = sorted(set(data) - set(opts) - {"command"})
        if unknown:
            raise SystemExit(
                f"{config}: unknown keys {unknown}; accepted: {', '.join(sorted(opts))}"
            )
        data.pop("command", None)
        opts.update(data)
        opts["config"] = str(config)
    opts.update(given)
    for key in ("methods", "total_prune", "release_steps", "subjects"):
        if isinstance(opts.get(key), (list, tuple)):
            opts[key] = ",".join(str(v) for v in opts[key])
    if task == "generate":
        prompts = list(opts.get("prompts") or [])
        if opts.get("prompts_file"):
            lines = Path(opts["prompts_file"]).read_text(encoding="utf-8").splitlines()
            prompts += [ln for ln in lines if ln.strip()]
        if not prompts:
            prompts = [load_drift_prompts("two_topic")[0].prompt]
        opts["prompts"] = prompts
    if not opts.get("out"):
        opts["out"] = f"results/{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return opts


def _run_task(task: str, args: argparse.Namespace) -> int:
    from .evaluate.run import run_experiment

    given = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "func", "task") and not k.startswith("_")
    }
    opts = resolve_options(task, given)
    opts["command"] = "dart " + " ".join(args._argv) if getattr(args, "_argv", None) else None
    run_experiment(task, opts)
    print(f"results: {opts['out']}/metrics.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    return _run_task(args.task, args)


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_task("generate", args)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    path = build_report(args.folders, args.out)
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dart", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="perplexity, MMLU, summarisation, knowledge drift")
    ev_sub = ev.add_subparsers(dest="task", required=True)
    for task in EVAL_TASKS:
        p = ev_sub.add_parser(task, help=f"{task}: all --methods side by side")
        _common_options(p)
        _task_options(task, p)
        p.set_defaults(func=cmd_eval)
    gen = sub.add_parser("generate", help="generate with every arm, records to JSONL")
    _common_options(gen)
    _task_options("generate", gen)
    gen.set_defaults(func=cmd_generate)
    rep = sub.add_parser("report", help="results folders -> markdown table and plots")
    rep.add_argument("folders", nargs="+")
    rep.add_argument("--out", default="results/report")
    rep.set_defaults(func=cmd_report)
    demo = sub.add_parser("demo", help="dense vs static vs DART on a two-topic prompt")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--prompt", default=None, help="default: the first packaged drift prompt")
    demo.add_argument("--total-prune", type=float, default=0.3)
    demo.add_argument("--backend", default="gathered", choices=("masked", "gathered", "compact"))
    demo.add_argument("--max-new-tokens", type=int, default=160)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--width", type=int, default=46, help="column width of the side-by-side")
    demo.add_argument("--out", default=f"results/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    demo.set_defaults(func=cmd_demo)
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub) -> None:
    """`dart export`: one flag per ExportOptions field (until the options module derives all
    commands' flags this way)."""
    p = sub.add_parser("export", help="torch.export + AOTInductor packages of the DART decode step")
    hints = typing.get_type_hints(ExportOptions)
    for f in dataclasses.fields(ExportOptions):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        literal = typing.get_origin(base) is typing.Literal
        p.add_argument(
            flag,
            type=str if literal else base,
            choices=typing.get_args(base) if literal else None,
            default=f.default,
            required=f.default is dataclasses.MISSING,
            help=f.metadata["help"],
        )
    names = [f.name for f in dataclasses.fields(ExportOptions)]
    p.set_defaults(
        func=lambda args: export_command(ExportOptions(**{n: getattr(args, n) for n in names}))
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
