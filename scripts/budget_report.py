"""Tables of the budget study (``scripts/budget_study.sh``), from its records.

``--collect OUT`` first copies every finished point's summary under ``OUT/<model>-<split>``
(the run folders of the study) into ``RECORDS/<model>-<split>.jsonl``, one summary per line
(its per-window NLLs and token counts included, so every figure recomputes from them). Then,
from the records alone:

* calibration: per candidate, the perplexity of each (model, sparsity) cell, the objective
  (the mean over the cells of ``log(ppl / dense ppl)``, which is NLL/token minus dense's) and
  its difference to the old default with a 95% bootstrap interval (windows resampled within
  each cell, 4,000 resamples, seed 0);
* eval: per model and sparsity, every arm's perplexity and its paired per-window NLL/token
  difference to GRIFFIN and to the old default (the study's ``comparison_table``).

    python scripts/budget_report.py --collect results/budget --records docs/results/budget
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from dart.evaluate.study import by_key, comparison_table, load_summaries

MODELS = {"smollm2": "SmolLM2-135M", "qwen": "Qwen2.5-Coder-1.5B (q8)"}
PRUNES = (0.5, 0.7)
OLD = "b-default"


def collect(out: Path, records: Path) -> None:
    records.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        split = folder.name.rsplit("-", 1)[1]
        found = load_summaries(folder, "ppl", split)
        keep = by_key(found)  # the newest summary of each (corpus, point, sparsity)
        lines = [json.dumps({k: v for k, v in s.items() if k != "folder"}) for s in keep.values()]
        (records / f"{folder.name}.jsonl").write_text("\n".join(lines) + "\n")


def read(records: Path, model: str, split: str) -> dict[tuple[str, float], dict[str, Any]]:
    path = records / f"{model}-{split}.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(s["name"], round(s["total_prune"], 6)): s for s in rows}


def _pooled(a: dict[str, Any], b: dict[str, Any], idx: list[int]) -> float:
    """NLL/token of ``a`` minus ``b`` pooled over the windows ``idx`` (token-weighted)."""
    na, nb, t = a["item_nll"], b["item_nll"], a["item_tokens"]
    return sum(na[i] - nb[i] for i in idx) / sum(t[i] for i in idx)


def objective_difference(
    pairs: list[tuple[dict[str, Any], dict[str, Any]]], iters: int = 4000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over cells of the pooled NLL/token difference, with a stratified bootstrap
    interval (each cell's windows resampled on their own)."""
    full = [list(range(len(a["item_nll"]))) for a, _ in pairs]
    mean = sum(_pooled(a, b, i) for (a, b), i in zip(pairs, full, strict=True)) / len(pairs)
    rng = random.Random(seed)
    draws = sorted(
        sum(_pooled(a, b, rng.choices(i, k=len(i))) for (a, b), i in zip(pairs, full, strict=True))
        / len(pairs)
        for _ in range(iters)
    )
    return mean, draws[int(0.025 * (iters - 1))], draws[math.ceil(0.975 * (iters - 1))]


def calibration_table(records: Path) -> str:
    cells = {m: read(records, m, "calibration") for m in MODELS}
    names = list(dict.fromkeys(n for c in cells.values() for n, _ in c if n != "dense"))
    head = [f"{m} {round(100 * p)}%" for m in MODELS for p in PRUNES]
    lines = ["| candidate | " + " | ".join(head) + " | objective | minus old default |",
             "|---" * (len(head) + 3) + "|"]  # fmt: skip
    dense = " | ".join(f"{cells[m][('dense', 0.0)]['perplexity']:.2f}" if ("dense", 0.0) in cells[m]
                       else "-" for m in MODELS for _ in PRUNES)  # fmt: skip
    lines.append(f"| dense | {dense} | 0 | |")
    ranked = []
    for name in names:
        got = [(m, p) for m in MODELS for p in PRUNES if (name, p) in cells[m]]
        vals = [f"{cells[m][(name, p)]['perplexity']:.2f}" if (m, p) in got else "-"
                for m in MODELS for p in PRUNES]  # fmt: skip
        complete = len(got) == len(MODELS) * len(PRUNES)
        obj, diff = "-", ""
        if complete:
            pairs = [(cells[m][(name, p)], cells[m][("dense", 0.0)]) for m, p in got]
            score = objective_difference(pairs)[0]
            obj = f"{score:.4f}"
            ranked.append((score, name))
            if name != OLD:
                d = objective_difference(
                    [(cells[m][(name, p)], cells[m][(OLD, p)]) for m, p in got]
                )
                diff = f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {obj} | {diff} |")
    order = ", ".join(f"{n} {s:.4f}" for s, n in sorted(ranked))
    return "\n".join(lines) + f"\n\nBy the objective (lowest first): {order}\n"


def eval_tables(records: Path) -> str:
    out = []
    for m, title in MODELS.items():
        cells = read(records, m, "eval")
        if not cells:
            continue
        summaries = list(cells.values())
        for s in summaries:
            s["corpus"] = title
        out.append(comparison_table(summaries, ["griffin", OLD], ["perplexity"]))
        names = [n for n in dict.fromkeys(n for n, _ in cells) if n not in ("dense",)]
        if ("dense", 0.0) in cells:
            obj = []
            for n in names:
                if all((n, p) in cells for p in PRUNES):
                    pairs = [(cells[(n, p)], cells[("dense", 0.0)]) for p in PRUNES]
                    obj.append(f"{n} {objective_difference(pairs)[0]:.4f}")
            out.append(f"\n{title}, mean over 50% and 70% of log(ppl / dense): " + ", ".join(obj))
        out.append("")
    # the pooled paired differences over both models and sparsities
    pooled = []
    both = {m: read(records, m, "eval") for m in MODELS}
    names = list(dict.fromkeys(n for c in both.values() for n, _ in c))
    for n in names:
        for base in ("griffin", OLD):
            if n in ("dense", "griffin", OLD) or n == base:
                continue
            pairs = [(both[m][(n, p)], both[m][(base, p)]) for m in MODELS for p in PRUNES
                     if (n, p) in both[m] and (base, p) in both[m]]  # fmt: skip
            if len(pairs) == len(MODELS) * len(PRUNES):
                d = objective_difference(pairs)
                pooled.append(f"| {n} | {base} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |")
    if pooled:
        out += ["Mean over the four (model, sparsity) cells of the pooled NLL/token difference:",
                "", "| arm | minus | difference [95%] |", "|---|---|---|", *pooled]  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", type=Path, default=None, help="the study's results folder")
    ap.add_argument("--records", type=Path, default=Path("docs/results/budget"))
    args = ap.parse_args(argv)
    if args.collect:
        collect(args.collect, args.records)
    cal, held_out = calibration_table(args.records), eval_tables(args.records)
    text = (f"## Calibration (wiki `calibration` split)\n\n{cal}\n"
            f"## Eval (wiki `eval` split, held out)\n\n{held_out}\n")  # fmt: skip
    (args.records / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
