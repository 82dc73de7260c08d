"""The tuning study's runner and command line: a grid of DART settings and the baselines, each
(corpus, grid point) run through the driver's per-arm function into its own fingerprinted,
resumable results folder, then summarised, tabled and drawn.

The grid, its texts, fingerprints, summaries and tables are :mod:`dart.evaluate.study`; each
point runs as one arm of :func:`dart.experiment.run_arm` (Lightning, the task's step, the
folder's lock and fingerprint, per-sample records appended as they finish; a rerun skips the
items on disk, so an interrupted study resumes where it stopped). ``OUT/<task>_<split>.json``
and ``.csv`` summarise every finished point (rewritten atomically after each one).

    python -m dart.study --split calibration --max-tokens 2048 --out results/study
    python -m dart.study --split eval --max-tokens 4096 --only griffin,static,dart-l2-cap10 \\
        --out results/study
    python -m dart.study --report docs/figures --out results/study
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .assets.models import PACKAGED_MODELS
from .core.config import ConfigError
from .evaluate.store import RecordStore, RunStore, model_identity
from .evaluate.study import (
    STREAM_COLUMNS,
    TABLE_COLUMNS,
    GridPoint,
    Source,
    StudyOptions,
    build_points,
    by_key,
    comparison_table,
    gen_table,
    load_summaries,
    make_source,
    point_fingerprint,
    point_folder,
    ppl_grid_table,
    summarise_point,
    write_tables,
)
from .experiment import RunOptions, record_check, run_arm
from .options import add_options, resolve_options
from .results import atomic_write_text, plot_drift, read_json, save_figure
from .runtime.loading import load_model

__all__ = ["main", "report", "run_grid", "run_point"]

log = logging.getLogger("dart.study")


# -- running -----------------------------------------------------------------------------------
def run_point(
    task: str,
    model: torch.nn.Module,
    tokenizer: Any,
    point: GridPoint,
    source: Source,
    fingerprint: dict[str, Any],
    folder: Path,
    run: RunOptions,
    reference: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Run the pending items of ``point`` on ``source`` into ``folder`` (locked and bound to
    ``fingerprint``) as one arm of :func:`~dart.experiment.run_arm`; its summary over every
    item, also written to ``folder/summary.json``."""
    from .lightning import ItemsDataModule

    config = point.config(run.backend, run.seed)
    arm = point.arm
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    with RunStore.open(folder, fingerprint) as store:
        store.records.validate = record_check(source.task, decode)
        data = ItemsDataModule(source.items, source.task.batch_size(source.task_options))
        run_arm(store, source.task, source.task_options, arm, config, model, tokenizer,
                source.calibration_ids, data, run)  # fmt: skip
        by_id = {r["id"]: r for r in store.records.records(arm.label, arm.total_prune)}
        records = [by_id[it["id"]] for it in source.items]
        summary = summarise_point(task, model, point, source, records, reference)
        timing = store.read_summary("timings.json").get(f"{arm.label}@{arm.total_prune}", {})
        summary.update(
            seconds=timing.get("seconds", 0.0),  # the latest run's (a resume: its part only)
            overrides=point.overrides,
            folder=str(folder),
        )
        store.write_summary("summary.json", summary)
        return summary


