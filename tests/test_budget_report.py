"""scripts/budget_report.py: the budget study's objective and tables, from synthetic records."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "budget_report.py"
_spec = importlib.util.spec_from_file_location("budget_report", _PATH)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _summary(name: str, prune: float, per_token: list[float], tokens: list[int]) -> dict:
    nll = [x * t for x, t in zip(per_token, tokens, strict=True)]
    return {"name": name, "method": "dense" if name == "dense" else "dart", "total_prune": prune,
            "corpus": "wiki", "perplexity": math.exp(sum(nll) / sum(tokens)),
            "item_nll": nll, "item_tokens": tokens}  # fmt: skip


def _write(folder: Path, model: str, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / f"{model}-{split}.jsonl").write_text(text)


def test_objective_is_the_mean_log_perplexity_ratio_and_its_interval_holds_it():
    tokens = [511, 256, 256]
    dense = _summary("dense", 0.0, [2.0, 2.2, 1.8], tokens)
    arm = _summary("a", 0.5, [2.5, 2.6, 2.4], tokens)
    other = _summary("a", 0.7, [3.0, 3.5, 2.9], tokens)
    mean, lo, hi = report.objective_difference([(arm, dense), (other, dense)])
    exp = (math.log(arm["perplexity"] / dense["perplexity"])
           + math.log(other["perplexity"] / dense["perplexity"])) / 2  # fmt: skip
    assert mean == pytest.approx(exp)
    assert lo <= mean <= hi and lo < hi
    # a constant per-window difference has no spread
    shifted = _summary("b", 0.5, [2.1, 2.3, 1.9], tokens)
    assert report.objective_difference([(shifted, dense)]) == pytest.approx((0.1, 0.1, 0.1))


def test_calibration_table_ranks_complete_candidates_only(tmp_path):
    tokens = [511, 256]
    for model, base in (("smollm2", 2.0), ("qwen", 1.5)):
        rows = [_summary("dense", 0.0, [base, base], tokens)]
        for p, step in ((0.5, 0.2), (0.7, 0.6)):
            rows.append(_summary("b-default", p, [base + step, base + step], tokens))
            rows.append(_summary("b-flat", p, [base + step - 0.05, base + step - 0.05], tokens))
            if model == "smollm2":  # b-half misses Qwen: no objective
                rows.append(_summary("b-half", p, [base, base], tokens))
        _write(tmp_path, model, "calibration", rows)
    text = report.calibration_table(tmp_path)
    assert "By the objective (lowest first): b-flat 0.3500, b-default 0.4000" in text
    flat = next(line for line in text.splitlines() if line.startswith("| b-flat "))
    assert "-0.0500 [-0.0500, -0.0500]" in flat
    half = next(line for line in text.splitlines() if line.startswith("| b-half "))
    assert half == "| b-half | 7.39 | 7.39 | - | - | - |  |"  # no Qwen cells: no objective
