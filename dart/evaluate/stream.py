"""Streaming evaluation: teacher-forced decoding with the KV cache kept, the setting in which drift
detection and re-tracing act.

A document is a prompt of ``P`` tokens and a continuation of ``C + 1`` tokens. The prompt goes
through the patched model in one forward (the prefill, which traces it and builds the masks);
the continuation is then fed one token at a time into the same :class:`DynamicCache`, and each
of these ``C`` decode passes predicts the next continuation token. The continuation comes from
the same text (the text goes on) or, with a switch source, from another document (a topic
switch: the prompt's masks stop fitting, which is what drift detection is for).

Per document and arm the record holds the NLL of the ``C`` predicted tokens (all of them, and
those predicted by passes that ran sparse), the re-traces (drift events) with their steps and the
drift monitor's per-window trace, dense token computations per token, and the effective sparsity
in FFN neurons computed (the controller's count: recomputed look-back tokens add dense work) and
in weight bytes read per decoded token (attention, FFN and LM-head matrices; the input embedding
is a lookup of one row unless tied to the head; a re-trace forward reads every weight once,
however many tokens it recomputes, as a memory-bound decoder does). Arms are compared by paired
per-document differences of the mean NLL per token with percentile-bootstrap confidence intervals
(:func:`paired_difference`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..assets.data import load_documents, load_file_documents, split_documents
from ..core.api import DARTHandle
from .perplexity import tokenize_prefix

__all__ = [
    "aggregate_stream",
    "paired_difference",
    "paired_metrics",
    "score_stream",
    "stream_items",
    "text_blocks",
    "weight_bytes",
]

BOOTSTRAP_ITERS = 4000
CONFIDENCE = 0.95


# -- documents -----------------------------------------------------------------------------------
def _source_documents(corpus: str | None, text_file: str | None, split: str) -> list[str]:
    if text_file:
        return split_documents(load_file_documents(text_file), split)
    return split_documents(load_documents(corpus), split)


def _source(corpus: str | None, text_file: str | None) -> tuple[str, str | None]:
    return ("file", text_file) if text_file else ("corpus", corpus)


def text_blocks(tokenizer: Any, docs: Sequence[str], length: int, count: int) -> list[list[int]]:
    """``count`` non-overlapping blocks of ``length`` tokens, each inside one document: the first
    block of every document in order, then second blocks, and so on (so the blocks come from as
    many different documents as possible). ValueError when the documents hold fewer."""
    blocks: list[list[int]] = []
    for text in docs:  # first blocks; documents tokenised only as far as needed
        ids = tokenize_prefix(tokenizer, text, length).tolist()
        if len(ids) == length:
            blocks.append(ids)
            if len(blocks) == count:
                return blocks
    depth = 1
    while len(blocks) < count:
        grown = False
        for text in docs:
            ids = tokenize_prefix(tokenizer, text, (depth + 1) * length).tolist()
            if len(ids) == (depth + 1) * length:
                blocks.append(ids[depth * length :])
                grown = True
                if len(blocks) == count:
                    return blocks
        if not grown:
            break
        depth += 1
    raise ValueError(
        f"the text holds {len(blocks)} blocks of {length} tokens inside its documents, fewer than "
        f"the {count} needed (documents are separated by blank lines in a text file): lower "
        "--documents, --prompt-tokens or --continuation-tokens, or give a longer text"
    )


def stream_items(
    tokenizer: Any,
    prompt_tokens: int,
    continuation_tokens: int,
    documents: int,
    corpus: str | None = "wiki",
    text_file: str | None = None,
    split: str = "eval",
    switch_corpus: str | None = None,
    switch_text_file: str | None = None,
) -> list[dict[str, Any]]:
    """The documents of a stream run: ``{id, prompt, continuation}`` (token ids; the
    continuation holds ``continuation_tokens + 1`` ids, its first is fed after the prompt and
    each decode pass predicts the next). Without a switch source both come from one block of the
    text; with one, the prompt from the text and the continuation from the switch source (when
    the two are the same text, from other documents of it)."""
    if prompt_tokens < 1 or continuation_tokens < 1 or documents < 1:
        raise ValueError(
            f"prompt_tokens ({prompt_tokens}), continuation_tokens ({continuation_tokens}) and "
            f"documents ({documents}) must be at least 1"
        )
    cont = continuation_tokens + 1
    docs = _source_documents(corpus, text_file, split)
    if switch_corpus is None and switch_text_file is None:
        blocks = text_blocks(tokenizer, docs, prompt_tokens + cont, documents)
        pairs = [(b[:prompt_tokens], b[prompt_tokens:]) for b in blocks]
    elif _source(switch_corpus, switch_text_file) == _source(corpus, text_file):
        blocks = text_blocks(tokenizer, docs, max(prompt_tokens, cont), 2 * documents)
        pairs = [
            (a[:prompt_tokens], b[:cont])
            for a, b in zip(blocks[:documents], blocks[documents:], strict=True)
        ]
    else:
        other = _source_documents(switch_corpus, switch_text_file, split)
        prompts = text_blocks(tokenizer, docs, prompt_tokens, documents)
        conts = text_blocks(tokenizer, other, cont, documents)
        pairs = list(zip(prompts, conts, strict=True))
    return [{"id": f"d{i:04d}", "prompt": p, "continuation": c} for i, (p, c) in enumerate(pairs)]


# -- weight bytes --------------------------------------------------------------------------------
def weight_bytes(model: torch.nn.Module, handle: DARTHandle | None) -> tuple[float, list[float]]:
    """Bytes of weights read per token (every matrix but an untied input embedding, which is a
    lookup) and, per patched FFN layer, the bytes of one neuron's weights. Quantised matrices
    (`dart.quantize`) count their buffers (rows, scales, mins)."""
    emb = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)  # None: a quantised head
    tied = head is not None and head.data_ptr() == emb.data_ptr()
    skip = set() if tied else {id(emb)}
    seen: set[int] = set()
    total = 0.0
    for p in [*model.parameters(), *model.buffers()]:
        if p.dim() != 2 or id(p) in skip or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if handle is None:
        return total, []
    per_neuron = [
        sum(
            p.numel() * p.element_size()
            for p in [*ffn.original.parameters(), *ffn.original.buffers()]
            if p.dim() == 2
        )
        / ffn.width
        for ffn in handle.ffns
    ]
    return total, per_neuron


# -- one document --------------------------------------------------------------------------------
def _sparse_now(handle: DARTHandle | None) -> bool:
    if handle is None or not handle.method.prunes:
        return False
    rows = handle.controller.sparse_rows
    return bool(rows) and rows[0]


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    prompt: Sequence[int],
    continuation: Sequence[int],
    handle: DARTHandle | None = None,
) -> dict[str, Any]:
    """Teacher-forced decode of one document (see the module doc): prefill ``prompt``, then feed
    ``continuation[:-1]`` one token at a time with the cache kept; each pass's logits score the
    next continuation token. Returns the record's measurements (without id and arm)."""
    from transformers import DynamicCache

    if len(prompt) < 1 or len(continuation) < 2:
        raise ValueError("score_stream needs a prompt and at least 2 continuation tokens")
    device = next(model.parameters()).device
    if handle is not None:
        handle.reset()
    cache = DynamicCache()
    model(input_ids=torch.tensor([list(prompt)], device=device), past_key_values=cache,
          use_cache=True)  # fmt: skip
    nll: list[float] = []
    sparse: list[bool] = []
    for pos in range(len(continuation) - 1):
        sparse.append(_sparse_now(handle))
        x = torch.tensor([[continuation[pos]]], device=device)
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
        target = torch.tensor([continuation[pos + 1]], device=device)
        nll.append(float(F.cross_entropy(logits[0, -1:].float(), target)))
    return {
        "tokens": len(nll),
        "nll": sum(nll),
        "sparse_tokens": sum(sparse),
        "nll_sparse": sum(v for v, s in zip(nll, sparse, strict=True) if s),
        "token_nll": nll,
        **_sparsity_record(model, handle, sparse),
    }


