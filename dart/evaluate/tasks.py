"""The task registry: one :class:`Task` object per evaluation (``ppl``, ``stream``, ``mmlu``,
``summarize``, ``drift``, ``generate``), saying what it evaluates on (its options and items), how
one step runs (its :class:`StepKind`), how per-sample records aggregate, and its main metric.

Nothing outside this module tests a task's name: the driver, the Lightning module and the CLI
ask the task object. A new task is one more entry of :data:`TASKS`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..assets.data import (
    SUMMARIZATION_SOURCES,
    TEXT_CORPORA,
    load_drift_prompts,
    load_text,
    load_text_file,
)
from ..core.api import DARTHandle
from ..runtime.fast import FastGenerator
from ..runtime.generation import encode_prompts
from .arms import Arm, parse_arms
from .generative import (
    aggregate_drift,
    aggregate_summarization,
    drift_items,
    generate_batch,
    summarization_items,
)
from .multiple_choice import aggregate_accuracy, mmlu_items, score_choices
from .perplexity import PROTOCOLS, aggregate_perplexity, tokenize_prefix, window_items
from .stream import aggregate_stream, score_stream, stream_items

__all__ = [
    "TASKS",
    "DriftOptions",
    "GenerateOptions",
    "GenerationOptions",
    "MMLUOptions",
    "PerplexityOptions",
    "StepContext",
    "StepKind",
    "StreamOptions",
    "SummarizeOptions",
    "Task",
    "compute_metrics",
    "get_task",
    "prompt_texts",
    "sparsity_of",
]


# -- options (one declaration per option; the CLI flags and YAML keys derive from them) --------
@dataclass
class PerplexityOptions:
    corpus: str = field(
        default="wiki", metadata={"help": "packaged corpus to score", "choices": TEXT_CORPORA}
    )
    text_file: str | None = field(
        default=None, metadata={"help": "a local text file instead of a corpus (scored whole)"}
    )
    split: Literal["eval", "calibration", "all"] = field(
        default="eval", metadata={"help": "part of the corpus (calibration is disjoint from eval)"}
    )
    window: int = field(default=512, metadata={"min": 1, "help": "tokens per scored window"})
    stride: int = field(default=256, metadata={"min": 1, "help": "tokens between window starts"})
    max_tokens: int | None = field(
        default=None, metadata={"min": 1, "help": "score only the first N tokens of the text"}
    )
    protocol: Literal["sliding", "llamacpp"] = field(
        default="sliding",
        metadata={
            "help": "sliding windows, or llama.cpp's llama-perplexity: disjoint chunks of "
            "--window tokens, the first half the prompt (dense, masks chosen), the second half "
            "scored on its KV cache under those masks"
        },
    )
    chunks: int | None = field(
        default=None, metadata={"help": "llamacpp protocol: score at most N chunks"}
    )


@dataclass
class StreamOptions:
    corpus: str = field(
        default="wiki", metadata={"help": "packaged corpus of the prompts", "choices": TEXT_CORPORA}
    )
    text_file: str | None = field(
        default=None, metadata={"help": "a local text file instead of the corpus"}
    )
    switch_corpus: str | None = field(
        default=None,
        metadata={
            "help": "continuations from this corpus (a topic switch; the prompts' corpus: "
            "from other documents of it); default: the prompt's own text goes on",
            "choices": TEXT_CORPORA,
        },
    )
    switch_text_file: str | None = field(
        default=None, metadata={"help": "continuations from this local text file (a switch)"}
    )
    split: Literal["eval", "calibration", "all"] = field(
        default="eval", metadata={"help": "part of the corpora (calibration is disjoint from eval)"}
    )
    prompt_tokens: int = field(
        default=128, metadata={"min": 1, "help": "prompt tokens (the prefill)"}
    )
    continuation_tokens: int = field(
        default=192,
        metadata={"min": 2, "help": "tokens predicted by decode passes, fed one at a time"},
    )
    documents: int = field(default=8, metadata={"min": 1, "help": "(prompt, continuation) pairs"})


@dataclass
class MMLUOptions:
    shots: int = field(default=5, metadata={"help": "examples in each prompt", "choices": range(6)})
    subjects: list[str] | None = field(
        default=None, metadata={"help": "comma list of subjects (default: all 57)"}
    )
    n_per_subject: int | None = field(
        default=None, metadata={"min": 1, "help": "questions drawn per subject (seeded)"}
    )
    limit: int | None = field(
        default=None, metadata={"min": 1, "help": "cap on questions (seeded subset)"}
    )
    split: Literal["test", "dev"] = field(
        default="test", metadata={"help": "MMLU split of the questions"}
    )
    leaky: bool = field(
        default=False,
        metadata={"help": "the reference code's protocol: masks from context + answer"},
    )


@dataclass
class GenerationOptions:
    max_new_tokens: int = field(
        default=128, metadata={"min": 1, "help": "greedy tokens per prompt"}
    )
    batch_size: int = field(default=4, metadata={"min": 1, "help": "prompts per generate call"})
    compile: bool = field(
        default=False,
        metadata={
            "help": "generate in the compiled static-cache loop (dart.runtime.fast), same greedy "
            "tokens"
        },
    )
    release_steps: list[int] = field(
        default_factory=list,
        metadata={"help": "comma list: DART also runs released to dense after R new tokens"},
    )


@dataclass
class SummarizeOptions(GenerationOptions):
    max_prompt_tokens: int = field(
        default=768, metadata={"min": 1, "help": "prompt length cap (the document is truncated)"}
    )
    limit: int | None = field(
        default=None, metadata={"min": 1, "help": "cap on documents (seeded)"}
    )
    split: Literal["eval", "calibration"] = field(
        default="eval", metadata={"help": "part of the Wikipedia stand-in (XSum: eval only)"}
    )
    source: str = field(
        default="wiki",
        metadata={"help": "documents and references: " + "; ".join(
            f"{s.name}: {s.help}" for s in SUMMARIZATION_SOURCES.values()),
            "choices": tuple(SUMMARIZATION_SOURCES)},
    )  # fmt: skip


@dataclass
class DriftOptions(GenerationOptions):
    # longer than the other generation tasks: the second topic must get room to start
    max_new_tokens: int = field(
        default=200, metadata={"min": 1, "help": "greedy tokens per prompt"}
    )
    limit: int | None = field(default=None, metadata={"min": 1, "help": "cap on two-topic prompts"})


@dataclass
class GenerateOptions(GenerationOptions):
    prompts: list[str] = field(
        default_factory=list,
        metadata={
            "help": "a prompt (repeat the flag for more; default: a packaged drift prompt)",
            "flag": "--prompt",
            "repeat": True,
        },
    )
    prompts_file: str | None = field(default=None, metadata={"help": "one prompt per line"})
    chat: bool = field(default=True, metadata={"help": "apply the model's chat template"})


# -- steps ---------------------------------------------------------------------------------------
@dataclass
class StepContext:
    """What a step sees: the model, the attached arm's handle (None: dense), the task options
    and, for generation, the compiled loop to use for a batch (None: HF ``generate``)."""

    model: torch.nn.Module
    handle: DARTHandle | None
    tokenizer: Any
    options: Any
    fast: Callable[[list[dict[str, Any]]], FastGenerator | None] = lambda batch: None


def sparsity_of(handle: DARTHandle | None) -> dict[str, float]:
    """The sparsity that actually ran under ``handle`` (dense: none): the keep counts'
    (``nominal_sparsity``) and, once decode passes ran, the share of FFN neurons they skipped
    (``effective_sparsity``; the controller counts decode passes only, so a scored window has
    none)."""
    if handle is None:
        return {"nominal_sparsity": 0.0, "effective_sparsity": 0.0, "ffn_bytes_read_fraction": 1.0}
    stats = handle.stats()
    out = {
        "nominal_sparsity": stats["nominal_sparsity"],
        "ffn_bytes_read_fraction": stats["ffn_bytes_read_fraction"],
    }
    if stats["decode_passes"]:
        out["effective_sparsity"] = stats["effective_sparsity"]
    return out


def _window_step(ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (item,) = batch
    device = next(ctx.model.parameters()).device
    ids = torch.tensor(item["ids"], device=device)
    score = PROTOCOLS[getattr(ctx.options, "protocol", "sliding")]
    if ctx.handle is not None:
        ctx.handle.reset()  # this window's bytes meter and counters alone
    r = score(ctx.model, ids, item["score_from"], item["prep_len"], ctx.handle)
    return [{"id": item["id"], **r, **sparsity_of(ctx.handle)}]


def _stream_step(ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (item,) = batch
    r = score_stream(ctx.model, item["prompt"], item["continuation"], ctx.handle)
    return [{"id": item["id"], **r}]


def _choices_step(ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (item,) = batch
    lls = score_choices(ctx.model, item["context"], item["choices"], ctx.handle, ctx.options.leaky)
    pred = max(range(len(lls)), key=lls.__getitem__)
    return [
        {
            "id": item["id"],
            "subject": item["subject"],
            "logliks": lls,
            "pred": pred,
            "answer": item["answer"],
            "correct": int(pred == item["answer"]),
            "context_tokens": len(item["context"]),
            **sparsity_of(ctx.handle),
        }
    ]


def _generate_step(ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tok = ctx.tokenizer
    return generate_batch(
        ctx.model,
        batch,
        ctx.options.max_new_tokens,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        handle=ctx.handle,
        decode=lambda t: tok.decode(t, skip_special_tokens=True),
        fast=ctx.fast(batch),
    )


@dataclass(frozen=True)
class StepKind:
    """How one step of a task runs: ``run(ctx, batch)`` -> one record per item (without the
    arm's fields); ``batched`` steps take several items at once (generation)."""

    name: str
    batched: bool
    run: Callable[[StepContext, list[dict[str, Any]]], list[dict[str, Any]]]


SCORE_WINDOW = StepKind("score_window", batched=False, run=_window_step)
SCORE_STREAM = StepKind("score_stream", batched=False, run=_stream_step)
SCORE_CHOICES = StepKind("score_choices", batched=False, run=_choices_step)
GENERATE = StepKind("generate", batched=True, run=_generate_step)


# -- items ---------------------------------------------------------------------------------------
def _ppl_items(tokenizer: Any, o: PerplexityOptions, seed: int) -> list[dict[str, Any]]:
    text = load_text_file(o.text_file) if o.text_file else load_text(o.corpus, o.split)
    max_tokens = o.max_tokens
    if o.protocol == "llamacpp" and o.chunks is not None:  # tokenise only what is scored
        max_tokens = min(max_tokens or o.chunks * o.window, o.chunks * o.window)
    ids = tokenize_prefix(tokenizer, text, max_tokens).tolist()
    return window_items(ids, o.window, o.stride, o.protocol, o.chunks)


def _stream_items(tokenizer: Any, o: StreamOptions, seed: int) -> list[dict[str, Any]]:
    return stream_items(
        tokenizer,
        o.prompt_tokens,
        o.continuation_tokens,
        o.documents,
        corpus=o.corpus,
        text_file=o.text_file,
        split=o.split,
        switch_corpus=o.switch_corpus,
        switch_text_file=o.switch_text_file,
    )


def _mmlu_items(tokenizer: Any, o: MMLUOptions, seed: int) -> list[dict[str, Any]]:
    return mmlu_items(
        tokenizer,
        shots=o.shots,
        limit=o.limit,
        n_per_subject=o.n_per_subject,
        seed=seed,
        subjects=o.subjects or None,
        split=o.split,
    )


def _summarize_items(tokenizer: Any, o: SummarizeOptions, seed: int) -> list[dict[str, Any]]:
    return summarization_items(
        tokenizer,
        limit=o.limit,
        seed=seed,
        max_prompt_tokens=o.max_prompt_tokens,
        split=o.split,
        source=o.source,
    )


def _drift_items(tokenizer: Any, o: DriftOptions, seed: int) -> list[dict[str, Any]]:
    return drift_items(tokenizer, limit=o.limit)


def prompt_texts(o: GenerateOptions) -> list[str]:
    """The prompts of ``dart generate``: the flags', then the file's lines; default: the first
    packaged two-topic drift prompt."""
    prompts = list(o.prompts)
    if o.prompts_file:
        lines = Path(o.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    return prompts or [load_drift_prompts("two_topic")[0].prompt]


def _generate_items(tokenizer: Any, o: GenerateOptions, seed: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"p{i}",
            "prompt": encode_prompts(tokenizer, [p], chat=o.chat)["input_ids"][0].tolist(),
        }
        for i, p in enumerate(prompt_texts(o))
    ]


# -- aggregation ---------------------------------------------------------------------------------
Decode = Callable[[Sequence[int]], str]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _ppl_aggregate(records: list[dict], dense: dict[str, dict] | None, decode: Decode) -> dict:
    return aggregate_perplexity(records)


def _stream_aggregate(records: list[dict], dense: dict | None, decode: Decode) -> dict:
    return aggregate_stream(records, dense)


def _mmlu_aggregate(records: list[dict], dense: dict[str, dict] | None, decode: Decode) -> dict:
    return aggregate_accuracy(records)


def _summarize_aggregate(records: list[dict], dense: dict | None, decode: Decode) -> dict:
    return aggregate_summarization(records, dense)


def _drift_aggregate(records: list[dict], dense: dict | None, decode: Decode) -> dict:
    # the dense arm is compared with itself: its rows show the agreement scale's top (1.0)
    reference = dense if dense is not None else {r["id"]: r for r in records}
    return aggregate_drift(records, reference, decode)


def _generate_aggregate(records: list[dict], dense: dict | None, decode: Decode) -> dict:
    tokens = sum(len(r["new_tokens"]) for r in records)
    seconds = sum(r["seconds"] / r["batch_size"] for r in records)  # a batch's time, once
    return {
        "samples": len(records),
        "new_tokens": tokens / len(records),
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
    }


# -- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One evaluation: ``items(tokenizer, options, seed)`` builds its samples (dicts with an
    ``id``), ``step`` runs a batch of them under one arm, ``aggregate(records, dense, decode)``
    turns one arm's records (and dense's, by id, for comparisons) into metrics, and
    ``main_metric`` is the one plotted against sparsity. ``needs_dense``: the metrics compare
    with dense outputs, so a dense arm always runs."""

    name: str
    help: str
    options: type
    items: Callable[[Any, Any, int], list[dict[str, Any]]]
    step: StepKind
    aggregate: Callable[[list[dict], dict[str, dict] | None, Decode], dict[str, float]]
    main_metric: str | None
    needs_dense: bool = False

    def arms(self, methods: Sequence[str], total_prune: Sequence[float], options: Any) -> list[Arm]:
        """The arms this task runs for ``--methods`` x ``--total-prune`` (plus the release-step
        sweep of generation tasks, and dense where the metrics need it)."""
        arms = parse_arms(methods, total_prune, getattr(options, "release_steps", None))
        if self.needs_dense and not any(a.is_reference for a in arms):
            arms.insert(0, Arm.reference())
        return arms

    def batch_size(self, options: Any) -> int:
        return options.batch_size if self.step.batched else 1


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "ppl",
            "sliding-window perplexity of a corpus or a text file",
            PerplexityOptions,
            _ppl_items,
            SCORE_WINDOW,
            _ppl_aggregate,
            "perplexity",
        ),
        Task(
            "mmlu",
            "MMLU multiple choice (masks from the question only)",
            MMLUOptions,
            _mmlu_items,
            SCORE_CHOICES,
            _mmlu_aggregate,
            "acc_micro",
        ),
        Task(
            "summarize",
            "summarisation stand-in: ROUGE against the reference and the dense output",
            SummarizeOptions,
            _summarize_items,
            GENERATE,
            _summarize_aggregate,
            "rougeL",
        ),
        Task(
            "drift",
            "knowledge drift: two-topic prompts, agreement with dense per topic",
            DriftOptions,
            _drift_items,
            GENERATE,
            _drift_aggregate,
            "rougeL_vs_dense_second",
            needs_dense=True,
        ),
        Task(
            "stream",
            "teacher-forced decoding with the KV cache kept (drift and re-traces act): NLL, "
            "re-traces, effective sparsity; --switch-* for a topic switch",
            StreamOptions,
            _stream_items,
            SCORE_STREAM,
            _stream_aggregate,
            "perplexity",
        ),
        Task(
            "generate",
            "generate with every arm, records to JSONL",
            GenerateOptions,
            _generate_items,
            GENERATE,
            _generate_aggregate,
            None,
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}") from None


def compute_metrics(
    task: Task, records: Iterable[dict[str, Any]], arms: Sequence[Arm], decode: Decode
) -> list[dict[str, Any]]:
    """metrics.json records ``{task, method, ..., metric, value}`` of ``arms`` from their
    per-sample records; every arm also gets the nominal and effective sparsity that ran (means
    over its records)."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], round(float(r["total_prune"]), 6))].append(r)
    reference = next((a for a in arms if a.is_reference), None)
    dense = {r["id"]: r for r in groups.get(reference.key, [])} if reference else None
    out = []
    for arm in arms:
        recs = groups.get(arm.key, [])
        if not recs:
            continue
        values = task.aggregate(recs, None if arm.is_reference else dense, decode)
        for name in ("nominal_sparsity", "effective_sparsity", "ffn_bytes_read_fraction"):
            values[name] = _mean([r[name] for r in recs if name in r])
        for metric, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                continue
            out.append({"task": task.name, **arm.to_dict(), "metric": metric, "value": value})
    return out
