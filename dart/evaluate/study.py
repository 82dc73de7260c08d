"""The tuning study: a grid of DART settings and the baselines, its texts, its per-point
fingerprints and summaries, and its paired tables.

A grid point is one arm (a method, its ``DARTConfig`` overrides and a sparsity) named by its
:attr:`GridPoint.name`; every (corpus, grid point) is one results folder ``OUT/<task>/<source>/
<name>-p<NN>-<hash>`` whose hash is that of the point's fingerprint (the resolved
``DARTConfig``, the options, the model's and the items' identity), so a changed setting, default
or text goes to a new folder and never reuses records. The points run through the driver's
per-arm function (:func:`dart.experiment.run_arm`, via :func:`dart.study.run_grid`) on the
steps of the task registry:

* ``ppl``: the ``ppl`` task (sliding windows, masks from each window's already-seen overlap);
  ``static`` calibrates on the tokens that follow the scored ones in the same split;
* ``stream``: the ``stream`` task (teacher-forced decode with drift and re-traces);
* ``gen``: :data:`CONTINUE`, greedy continuations of corpus prompts with EOS suppressed,
  compared with the dense point's continuation (token ROUGE-L from
  :func:`dart.evaluate.metrics.rouge_scores`, repeated 4-grams, the dense model's NLL).

Nothing here loads a model, runs Lightning or draws: the runner and the figures are in
:mod:`dart.study`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..assets.data import TEXT_CORPORA, load_text
from ..core.config import ConfigError, DARTConfig
from ..core.methods import get_method
from ..core.quant import Weights
from ..options import dart_field
from ..results import atomic_write_text, read_json, write_json
from .arms import Arm, arm_config
from .generative import generate_batch
from .metrics import repeated_ngrams, rouge_scores
from .perplexity import aggregate_perplexity, tokenize_prefix
from .store import data_identity, digest, run_fingerprint
from .stream import aggregate_stream, paired_difference, stream_items
from .tasks import (
    TASKS,
    PerplexityOptions,
    StepContext,
    StepKind,
    StreamOptions,
    Task,
)

__all__ = [
    "BUDGETS",
    "CONTINUE",
    "STUDY_TASKS",
    "ContinuationOptions",
    "GridPoint",
    "Source",
    "StudyOptions",
    "build_points",
    "comparison_table",
    "gen_table",
    "load_summaries",
    "make_source",
    "point_fingerprint",
    "point_folder",
    "ppl_grid_table",
    "stream_grid",
    "study_grid",
    "summarise_point",
    "write_tables",
]

STUDY_TASKS = ("ppl", "stream", "gen")


# -- options (the flags of `python -m dart.study`, one declaration each) -------------------------
@dataclass
class StudyOptions:
    task: Literal["ppl", "stream", "gen"] = field(
        default="ppl", metadata={"help": "what each grid point is scored on"}
    )
    model: str = field(
        default="smollm2-135m", metadata={"help": "packaged model name or a local HF folder"}
    )
    weights: Weights = field(
        default="fp",
        metadata={"help": "fp (the model's own weights) or quantised q8, q4, q4m (dart.quantize)"},
    )
    corpora: list[str] = field(
        default_factory=lambda: ["wiki", "c4"],
        metadata={"help": "comma list of corpora", "choices": TEXT_CORPORA},
    )
    split: Literal["calibration", "eval"] = field(
        default="calibration", metadata={"help": "split scored (settings are tuned on calibration)"}
    )
    calibration_tokens: int = field(
        default=512, metadata={"min": 1, "help": "tokens of the static method's calibration text"}
    )
    prunes: list[float] = field(
        default_factory=lambda: [0.5, 0.7], metadata={"help": "comma list of sparsities"}
    )
    only: list[str] | None = field(
        default=None, metadata={"help": "comma list of grid points to run, in order"}
    )
    extra: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NAME=JSON: one more point per sparsity (DARTConfig overrides)",
            "repeat": True,
        },
    )
    max_tokens: int = field(default=2048, metadata={"min": 1, "help": "ppl: tokens scored"})
    window: int = field(default=512, metadata={"min": 1, "help": "ppl: tokens per window"})
    stride: int = field(default=256, metadata={"min": 1, "help": "ppl: tokens between windows"})
    max_ranking_prune: float = field(
        default=0.7, metadata={"help": "sparsity of the max-ranking points (negative: none)"}
    )
    gen_tokens: int = field(default=48, metadata={"min": 1, "help": "gen: greedy tokens/prompt"})
    prompt_tokens: int = field(
        default=128, metadata={"min": 1, "help": "stream, gen: prompt tokens"}
    )
    continuation_tokens: int = field(
        default=192, metadata={"min": 1, "help": "stream: teacher-forced continuation tokens"}
    )
    documents: int = field(default=8, metadata={"min": 1, "help": "stream, gen: documents"})
    switch: bool = field(
        default=False,
        metadata={"help": "stream: continuations from other documents of the corpus (a switch)"},
    )
    # under every DART point's own settings (the stream grid: the budget and statistic chosen
    # on perplexity); the baselines keep theirs
    dart: dict[str, Any] | None = dart_field()
    retrace: list[int] = field(
        default_factory=lambda: [0, 16, 32, 64, 128],
        metadata={"help": "stream: retrace_tokens values"},
    )
    pressure: list[int] = field(
        default_factory=lambda: [1, 2, 3], metadata={"help": "stream: pressure_trigger values"}
    )
    backend: str = field(default="gathered", metadata={"help": "sparse FFN backend"})
    seed: int = field(default=0, metadata={"help": "torch seed (the random method)"})
    threads: int | None = field(default=None, metadata={"min": 1, "help": "torch CPU threads"})
    accelerator: str = field(
        default="cpu", metadata={"help": "Lightning accelerator the points run on (cpu, gpu)"}
    )
    out: str = field(default="results/study", metadata={"help": "the study's results folder"})
    report: str | None = field(
        default=None,
        metadata={
            "help": "run nothing: tables of every finished point under --out to OUT/report.md, "
            "figures to this folder"
        },
    )


# -- the grid ----------------------------------------------------------------------------------
# How an ``auto`` budget spreads total_prune over layers (BudgetConfig overrides). Every entry
# spells out every guard, so a point means the same whatever the library's defaults (the
# study chose them). ``uniform`` is the blend all the way to uniform: the same share of every
# layer (GRIFFIN's budget).
SPEC_BUDGET: dict[str, Any] = {"normalize": "minmax", "cap_margin": None, "min_keep_ratio": None,
                               "uniform_blend": 0.0, "blend_toward": "uniform"}  # fmt: skip
BUDGETS: dict[str, dict[str, Any]] = {
    "auto": SPEC_BUDGET,
    "cap10": {**SPEC_BUDGET, "cap_margin": 0.1},
    "cap20": {**SPEC_BUDGET, "cap_margin": 0.2},
    "blend50": {**SPEC_BUDGET, "uniform_blend": 0.5},
    "blend25": {**SPEC_BUDGET, "uniform_blend": 0.25},
    # blended toward the sensitivity-only budget: the depth ramp is halved, an outlier layer
    # that R protects stays protected
    "sblend50": {**SPEC_BUDGET, "uniform_blend": 0.5, "blend_toward": "sensitivity"},
    # the sensitivity-only budget (no depth ramp): the default since the two-model budget
    # study (docs/results/budget)
    "sblend100": {**SPEC_BUDGET, "uniform_blend": 1.0, "blend_toward": "sensitivity"},
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
        return Arm(self.method, self.total_prune, name=self.name)


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
    """``NAME=JSON`` -> a grid point per sparsity with those DARTConfig overrides (``method``
    among them picks the method; default ``dart``)."""
    out = []
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"--extra {spec!r}: expected NAME=JSON (DARTConfig overrides)")
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--extra {name}: the overrides are not JSON ({e})") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"--extra {name}: the overrides must be a JSON object")
        method = overrides.pop("method", "dart")
        out += [GridPoint(name, method, p, overrides) for p in prunes]
    return out


def stream_grid(prunes: list[float], retrace: list[int], pressure: list[int]) -> list[GridPoint]:
    """The drift study: dense, GRIFFIN, DART without drift and DART at every look-back
    ``retrace_tokens`` x ``pressure_trigger``."""
    points = [GridPoint("dense", "dense", 0.0)]
    for p in prunes:
        points += [
            GridPoint("griffin", "griffin", p),
            GridPoint("static", "static", p, {"budget": SPEC_BUDGET}),
            GridPoint("dart-nodrift", "dart-nodrift", p),
        ]
        for r in retrace:
            for k in pressure:
                drift = {"retrace_tokens": r, "pressure_trigger": k}
                points.append(GridPoint(f"dart-R{r}-p{k}", "dart", p, {"drift": drift}))
    return points


def _under(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base`` section by section (a point's drift keys over the base's)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


def with_base(points: list[GridPoint], base: dict[str, Any] | None) -> list[GridPoint]:
    """The ``--dart.*`` settings under every DART point's own (the baselines keep theirs)."""
    if not base:
        return points
    return [
        GridPoint(p.name, p.method, p.total_prune, _under(base, p.overrides))
        if get_method(p.method).uses_ema and not get_method(p.method).shared_mask
        else p
        for p in points
    ]


