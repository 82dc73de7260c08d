"""Re-trace modes side by side on topic-switch streams: quality, re-traces, FFN work, wall time.

Every arm scores the same switch-stream documents (`dart.evaluate.stream`: a prompt of one
eval-split Wikipedia document, then teacher-forced decoding of another document, the KV cache
kept) in one process, interleaved per document (each document: every arm in turn), so the wall
time ratios are taken under the same load. Arms (each at every `--prunes` value):

- `griffin`: GRIFFIN (prompt masks, never re-traced);
- `nodrift`: DART with drift detection off;
- `lookback-R<R>`: DART with the look-back re-trace of R tokens (`drift.retrace: lookback`);
- `ffn-R<R>`: DART with the `ffn_inputs` re-trace over the last R tokens' FFN inputs.

Per arm: perplexity, re-traces per 200 tokens, dense token computations per token, FFN neuron
sparsity counting the re-trace work (mean over documents) beside the nominal one, wall time per
document over `nodrift`'s (sum over documents, same process), and paired per-document
differences of NLL per token (bootstrap intervals, `dart.evaluate.stream.paired_difference`)
against `nodrift`, `griffin` and the first look-back arm. Records are appended to
`<out>/records.jsonl` as they are made, so an interrupted run resumes (with the same options:
a different set is refused); `<out>/summary.json` and `<out>/table.md` are rewritten at the end.

    python bench/retrace.py --model smollm2-135m --prunes 0.5,0.7 --out results/retrace_smollm2
    python bench/retrace.py --model qwen2.5-coder-1.5b --dtype bfloat16 --prunes 0.7 \\
        --documents 8 --out results/retrace_qwen
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from dart.assets.models import load_model
from dart.evaluate.arms import Arm, arm_config, attach_arm
from dart.evaluate.stream import aggregate_stream, paired_difference, score_stream, stream_items


def _arms(
    lookback: list[int], ffn: list[str], griffin: bool, label: str = "ffn"
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Arms in the order each document runs them (the cheap ones and the candidates first, so
    a run cut short mid-document still pairs them)."""
    arms: dict[str, tuple[str, dict[str, Any]]] = {"nodrift": ("dart-nodrift", {})}
    for spec in ffn:  # "R" or "RbB": R tokens, retrace_blend B
        r, _, blend = spec.partition("b")
        drift = {"retrace": "ffn_inputs", "retrace_tokens": int(r)}
        if blend:
            drift["retrace_blend"] = float(blend)
        arms[f"{label}-R{spec}"] = ("dart", {"drift": drift})
    for r in lookback:
        arms[f"lookback-R{r}"] = ("dart", {"drift": {"retrace": "lookback", "retrace_tokens": r}})
    if griffin:
        arms["griffin"] = ("griffin", {})
    return arms


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _load(path: Path, options: dict[str, Any]) -> dict[tuple[str, float, int], dict]:
    done: dict[tuple[str, float, int], dict] = {}
    if not path.exists():
        return done
    with path.open() as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if lines and lines[0].get("options") != options:
        raise SystemExit(
            f"{path}: written with other options ({lines[0].get('options')}); use another --out"
        )
    for r in lines[1:]:
        done[(r["arm"], r["prune"], r["id"])] = r
    return done


def _pair(records: list[dict], base: list[dict]) -> dict[str, float] | None:
    by_id = {r["id"]: r for r in base}
    diffs = [
        r["nll"] / r["tokens"] - by_id[r["id"]]["nll"] / by_id[r["id"]]["tokens"]
        for r in records
        if r["id"] in by_id
    ]
    return paired_difference(diffs) if diffs else None


def _fmt(d: dict[str, float] | None) -> str:
    if d is None:
        return ""
    star = "*" if d["excludes_zero"] else ""
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{star}"


def summarise(records: list[dict], arms: list[str], prunes: list[float]) -> dict[str, Any]:
    """Per prune and arm: the stream aggregate, sparsities, wall ratio and paired deltas."""
    out: dict[str, Any] = {}
    for p in prunes:
        by_arm = {a: [r for r in records if r["arm"] == a and r["prune"] == p] for a in arms}
        by_arm = {a: recs for a, recs in by_arm.items() if recs}
        # only the documents every arm has scored: each column averages the same documents
        common = set.intersection(*({r["id"] for r in recs} for recs in by_arm.values()))
        by_arm = {a: [r for r in recs if r["id"] in common] for a, recs in by_arm.items()}
        first_lookback = next((a for a in arms if a.startswith("lookback")), None)
        rows = {}
        for a, recs in by_arm.items():
            if not recs:
                continue
            agg = aggregate_stream(recs)
            base_s = sum(r["seconds"] for r in by_arm.get("nodrift", []))
            rows[a] = {
                **agg,
                "ffn_neuron_sparsity": sum(r["effective_sparsity"] for r in recs) / len(recs),
                "nominal_sparsity": sum(r["nominal_sparsity"] for r in recs) / len(recs),
                "seconds": sum(r["seconds"] for r in recs),
                "wall_over_nodrift": sum(r["seconds"] for r in recs) / base_s if base_s else None,
                "minus_nodrift": _pair(recs, by_arm.get("nodrift", [])),
                "minus_griffin": _pair(recs, by_arm.get("griffin", [])),
                "minus_lookback": (
                    _pair(recs, by_arm[first_lookback]) if first_lookback not in (None, a) else None
                ),
                "retrace_state_bytes": max(r["retrace_state_bytes"] for r in recs),
            }
        out[str(p)] = rows
    return out


