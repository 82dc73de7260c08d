"""Per-layer prune fractions of the budget candidates on one model's calibration text.

The budget study (``scripts/budget_study.sh``) scores the candidates by perplexity; this shows
what each one does to the layers. One dense tracing forward over the first ``--tokens`` tokens
of the wiki ``calibration`` split collects the layer sensitivities ``S`` (the ``residual`` and
the ``raw`` kind: one forward each), checks that the default budget computed here from ``S``
is the one DART built, and prints, for every candidate and sparsity, the prune fraction of each
layer (and writes them as JSON)::

    python scripts/budget_layers.py --model smollm2-135m \\
        --out docs/results/budget/layers-smollm2.json
    python scripts/budget_layers.py --model qwen2.5-coder-1.5b --weights q8 --threads 1 \\
        --out docs/results/budget/layers-qwen.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dart
from dart.assets.data import load_text
from dart.assets.models import PACKAGED_MODELS
from dart.core.budget import allocate_budget
from dart.core.config import BudgetConfig
from dart.evaluate.perplexity import tokenize_prefix
from dart.runtime.loading import load_model

# the study's candidates (scripts/budget_study.sh), as BudgetConfig overrides of the old default
OLD_DEFAULT = {"sensitivity": "residual", "uniform_blend": 0.5, "blend_toward": "sensitivity",
               "prune_max": 0.9, "cap_margin": None, "min_keep_ratio": None}  # fmt: skip
CANDIDATES: dict[str, dict] = {
    "b-default": {},
    "b-uniform": {"uniform_blend": 1.0, "blend_toward": "uniform"},
    "b-ublend50": {"blend_toward": "uniform"},
    "b-keep67": {"min_keep_ratio": 0.6667},
    "b-keep80": {"min_keep_ratio": 0.8},
    "b-max80": {"prune_max": 0.8},
    "b-ublend75": {"uniform_blend": 0.75, "blend_toward": "uniform"},
    "b-sblend75": {"uniform_blend": 0.75},
    "b-sblend100": {"uniform_blend": 1.0},
    "b-sblend75-keep67": {"uniform_blend": 0.75, "min_keep_ratio": 0.6667},
    "b-sblend100-keep67": {"uniform_blend": 1.0, "min_keep_ratio": 0.6667},
    "b-max85": {"prune_max": 0.85},
    "b-raw": {"sensitivity": "raw"},
}


def sensitivities(model: torch.nn.Module, ids: torch.Tensor, kind: str) -> tuple[list, list]:
    """``S`` per layer after one dense tracing forward over ``ids``, and DART's keep counts at
    70% under the old default budget with that sensitivity kind."""
    budget = {**OLD_DEFAULT, "sensitivity": kind}
    handle = dart.attach(model, total_prune=0.7, statistic="normalized_l2", budget=budget)
    try:
        handle.prepare(ids[None])
        s = handle.controller.selection.sens.scores().double().cpu().tolist()
        keep = list(handle.stats()["keep_counts"])
    finally:
        handle.detach()
    return s, keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="fp", choices=["fp", "q8", "q4", "q4m"])
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens traced")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON of every fraction")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    direct = args.weights != "fp" and args.model.lower() in PACKAGED_MODELS
    model, tok = load_model(args.model, weights=args.weights, direct=direct or None)
    ids = tokenize_prefix(tok, load_text("wiki", "calibration"), args.tokens).reshape(-1)
    widths = [int(layer.mlp.down_proj.in_features) for layer in model.model.layers]
    s = {}
    with torch.no_grad():
        for kind in ("residual", "raw"):
            s[kind], keep = sensitivities(model, ids, kind)
            cfg = BudgetConfig(**{**OLD_DEFAULT, "sensitivity": kind})
            mine = allocate_budget(s[kind], widths, 0.7, cfg).keep_counts
            if mine != keep:  # the fractions below would not be what DART runs
                raise SystemExit(f"{kind}: DART kept {keep}, the budget here gives {mine}")
    out: dict = {"model": args.model, "weights": args.weights, "tokens": int(ids.numel()),
                 "sensitivity": s, "fractions": {}}  # fmt: skip
    print(f"{args.model} ({args.weights}), {ids.numel()} calibration tokens, {len(widths)} layers")
    for total in (0.5, 0.7):
        for name, over in CANDIDATES.items():
            cfg = BudgetConfig(**{**OLD_DEFAULT, **over})
            a = allocate_budget(s[cfg.sensitivity], widths, total, cfg)
            p = [1 - k / n for k, n in zip(a.keep_counts, widths, strict=True)]
            out["fractions"][f"{name}@{total}"] = p
            mid = p[len(p) // 4 : 3 * len(p) // 4]
            head = f"{total:.1f} {name:11s} max {max(p):.3f}  middle half {sum(mid) / len(mid):.3f}"
            print(f"{head}  first {p[0]:.2f} last {p[-1]:.2f} | " + " ".join(f"{x:.2f}" for x in p))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
