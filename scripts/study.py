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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dart.config import DARTConfig
from dart.data import TEXT_CORPORA, load_text
from dart.evaluate.arms import Arm, arm_config, attach_arm
from dart.evaluate.perplexity import (
    aggregate_perplexity,
    score_window,
    tokenize_prefix,
    window_items,
)
from dart.evaluate.store import RunStore, data_identity, digest, model_identity, run_fingerprint
from dart.models import load_model
from dart.results import atomic_write_text, write_json

log = logging.getLogger("dart.study")

# -- the grid ----------------------------------------------------------------------------------
# How an ``auto`` budget spreads total_prune over layers (BudgetConfig overrides). ``uniform``
# is the blend all the way to uniform: the same share of every layer (GRIFFIN's budget).
BUDGETS: dict[str, dict[str, Any]] = {
    "auto": {},
    "cap10": {"cap_margin": 0.1},
    "cap20": {"cap_margin": 0.2},
    "blend50": {"uniform_blend": 0.5},
    "rank": {"normalize": "rank"},
    "wins": {"normalize": "winsorized"},
    "uniform": {"uniform_blend": 1.0},
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
        points += [GridPoint("griffin", "griffin", p), GridPoint("static", "static", p)]
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


# -- running one grid point --------------------------------------------------------------------
@dataclass
class Corpus:
    name: str
    split: str
    max_tokens: int
    items: list[dict[str, Any]]
    calibration_ids: torch.Tensor


def load_corpus(
    tokenizer: Any,
    name: str,
    split: str,
    max_tokens: int,
    calib_tokens: int,
    window: int,
    stride: int,
) -> Corpus:
    text = load_text(name, split)
    ids = tokenize_prefix(tokenizer, text, max_tokens + calib_tokens)
    if ids.numel() < max_tokens + calib_tokens:
        raise SystemExit(
            f"corpus {name} ({split}) has {ids.numel()} tokens, fewer than --max-tokens "
            f"{max_tokens} + --calibration-tokens {calib_tokens}"
        )
    scored, calibration = ids[:max_tokens], ids[max_tokens:]
    return Corpus(
        name, split, max_tokens, window_items(scored.tolist(), window, stride), calibration[None]
    )


def point_fingerprint(
    point: GridPoint,
    config: DARTConfig | None,
    corpus: Corpus,
    opts: argparse.Namespace,
    model_id: dict[str, Any],
) -> dict[str, Any]:
    options = {
        "corpus": corpus.name,
        "split": corpus.split,
        "max_tokens": corpus.max_tokens,
        "window": opts.window,
        "stride": opts.stride,
        "method": point.method,
        "config": None if config is None else config.to_dict(),
        "static_calibration": digest(corpus.calibration_ids.tolist())
        if point.arm.needs_calibration
        else None,
    }
    return run_fingerprint("ppl", options, model_id, data_identity(corpus.items))


def run_point(
    model: torch.nn.Module,
    point: GridPoint,
    corpus: Corpus,
    folder: Path,
    fingerprint: dict[str, Any],
    config: DARTConfig | None,
) -> dict[str, Any]:
    """Score the pending windows of ``point`` into ``folder``; its summary (all windows)."""
    key = (point.name, point.total_prune)
    with RunStore.open(folder, fingerprint) as store:
        done = store.done_ids(key)
        pending = [it for it in corpus.items if it["id"] not in done]
        if pending:
            handle = None if config is None else attach_arm(model, config, corpus.calibration_ids)
            try:
                for it in pending:
                    start = time.perf_counter()
                    r = score_window(
                        model, torch.tensor(it["ids"]), it["score_from"], it["prep_len"], handle
                    )
                    nominal = handle.stats()["nominal_sparsity"] if handle else 0.0
                    store.records.append(
                        [
                            {
                                "id": it["id"],
                                "method": point.name,
                                "total_prune": point.total_prune,
                                **r,
                                "nominal_sparsity": nominal,
                                "seconds": time.perf_counter() - start,
                            }
                        ]
                    )
            finally:
                if handle is not None:
                    handle.detach()
        records = [r for r in store if (r["method"], round(r["total_prune"], 6)) == key]
        by_id = {r["id"]: r for r in records}
        records = [by_id[it["id"]] for it in corpus.items]
        summary = {
            "name": point.name,
            "method": point.method,
            "total_prune": point.total_prune,
            "corpus": corpus.name,
            "split": corpus.split,
            **aggregate_perplexity(records),
            "nominal_sparsity": sum(r["nominal_sparsity"] for r in records) / len(records),
            "seconds": sum(r["seconds"] for r in records),
            "window_nll": [r["nll"] for r in records],
            "window_tokens": [r["tokens"] for r in records],
            "overrides": point.overrides,
            "folder": str(folder),
        }
        store.write_summary("summary.json", summary)
        return summary


def write_tables(out: Path, split: str, summaries: list[dict[str, Any]]) -> None:
    write_json(out / f"ppl_{split}.json", summaries)
    buf = io.StringIO()
    cols = [
        "corpus",
        "name",
        "total_prune",
        "perplexity",
        "nll_per_token",
        "nominal_sparsity",
        "tokens",
        "seconds",
    ]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(summaries)
    atomic_write_text(out / f"ppl_{split}.csv", buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpora", default="wiki,c4")
    ap.add_argument("--split", default="calibration", choices=("calibration", "eval"))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--calibration-tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--prunes", default="0.5,0.7")
    ap.add_argument(
        "--max-ranking-prune",
        type=float,
        default=0.7,
        help="sparsity of the max-ranking arms (negative: none)",
    )
    ap.add_argument("--only", default=None, help="comma list of grid point names to run")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=JSON: one more point per sparsity with these DARTConfig overrides",
    )
    ap.add_argument("--backend", default="gathered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/study")
    opts = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    corpora = [c.strip() for c in opts.corpora.split(",") if c.strip()]
    bad = [c for c in corpora if c not in TEXT_CORPORA]
    if bad:
        raise SystemExit(f"unknown corpora {bad}; accepted: {', '.join(TEXT_CORPORA)}")
    prunes = [float(p) for p in opts.prunes.split(",")]
    max_prune = opts.max_ranking_prune if opts.max_ranking_prune >= 0 else None
    points = study_grid(prunes, max_prune) + parse_extra(opts.extra, prunes)
    if opts.only:
        wanted = {n.strip() for n in opts.only.split(",")}
        unknown = wanted - {p.name for p in points}
        if unknown:
            raise SystemExit(f"--only: unknown grid points {sorted(unknown)}")
        points = [p for p in points if p.name in wanted]
    configs = {p: p.config(opts.backend, opts.seed) for p in points}  # bad settings fail now
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)

    out = Path(opts.out)
    model, tokenizer = load_model(opts.model)
    model_id = model_identity(model, opts.model)
    loaded = {
        c: load_corpus(
            tokenizer,
            c,
            opts.split,
            opts.max_tokens,
            opts.calibration_tokens,
            opts.window,
            opts.stride,
        )
        for c in corpora
    }
    summaries: list[dict[str, Any]] = []
    todo = [(p, c) for p in points for c in corpora]  # corpora interleaved: partial grids pair
    start = time.perf_counter()
    for i, (point, cname) in enumerate(todo, 1):
        corpus = loaded[cname]
        fp = point_fingerprint(point, configs[point], corpus, opts, model_id)
        tag = f"{point.name}-p{round(100 * point.total_prune):02d}-{digest(fp)[:10]}"
        folder = out / "ppl" / f"{cname}-{opts.split}-{opts.max_tokens}" / tag
        s = run_point(model, point, corpus, folder, fp, configs[point])
        summaries.append(s)
        write_tables(out, opts.split, summaries)
        elapsed = time.perf_counter() - start
        log.info(
            "[%d/%d %.0f s] %s %s@%.2f: ppl %.2f (nominal sparsity %.3f, %.0f s)",
            i,
            len(todo),
            elapsed,
            cname,
            point.name,
            point.total_prune,
            s["perplexity"],
            s["nominal_sparsity"],
            s["seconds"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
