"""The arms of a ``dart.lmeval`` results folder side by side: a markdown table (per task, each
arm's mean with its 95% interval and the paired differences with theirs) and a figure.

    python -m dart.lmeval report results/paper_lmeval/zero_shot --figure docs/figures/x.png

Intervals are normal approximations, mean +- 1.96 standard errors (the per-document standard
error that :func:`dart.lmeval.compute_metrics` records; paired differences are taken on the
same documents).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..evaluate.store import METRIC_KEYS
from ..results import read_json, save_figure

__all__ = ["POOLED_TASK", "comparison_table", "load_lmeval_metrics", "plot_comparison"]

Z95 = 1.96
POOLED_TASK = "all"  # every sample of a run's tasks pooled, for the metrics they all have
# With more tasks than this (MMLU's 57 subjects, one document each), the table shows the pooled
# row only: per-task rows of a few documents say nothing.
MAX_TASK_ROWS = 12
SPARSITY_KEYS = ("ffn_sparsity", "weight_bytes_sparsity")


def load_lmeval_metrics(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """``metrics.json`` of a ``dart.lmeval`` results folder."""
    path = Path(folder) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run `python -m dart.lmeval run ... --out {folder}` first"
        )
    data = read_json(path)
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and all(k in r for k in METRIC_KEYS) for r in data
    ):
        raise ValueError(f"{path} is not a dart.lmeval metrics list")
    return data


def _arms(metrics: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(label, sparsity) of every arm, dense first, in the order they were run."""
    arms = list(dict.fromkeys((r["method"], float(r["total_prune"])) for r in metrics))
    return sorted(arms, key=lambda a: a[1] > 0)


def _name(arm: tuple[str, float], show_sparsity: bool) -> str:
    label, prune = arm
    return f"{label}@{prune:g}" if show_sparsity and prune else label


def _cell(rec: dict[str, Any] | None, signed: bool = False) -> str:
    if rec is None or rec["value"] is None:
        return ""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(rec["value"])
    if rec.get("stderr"):
        text += f" ± {Z95 * rec['stderr']:.3f}"
    return text


def _index(metrics, metric: str):
    """(task, arm) -> {metric name: record}, the tasks in order (pooled last) and the
    difference columns present: (arm, compared base method)."""
    if not any(r["metric"] == metric for r in metrics):
        names = sorted({r["metric"] for r in metrics if "_minus_" not in r["metric"]})
        raise ValueError(f"metric {metric!r} is not in these results; they have {names}")
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in metrics:
        by[(r["task"], (r["method"], float(r["total_prune"])))][r["metric"]] = r
    tasks = list(dict.fromkeys(r["task"] for r in metrics if r["metric"] == metric))
    tasks = [t for t in tasks if t != POOLED_TASK] + ([POOLED_TASK] if POOLED_TASK in tasks else [])
    prefix = f"{metric}_minus_"
    diffs = list(dict.fromkeys(
        ((r["method"], float(r["total_prune"])), r["metric"][len(prefix):])
        for r in metrics if r["metric"].startswith(prefix)
    ))  # fmt: skip
    return by, tasks, diffs


def comparison_table(metrics: list[dict[str, Any]], metric: str = "acc") -> str:
    """Markdown: one row per task (pooled last, in bold), each arm's ``metric`` +- its 95%
    half-width, then each paired difference (arm - compared arm) +- its half-width, and the
    arms' mean sparsity (FFN neurons and per-token weight bytes) below."""
    by, tasks, diffs = _index(metrics, metric)
    arms = _arms(metrics)
    show = len({p for _, p in arms if p}) > 1
    if len(tasks) > MAX_TASK_ROWS and POOLED_TASK in tasks:
        tasks = [POOLED_TASK]
    head = ["task", "n", *(_name(a, show) for a in arms)]
    head += [f"{_name(a, show)} − {base}" for a, base in diffs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        n = max((by[(task, a)].get(metric, {}).get("n", 0) for a in arms), default=0)
        cells = [_cell(by[(task, a)].get(metric)) for a in arms]
        cells += [_cell(by[(task, a)].get(f"{metric}_minus_{base}"), True) for a, base in diffs]
        name = f"**{POOLED_TASK} (pooled)**" if task == POOLED_TASK else task
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    notes = []
    for a in arms:
        vals = [by[(tasks[-1], a)].get(k, {}).get("value") for k in SPARSITY_KEYS]
        if a[1] and None not in vals:
            notes.append(f"{_name(a, True)}: {vals[0]:.3f} of FFN neurons, {vals[1]:.3f} of "
                         "weight bytes per token")  # fmt: skip
    text = "\n".join(lines) + f"\n\n`{metric}`, mean ± 95% half-width (1.96 standard errors)."
    if notes:
        text += " Sparsity skipped, mean over contexts: " + "; ".join(notes) + "."
    return text


def _points(recs: list[dict[str, Any] | None]) -> tuple[list[float], list[float]]:
    """Values (NaN where missing: no bar or point) and 95% half-widths of metric records."""
    vals = [r["value"] if r and r["value"] is not None else float("nan") for r in recs]
    errs = [Z95 * (r.get("stderr") or 0.0) if r else 0.0 for r in recs]
    return vals, errs


def plot_comparison(
    path: str | os.PathLike,
    metrics: list[dict[str, Any]],
    metric: str = "acc",
    title: str | None = None,
) -> Path:
    """Two panels: each arm's ``metric`` per task (bars, 95% intervals), and every paired
    difference per task (points, 95% intervals, the zero line drawn)."""
    by, tasks, diffs = _index(metrics, metric)
    arms = _arms(metrics)
    show = len({p for _, p in arms if p}) > 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(tasks) + 2), 7))
    width = 0.8 / max(len(arms), 1)
    xs = range(len(tasks))
    for j, arm in enumerate(arms):
        vals, errs = _points([by[(t, arm)].get(metric) for t in tasks])
        pos = [x + (j - (len(arms) - 1) / 2) * width for x in xs]
        top.bar(pos, vals, width, yerr=errs, capsize=2, label=_name(arm, show))
    top.set_ylabel(metric)
    top.set_xticks(list(xs), tasks, rotation=30, ha="right")
    top.legend(fontsize=8)
    top.set_title(title or f"{metric} per task (95% intervals)")
    step = 0.8 / max(len(diffs), 1)
    for j, (arm, base) in enumerate(diffs):
        vals, errs = _points([by[(t, arm)].get(f"{metric}_minus_{base}") for t in tasks])
        pos = [x + (j - (len(diffs) - 1) / 2) * step for x in xs]
        bottom.errorbar(pos, vals, yerr=errs, fmt="o", capsize=3,
                        label=f"{_name(arm, show)} − {base}")  # fmt: skip
    bottom.axhline(0.0, color="black", lw=0.8)
    bottom.set_ylabel(f"paired difference in {metric}")
    bottom.set_xticks(list(xs), tasks, rotation=30, ha="right")
    if diffs:
        bottom.legend(fontsize=8)
    return save_figure(fig, path)