def table(summary: dict[str, Any], lookback: str | None) -> str:
    lines = []
    for p, rows in summary.items():
        lines += [
            f"\n{float(p):.0%} prune\n",
            "| arm | perplexity | re-traces / 200 tok | dense token computations / tok | FFN "
            "neuron sparsity (nominal) | wall / no drift | minus no drift | minus GRIFFIN | "
            f"minus {lookback} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for a, s in rows.items():
            wall = f"{s['wall_over_nodrift']:.3f}" if s["wall_over_nodrift"] else ""
            lines.append(
                f"| {a} | {s['perplexity']:.2f} | {s['retraces_per_200_tokens']:.2f} | "
                f"{s['dense_token_computations_per_token']:.3f} | "
                f"{s['ffn_neuron_sparsity']:.3f} ({s['nominal_sparsity']:.3f}) | {wall} | "
                f"{_fmt(s['minus_nodrift']) if a != 'nodrift' else ''} | "
                f"{_fmt(s['minus_griffin']) if a != 'griffin' else ''} | "
                f"{_fmt(s['minus_lookback'])} |"
            )
    return "\n".join(lines) + "\n(* : the 95% interval excludes 0)\n"


def _write(
    out: Path, records: list[dict], arms: list[str], prunes: list[float], lookback: str | None
) -> tuple[dict[str, Any], str]:
    """Rewrite summary.json and table.md from the records so far (partial runs included)."""
    have = [p for p in prunes if any(r["prune"] == p and r["arm"] == "nodrift" for r in records)]
    summary = summarise(records, arms, have)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    docs = {p: int(next(iter(summary[str(p)].values()))["samples"]) for p in have}
    text = table(summary, lookback) + f"documents (every arm) per prune: {docs}; load average: "
    text += f"{os.getloadavg()}\n"
    (out / "table.md").write_text(text)
    return summary, text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prunes", default="0.5,0.7")
    ap.add_argument("--documents", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--continuation-tokens", type=int, default=192)
    ap.add_argument("--lookback", default="64", help="look-back R values")
    ap.add_argument(
        "--ffn", default="8,16", help="ffn_inputs arms: R, or RbB for retrace_blend B (16b0.5)"
    )
    ap.add_argument(
        "--ffn-label", default="ffn", help="name of the ffn_inputs arms (versions of the code)"
    )
    ap.add_argument(
        "--skip-nodrift",
        action="store_true",
        help="do not run the no-drift arm (its records come from another run in --out)",
    )
    ap.add_argument(
        "--summarise-only", action="store_true", help="rewrite the table from --out's records"
    )
    ap.add_argument("--only", default="", help="with --summarise-only: these arms (a,b,...)")
    ap.add_argument("--no-griffin", action="store_true", help="leave the GRIFFIN arm out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prunes = [float(x) for x in args.prunes.split(",")]
    ffn = [x.strip() for x in args.ffn.split(",") if x.strip()]
    arms = _arms(_ints(args.lookback), ffn, not args.no_griffin, args.ffn_label)
    # what decides a record (arms and prunes only select which records are made)
    keys = ("model", "dtype", "documents", "prompt_tokens", "continuation_tokens")
    options = {k: getattr(args, k) for k in keys}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    done = _load(path, options)
    if not path.exists():
        path.write_text(json.dumps({"options": options}) + "\n")
    lookback = next((a for a in arms if a.startswith("lookback")), None)
    if args.summarise_only:  # every arm the records hold
        names = list(dict.fromkeys(r["arm"] for r in done.values()))
        if args.only:
            names = [a for a in names if a in args.only.split(",")]
        names.sort(key=lambda a: (a != "nodrift", a.startswith("lookback"), a))
        print(_write(out, list(done.values()), names, prunes, lookback)[1])
        return
    run = [a for a in arms if not (args.skip_nodrift and a == "nodrift")]
    model, tok = load_model(args.model, dtype=args.dtype)
    items = stream_items(
        tok, args.prompt_tokens, args.continuation_tokens, args.documents, corpus="wiki",
        split="eval", switch_corpus="wiki",
    )  # fmt: skip
    start = time.perf_counter()
    for p in prunes:  # one sparsity complete before the next: partial runs stay comparable
        for i, item in enumerate(items):
            for name in run:
                method, overrides = arms[name]
                if (name, p, i) in done:
                    continue
                handle = attach_arm(model, arm_config(Arm(method, p), overrides))
                t0 = time.perf_counter()
                with torch.no_grad():
                    rec = score_stream(model, item["prompt"], item["continuation"], handle)
                seconds = time.perf_counter() - t0
                state = handle.stats()["extra_state_bytes"].get("retrace_inputs", 0)
                handle.detach()
                rec.pop("token_nll", None)
                rec.pop("trace", None)
                rec.update(arm=name, prune=p, id=i, seconds=seconds, retrace_state_bytes=state)
                done[(name, p, i)] = rec
                with path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            _write(out, list(done.values()), list(arms), prunes, lookback)
            print(f"{p:.0%}: document {i + 1}/{len(items)} done "
                  f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})",
                  flush=True)  # fmt: skip
    summary, text = _write(out, list(done.values()), list(arms), prunes, lookback)
    print(text)
    if any(math.isnan(s["perplexity"]) for rows in summary.values() for s in rows.values()):
        raise SystemExit("a perplexity is NaN")


if __name__ == "__main__":
    main()
