#!/usr/bin/env python
"""The tuning study of issue 12: windowed perplexity of a grid of DART settings and the baselines.

Every grid point (a method, its ``DARTConfig`` overrides and a sparsity) is scored with the
protocol of ``dart eval ppl`` (:func:`dart.evaluate.perplexity.score_window`: sliding windows,
masks from each window's already-seen overlap, ``prepare`` + ``hold``) on the first
``--max-tokens`` tokens of each corpus's ``--split``. Settings are tuned on the ``calibration``
split only; the chosen ones are then reported on ``eval``.

Each (corpus, grid point) has its own results folder ``OUT/ppl/<corpus>-<split>-<tokens>/
<name>-p<NN>-<hash>``: the hash is that of its fingerprint (the resolved ``DARTConfig``, the
options, the model's and the windows' identity), so a changed setting, default or text goes to
a new folder and never reuses records. Per-window records are appended atomically
(:class:`~dart.evaluate.store.RunStore`); a rerun skips the windows on disk, so an interrupted
study resumes where it stopped. ``OUT/ppl_<split>.json`` and ``.csv`` summarise every finished
grid point (rewritten atomically after each one).

``static``'s calibration text is the ``--calibration-tokens`` tokens that follow the scored
ones in the same corpus split (so its masks never saw the scored tokens).

    python scripts/study.py --split calibration --max-tokens 2048 --out results/study
    python scripts/study.py --split eval --max-tokens 4096 --only griffin,static,dart-l2-cap10 \\
        --out results/study
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dart.assets.data import TEXT_CORPORA, load_text
from dart.assets.models import load_model
from dart.core.config import DARTConfig
from dart.evaluate.arms import Arm, arm_config, attach_arm
from dart.evaluate.perplexity import (
    aggregate_perplexity,
    score_window,
    tokenize_prefix,
    window_items,
)
from dart.evaluate.store import (
    RecordStore,
    RunStore,
    data_identity,
    digest,
    model_identity,
    run_fingerprint,
)
from dart.evaluate.stream import (
    aggregate_stream,
    paired_difference,
    score_stream,
    stream_items,
)
from dart.results import atomic_write_text, plot_drift, read_json, save_figure, write_json

log = logging.getLogger("dart.study")

# -- the grid ----------------------------------------------------------------------------------
# How an ``auto`` budget spreads total_prune over layers (BudgetConfig overrides). Every entry
# spells out all three guards, so a point means the same whatever the library's defaults (the
# study chose them). ``uniform`` is the blend all the way to
# uniform: the same share of every layer (GRIFFIN's budget).
SPEC_BUDGET: dict[str, Any] = {"normalize": "minmax", "cap_margin": None, "uniform_blend": 0.0,
                               "blend_toward": "uniform"}  # fmt: skip
BUDGETS: dict[str, dict[str, Any]] = {
    "auto": SPEC_BUDGET,
    "cap10": {**SPEC_BUDGET, "cap_margin": 0.1},
    "cap20": {**SPEC_BUDGET, "cap_margin": 0.2},
    "blend50": {**SPEC_BUDGET, "uniform_blend": 0.5},
    "blend25": {**SPEC_BUDGET, "uniform_blend": 0.25},
    # blended toward the sensitivity-only budget: the depth ramp is halved, an outlier layer
    # that R protects stays protected (after the generation check of the first study)
    "sblend50": {**SPEC_BUDGET, "uniform_blend": 0.5, "blend_toward": "sensitivity"},
    "rank": {**SPEC_BUDGET, "normalize": "rank"},
    "wins": {**SPEC_BUDGET, "normalize": "winsorized"},
    "uniform": {**SPEC_BUDGET, "uniform_blend": 1.0},
}
STATISTICS = {"l2": "l2", "nl2": "normalized_l2"}


@dataclass(frozen=True)
class GridPoint:
    """One arm of the study: ``name`` labels its records and folder."""

    name: str
    method: str
    total_prune: float
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def config(self, backend: str, seed: int) -> DARTConfig | None:
        return arm_config(self.arm, self.overrides, backend=backend, seed=seed)

    @property
    def arm(self) -> Arm:
        return Arm(self.method, self.total_prune)


def dart_point(stat: str, ranking: str, budget: str, total_prune: float) -> GridPoint:
    rank_tag = "" if ranking == "magnitude" else f"-{ranking}"
    name = f"dart-{stat}{rank_tag}-{budget}"
    overrides = {"statistic": STATISTICS[stat], "ranking": ranking, "budget": BUDGETS[budget]}
    return GridPoint(name, "dart", total_prune, overrides)


def study_grid(prunes: list[float], max_ranking_prune: float | None) -> list[GridPoint]:
    """Baselines, then DART's statistic x budget (magnitude ranking) at every sparsity, then the
    ``max`` output-proxy ranking with the ``auto`` budget at ``max_ranking_prune`` only.
    ``nl2-uniform`` is left out: it is GRIFFIN (normalised statistic, uniform k)."""
    points = [GridPoint("dense", "dense", 0.0)]
    for p in prunes:
        static = GridPoint("static", "static", p, {"budget": SPEC_BUDGET})  # the spec's budget
        points += [GridPoint("griffin", "griffin", p), static]
    for budget in BUDGETS:
        for stat in STATISTICS:
            if (stat, budget) == ("nl2", "uniform"):
                continue
            points += [dart_point(stat, "magnitude", budget, p) for p in prunes]
    if max_ranking_prune is not None:
        points += [dart_point(s, "max", "auto", max_ranking_prune) for s in STATISTICS]
    return points


def parse_extra(specs: list[str], prunes: list[float]) -> list[GridPoint]:
    """``NAME=JSON`` -> a DART grid point per sparsity with those DARTConfig overrides."""
    out = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--extra {spec!r}: expected NAME=JSON (DARTConfig overrides)")
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--extra {name}: the overrides are not JSON ({e})") from None
        method = overrides.pop("method", "dart")
        out += [GridPoint(name, method, p, overrides) for p in prunes]
    return out


def stream_grid(
    prunes: list[float], base: dict[str, Any], retrace: list[int], pressure: list[int]
) -> list[GridPoint]:
    """The drift study: dense, GRIFFIN, DART without drift and DART at every look-back
    ``retrace_tokens`` x ``pressure_trigger``, all with the ``base`` DART overrides (the
    budget and statistic chosen on perplexity)."""
    points = [GridPoint("dense", "dense", 0.0)]
    for p in prunes:
        points += [
            GridPoint("griffin", "griffin", p),
            GridPoint("static", "static", p, {"budget": SPEC_BUDGET}),
            GridPoint("dart-nodrift", "dart-nodrift", p, base),
        ]
        for r in retrace:
            for k in pressure:
                drift = {**base.get("drift", {}), "retrace_tokens": r, "pressure_trigger": k}
                points.append(GridPoint(f"dart-R{r}-p{k}", "dart", p, {**base, "drift": drift}))
    return points


# -- the texts ---------------------------------------------------------------------------------
@dataclass
class Source:
    """What one corpus gives a task: its items, the options that determined them (in the
    fingerprint) and the static method's calibration ids."""

    corpus: str
    tag: str
    options: dict[str, Any]
    items: list[dict[str, Any]]
    calibration_ids: torch.Tensor


