#!/usr/bin/env python
"""Run a `dart export` package: greedy generation from token ids, with torch only.

    python scripts/run_exported.py PACKAGE_DIR --prompt-ids 1,2,3 --max-new-tokens 32
    python scripts/run_exported.py PACKAGE_DIR --prompt-ids 5,6,7 --prompt-ids 8,9 --json out.json

Needs torch and `dart.runtime.runner` (which imports torch alone: neither transformers nor the
`dart_ext` package). The runner checks the package's format and torch version and the sha256 of
the ops library it carries, loads that library (`torch.ops.dart.*`) and the two AOTInductor
programs. A package is native code: run only packages you trust as you would an executable.

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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dart.runtime.runner import PackageError, load_package, trim_at_eos  # noqa: E402


def _positive(text: str) -> int:
    """An argparse type: an int of at least 1 (0 would still emit the prefill's token)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below the minimum 1")
    return value


def _prompt(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of token ids") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a prompt needs token ids >= 0")
    return ids


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package_dir")
    p.add_argument(
        "--prompt-ids", action="append", required=True, type=_prompt, help="comma-separated ids"
    )
    p.add_argument("--max-new-tokens", type=_positive, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens")
    p.add_argument("--threads", type=_positive, default=None)
    p.add_argument("--json", default=None, help="also write the result to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompt_ids
    try:
        package = load_package(args.package_dir)
        result = package.generate(prompts, args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    except (PackageError, ValueError) as e:
        sys.exit(str(e))
    eos = None if args.ignore_eos else package.manifest["eos_token_id"]
    text = json.dumps(
        {
            "tokens": [trim_at_eos(row, eos) for row in result.tokens.tolist()],
            "prefill_seconds": result.prefill_seconds,
            "decode_seconds": result.decode_seconds,
            "decode_tokens_per_s": result.tokens_per_s if result.decode_seconds > 0 else None,
        }
    )
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
