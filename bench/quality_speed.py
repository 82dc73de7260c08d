"""Quality against decode speed: llama.cpp's quantisation ladder beside dart's arms, one chart.

On one held-out text (the packaged Wikipedia text's `eval` split, never calibration, written to
a file that every arm scores) and the same thread counts:

- llama.cpp arms: the packaged GGUF as it ships (Q4_K_M for qwen2.5-coder-1.5b) and lower types
  made from it with llama-quantize (default Q3_K_M, Q2_K; requantised from Q4_K_M, so a little
  worse than files made from 16-bit weights). Perplexity with llama-perplexity (`-c 512`,
  disjoint chunks of 512 tokens, the second half of each chunk scored, 16 chunks); decode tok/s
  with llama-bench (`-p 0 -n new_tokens`), rounds interleaving the types, median of the rounds.
- dart arms: records that other code writes to a JSON file (`--dart-records`), one object per
  arm and thread count with the keys of RECORD_SCHEMA:

      arm                  str    the arm's label, e.g. "dart 50% gathered fp32"
      bytes_read_fraction  float  weight bytes read per decoded token over its own dense model's
                                  (llama.cpp arms: over the packaged file's; the token embedding
                                  is left out unless tied, as in bench/decode.py)
      ppl                  float  perplexity on the same text file, same chunks and positions
      tok_s                float  decode tokens per second
      threads              int    threads the speed was measured with

  Other keys are kept and ignored. To score the same positions as llama-perplexity, a dart arm
  tokenises the same text file (without special tokens when the vocabulary adds no BOS, as
  Qwen2.5's) and scores `dart.llamacpp.perplexity_windows(len(ids), 512, 16)` with
  `dart.evaluate.perplexity.score_window`.

Writes `records.json` (every record in that schema, llama.cpp's with extra keys), `table.md` and
`quality_speed.png` (perplexity against decode tok/s, one marker per thread count) into `--out`.
llama.cpp's worker threads spin-wait, so its speed holds only on a quiet machine: the load
average before and after is written beside the table.

    python bench/quality_speed.py --threads 1,2 --out results/quality_speed
    python bench/quality_speed.py --dart-records results/dart_points.json --out results/qs
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dart import llamacpp  # noqa: E402
from dart.results import atomic_write_text, read_json, save_figure, write_json  # noqa: E402

RECORD_SCHEMA: dict[str, type] = {
    "arm": str,
    "bytes_read_fraction": float,
    "ppl": float,
    "tok_s": float,
    "threads": int,
}
DEFAULT_QUANTS = "Q4_K_M,Q3_K_M,Q2_K"
LLAMACPP_FAMILY = "llama.cpp"


def validate_records(data: object, source: str) -> list[dict]:
    """Records checked against RECORD_SCHEMA; a bad one raises ValueError naming the source,
    the record's index and the key."""
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: record {i} is a {type(rec).__name__}, not an object")
        for key, kind in RECORD_SCHEMA.items():
            if key not in rec:
                raise ValueError(
                    f"{source}: record {i} has no {key!r} (needs {list(RECORD_SCHEMA)})"
                )
            value = rec[key]
            ok = (
                isinstance(value, str)
                if kind is str
                else isinstance(value, int) and not isinstance(value, bool)
                if kind is int
                else isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            if not ok:
                raise ValueError(
                    f"{source}: record {i} key {key!r} is {value!r}, expected {kind.__name__}"
                )
        if not (rec["tok_s"] > 0 and rec["ppl"] > 0 and rec["threads"] >= 1):
            raise ValueError(
                f"{source}: record {i} ({rec['arm']!r}) needs tok_s > 0, ppl > 0, threads >= 1"
            )
        out.append(dict(rec))
    return out


def llamacpp_records(
    model: str,
    quants: list[str],
    threads: list[int],
    new_tokens: int,
    rounds: int,
    text_file: Path,
    ctx: int,
    chunks: int,
    ppl_threads: int | None = None,
) -> list[dict]:
    """Perplexity and decode speed of each quantisation of ``model``'s GGUF (the one the
    package ships is used as is; the others are made from it)."""
    tools = llamacpp.ensure_llamacpp()
    packaged = llamacpp.packaged_gguf(model)
    shipped = llamacpp.file_type(packaged)
    files = {}
    for q in quants:
        if q == shipped:
            files[q] = packaged
        else:
            files[q] = llamacpp.quantize(packaged, None, q, tools=tools)  # cached
            print(f"{q}: {files[q]}", file=sys.stderr, flush=True)
    speeds: dict[tuple[str, int], list] = {(q, t): [] for q in quants for t in threads}
    for rnd in range(1, rounds + 1):  # rounds interleave the types and thread counts
        for q in quants:
            for t in threads:
                (rec,) = llamacpp.bench(files[q], t, new_tokens, 0, repetitions=1, tools=tools)
                speeds[q, t].append(rec)
                print(f"  round {rnd} {q:<7} {t} threads {rec.avg_ts:7.2f} tok/s", file=sys.stderr)
    ref_bytes = llamacpp.weight_bytes_per_token(packaged)
    out = []
    for q in quants:
        print(f"perplexity of {q} ...", file=sys.stderr, flush=True)
        ppl_t = ppl_threads or max(threads)
        ppl = llamacpp.perplexity(files[q], text_file, ctx, chunks, ppl_t, tools=tools)
        for t in threads:
            recs = speeds[q, t]
            out.append(
                {
                    "arm": f"{LLAMACPP_FAMILY} {q}" + (" (shipped)" if q == shipped else ""),
                    "bytes_read_fraction": llamacpp.weight_bytes_per_token(files[q]) / ref_bytes,
                    "ppl": ppl.ppl,
                    "tok_s": statistics.median(r.avg_ts for r in recs),
                    "threads": t,
                    "family": LLAMACPP_FAMILY,
                    "quant": q,
                    "ppl_stderr": ppl.stderr,
                    "model_size": recs[0].model_size,
                    "model_type": recs[0].model_type,
                    "new_tokens": new_tokens,
                    "tok_s_rounds": [r.avg_ts for r in recs],
                    "ctx": ctx,
                    "chunks": chunks,
                    "gguf": str(files[q]),
                }
            )
    return out


def markdown_table(records: list[dict], notes: list[str] = ()) -> str:
    """One row per record: arm, threads, bytes read, perplexity (with its +/- when known),
    decode tok/s; ``notes`` follow the table."""
    lines = [
        "| arm | threads | bytes read | perplexity | decode tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(records, key=lambda r: (r["threads"], -r["tok_s"])):
        ppl = f"{r['ppl']:.3f}"
        if r.get("ppl_stderr") is not None:
            ppl += f" ± {r['ppl_stderr']:.3f}"
        lines.append(
            f"| {r['arm']} | {r['threads']} | {r['bytes_read_fraction']:.3f} | {ppl} | "
            f"{r['tok_s']:.2f} |"
        )
    return "\n".join(lines + [""] + [f"{n}" for n in notes]) + "\n"


def plot(records: list[dict], path: Path, title: str) -> Path:
    """Perplexity against decode tok/s: llama.cpp's types joined by a line per thread count,
    other arms as points; markers tell thread counts apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>p*h"
    threads = sorted({r["threads"] for r in records})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for j, t in enumerate(threads):
        marker = markers[j % len(markers)]
        ladder = sorted(
            (r for r in records if r["threads"] == t and r.get("family") == LLAMACPP_FAMILY),
            key=lambda r: r["bytes_read_fraction"],  # the ladder in size order, whatever the noise
        )
        if ladder:
            ax.plot([r["tok_s"] for r in ladder], [r["ppl"] for r in ladder], "-", color="C0",
                    marker=marker, label=f"{LLAMACPP_FAMILY}, {t} threads")  # fmt: skip
        others = [r for r in records if r["threads"] == t and r.get("family") != LLAMACPP_FAMILY]
        for k, r in enumerate(others):
            ax.plot(r["tok_s"], r["ppl"], marker=marker, linestyle="none", color=f"C{k + 1}",
                    label=f"{r['arm']}, {t} threads")  # fmt: skip
        for r in ladder + others:
            label = r.get("quant", r["arm"]) if r.get("family") == LLAMACPP_FAMILY else r["arm"]
            ax.annotate(label, (r["tok_s"], r["ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)  # fmt: skip
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected a comma list of integers") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} {text!r}: every value must be >= 1")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="a packaged model (has a GGUF)")
    p.add_argument("--quants", default=DEFAULT_QUANTS,
                   help="llama.cpp types; the shipped one is the packaged file itself")  # fmt: skip
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma list")
    p.add_argument("--ppl-threads", type=int, default=None,
                   help="threads of llama-perplexity (default: the largest --threads; the "
                   "value does not depend on it, only its time)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--corpus", default="wiki", help="packaged corpus whose eval split is scored")
    p.add_argument("--dart-records", default=None, help="JSON list of dart arms' records")
    p.add_argument("--out", default="results/quality_speed")
    args = p.parse_args(argv)
    quants = args.quants.split(",")
    for q in quants:
        if q not in llamacpp.QUANT_TYPES:
            raise SystemExit(f"--quants {q!r}: use {', '.join(llamacpp.QUANT_TYPES)}")
    threads = _ints(args.threads, "--threads")
    if args.new_tokens < 1 or args.rounds < 1:
        raise SystemExit("--new-tokens and --rounds must be >= 1")
    dart_records = []
    if args.dart_records:
        try:
            dart_records = validate_records(read_json(args.dart_records), args.dart_records)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--dart-records: {err}") from err
    try:
        llamacpp.packaged_gguf(args.model)  # refuse a model with no GGUF before any work
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from err
    load_before = os.getloadavg()
    text_file = llamacpp.heldout_text_file(args.corpus)
    records = llamacpp_records(
        args.model, quants, threads, args.new_tokens, args.rounds, text_file, args.ctx,
        args.chunks, args.ppl_threads,
    )  # fmt: skip
    load_after = os.getloadavg()
    records += dart_records
    out = Path(args.out)
    write_json(out / "records.json", records)
    load = f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    notes = [
        f"Held-out text: {args.corpus} eval split ({text_file}); perplexity over {args.chunks} "
        f"disjoint chunks of {args.ctx} tokens, second half of each chunk scored.",
        f"Decode: {args.new_tokens} tokens from an empty context, median of {args.rounds} "
        f"rounds. llama.cpp's threads spin-wait: its speed holds on a quiet machine only ({load}).",
    ]
    table = markdown_table(records, notes)
    atomic_write_text(out / "table.md", table)
    title = (
        f"{args.model}: perplexity vs decode speed ({args.corpus} eval, ctx {args.ctx}, "
        f"{args.chunks} chunks; {args.new_tokens} new tokens)"
    )
    plot(records, out / "quality_speed.png", title)
    print(table)
    bad = [r["arm"] for r in records if not math.isfinite(r["ppl"])]
    if bad:
        print(f"warning: non-finite perplexity for {', '.join(bad)}", file=sys.stderr)


if __name__ == "__main__":
    main()
