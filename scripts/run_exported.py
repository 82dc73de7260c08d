#!/usr/bin/env python
"""Run a `dart export` folder: greedy generation from token ids, with torch only.

    python scripts/run_exported.py PACKAGE_DIR --prompt-ids 1,2,3 --max-new-tokens 32
    python scripts/run_exported.py PACKAGE_DIR --prompt-ids 5,6,7 --prompt-ids 8,9 --json out.json

Imports nothing from `dart` or `dart_ext`: the dart op kernels are registered by loading the
compiled library `torch.ops.load_library(manifest["ops_library"])` (override with
`--ops-library PATH`, e.g. `dart_ext/_C.abi3.so` of another checkout). The two AOTInductor
packages (`prefill.pt2`, `decode.pt2`) are loaded with `torch._inductor.aoti_load_package`.

One `--prompt-ids` per sequence (comma-separated ids); the batch must equal the exported batch
size. Prompts are left-padded (mask 0) to the longest one (or to the exported fixed prompt
length). Prefill runs the dense prompt pass and returns the kept-neuron indices of every pruned
layer; the decode loop feeds them back at each step (the prompt's masks are kept). Prints a JSON
object: {"tokens": [[ids of row 0], ...], "prefill_seconds", "decode_seconds",
"decode_tokens_per_s"}; rows stop after the EOS id unless --ignore-eos.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package_dir")
    p.add_argument("--prompt-ids", action="append", required=True, help="comma-separated ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ops-library", default=None, help="default: the manifest's ops_library")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.package_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    torch.ops.load_library(args.ops_library or manifest["ops_library"])
    prefill = torch._inductor.aoti_load_package(str(folder / manifest["programs"]["prefill"]))
    decode = torch._inductor.aoti_load_package(str(folder / manifest["programs"]["decode"]))

    rows = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
    batch, max_len = manifest["batch_size"], manifest["max_len"]
    if len(rows) != batch:
        sys.exit(f"the package was exported for batch {batch}, got {len(rows)} prompts")
    length = manifest["prompt_len"] or max(len(r) for r in rows)
    if min(len(r) for r in rows) < 1 or max(len(r) for r in rows) > length:
        sys.exit(f"prompts must have 1..{length} tokens")
    if length + args.max_new_tokens > max_len:
        sys.exit(f"prompt ({length}) + max_new_tokens exceeds the cache length {max_len}")
    pad = manifest["pad_token_id"] or 0
    ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    state = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in manifest["state"]]
    eos = None if args.ignore_eos else manifest["eos_token_id"]

    with torch.inference_mode():
        start = time.perf_counter()
        logits, *idx = prefill(ids, mask, *state)
        token = logits.argmax(-1)
        prefill_s = time.perf_counter() - start
        out = [token]
        done = token == eos if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -1:] + 1
        start = time.perf_counter()
        steps = 0
        for t in range(1, args.max_new_tokens):
            if eos is not None and bool(done.all()):
                break
            cache_position = torch.tensor([length + t - 1])
            logits = decode(token[:, None], pos, cache_position, *idx, *state)
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            token = logits.argmax(-1)
            if eos is not None:
                token = torch.where(done, eos, token)
                done |= token == eos
            out.append(token)
            pos = pos + 1
            steps += 1
        decode_s = time.perf_counter() - start

    tokens = torch.stack(out, 1).tolist()
    if eos is not None:
        tokens = [r[: r.index(eos) + 1] if eos in r else r for r in tokens]
    result = {
        "tokens": tokens,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": batch * steps / decode_s if decode_s > 0 else None,
    }
    text = json.dumps(result)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
