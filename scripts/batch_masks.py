"""Shared against per-sequence batch masks: quality of DART's generations at batch 4 and 8.

The same prompts (the Wikipedia stand-in's EVAL split, summarisation instruction, documents cut
to --prompt-tokens) run greedy under each policy; each output is judged against the dense
model's (perplexity under the dense model, ROUGE-L and token agreement with the dense output,
see dart.evaluate.batch_masks) and the policies are paired per prompt. Resumable: records go to
OUT/records.jsonl per (batch size, sparsity, policy) as each finishes; OUT/summary.json holds the
comparisons.

    PYTHONPATH=$PWD python scripts/batch_masks.py --out docs/results/batch_masks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dart
from dart.evaluate.batch_masks import compare_policies, generate_all, policy_records
from dart.evaluate.generative import summarization_items
from dart.results import atomic_write_text

POLICIES = ("per_sequence", "shared")


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/batch_masks")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32, help="prompts (a multiple of 8)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--total-prune", default="0.5,0.7")
    ap.add_argument("--method", default="dart")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = dart.load_model(args.model)
    items = summarization_items(
        tokenizer, limit=args.prompts, seed=0, max_prompt_tokens=args.prompt_tokens, split="eval"
    )
    setting = {"model": args.model, "prompts": [it["id"] for it in items],
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "method": args.method}  # fmt: skip
    setting_path = out / "setting.json"
    if setting_path.exists() and json.loads(setting_path.read_text()) != setting:
        raise SystemExit(f"{out} holds records of another setting ({setting_path}): use --out")
    atomic_write_text(setting_path, json.dumps(setting, indent=1))

    dense_path = out / "dense.jsonl"
    dense_records = _read(dense_path)
    if not dense_records:
        dense_records = generate_all(model, tokenizer, items, 1, args.new_tokens)
        _append(dense_path, dense_records)
    dense = {r["id"]: r for r in dense_records}

    records_path = out / "records.jsonl"
    records = _read(records_path)
    done = {(r["batch_size"], r["total_prune"], r["batch_policy"]) for r in records}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        for p in (float(x) for x in args.total_prune.split(",")):
            for policy in POLICIES:
                if (b, p, policy) in done:
                    continue
                start = time.perf_counter()
                cfg = dart.DARTConfig(method=args.method, total_prune=p, batch_policy=policy)
                new = policy_records(model, tokenizer, items, cfg, b, args.new_tokens, dense)
                _append(records_path, new)
                records += new
                print(f"batch {b}, {p:.0%}, {policy}: {time.perf_counter() - start:.0f} s",
                      flush=True)  # fmt: skip

    summary = []
    for b in sorted({r["batch_size"] for r in records}):
        for p in sorted({r["total_prune"] for r in records}):
            sel = {pol: [r for r in records if (r["batch_size"], r["total_prune"],
                                                r["batch_policy"]) == (b, p, pol)]
                   for pol in POLICIES}  # fmt: skip
            if all(sel.values()):
                cmp = compare_policies(sel["shared"], sel["per_sequence"])
                summary.append({"batch_size": b, "total_prune": p, **cmp})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    for row in summary:
        print(f"batch {row['batch_size']} at {row['total_prune']:.0%}:")
        for metric in ("judge_ppl", "rougeL_vs_dense", "token_agreement"):
            m = row[metric]
            ci = f"[{m['diff_ci_low']:+.3f}, {m['diff_ci_high']:+.3f}]"
            print(f"  {metric:16s} per-seq {m['per_sequence']:.3f}  shared {m['shared']:.3f}  "
                  f"diff {m['diff_mean']:+.3f} {ci}")  # fmt: skip


if __name__ == "__main__":
    main()