def build_points(opts: StudyOptions) -> list[GridPoint]:
    """The grid of ``opts.task`` plus ``--extra`` points, cut to ``--only`` (in its order)."""
    if opts.task in ("ppl", "gen"):
        max_prune = opts.max_ranking_prune if opts.max_ranking_prune >= 0 else None
        points = study_grid(opts.prunes, max_prune)
    else:
        points = stream_grid(opts.prunes, opts.retrace, opts.pressure)
    points = with_base(points, opts.dart) + parse_extra(opts.extra, opts.prunes)
    if opts.only:
        order = [n.strip() for n in opts.only if n.strip()]
        unknown = set(order) - {p.name for p in points}
        if unknown:
            raise ConfigError(f"--only: unknown grid points {sorted(unknown)}")
        points = sorted((p for p in points if p.name in order), key=lambda p: order.index(p.name))
    return points


# -- the greedy-continuation task --------------------------------------------------------------
@dataclass
class ContinuationOptions:
    corpus: str = field(
        default="wiki", metadata={"help": "packaged corpus of the prompts", "choices": TEXT_CORPORA}
    )
    split: Literal["eval", "calibration", "all"] = field(
        default="eval", metadata={"help": "part of the corpus"}
    )
    prompt_tokens: int = field(default=128, metadata={"min": 1, "help": "prompt tokens"})
    documents: int = field(default=8, metadata={"min": 1, "help": "prompts"})
    gen_tokens: int = field(default=48, metadata={"min": 1, "help": "greedy tokens per prompt"})


