"""Generation tasks: the summarisation stand-in and knowledge drift.

Prompts are token ids (left-padded into a batch); each sequence gets its own masks
(``batch_policy='per_sequence'``) from its own prompt, and DART re-traces on drift during
generation. Records hold the new tokens and text, the drift trace of the sequence (generated
step, window similarity, threshold) and its re-trace steps.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..assets.data import (
    SUMMARIZATION_SOURCES,
    format_summarization_prompt,
    load_drift_prompts,
)
from ..core.api import DARTHandle
from ..core.config import ConfigError
from ..runtime.fast import FastGenerator
from ..runtime.generation import encode_prompts
from .metrics import rouge_scores

__all__ = [
    "aggregate_drift",
    "aggregate_summarization",
    "drift_items",
    "generate_batch",
    "summarization_items",
]


def summarization_items(
    tokenizer: Any,
    limit: int | None = None,
    seed: int = 0,
    max_prompt_tokens: int = 768,
    split: str = "eval",
    source: str = "wiki",
) -> list[dict[str, Any]]:
    """Summarisation prompts of a source of :data:`SUMMARIZATION_SOURCES` (the Wikipedia
    stand-in or XSum; instruction kept, document truncated) as token ids."""
    if source not in SUMMARIZATION_SOURCES:
        raise ConfigError(f"source {source!r} is not one of {', '.join(SUMMARIZATION_SOURCES)}")
    src = SUMMARIZATION_SOURCES[source]
    if split not in src.splits:
        raise ConfigError(f"--split {split!r}: source {source!r} has only {', '.join(src.splits)}")
    items = []
    for s in src.load(limit, seed, split):
        ids = format_summarization_prompt(
            s.document, tokenizer, max_prompt_tokens, src.instruction, return_ids=True
        )
        items.append({"id": f"{src.item_prefix}{s.id}", "prompt": list(ids),
                      "reference": s.reference})  # fmt: skip
    return items


def drift_items(
    tokenizer: Any, limit: int | None = None, kind: str = "two_topic"
) -> list[dict[str, Any]]:
    """Knowledge-drift prompts (chat template applied) as token ids."""
    items = []
    for p in load_drift_prompts(kind)[:limit]:
        ids = encode_prompts(tokenizer, [p.prompt], chat=True)["input_ids"][0].tolist()
        items.append({"id": p.id, "prompt": ids, "topic_a": p.topic_a, "topic_b": p.topic_b})
    return items


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    items: Sequence[dict[str, Any]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    handle: DARTHandle | None = None,
    decode=None,
    fast: FastGenerator | None = None,
    min_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Greedy generation for a batch of prompt-id items; one record per item (without arm).

    With `fast` (a :class:`~dart.runtime.fast.FastGenerator` over `model` and `handle`) the batch
    runs in the compiled static-cache loop instead of HF `generate`; the tokens are the same.
    `min_new_tokens` (HF `generate` only) suppresses EOS until that many tokens are written, so
    that every arm writes as many (the tuning study's continuations).
    """
    if min_new_tokens is not None and fast is not None:
        raise ValueError("generate_batch: min_new_tokens is not supported by the compiled loop")
    device = next(model.parameters()).device
    width = max(len(it["prompt"]) for it in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, it in enumerate(items):
        n = len(it["prompt"])
        ids[b, width - n :] = torch.tensor(it["prompt"])
        mask[b, width - n :] = 1
    if handle is not None:
        handle.reset()
    start = time.perf_counter()
    if fast is not None:
        new = fast.generate(ids, mask, max_new_tokens, eos_token_id=eos_token_id).tokens
    else:
        new = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            **({} if min_new_tokens is None else {"min_new_tokens": min_new_tokens}),
        )[:, width:]
    seconds = time.perf_counter() - start
    stats = handle.stats() if handle is not None else {}
    history = handle.drift_history() if handle is not None else []
    records = []
    for b, it in enumerate(items):
        row = new[b].tolist()
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        n_prompt = len(it["prompt"])
        rec = {k: v for k, v in it.items() if k != "prompt"}
        rec.update(
            prompt_tokens=n_prompt,
            new_tokens=row,
            text=decode(row) if decode is not None else None,
            seconds=seconds,
            batch_size=len(items),
            effective_sparsity=stats.get("effective_sparsity", 0.0),
            nominal_sparsity=stats.get("nominal_sparsity", 0.0),
            trace=[(s - n_prompt, sim, tau) for s, sim, tau in history[b]] if history else [],
            events=[e["step"] for e in stats.get("drift_events", []) if e["row"] == b],
        )
        if "reference" in it and rec["text"] is not None:
            rec["rouge"] = rouge_scores(rec["text"], it["reference"])
        records.append(rec)
    return records


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate_summarization(
    records: Iterable[dict[str, Any]], dense: dict[str, dict[str, Any]] | None = None
) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum against the reference, and ROUGE-L against the dense output."""
    records = list(records)
    out = {
        k: _mean([r["rouge"][k] for r in records])
        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    if dense:
        vs = [
            rouge_scores(r["text"], dense[r["id"]]["text"])["rougeL"]
            for r in records
            if r["id"] in dense
        ]
        out["rougeL_vs_dense"] = _mean(vs)
    out["samples"] = len(records)
    out["effective_sparsity"] = _mean([r["effective_sparsity"] for r in records])
    out["new_tokens"] = _mean([len(r["new_tokens"]) for r in records])
    out["retraces_per_document"] = _mean([len(r.get("events", [])) for r in records])
    return out


def _halves(tokens: list[int], half: int) -> tuple[list[int], list[int]]:
    return tokens[:half], tokens[half:]


def aggregate_drift(
    records: Iterable[dict[str, Any]], dense: dict[str, dict[str, Any]], decode
) -> dict[str, float]:
    """Agreement with the dense output per topic: the first half of the dense output's tokens
    (topic A) and the second half (topic B); token agreement = share of positions whose token
    equals dense's; ROUGE-L of the decoded halves against dense's halves; re-traces."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in records:
        per["retraces"].append(len(r["events"]))
        per["effective_sparsity"].append(r["effective_sparsity"])
        d = dense.get(r["id"])
        if d is None:
            continue
        half = len(d["new_tokens"]) // 2
        for name, dt, at in zip(
            ("first", "second"),
            _halves(d["new_tokens"], half),
            _halves(r["new_tokens"], half),
            strict=True,
        ):
            if not dt:
                continue
            offset = 0 if name == "first" else half
            agree = sum(
                1
                for i, t in enumerate(dt)
                if i + offset < len(r["new_tokens"]) and r["new_tokens"][i + offset] == t
            )
            per[f"token_agreement_{name}"].append(agree / len(dt))
            per[f"rougeL_vs_dense_{name}"].append(rouge_scores(decode(at), decode(dt))["rougeL"])
    out = {k: _mean(v) for k, v in per.items()}
    out["samples"] = len(per["retraces"])
    return out