def _sparsity_record(
    model: torch.nn.Module, handle: DARTHandle | None, sparse: list[bool]
) -> dict[str, Any]:
    tokens = len(sparse)
    if handle is None or not handle.method.prunes:
        return {"retraces": 0, "events": [], "trace": [], "dense_token_computations_per_token":
                1.0, "effective_sparsity": 0.0, "weight_bytes_sparsity": 0.0,
                "nominal_sparsity": 0.0}  # fmt: skip
    stats = handle.stats()
    total, per_neuron = weight_bytes(model, handle)
    # Bytes read: a sparse pass reads the kept rows of every FFN; a dense pass (a re-trace,
    # however many look-back tokens it recomputes in its one forward) reads every weight once.
    # The keep counts are fixed for a sequence (its budget is allocated once, at the prompt).
    pruned = [w - k for w, k in zip(stats["widths"], stats["keep_counts"], strict=True)]
    skipped = sum(sparse) * sum(n * b for n, b in zip(pruned, per_neuron, strict=True)) / tokens
    # passes that ran dense (re-trace passes), unless the controller counts re-computed tokens
    dense = stats.get("dense_token_computations_per_token", (tokens - sum(sparse)) / tokens)
    history = handle.drift_history()
    return {
        "retraces": len(stats["drift_events"]),
        "events": [e["step"] for e in stats["drift_events"]],
        "trace": [list(t) for t in history[0]] if history else [],
        "dense_token_computations_per_token": dense,
        "effective_sparsity": stats["effective_sparsity"],
        "weight_bytes_sparsity": skipped / total,
        "nominal_sparsity": stats["nominal_sparsity"],
    }