def _continuation_items(tokenizer: Any, o: ContinuationOptions, seed: int) -> list[dict]:
    items = stream_items(tokenizer, o.prompt_tokens, o.gen_tokens, o.documents,
                         corpus=o.corpus, split=o.split)  # fmt: skip
    return [{"id": it["id"], "prompt": it["prompt"], "steps": o.gen_tokens} for it in items]


def _continue_step(ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy continuation of one prompt for ``steps`` tokens, EOS suppressed so that every
    arm writes as many (HF ``generate``; the model's own EOS, padding with it)."""
    (item,) = batch
    model = ctx.model
    (rec,) = generate_batch(model, [item], item["steps"], pad_token_id=model.config.eos_token_id,
                            eos_token_id=model.generation_config.eos_token_id,
                            handle=ctx.handle, min_new_tokens=item["steps"])  # fmt: skip
    stats = ctx.handle.stats() if ctx.handle is not None else {}
    return [{
        "id": item["id"],
        "new_tokens": rec["new_tokens"],
        "nominal_sparsity": rec["nominal_sparsity"],
        "retraces": stats.get("mask_refreshes", 0),  # generate_batch reset the counters
    }]  # fmt: skip


def agreement(records: list[dict[str, Any]], reference: list[list[int]]) -> dict[str, Any]:
    """Per record: ROUGE-L of its ``new_tokens`` against ``reference`` (token ids, in order)
    and its repeated 4-grams; their means."""
    rouge = [rouge_scores(r["new_tokens"], d)["rougeL"]
             for r, d in zip(records, reference, strict=True)]  # fmt: skip
    loops = [repeated_ngrams(r["new_tokens"]) for r in records]
    n = len(records)
    return {
        "rouge_l_vs_dense": sum(rouge) / n,
        "repeated_4grams": sum(loops) / n,
        "nominal_sparsity": sum(r["nominal_sparsity"] for r in records) / n,
        "retraces_per_item": sum(r["retraces"] for r in records) / n,
        "item_rouge_l": rouge,
        "item_repeated": loops,
    }


def _continuation_aggregate(records: list[dict], dense: dict | None, decode: Any) -> dict:
    # the dense arm is compared with itself (the top of the scale, 1.0)
    by_id = dense if dense is not None else {r["id"]: r for r in records}
    records = [r for r in records if r["id"] in by_id]
    out = agreement(records, [by_id[r["id"]]["new_tokens"] for r in records])
    return {k: v for k, v in out.items() if not k.startswith("item_")}


CONTINUE = Task(
    "continue",
    "greedy continuations of corpus prompts (EOS suppressed) against the dense continuation: "
    "token ROUGE-L, repeated 4-grams",
    ContinuationOptions,
    _continuation_items,
    StepKind("continue", batched=False, run=_continue_step),
    _continuation_aggregate,
    "rouge_l_vs_dense",
    needs_dense=True,
)


def dense_nll(model: torch.nn.Module, prompt: list[int], new: list[int]) -> float:
    """Mean NLL per token the unpatched model gives ``new`` after ``prompt`` (how plausible the
    dense model finds the text; low for fluent text, and for loops, hence ``repeated_ngrams``)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + new], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(new, device=device)))


# -- the texts ---------------------------------------------------------------------------------
@dataclass
class Source:
    """What one corpus gives a grid: the task and its options, the items, the options that
    determined them (in the fingerprint) and the static method's calibration ids."""

    corpus: str
    tag: str
    options: dict[str, Any]
    task: Task
    task_options: Any
    items: list[dict[str, Any]]
    calibration_ids: torch.Tensor


def _ppl_source(tokenizer: Any, name: str, o: StudyOptions) -> Source:
    """The first ``max_tokens`` of the split, in windows; static calibrates on the
    ``calibration_tokens`` that follow them (its masks never see the scored tokens)."""
    need = o.max_tokens + o.calibration_tokens
    ids = tokenize_prefix(tokenizer, load_text(name, o.split), need)
    if ids.numel() < need:
        raise ConfigError(
            f"corpus {name} ({o.split}) has {ids.numel()} tokens, fewer than --max-tokens "
            f"{o.max_tokens} + --calibration-tokens {o.calibration_tokens}"
        )
    task = TASKS["ppl"]
    task_options = PerplexityOptions(corpus=name, split=o.split, window=o.window,
                                     stride=o.stride, max_tokens=o.max_tokens)  # fmt: skip
    # the task's items are the first max_tokens of the same text (tokenize_prefix's margin)
    items = task.items(tokenizer, task_options, o.seed)
    options = {"corpus": name, "split": o.split, "max_tokens": o.max_tokens,
               "window": o.window, "stride": o.stride}  # fmt: skip
    tag = f"{name}-{o.split}-{o.max_tokens}"
    return Source(name, tag, options, task, task_options, items, ids[None, o.max_tokens :])


def _calibration_split_ids(tokenizer: Any, name: str, tokens: int) -> torch.Tensor:
    return tokenize_prefix(tokenizer, load_text(name, "calibration"), tokens)[None]


def _stream_source(tokenizer: Any, name: str, o: StudyOptions) -> Source:
    """Documents of the split (a topic switch to other documents of the same corpus with
    ``--switch``); static calibrates on the first ``calibration_tokens`` of the corpus's
    calibration split."""
    switch = name if o.switch else None
    task = TASKS["stream"]
    task_options = StreamOptions(corpus=name, split=o.split, switch_corpus=switch,
                                 prompt_tokens=o.prompt_tokens, documents=o.documents,
                                 continuation_tokens=o.continuation_tokens)  # fmt: skip
    items = task.items(tokenizer, task_options, o.seed)
    options = {"corpus": name, "split": o.split, "switch_corpus": switch,
               "prompt_tokens": o.prompt_tokens, "documents": o.documents,
               "continuation_tokens": o.continuation_tokens}  # fmt: skip
    tag = (f"{name}-{o.split}-{'switch' if switch else 'same'}-p{o.prompt_tokens}"
           f"c{o.continuation_tokens}n{o.documents}")  # fmt: skip
    calib = _calibration_split_ids(tokenizer, name, o.calibration_tokens)
    return Source(name, tag, options, task, task_options, items, calib)


def _gen_source(tokenizer: Any, name: str, o: StudyOptions) -> Source:
    """Prompts of ``prompt_tokens`` from ``documents`` documents of the split; each point
    continues them greedily for ``gen_tokens`` tokens (the dense point's text is the
    reference)."""
    task_options = ContinuationOptions(name, o.split, o.prompt_tokens, o.documents, o.gen_tokens)
    items = CONTINUE.items(tokenizer, task_options, o.seed)
    options = {"corpus": name, "split": o.split, "prompt_tokens": o.prompt_tokens,
               "documents": o.documents, "gen_tokens": o.gen_tokens}  # fmt: skip
    tag = f"{name}-{o.split}-gen-p{o.prompt_tokens}g{o.gen_tokens}n{o.documents}"
    calib = _calibration_split_ids(tokenizer, name, o.calibration_tokens)
    return Source(name, tag, options, CONTINUE, task_options, items, calib)


_SOURCES = {"ppl": _ppl_source, "stream": _stream_source, "gen": _gen_source}


def make_source(tokenizer: Any, corpus: str, opts: StudyOptions) -> Source:
    """The items of ``corpus`` for ``opts.task``."""
    return _SOURCES[opts.task](tokenizer, corpus, opts)


# -- one grid point's folder and summary -------------------------------------------------------
def point_fingerprint(
    task: str,
    point: GridPoint,
    config: DARTConfig | None,
    source: Source,
    model_id: dict[str, Any],
) -> dict[str, Any]:
    """What determines the point's records (its folder's hash): the task, the source's options,
    the method and resolved config, the static calibration text, the model and the items."""
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


def point_folder(
    out: Path, task: str, source: Source, point: GridPoint, fingerprint: dict[str, Any]
) -> Path:
    tag = f"{point.name}-p{round(100 * point.total_prune):02d}-{digest(fingerprint)[:10]}"
    return Path(out) / task / source.tag / tag


def _summarise_scores(task: str, records: list[dict[str, Any]]) -> dict[str, Any]:
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


def gen_metrics(
    model: torch.nn.Module,
    items: list[dict[str, Any]],
    records: list[dict[str, Any]],
    reference: list[list[int]],
) -> dict[str, Any]:
    """Per item: agreement with the dense text ``reference`` (token ROUGE-L), repeated 4-grams
    and the dense model's NLL of the text; their means; ``item_nll``/``item_tokens`` carry the
    dense NLL so the paired tables work unchanged."""
    out = agreement(records, reference)
    pairs = zip(items, records, strict=True)
    nll = [dense_nll(model, it["prompt"], r["new_tokens"]) for it, r in pairs]
    n = len(records)
    return {
        "rouge_l_vs_dense": out["rouge_l_vs_dense"],
        "repeated_4grams": out["repeated_4grams"],
        "dense_nll": sum(nll) / n,
        "nominal_sparsity": out["nominal_sparsity"],
        "retraces_per_item": out["retraces_per_item"],
        "item_rouge_l": out["item_rouge_l"],
        "item_repeated": out["item_repeated"],
        "item_nll": nll,
        "item_tokens": [1] * n,
        "item_new_tokens": [r["new_tokens"] for r in records],
        "perplexity": math.exp(sum(nll) / n),  # of the dense model on the generated text
    }


def summarise_point(
    task: str,
    model: torch.nn.Module,
    point: GridPoint,
    source: Source,
    records: list[dict[str, Any]],
    reference: list[list[int]] | None,
) -> dict[str, Any]:
    """The point's summary (every item's record, in the source's order); ``gen`` compares each
    continuation with ``reference`` (the dense point's; None: this point's own) and needs the
    unpatched ``model`` for the dense NLL."""
    if task == "gen":
        own = [r["new_tokens"] for r in records]
        scores = gen_metrics(model, source.items, records, reference or own)
    else:
        scores = _summarise_scores(task, records)
    return {
        "name": point.name,
        "method": point.method,
        "total_prune": point.total_prune,
        "corpus": source.corpus,
        "source": source.tag,
        **scores,
    }


# -- tables ------------------------------------------------------------------------------------
TABLE_COLUMNS = {
    "ppl": ["perplexity", "nll_per_token", "nominal_sparsity"],
    "gen": ["rouge_l_vs_dense", "repeated_4grams", "dense_nll", "retraces_per_item",
            "nominal_sparsity"],
    "stream": ["perplexity", "nll_per_token", "nll_per_sparse_token", "retraces_per_200_tokens",
               "dense_token_computations_per_token", "effective_sparsity",
               "weight_bytes_sparsity"],
}  # fmt: skip
STREAM_COLUMNS = ["perplexity", "retraces_per_200_tokens", "dense_token_computations_per_token",
                  "effective_sparsity", "weight_bytes_sparsity"]  # fmt: skip


def write_tables(path: Path, task: str, summaries: list[dict[str, Any]]) -> None:
    """``path``.json (every summary) and ``path``.csv (one row per corpus and point)."""
    write_json(path.with_suffix(".json"), summaries)
    buf = io.StringIO()
    cols = ["corpus", "name", "total_prune", *TABLE_COLUMNS[task], "tokens", "seconds"]
    w = csv.DictWriter(buf, cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(summaries)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())


def load_summaries(out: Path, task: str, split: str) -> list[dict[str, Any]]:
    """Every point's summary.json under ``out/task/<corpus>-<split>-*``, newest folder last."""
    found = sorted(
        (Path(out) / task).glob(f"*-{split}-*/*/summary.json"), key=lambda p: p.stat().st_mtime
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


def ppl_grid_table(
    summaries: list[dict[str, Any]], corpora: list[str], prunes: list[float]
) -> tuple[str, list[str], dict[str, float]]:
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
