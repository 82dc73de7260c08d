"""Quality per byte: perplexity against the share of FFN weight bytes read per token.

llama.cpp's protocol (`llama-perplexity -c CTX`): disjoint chunks of the packaged Wikipedia
text's EVAL split, the first half of each chunk the prompt (dense), the second half scored on
its KV cache under the arm's masks (`dart.evaluate.perplexity.score_chunk_cached` does the same
per arm; here the dense prompt pass of a chunk is shared by the arms that do not trace it, which
halves the CPU time). Per-token thresholds are calibrated on the CALIBRATION split.

Resumable: records (arm, chunk) go to OUT/records.jsonl as they finish; a rerun skips them.
The summary OUT/quality_per_byte.json holds one entry per arm: arm, method, allocation,
total_prune, bytes_read_fraction (measured from the masks), ppl, chunks, tokens.

    PYTHONPATH=$PWD python scripts/quality_per_byte.py --out docs/results/quality_per_byte
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dart
from dart.assets.data import load_text
from dart.core import api
from dart.core.config import ConfigError
from dart.evaluate.perplexity import llamacpp_windows, tokenize_prefix
from dart.options import add_dart_flags, dart_config_from
from dart.results import atomic_write_text

# (arm, method, total_prune, allocation); dense first, DART (traces its own prompt) last
# (calibrated on first use: the input mode's greedy error curves are the slow part, so last)
ARMS = [
    ("dense", "dense", 0.0, None),
    ("gate@0.6", "gate", 0.4, "greedy"),
    ("gate-uniform@0.6", "gate", 0.4, "uniform"),
    ("gate-weighted@0.6", "gate-weighted", 0.4, "greedy"),
    ("gate@0.8", "gate", 0.2, "greedy"),
    ("input-uniform@0.6", "input", 0.4, "uniform"),
    ("input-uniform@0.5", "input", 0.5, "uniform"),
    ("input-uniform@0.4", "input", 0.6, "uniform"),
    ("input@0.6", "input", 0.4, "greedy"),
    ("input@0.5", "input", 0.5, "greedy"),
    ("input@0.4", "input", 0.6, "greedy"),
    ("dart@0.6", "dart", 0.4, None),
    ("dart@0.5", "dart", 0.5, None),
    ("dart@0.4", "dart", 0.6, None),
]


# DARTConfig fields an arm sets; every other field is a --dart.* flag (dart.options).
ARM_FIELDS = ("method", "total_prune", "backend", "per_token_allocation")


def _config(
    args: argparse.Namespace, method: str, total_prune: float, allocation: str | None
) -> dart.DARTConfig:
    extra = {"per_token_allocation": allocation} if allocation else {}
    return dart_config_from(args, method=method, total_prune=total_prune, backend="masked", **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/quality_per_byte")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calibration-tokens", type=int, default=512)
    ap.add_argument("--arms", default=",".join(a[0] for a in ARMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve-tokens", type=int, default=64, help="tokens of the error curves")
    # the DARTConfig settings of every arm (a changed setting needs a new --out: records and
    # thresholds resume by arm name)
    add_dart_flags(ap, exclude=ARM_FIELDS)
    args = ap.parse_args()
    try:
        for _, method, p, alloc in ARMS:  # a bad setting fails before the model loads
            _config(args, method, p, alloc)
    except ConfigError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    try:
        import dart_ext  # noqa: F401
    except Exception:  # a stale build: the masked backend needs no kernels
        api.load_ops = lambda: False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in ARMS if a[0] in args.arms.split(",")]
    model, tok = dart.load_model(args.model)
    model.eval()
    ids = tokenize_prefix(tok, load_text("wiki", "eval"), args.ctx * args.chunks)
    windows = llamacpp_windows(ids.numel(), args.ctx, args.chunks)
    calib = tokenize_prefix(tok, load_text("wiki", "calibration"), args.calibration_tokens)[None]

    states_path = out / "thresholds.json"
    states = json.loads(states_path.read_text()) if states_path.exists() else {}
    captured = None
    # error curves depend on the mode and the calibration data only: reuse a resumed run's
    curves = {st["method"]: st["error_curves"] for st in states.values() if st["error_curves"]}

    def calibrated(name: str, method: str, p: float, alloc: str) -> dict:
        """The arm's thresholds: calibrated on first use (so cheap arms start scoring first)."""
        nonlocal captured
        if name in states:
            return states[name]
        h = dart.attach(model, _config(args, method, p, alloc))
        start = time.perf_counter()
        with torch.no_grad():
            if captured is None:
                with h.controller.capturing() as captured:
                    model(input_ids=calib, use_cache=False)
            state = h.controller.calibrate_per_token(
                captured, curve_tokens=args.curve_tokens, curves=curves.get(method)
            )
        state["seconds"] = time.perf_counter() - start
        if state["error_curves"]:
            curves[method] = state["error_curves"]
        h.detach()
        states[name] = state
        atomic_write_text(states_path, json.dumps(states, indent=1) + "\n")
        print(f"calibrated {name}: {state['seconds']:.1f} s", flush=True)
        return state

    rec_path = out / "records.jsonl"
    done = set()
    if rec_path.exists():
        for line in rec_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["arm"], r["chunk"]))
    half = args.ctx // 2
    for w in windows:
        todo = [a for a in arms if (a[0], w.id) not in done]
        if not todo:
            continue
        chunk = ids[w.begin : w.end][None]
        prompt, rest = chunk[:, :half], chunk[:, half:]
        targets = chunk[0, half + 1 :]
        with torch.no_grad():
            base = None
            for name, method, p, alloc in todo:
                t0 = time.perf_counter()
                state = calibrated(name, method, p, alloc) if alloc is not None else None
                h = (
                    None
                    if method == "dense"
                    else dart.attach(model, _config(args, method, p, alloc))
                )
                if state is not None:
                    h.load_per_token_state(state)
                if h is not None and h.method.selects_from_prompt:
                    cache = model(input_ids=prompt, use_cache=True).past_key_values  # traced
                    h.controller.select_traced()
                else:
                    if base is None:
                        base = model(input_ids=prompt, use_cache=True).past_key_values
                    cache = copy.deepcopy(base)
                    if h is not None:
                        h.controller.begin(1)
                        h.controller.select_traced()  # the prompt ran dense: per token now
                if h is not None:
                    h.reset()
                    with h.hold():
                        logits = model(input_ids=rest, past_key_values=cache).logits
                    frac = h.stats()["ffn_bytes_read_fraction"]
                    h.detach()
                else:
                    logits = model(input_ids=rest, past_key_values=cache).logits
                    frac = 1.0
                nll = float(F.cross_entropy(logits[0, :-1].float(), targets, reduction="sum"))
                r = {
                    "arm": name,
                    "method": method,
                    "total_prune": p,
                    "allocation": alloc,
                    "chunk": w.id,
                    "nll": nll,
                    "tokens": int(targets.numel()),
                    "bytes_read_fraction": frac,
                    "seconds": time.perf_counter() - t0,
                }
                with rec_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps(r), flush=True)
        summarize(out, arms, args)


def summarize(out: Path, arms: list, args: argparse.Namespace) -> None:
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    rows = []
    for name, method, p, alloc in arms:
        rs = [r for r in recs if r["arm"] == name]
        if not rs:
            continue
        nll, tokens = sum(r["nll"] for r in rs), sum(r["tokens"] for r in rs)
        rows.append(
            {
                "arm": name,
                "method": method,
                "allocation": alloc,
                "total_prune": p,
                "bytes_read_fraction": sum(r["bytes_read_fraction"] for r in rs) / len(rs),
                "ppl": math.exp(nll / tokens),
                "chunks": len(rs),
                "tokens": tokens,
            }
        )
    summary = {
        "protocol": "llamacpp",
        "ctx": args.ctx,
        "model": args.model,
        "eval": "wiki eval split",
        "calibration": f"wiki calibration split, {args.calibration_tokens} tokens",
        "backend": "masked (exact emulation of the per-token reads)",
        "arms": rows,
    }
    atomic_write_text(out / "quality_per_byte.json", json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
