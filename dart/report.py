"""`dart report`: results folders -> one markdown table and comparison plots."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .evaluate.store import METRIC_KEYS, RecordStore
from .evaluate.tasks import TASKS
from .results import CorruptFileError, atomic_write_text, plot_drift, read_json, save_figure

__all__ = [
    "build_report",
    "drift_plot",
    "load_metrics",
    "markdown_table",
    "plot_metric_vs_sparsity",
]

# The metric plotted against sparsity, per task (from the task registry).
MAIN_METRICS = tuple(dict.fromkeys(t.main_metric for t in TASKS.values() if t.main_metric))

# Metrics shown in tables (others stay in metrics.json), in this order.
TABLE_METRICS = (
    "perplexity",
    "acc_micro",
    "acc_macro",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "rougeL_vs_dense",
    "token_agreement_first",
    "token_agreement_second",
    "rougeL_vs_dense_first",
    "rougeL_vs_dense_second",
    "retraces",
    "nominal_sparsity",
    "effective_sparsity",
    "tokens_per_s",
    "tokens",
    "questions",
    "samples",
)


def load_metrics(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.json of a results folder (checked against the schema)."""
    try:
        data = read_json(Path(folder) / "metrics.json")
    except CorruptFileError as e:
        raise CorruptFileError(
            f"{e}; rerun the folder's `dart eval` command (same --out): it recomputes "
            "metrics.json from the per-sample records without rerunning them"
        ) from e
    if not isinstance(data, list):
        raise ValueError(f"{folder}/metrics.json is not a list of records")
    for r in data:
        missing = [k for k in METRIC_KEYS if k not in r]
        if missing:
            raise ValueError(f"{folder}/metrics.json: a record lacks {missing}: {r}")
    return data


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown_table(metrics: list[dict[str, Any]]) -> str:
    """Rows (task, method, sparsity), one column per metric in TABLE_METRICS present."""
    rows: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in metrics:
        rows[(r["task"], r["method"], float(r["total_prune"]))][r["metric"]] = r["value"]
    present = {m for r in rows.values() for m in r}
    cols = [m for m in TABLE_METRICS if m in present]
    lines = ["| task | method | sparsity | " + " | ".join(cols) + " |"]
    lines.append("|" + "---|" * (3 + len(cols)))
    for (task, method, prune), vals in rows.items():
        cells = [_fmt(vals[c]) if c in vals else "" for c in cols]
        lines.append(f"| {task} | {method} | {prune:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric_vs_sparsity(
    path: str | os.PathLike, metrics: list[dict[str, Any]], metric: str, title: str | None = None
) -> Path | None:
    """One line per method of ``metric`` against total_prune (dense drawn as a flat line)."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in metrics:
        if r["metric"] == metric and r["value"] is not None:  # null: non-finite, see metrics
            points[r["method"]].append((float(r["total_prune"]), float(r["value"])))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted({x for pts in points.values() for x, _ in pts})
    for method, pts in sorted(points.items()):
        pts.sort()
        if pts == [(0.0, pts[0][1])]:  # an unpruned method: one point, drawn across
            ax.axhline(pts[0][1], color="black", ls="--", label=method)
        else:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.set_xticks(xs)
    ax.set_xlabel("total FFN sparsity (total_prune)")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(title or f"{metric} vs sparsity")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_report(folders: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Merge results folders into ``out/report.md`` plus plots; returns the markdown path."""
    out = Path(out)
    sections, all_metrics = [], []
    for folder in folders:
        metrics = load_metrics(folder)
        all_metrics.extend(metrics)
        cfg = Path(folder) / "config.yaml"
        cmd = ""
        if cfg.exists():
            import yaml

            c = yaml.safe_load(cfg.read_text()) or {}
            cmd = c.get("command") or ""
        sections.append(
            f"## {folder}\n\n" + (f"`{cmd}`\n\n" if cmd else "") + markdown_table(metrics)
        )
        drift_plot(out / f"drift-{Path(folder).name}.png", RecordStore(folder))
    plots = []
    for folder in folders:  # one plot per folder and metric: corpora/settings never mix
        metrics = load_metrics(folder)
        for metric in MAIN_METRICS:
            name = f"{Path(folder).name}-{metric}.png"
            title = f"{Path(folder).name}: {metric}"
            if plot_metric_vs_sparsity(out / name, metrics, metric, title) is not None:
                plots.append(name)
    text = (
        "# DART results\n\n"
        + "\n\n".join(sections)
        + "\n\n"
        + "\n".join(f"![{p}]({p})" for p in plots)
    )
    return atomic_write_text(out / "report.md", text + "\n")


def drift_plot(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path | None:
    """The drift traces of every arm on the first prompt that has any (generation records);
    None when no record has a trace."""
    first: dict[str, dict] = {}
    for r in records:
        label = f"{r['method']}@{r['total_prune']}"
        if r.get("trace") and (label not in first or r["id"] < first[label]["id"]):
            first[label] = r
    if not first:
        return None
    ident = min(r["id"] for r in first.values())
    traces = {k: [tuple(t) for t in r["trace"]] for k, r in first.items() if r["id"] == ident}
    events = {k: r["events"] for k, r in first.items() if r["id"] == ident}
    return plot_drift(path, traces, events, title=f"Drift signal, prompt {ident}")