def ppl_source(tokenizer: Any, name: str, opts: argparse.Namespace) -> Source:
    """The first ``max_tokens`` of the split, in windows; static calibrates on the
    ``calibration_tokens`` that follow them (its masks never see the scored tokens)."""
    need = opts.max_tokens + opts.calibration_tokens
    ids = tokenize_prefix(tokenizer, load_text(name, opts.split), need)
    if ids.numel() < need:
        raise SystemExit(
            f"corpus {name} ({opts.split}) has {ids.numel()} tokens, fewer than --max-tokens "
            f"{opts.max_tokens} + --calibration-tokens {opts.calibration_tokens}"
        )
    items = window_items(ids[: opts.max_tokens].tolist(), opts.window, opts.stride)
    options = {"corpus": name, "split": opts.split, "max_tokens": opts.max_tokens,
               "window": opts.window, "stride": opts.stride}  # fmt: skip
    tag = f"{name}-{opts.split}-{opts.max_tokens}"
    return Source(name, tag, options, items, ids[None, opts.max_tokens :])


def stream_source(tokenizer: Any, name: str, opts: argparse.Namespace) -> Source:
    """Documents of the split (a topic switch to other documents of the same corpus with
    ``--switch``); static calibrates on the first ``calibration_tokens`` of the corpus's
    calibration split (the protocol of docs/RESULTS.md)."""
    switch = name if opts.switch else None
    items = stream_items(tokenizer, opts.prompt_tokens, opts.continuation_tokens, opts.documents,
                         corpus=name, split=opts.split, switch_corpus=switch)  # fmt: skip
    calibration = load_text(name, "calibration")
    calib_ids = tokenize_prefix(tokenizer, calibration, opts.calibration_tokens)[None]
    options = {"corpus": name, "split": opts.split, "switch_corpus": switch,
               "prompt_tokens": opts.prompt_tokens, "documents": opts.documents,
               "continuation_tokens": opts.continuation_tokens}  # fmt: skip
    tag = (f"{name}-{opts.split}-{'switch' if switch else 'same'}-p{opts.prompt_tokens}"
           f"c{opts.continuation_tokens}n{opts.documents}")  # fmt: skip
    return Source(name, tag, options, items, calib_ids)