# -- aggregation ---------------------------------------------------------------------------------
def paired_difference(
    diffs: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = 0
) -> dict[str, float]:
    """Mean of paired differences with a percentile-bootstrap ``CONFIDENCE`` interval (resampling
    the pairs); ``excludes_zero`` is 1.0 when the interval does not contain 0."""
    n = len(diffs)
    if n == 0:
        raise ValueError("paired_difference: no pairs")
    mean = sum(diffs) / n
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(iters))
    alpha = (1.0 - CONFIDENCE) / 2
    lo = means[int(math.floor(alpha * (iters - 1)))]
    hi = means[int(math.ceil((1 - alpha) * (iters - 1)))]
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": float(n),
            "excludes_zero": float(lo > 0 or hi < 0)}  # fmt: skip


def _per_token(r: dict[str, Any]) -> float:
    return r["nll"] / r["tokens"]


def paired_metrics(
    records: Iterable[dict[str, Any]], baseline: Iterable[dict[str, Any]], name: str
) -> dict[str, float]:
    """``nll_minus_<name>`` (mean per-document difference of NLL per token, this arm minus the
    baseline, on the documents both have) with its bootstrap interval (``..._ci_low``,
    ``..._ci_high``, ``..._n``)."""
    base = {r["id"]: r for r in baseline}
    diffs = [_per_token(r) - _per_token(base[r["id"]]) for r in records if r["id"] in base]
    if not diffs:
        return {}
    d = paired_difference(diffs)
    key = f"nll_minus_{name}"
    return {key: d["mean"], f"{key}_ci_low": d["ci_low"], f"{key}_ci_high": d["ci_high"],
            f"{key}_n": d["n"]}  # fmt: skip


def aggregate_stream(
    records: list[dict[str, Any]], dense: dict[str, dict[str, Any]] | None = None
) -> dict[str, float]:
    """One arm's metrics: perplexity and NLL per token over all predicted tokens and over those
    predicted by sparse passes, re-traces per sequence and per 200 tokens, dense token
    computations per token, effective sparsity (neurons, weight bytes); with ``dense`` (records
    by id) the paired difference to it."""
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll"] for r in records)
    sparse_tokens = sum(r["sparse_tokens"] for r in records)
    mean = lambda key: sum(r[key] for r in records) / len(records)  # noqa: E731
    out = {
        "perplexity": math.exp(nll / tokens),
        "nll_per_token": nll / tokens,
        "nll_per_sparse_token": (
            sum(r["nll_sparse"] for r in records) / sparse_tokens if sparse_tokens else math.nan
        ),
        "retraces": mean("retraces"),
        "retraces_per_200_tokens": 200.0 * sum(r["retraces"] for r in records) / tokens,
        "dense_token_computations_per_token": mean("dense_token_computations_per_token"),
        "weight_bytes_sparsity": mean("weight_bytes_sparsity"),
        "tokens": float(tokens),
        "samples": float(len(records)),
    }
    if dense:
        out.update(paired_metrics(records, dense.values(), "dense"))
    return out
