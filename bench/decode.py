"""End-to-end decode speed, side by side in one process.

Arms (same prompts, same number of new tokens):
  hf_dense                HF `generate`, dense model (eager)
  dense_compiled          the compiled static-cache loop (dart.fast), dense model
  dart_masked             HF `generate` with DART's masked backend (the paper's simulation)
  dart_gathered_compiled  the compiled loop with DART's gathered kernels
  dart_compact_compiled   the compiled loop with DART's compact (slice-on-reselect) buffers

Rounds interleave the arms (each round runs every arm once) and the table reports medians, so
a noisy shared machine hits all arms alike. The ideal speedup is the ratio of weight bytes
read per token, dense over pruned (FFN rows skipped, everything else read in full).

    python bench/decode.py --quick            # < 5 minutes on 2 CPU cores
    python bench/decode.py --dtypes float32,bfloat16 --sparsity 0.5,0.7 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dart  # noqa: E402
from dart.data import load_drift_prompts  # noqa: E402
from dart.fast import FastGenerator  # noqa: E402
from dart.generation import encode_prompts  # noqa: E402

ARMS = (
    "hf_dense",
    "dense_compiled",
    "dart_masked",
    "dart_gathered_compiled",
    "dart_compact_compiled",
)


def weight_bytes_per_token(model, keep_fraction: float) -> tuple[float, float]:
    """(dense, pruned) bytes of weights read to decode one token (embedding row ignored)."""
    handle = dart.attach(model, dart.DARTConfig(method="dense"))
    ffn = sum(sum(t.numel() * t.element_size() for t in _ffn_tensors(f)) for f in handle.ffns)
    handle.detach()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head.data_ptr() == emb.data_ptr():  # tied: the embedding matrix is read as the head
        dense = total
    else:
        dense = total - emb.numel() * emb.element_size()
    return dense, dense - ffn * (1.0 - keep_fraction)


def _ffn_tensors(ffn):
    p = ffn._parts
    return [t for t in (p.w_gate, p.w_up, p.w_down_t) if t is not None]


def _config(args, sparsity: float, backend: str) -> dart.DARTConfig:
    return dart.DARTConfig(
        total_prune=sparsity,
        layer_topk=args.layer_topk,
        backend=backend,
        batch_policy=args.batch_policy,
    )


class Arm:
    """One arm: its own copy of the model (DART patches a model in place), set up once."""

    def __init__(self, name: str, base, args, sparsity: float, max_len: int):
        self.name = name
        self.model = base if name in ("hf_dense", "dense_compiled") else copy.deepcopy(base)
        self.handle = None
        if name.startswith("dart_"):
            backend = name.split("_")[1]
            self.handle = dart.attach(self.model, _config(args, sparsity, backend))
        self.fast = None
        if name.endswith("_compiled"):
            self.fast = FastGenerator(self.model, self.handle, max_len)

    def run(self, ids, mask, new_tokens: int, pad_id: int) -> dict:
        if self.handle is not None:
            self.handle.reset()
        if self.fast is not None:
            r = self.fast.generate(ids, mask, max_new_tokens=new_tokens)
            rec = {"tokens_per_s": r.tokens_per_s, "prefill_seconds": r.prefill_seconds}
        else:
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
            seconds = time.perf_counter() - start
            rec = {"tokens_per_s": ids.shape[0] * (out.shape[1] - ids.shape[1]) / seconds}
        if self.handle is not None:
            stats = self.handle.stats()
            rec["effective_sparsity"] = stats["effective_sparsity"]
            rec["retraces"] = stats["mask_refreshes"]
        return rec

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()


def bench_setting(base, tok, dtype, batch, sparsity, args, with_dense: bool) -> list[dict]:
    prompts = [p.prompt for p in load_drift_prompts("two_topic")[:batch]]
    enc = encode_prompts(tok, prompts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    max_len = ids.shape[1] + args.new_tokens + 8
    names = [a for a in args.arms if with_dense or not a.endswith("dense") and "dense_" not in a]
    if "dense_compiled" not in names:
        names.append("dense_compiled")  # the baseline of every ratio
    torch._dynamo.reset()  # each setting compiles its own steps
    arms = [Arm(n, base, args, sparsity, max_len) for n in names]
    samples: dict[str, list[dict]] = {a.name: [] for a in arms}
    for rnd in range(args.rounds + 1):  # round 0 warms up (compiles)
        for arm in arms:
            rec = arm.run(ids, mask, args.new_tokens, tok.pad_token_id)
            if rnd > 0:
                samples[arm.name].append(rec)
            print(f"  round {rnd} {arm.name:<24} {rec['tokens_per_s']:7.1f} tok/s", file=sys.stderr)
    for arm in arms:
        arm.close()
    base_tps = statistics.median(s["tokens_per_s"] for s in samples["dense_compiled"])
    dense_b, pruned_b = weight_bytes_per_token(base, 1.0 - sparsity)
    out = []
    for name in names:
        tps = statistics.median(s["tokens_per_s"] for s in samples[name])
        dense_arm = name in ("hf_dense", "dense_compiled")
        rec = {
            "arm": name,
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "sparsity": 0.0 if dense_arm else sparsity,
            "tokens_per_s": tps,
            "ms_per_token": 1000.0 * batch / tps,
            "speedup_vs_dense_compiled": tps / base_tps,
            "ideal_speedup": 1.0 if dense_arm else dense_b / pruned_b,
            "new_tokens": args.new_tokens,
            "batch_policy": args.batch_policy,
        }
        for key in ("prefill_seconds", "effective_sparsity", "retraces"):
            vals = [s[key] for s in samples[name] if key in s]
            if vals:
                rec[key] = statistics.median(vals)
        if with_dense or not dense_arm:
            out.append(rec)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sparsity", default="0.5,0.7")
    p.add_argument("--batch", default="1")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layer-topk", default="all:auto")
    p.add_argument("--batch-policy", default="per_sequence", choices=("per_sequence", "shared"))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fp32, 64 tokens, 2 rounds")
    p.add_argument("--json", default=None, help="write the records to this path")
    args = p.parse_args()
    if args.quick:
        args.dtypes, args.new_tokens, args.rounds = "float32", 64, 2
    args.arms = args.arms.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        model, tok = dart.load_model(args.model, dtype=dtype)
        for batch in (int(b) for b in args.batch.split(",")):
            for i, sparsity in enumerate(float(s) for s in args.sparsity.split(",")):
                print(f"[{dtype_name} batch {batch} sparsity {sparsity}]", file=sys.stderr)
                records += bench_setting(model, tok, dtype, batch, sparsity, args, i == 0)
    print(
        f"\n{'dtype':<9}{'batch':>6}{'arm':>25}{'sparsity':>9}{'tok/s':>8}{'ms/tok':>8}"
        f"{'vs dense_compiled':>18}{'ideal':>7}{'eff.sp':>8}{'retraces':>9}"
    )
    for r in records:
        speed = r["speedup_vs_dense_compiled"]
        print(
            f"{r['dtype']:<9}{r['batch']:>6}{r['arm']:>25}{r['sparsity']:>9.2f}"
            f"{r['tokens_per_s']:>8.1f}{r['ms_per_token']:>8.1f}"
            f"{(f'{speed:.2f}x' if speed else '-'):>18}{r['ideal_speedup']:>6.2f}x"
            f"{r.get('effective_sparsity', 0.0):>8.2f}{r.get('retraces', 0):>9}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