def gen_source(tokenizer: Any, name: str, opts: argparse.Namespace) -> Source:
    """Prompts of ``prompt_tokens`` from ``documents`` documents of the split; each arm
    continues them greedily for ``gen_tokens`` tokens (the dense arm's text is the reference)."""
    items = stream_items(tokenizer, opts.prompt_tokens, opts.gen_tokens, opts.documents,
                         corpus=name, split=opts.split)  # fmt: skip
    items = [{"id": it["id"], "prompt": it["prompt"], "steps": opts.gen_tokens} for it in items]
    calib_ids = tokenize_prefix(tokenizer, load_text(name, "calibration"), opts.calibration_tokens)
    options = {"corpus": name, "split": opts.split, "prompt_tokens": opts.prompt_tokens,
               "documents": opts.documents, "gen_tokens": opts.gen_tokens}  # fmt: skip
    tag = f"{name}-{opts.split}-gen-p{opts.prompt_tokens}g{opts.gen_tokens}n{opts.documents}"
    return Source(name, tag, options, items, calib_ids[None])


SOURCES = {"ppl": ppl_source, "stream": stream_source, "gen": gen_source}


# -- running one grid point --------------------------------------------------------------------
def point_fingerprint(
    task: str,
    point: GridPoint,
    config: DARTConfig | None,
    source: Source,
    model_id: dict[str, Any],
) -> dict[str, Any]:
    settings = None if config is None else config.to_dict()
    if settings is not None and task == "ppl":
        # windows are scored under hold(): no drift checks, so drift settings change no value
        del settings["drift"]
    options = {  # not "config": that key is a run-only option (the YAML path), left out
        **source.options,
        "method": point.method,
        "dart_config": settings,
        "static_calibration": digest(source.calibration_ids.tolist())
        if point.arm.needs_calibration
        else None,
    }
    return run_fingerprint(task, options, model_id, data_identity(source.items))


def score_item(
    task: str, model: torch.nn.Module, item: dict[str, Any], handle: Any
) -> dict[str, Any]:
    if task == "stream":
        return score_stream(model, item["prompt"], item["continuation"], handle)
    if task == "gen":
        return generate_item(model, item["prompt"], item["steps"], handle)
    r = score_window(model, torch.tensor(item["ids"]), item["score_from"], item["prep_len"], handle)
    return {**r, "nominal_sparsity": handle.stats()["nominal_sparsity"] if handle else 0.0}


def generate_item(
    model: torch.nn.Module, prompt: list[int], steps: int, handle: Any
) -> dict[str, Any]:
    """Greedy continuation of ``prompt`` (``steps`` tokens, EOS suppressed so that every arm
    writes as many) under ``handle`` (None: dense)."""
    ids = torch.tensor([prompt])
    before = handle.stats().get("mask_refreshes", 0) if handle is not None else 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=steps, min_new_tokens=steps,
                             pad_token_id=model.config.eos_token_id)  # fmt: skip
    stats = handle.stats() if handle is not None else {}
    return {
        "new_tokens": out[0, ids.shape[1] :].tolist(),
        "nominal_sparsity": stats.get("nominal_sparsity", 0.0),
        "retraces": stats.get("mask_refreshes", 0) - before,  # the handle's count runs on
    }