def run_grid(
    opts: StudyOptions, points: list[GridPoint], model: torch.nn.Module, tokenizer: Any
) -> list[dict[str, Any]]:
    """Every (point, corpus) of ``opts.corpora`` (corpora interleaved, so a partial grid
    pairs); their summaries, also in ``OUT/<task>_<split>.json``/``.csv``. ``gen``: the first
    point must be ``dense`` (its continuations are the reference of the others)."""
    if opts.task == "gen" and (not points or points[0].name != "dense"):
        raise ConfigError("--task gen: the dense point must run first (its text is the reference)")
    for p in points:
        p.config(opts.backend, opts.seed)  # a bad setting fails before anything runs
    run = RunOptions(model=opts.model, weights=opts.weights, seed=opts.seed, backend=opts.backend,
                     out=opts.out, threads=opts.threads, accelerator=opts.accelerator,
                     quiet=True)  # fmt: skip
    out = Path(opts.out)
    model_id = model_identity(model, opts.model)
    sources = {c: make_source(tokenizer, c, opts) for c in opts.corpora}
    reference: dict[str, list[list[int]]] = {}
    summaries: list[dict[str, Any]] = []
    todo = [(p, c) for p in points for c in opts.corpora]
    start = time.perf_counter()
    for i, (point, corpus) in enumerate(todo, 1):
        source = sources[corpus]
        fp = point_fingerprint(opts.task, point, point.config(opts.backend, opts.seed), source,
                               model_id)  # fmt: skip
        folder = point_folder(out, opts.task, source, point, fp)
        s = run_point(opts.task, model, tokenizer, point, source, fp, folder, run,
                      reference.get(corpus))  # fmt: skip
        if opts.task == "gen" and point.name == "dense":
            reference[corpus] = s["item_new_tokens"]
        summaries.append(s)
        write_tables(out / f"{opts.task}_{opts.split}", opts.task, summaries)
        score = (f"ROUGE-L vs dense {s['rouge_l_vs_dense']:.3f}" if opts.task == "gen"
                 else f"ppl {s['perplexity']:.2f}")  # fmt: skip
        log.info("[%d/%d %.0f s] %s %s@%.2f: %s (%.0f s)", i, len(todo),
                 time.perf_counter() - start, corpus, point.name, point.total_prune, score,
                 s["seconds"])  # fmt: skip
    return summaries


# -- figures -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ppl_heatmap(
    path: Path, summaries: list[dict[str, Any]], corpora: list[str], prunes: list[float]
) -> Path:
    """Grid points x (corpus, sparsity): colour = NLL/token minus GRIFFIN's, text = perplexity."""
    import numpy as np

    plt = _pyplot()
    cells = by_key(summaries)
    names = [n for n in dict.fromkeys(s["name"] for s in summaries) if n not in ("dense",)]
    cols = [(c, p) for p in prunes for c in corpora]
    delta = np.full((len(names), len(cols)), np.nan)
    for i, n in enumerate(names):
        for j, (c, p) in enumerate(cols):
            s, g = cells.get((c, n, p)), cells.get((c, "griffin", p))
            if s and g:
                delta[i, j] = s["nll_per_token"] - g["nll_per_token"]
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(names) + 1.6))
    lim = 0.5  # colours saturate at +-0.5 nats/token (static at 70% is far beyond)
    im = ax.imshow(np.clip(delta, -lim, lim), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, n in enumerate(names):
        for j, (c, p) in enumerate(cols):
            s = cells.get((c, n, p))
            if s:
                ax.text(j, i, f"{s['perplexity']:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [f"{c} {round(100 * p)}%" for c, p in cols])
    ax.set_yticks(range(len(names)), names)
    fig.colorbar(im, ax=ax, label="NLL/token minus GRIFFIN's (blue: better; clipped)")
    ax.set_title("Perplexity grid, calibration splits (text: perplexity)")
    return save_figure(fig, path)


def gen_bars(path: Path, summaries: list[dict[str, Any]], title: str) -> Path:
    """Grouped bars: ROUGE-L against the dense text per (corpus, sparsity) cell, one bar per
    pruned point."""
    plt = _pyplot()
    cells = by_key(summaries)
    names = [n for n in dict.fromkeys(s["name"] for s in summaries) if n != "dense"]
    cols = sorted({(c, p) for c, _, p in cells if p > 0}, key=lambda cp: (cp[1], cp[0]))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2, 3.6))
    for i, name in enumerate(names):
        values = [cells[(c, name, p)]["rouge_l_vs_dense"] if (c, name, p) in cells else 0.0
                  for c, p in cols]  # fmt: skip
        ax.bar([j + (i - len(names) / 2 + 0.5) * width for j in range(len(cols))], values,
               width, label=name)  # fmt: skip
    ax.set_xticks(range(len(cols)), [f"{c} {round(100 * p)}%" for c, p in cols])
    ax.set_ylabel("ROUGE-L vs the dense text")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def drift_traces(path: Path, folder_by_name: dict[str, Path], doc: str, offset: int) -> Path | None:
    """Per-window drift similarity, threshold and re-traces of one document, per arm. The
    monitor counts tokens seen (prompt included); re-trace events are decode passes, shifted by
    the prompt's ``offset`` tokens onto the same axis."""
    traces, events = {}, {}
    for name, folder in folder_by_name.items():
        for r in RecordStore(folder):
            if r["id"] == doc and r.get("trace"):
                traces[name] = [tuple(t) for t in r["trace"]]
                events[name] = [offset + e for e in r["events"]]
    if not traces:
        return None
    title = f"Drift signal, switch stream {doc} (x: tokens seen, the prompt's {offset} first)"
    return plot_drift(path, traces, events, title=title)


