"""The `dart` command."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import torch

from .api import attach
from .config import DARTConfig
from .data import load_drift_prompts, load_text
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dart", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