def lcs_f1(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 on token ids: the longest common subsequence over the mean length."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 2.0 * prev[-1] / (len(a) + len(b))


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of ``tokens`` that already occurred earlier in it (0: no loop)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def dense_nll(model: torch.nn.Module, prompt: list[int], new: list[int]) -> float:
    """Mean NLL per token the unpatched model gives ``new`` after ``prompt`` (how plausible the
    dense model finds the text; low for fluent text, and for loops, hence ``repeated_ngrams``)."""
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(new)))


def gen_metrics(
    model: torch.nn.Module,
    items: list[dict[str, Any]],
    records: list[dict[str, Any]],
    reference: list[list[int]],
) -> dict[str, Any]:
    """Per item: agreement with the dense text ``reference`` (token ROUGE-L), repeated 4-grams
    and the dense model's NLL of the text; their means; ``item_nll``/``item_tokens`` carry the
    dense NLL so the paired tables work unchanged."""
    agree = [lcs_f1(r["new_tokens"], d) for r, d in zip(records, reference, strict=True)]
    loops = [repeated_ngrams(r["new_tokens"]) for r in records]
    pairs = zip(items, records, strict=True)
    nll = [dense_nll(model, it["prompt"], r["new_tokens"]) for it, r in pairs]
    n = len(records)
    return {
        "rouge_l_vs_dense": sum(agree) / n,
        "repeated_4grams": sum(loops) / n,
        "dense_nll": sum(nll) / n,
        "nominal_sparsity": sum(r["nominal_sparsity"] for r in records) / n,
        "retraces_per_item": sum(r["retraces"] for r in records) / n,
        "item_rouge_l": agree,
        "item_repeated": loops,
        "item_nll": nll,
        "item_tokens": [1] * n,
        "item_new_tokens": [r["new_tokens"] for r in records],
        "perplexity": math.exp(sum(nll) / n),  # of the dense model on the generated text
    }