# the drift traces drawn: the one-token re-trace and look-back re-traces
TRACED = ("dart-R0-p2", "dart-R64-p2", "dart-R64-p3", "dart-R32-p3")


def report(out: Path, figures: Path) -> str:
    """Markdown tables and figures of every finished point under ``out``."""
    corpora, prunes = ["wiki", "c4"], [0.5, 0.7]
    parts = []
    calib = load_summaries(out, "ppl", "calibration")
    if calib:
        table, ranked, scores = ppl_grid_table(calib, corpora, prunes)
        ppl_heatmap(figures / "study-ppl-grid.png", calib, corpora, prunes)
        best = ", ".join(f"{n} ({scores[n]:+.4f})" for n in ranked[:5])
        parts += ["### Perplexity grid (calibration splits)", table, f"Ranked: {best}"]
        parts += ["Paired to GRIFFIN, calibration:",
                  comparison_table(calib, ["griffin", "static"], ["perplexity"])]  # fmt: skip
    evals = load_summaries(out, "ppl", "eval")
    if evals:
        parts += ["### Perplexity, eval splits",
                  comparison_table(evals, ["griffin", "static"], ["perplexity",
                                   "nominal_sparsity"])]  # fmt: skip
    for split in ("calibration", "eval"):
        gens = load_summaries(out, "gen", split)
        if gens:
            title = f"Greedy continuations, {split} splits"
            gen_bars(figures / f"study-gen-{split}.png", gens, title)
            parts += [f"### Greedy generation ({split} split; pooled over corpora and sparsities)",
                      gen_table(gens), "Per cell (paired difference of the dense NLL):",
                      comparison_table(gens, ["griffin"], TABLE_COLUMNS["gen"])]  # fmt: skip
    for split in ("calibration", "eval"):
        streams = load_summaries(out, "stream", split)
        if not streams:
            continue
        against = ["griffin", "dart-nodrift"]
        parts += [f"### Switch streams ({split} split)",
                  comparison_table(streams, against, STREAM_COLUMNS)]  # fmt: skip
        folders = {s["name"]: Path(s["folder"]) for s in streams if s["name"] in TRACED}
        if folders:
            options = read_json(next(iter(folders.values())) / "fingerprint.json")["options"]
            drift_traces(figures / f"study-drift-{split}.png", folders, "d0000",
                         options["prompt_tokens"])  # fmt: skip
    return "\n\n".join(parts) + "\n"


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> StudyOptions:
    ap = argparse.ArgumentParser(prog="python -m dart.study", description=__doc__.split("\n\n")[0])
    add_options(ap, StudyOptions, config=False)
    (opts,) = resolve_options(vars(ap.parse_args(argv)), StudyOptions)
    return opts


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        if opts.report:
            text = report(Path(opts.out), Path(opts.report))
            atomic_write_text(Path(opts.out) / "report.md", text)
            print(text)
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                            stream=sys.stdout)  # fmt: skip
        # one Trainer per point: its start-up lines (devices, tips) would bury the progress
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        points = build_points(opts)
        for p in points:
            p.config(opts.backend, opts.seed)  # a bad setting fails before the model loads
        if opts.threads:
            torch.set_num_threads(opts.threads)
        torch.manual_seed(opts.seed)
        # quantised: a packaged model is read tensor by tensor (direct), so the fp32 model
        # never sits in memory beside the quantised one; the weights' hash in the model
        # identity keeps q8 points in folders of their own
        direct = opts.weights != "fp" and opts.model.lower() in PACKAGED_MODELS
        model, tokenizer = load_model(opts.model, weights=opts.weights, direct=direct or None)
        run_grid(opts, points, model, tokenizer)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
