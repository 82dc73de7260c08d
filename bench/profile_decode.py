"""Where a compiled decode step of a quantised model spends its time (CPU).

Loads a model quantised (`dart.load_model(..., weights=...)`), runs the compiled loop
(`dart.runtime.fast.FastGenerator`) dense and with DART attached, and for each arm and thread
count prints the ms per generated token of: the FFN op (`dart::gathered_glu_ffn_q`), the
attention linears and the LM head (`dart::linear_q`; the longest call of each step is the
head's), the other ops the profiler sees (attention, DART's selection, copies), and the rest of
the step (compiled inductor kernels: norms, rope, residual adds, sampling; the Python loop;
thread wake-ups), which is the un-profiled wall time minus the profiled ops.

The step time comes from runs without the profiler (median of --repeats); the split from one
profiled run, scaled to that step time. Only decode steps count (the prompt pass is excluded by
the ops' token count).

    python bench/profile_decode.py --model qwen2.5-coder-1.5b --weights q4 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dart  # noqa: E402
from dart.runtime.fast import FastGenerator  # noqa: E402


def _classify(name: str, shapes, lm_rows: int) -> str | None:
    """The category of one profiled op at decode (None: a prompt-pass call, not counted)."""
    x = shapes[0] if shapes else None
    tokens = 1
    if x and isinstance(x, list) and x and isinstance(x[0], int):
        for s in x[:-1]:
            tokens *= s
    if name in ("dart::gathered_glu_ffn_q", "dart::gathered_mlp_q"):
        return "ffn" if tokens <= 4 else None
    if name == "dart::linear_q":  # the profiler records no shapes of its Tensor[] rows
        return "linear_q" if tokens <= 4 else None
    if name in ("aten::linear", "aten::mm", "aten::matmul") and any(
        isinstance(s, list) and s[:1] == [lm_rows] for s in shapes[1:2]
    ):
        return "lm_head"  # an LM head left in floating point (e.g. tied to the embeddings)
    if "scaled_dot_product" in name or name in ("aten::bmm", "aten::baddbmm", "aten::softmax"):
        return "attention"
    if name.startswith("dart::"):
        return "dart_other"
    return "other_ops"


def profile_arm(fast: FastGenerator, handle, ids, mask, new: int, repeats: int, lm_rows: int):
    walls = []
    for _ in range(repeats):
        if handle is not None:
            handle.reset()
        r = fast.generate(ids, mask, max_new_tokens=new)
        walls.append(1000.0 * r.decode_seconds / r.decode_steps)
    step_ms = statistics.median(walls)
    if handle is not None:
        handle.reset()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        r = fast.generate(ids, mask, max_new_tokens=new)
    prof_step_ms = 1000.0 * r.decode_seconds / r.decode_steps
    per = defaultdict(float)
    linear_q = []  # [ms] of each decode call: the LM head's are the longest, one per step
    for ev in prof.events():
        # dart ops never nest in each other; other ops count only at the top of an op stack
        # (an aten op called inside another op or a dart op is part of that op's time)
        if not ev.name.startswith("dart::"):
            if not ev.name.startswith("aten::"):
                continue
            parent, nested = ev.cpu_parent, False
            while parent is not None:
                if parent.name.startswith(("aten::", "dart::")):
                    nested = True
                    break
                parent = parent.cpu_parent
            if nested:
                continue
        cat = _classify(ev.name, ev.input_shapes, lm_rows)
        if cat == "linear_q":
            linear_q.append(ev.cpu_time_total / 1000.0)
        elif cat is not None:
            per[cat] += ev.cpu_time_total / 1000.0
    steps = r.decode_steps
    # one step's 151,936-row head reads ~100x the bytes of an attention linear: the `steps`
    # longest calls are the head's (the prompt pass's calls are excluded by their tokens)
    linear_q.sort(reverse=True)
    per["lm_head"] += sum(linear_q[:steps])
    per["attn_linears"] += sum(linear_q[steps:])
    out = {k: v / steps for k, v in per.items()}
    out["rest"] = max(prof_step_ms - sum(out.values()), 0.0)
    scale = step_ms / prof_step_ms  # the profiler's own overhead, taken off pro rata
    return step_ms, prof_step_ms, {k: v * scale for k, v in out.items()}, walls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--weights", default="q4")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms", default="dense,dart", help="comma list of dense, dart")
    args = p.parse_args(argv)
    model, tok = dart.load_model(args.model, weights=args.weights)
    lm_rows = model.get_output_embeddings().out_features
    text = "def fibonacci(n):\n    " * 4
    enc = tok(text, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    max_len = ids.shape[1] + args.new_tokens + 8
    cats = ["ffn", "attn_linears", "lm_head", "attention", "dart_other", "other_ops", "rest"]
    print(
        f"model={args.model} weights={args.weights} new_tokens={args.new_tokens} "
        f"(ms per generated token; step = median of {args.repeats} unprofiled runs)"
    )
    print(f"{'arm':<8} {'thr':>3} {'step':>7} " + " ".join(f"{c:>12}" for c in cats))
    for arm in args.arms.split(","):
        handle = None
        if arm == "dart":
            handle = dart.attach(
                model, dart.DARTConfig(total_prune=args.sparsity, backend="gathered")
            )
        fast = FastGenerator(model, handle, max_len)
        for thr in args.threads:
            torch.set_num_threads(thr)
            fast.generate(ids, mask, max_new_tokens=args.new_tokens)  # compile / warm up
            step, _, split, walls = profile_arm(
                fast, handle, ids, mask, args.new_tokens, args.repeats, lm_rows
            )
            print(
                f"{arm:<8} {thr:>3} {step:>7.2f} "
                + " ".join(f"{split.get(c, 0.0):>12.2f}" for c in cats)
                + f"   runs {', '.join(f'{w:.1f}' for w in walls)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