def summarise(task: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    if task == "stream":
        out = aggregate_stream(records)
        out.update(
            effective_sparsity=sum(r["effective_sparsity"] for r in records) / len(records),
            nominal_sparsity=sum(r["nominal_sparsity"] for r in records) / len(records),
        )
    else:
        out = aggregate_perplexity(records)
        out["nominal_sparsity"] = sum(r["nominal_sparsity"] for r in records) / len(records)
    out["item_nll"] = [r["nll"] for r in records]
    out["item_tokens"] = [r["tokens"] for r in records]
    return out


def run_point(
    task: str,
    model: torch.nn.Module,
    point: GridPoint,
    source: Source,
    folder: Path,
    fingerprint: dict[str, Any],
    config: DARTConfig | None,
    reference: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Score the pending items of ``point`` into ``folder``; its summary (all items). ``gen``
    compares each continuation with ``reference`` (the dense arm's; None: this point's own)."""
    key = (point.name, point.total_prune)
    with RunStore.open(folder, fingerprint) as store:
        done = store.done_ids(key)
        pending = [it for it in source.items if it["id"] not in done]
        if pending:
            handle = None if config is None else attach_arm(model, config, source.calibration_ids)
            try:
                for it in pending:
                    start = time.perf_counter()
                    r = score_item(task, model, it, handle)
                    rec = {"id": it["id"], "method": point.name, "total_prune": point.total_prune}
                    rec.update(r, seconds=time.perf_counter() - start)
                    store.records.append([rec])
            finally:
                if handle is not None:
                    handle.detach()
        by_id = {r["id"]: r for r in store if (r["method"], round(r["total_prune"], 6)) == key}
        records = [by_id[it["id"]] for it in source.items]
        if task == "gen":
            own = [r["new_tokens"] for r in records]
            scores = gen_metrics(model, source.items, records, reference or own)
        else:
            scores = summarise(task, records)
        summary = {
            "name": point.name,
            "method": point.method,
            "total_prune": point.total_prune,
            "corpus": source.corpus,
            "source": source.tag,
            **scores,
            "seconds": sum(r["seconds"] for r in records),
            "overrides": point.overrides,
            "folder": str(folder),
        }
        store.write_summary("summary.json", summary)
        return summary


TABLE_COLUMNS = {
    "ppl": ["perplexity", "nll_per_token", "nominal_sparsity"],
    "gen": [
        "rouge_l_vs_dense",
        "repeated_4grams",
        "dense_nll",
        "retraces_per_item",
        "nominal_sparsity",
    ],
    "stream": [
        "perplexity",
        "nll_per_token",
        "nll_per_sparse_token",
        "retraces_per_200_tokens",
        "dense_token_computations_per_token",
        "effective_sparsity",
        "weight_bytes_sparsity",
    ],  # fmt: skip
}


def write_tables(path: Path, task: str, summaries: list[dict[str, Any]]) -> None:
    """``path``.json (every summary) and ``path``.csv (one row per corpus and point)."""
    write_json(path.with_suffix(".json"), summaries)
    buf = io.StringIO()
    cols = ["corpus", "name", "total_prune", *TABLE_COLUMNS[task], "tokens", "seconds"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(summaries)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())


# -- the report --------------------------------------------------------------------------------
def load_summaries(out: Path, task: str, split: str) -> list[dict[str, Any]]:
    """Every point's summary.json under ``out/task/<corpus>-<split>-*``, newest folder last."""
    found = sorted(
        (out / task).glob(f"*-{split}-*/*/summary.json"), key=lambda p: p.stat().st_mtime
    )
    return [read_json(p) for p in found]


def item_nll(summary: dict[str, Any]) -> list[float]:
    """NLL per token of each window / document (``window_*``: summaries of the first version)."""
    nll = summary.get("item_nll", summary.get("window_nll"))
    tokens = summary.get("item_tokens", summary.get("window_tokens"))
    return [n / t for n, t in zip(nll, tokens, strict=True)]


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """``a - b`` per window / document, mean and bootstrap interval."""
    return paired_difference([x - y for x, y in zip(item_nll(a), item_nll(b), strict=True)])


def _cell(d: dict[str, float]) -> str:
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def by_key(summaries: list[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    """(corpus, name, total_prune) -> summary (the newest of a key wins)."""
    return {(s["corpus"], s["name"], round(s["total_prune"], 6)): s for s in summaries}


def ppl_grid_table(summaries: list[dict[str, Any]], corpora: list[str], prunes: list[float]):
    """Markdown rows of the grid (perplexity per cell, mean NLL difference to GRIFFIN) and the
    DART points ranked by the decision rule's score (those with every cell only)."""
    cells = by_key(summaries)
    names = list(dict.fromkeys(s["name"] for s in summaries if s["name"] != "dense"))
    head = [f"{c} {round(100 * p)}%" for p in prunes for c in corpora]
    lines = ["| point | " + " | ".join(head) + " | score (mean NLL - GRIFFIN) |",
             "|---" * (len(head) + 2) + "|"]  # fmt: skip
    scores = {}
    for name in names:
        row, deltas = [], []
        for p in prunes:
            for c in corpora:
                s, g = cells.get((c, name, p)), cells.get((c, "griffin", p))
                row.append(f"{s['perplexity']:.1f}" if s else "-")
                if s and g:
                    deltas.append(s["nll_per_token"] - g["nll_per_token"])
        complete = len(deltas) == len(head) and name.startswith("dart")
        if complete:
            scores[name] = sum(deltas) / len(deltas)
        score = f"{scores[name]:+.4f}" if complete else ""
        lines.append(f"| {name} | " + " | ".join(row) + f" | {score} |")
    ranked = sorted(scores, key=scores.get)
    return "\n".join(lines), ranked, scores


def ppl_heatmap(
    path: Path, summaries: list[dict[str, Any]], corpora: list[str], prunes: list[float]
) -> Path:
    """Grid points x (corpus, sparsity): colour = NLL/token minus GRIFFIN's, text = perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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


def comparison_table(
    summaries: list[dict[str, Any]], against: list[str], columns: list[str]
) -> str:
    """Rows (corpus, sparsity, arm): ``columns`` of its summary and, for every arm but dense and
    those ``against``, its paired difference to each of them (NLL per token, 95% bootstrap
    interval over windows or documents)."""
    cells = by_key(summaries)
    names = list(dict.fromkeys(["dense", *against, *(s["name"] for s in summaries)]))
    lines = ["| corpus | sparsity | arm | " + " | ".join(columns)
             + "".join(f" | minus {a}" for a in against) + " |",
             "|---" * (3 + len(columns) + len(against)) + "|"]  # fmt: skip
    for c, p in sorted({(c, p) for c, _, p in cells if p > 0}):
        for name in names:
            s = cells.get((c, name, 0.0 if name == "dense" else p))
            if s is None:
                continue
            vals = [f"{s[k]:.3f}" if isinstance(s.get(k), float) else str(s.get(k, "-"))
                    for k in columns]  # fmt: skip
            diffs = []
            for a in against:
                other = cells.get((c, a, p))
                ok = name not in ("dense", *against) and other is not None
                diffs.append(_cell(paired(s, other)) if ok else "")
            lines.append(f"| {c} | {round(100 * p)}% | {name} | " + " | ".join(vals)
                         + "".join(f" | {d}" for d in diffs) + " |")  # fmt: skip
    return "\n".join(lines)


def gen_table(summaries: list[dict[str, Any]]) -> str:
    """One row per pruned point over every (corpus, sparsity) cell it has: mean ROUGE-L against
    the dense text, repeated 4-grams, the dense model's NLL of the text and re-traces per prompt,
    and, pooled over the prompts of the cells it shares with GRIFFIN, the paired differences to
    GRIFFIN of ROUGE-L (higher: closer to dense) and of the dense NLL (lower: more plausible)."""
    cells = by_key(summaries)
    names = [n for n in dict.fromkeys(s["name"] for s in summaries) if n != "dense"]
    lines = ["| point | cells | ROUGE-L vs dense | repeated 4-grams | dense NLL | re-traces / "
             "prompt | ROUGE-L minus GRIFFIN | dense NLL minus GRIFFIN |",
             "|---" * 8 + "|"]  # fmt: skip
    for name in names:
        mine = [(k, s) for k, s in cells.items() if k[1] == name]
        rouge, nll = [], []
        for (c, _, p), s in mine:
            g = cells.get((c, "griffin", p))
            if g is not None and name != "griffin":
                rouge += [a - b for a, b in zip(s["item_rouge_l"], g["item_rouge_l"], strict=True)]
                nll += [a - b for a, b in zip(s["item_nll"], g["item_nll"], strict=True)]
        keys = ("rouge_l_vs_dense", "repeated_4grams", "dense_nll", "retraces_per_item")
        mean = {k: sum(s[k] for _, s in mine) / len(mine) for k in keys}
        diffs = [_cell(paired_difference(d)) if d else "" for d in (rouge, nll)]
        lines.append(f"| {name} | {len(mine)} | {mean['rouge_l_vs_dense']:.3f} | "
                     f"{mean['repeated_4grams']:.3f} | {mean['dense_nll']:.3f} | "
                     f"{mean['retraces_per_item']:.2f} | {diffs[0]} | {diffs[1]} |")  # fmt: skip
    return "\n".join(lines)


def gen_bars(path: Path, summaries: list[dict[str, Any]], title: str) -> Path:
    """Grouped bars: ROUGE-L against the dense text per (corpus, sparsity) cell, one bar per
    pruned point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_points(opts: argparse.Namespace, prunes: list[float]) -> list[GridPoint]:
    if opts.task in ("ppl", "gen"):
        max_prune = opts.max_ranking_prune if opts.max_ranking_prune >= 0 else None
        points = study_grid(prunes, max_prune)
    else:
        try:
            base = json.loads(opts.base)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--base: not JSON ({e})") from None
        points = stream_grid(prunes, base, _ints(opts.retrace), _ints(opts.pressure))
    points += parse_extra(opts.extra, prunes)
    if opts.only:
        order = [n.strip() for n in opts.only.split(",") if n.strip()]
        unknown = set(order) - {p.name for p in points}
        if unknown:
            raise SystemExit(f"--only: unknown grid points {sorted(unknown)}")
        points = sorted((p for p in points if p.name in order), key=lambda p: order.index(p.name))
    return points


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="ppl", choices=tuple(SOURCES))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpora", default="wiki,c4")
    ap.add_argument("--split", default="calibration", choices=("calibration", "eval"))
    ap.add_argument("--calibration-tokens", type=int, default=512)
    ap.add_argument("--prunes", default="0.5,0.7")
    ap.add_argument("--only", default=None, help="comma list of grid points to run, in order")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=JSON: one more point per sparsity (DARTConfig overrides)",
    )
    ppl = ap.add_argument_group("ppl")
    ppl.add_argument("--max-tokens", type=int, default=2048)
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--stride", type=int, default=256)
    ppl.add_argument(
        "--max-ranking-prune",
        type=float,
        default=0.7,
        help="sparsity of the max-ranking points (negative: none)",
    )
    gen = ap.add_argument_group("gen (also --prompt-tokens, --documents)")
    gen.add_argument("--gen-tokens", type=int, default=48, help="greedy tokens per prompt")
    stream = ap.add_argument_group("stream")
    stream.add_argument("--prompt-tokens", type=int, default=128)
    stream.add_argument("--continuation-tokens", type=int, default=192)
    stream.add_argument("--documents", type=int, default=8)
    stream.add_argument(
        "--switch",
        action="store_true",
        help="continuations from other documents of the corpus (topic switch)",
    )
    stream.add_argument(
        "--base", default="{}", help="JSON DARTConfig overrides of every DART point"
    )
    stream.add_argument("--retrace", default="0,16,32,64,128", help="retrace_tokens values")
    stream.add_argument("--pressure", default="1,2,3", help="pressure_trigger values")
    ap.add_argument("--backend", default="gathered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/study")
    ap.add_argument(
        "--report",
        default=None,
        metavar="FIGURES",
        help="run nothing: tables of every finished point under --out to "
        "OUT/report.md, figures to this folder",
    )
    return ap.parse_args(argv)  # fmt: skip


STREAM_COLUMNS = ["perplexity", "retraces_per_200_tokens", "dense_token_computations_per_token",
                  "effective_sparsity", "weight_bytes_sparsity"]  # fmt: skip


# the drift traces drawn: the one-token re-trace (before issue 12) and look-back re-traces
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


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.report:
        text = report(Path(opts.out), Path(opts.report))
        atomic_write_text(Path(opts.out) / "report.md", text)
        print(text)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    corpora = [c.strip() for c in opts.corpora.split(",") if c.strip()]
    bad = [c for c in corpora if c not in TEXT_CORPORA]
    if bad:
        raise SystemExit(f"unknown corpora {bad}; accepted: {', '.join(TEXT_CORPORA)}")
    prunes = [float(p) for p in opts.prunes.split(",")]
    points = build_points(opts, prunes)
    configs = {p: p.config(opts.backend, opts.seed) for p in points}  # bad settings fail now
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    out = Path(opts.out)
    model, tokenizer = load_model(opts.model)
    model_id = model_identity(model, opts.model)
    sources = {c: SOURCES[opts.task](tokenizer, c, opts) for c in corpora}
    if opts.task == "gen" and (not points or points[0].name != "dense"):
        raise SystemExit("--task gen: the dense point must run first (its text is the reference)")
    reference: dict[str, list[list[int]]] = {}
    summaries: list[dict[str, Any]] = []
    todo = [(p, c) for p in points for c in corpora]  # corpora interleaved: partial grids pair
    start = time.perf_counter()
    for i, (point, corpus) in enumerate(todo, 1):
        source = sources[corpus]
        fp = point_fingerprint(opts.task, point, configs[point], source, model_id)
        tag = f"{point.name}-p{round(100 * point.total_prune):02d}-{digest(fp)[:10]}"
        folder = out / opts.task / source.tag / tag
        s = run_point(opts.task, model, point, source, folder, fp, configs[point],
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
