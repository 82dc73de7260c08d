"""Batch masks: what sharing one mask over a batch costs in quality, against per-sequence masks.

With ``batch_policy='per_sequence'`` every row of a batch keeps the neurons its own prompt chose
(each row reads its own share of the FFN weights); with ``'shared'`` one set of neurons serves
every row (one read for the whole batch, chosen from the rows' pooled statistics). This module
generates the same prompts under both policies, batch by batch, and judges each generated text
against the dense model's: its perplexity under the dense model (teacher-forced after the prompt)
and its ROUGE-L against the dense output. Per prompt the two policies are paired, so the
difference (shared minus per-sequence) gets a bootstrap interval.

    records = policy_records(model, tokenizer, items, cfg, batch_size=4, max_new_tokens=64)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core.api import attach
from ..core.config import DARTConfig
from .generative import generate_batch
from .metrics import rouge_scores
from .stream import paired_difference

__all__ = ["BATCH_POLICY_METRICS", "compare_policies", "dense_judge", "policy_records"]

# per record: perplexity of the generated text under the dense model, ROUGE-L against the dense
# output (higher is better), token agreement with the dense output
BATCH_POLICY_METRICS = ("judge_ppl", "rougeL_vs_dense", "token_agreement")


def _batches(items: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _eos(tokenizer: Any) -> tuple[int, int | None]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set one")
    return pad, eos


@torch.no_grad()
def generate_all(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    batch_size: int,
    max_new_tokens: int,
    config: DARTConfig | None = None,
) -> list[dict[str, Any]]:
    """Greedy outputs of `items`, `batch_size` prompts per call; `config` attaches DART (or a
    baseline) for the calls and detaches it after; None generates dense."""
    pad, eos = _eos(tokenizer)
    handle = attach(model, config) if config is not None else None
    try:
        records = []
        for batch in _batches(items, batch_size):
            records += generate_batch(
                model, batch, max_new_tokens, pad, eos, handle=handle, decode=tokenizer.decode
            )
        return records
    finally:
        if handle is not None:
            handle.detach()


@torch.no_grad()
def dense_judge(model: torch.nn.Module, prompt: Sequence[int], new: Sequence[int]) -> float:
    """Perplexity of the tokens `new` after `prompt` under `model` (teacher-forced, one pass)."""
    if not new:
        return math.nan
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt) + list(new)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="mean")
    return math.exp(nll.item())


def policy_records(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    config: DARTConfig,
    batch_size: int,
    max_new_tokens: int,
    dense: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One record per prompt for `config` at `batch_size`: its output judged against `dense`
    (the dense records by id, from :func:`generate_all` without a config)."""
    prompts = {it["id"]: it["prompt"] for it in items}
    out = []
    for r in generate_all(model, tokenizer, items, batch_size, max_new_tokens, config):
        d = dense[r["id"]]
        agree = sum(a == b for a, b in zip(r["new_tokens"], d["new_tokens"], strict=False))
        out.append({
            "id": r["id"],
            "batch_policy": config.batch_policy,
            "total_prune": config.total_prune,
            "method": config.method,
            "batch_size": batch_size,
            "new_tokens": r["new_tokens"],
            "judge_ppl": dense_judge(model, prompts[r["id"]], r["new_tokens"]),
            "rougeL_vs_dense": rouge_scores(r["text"], d["text"])["rougeL"],
            "token_agreement": agree / max(len(d["new_tokens"]), 1),
            "effective_sparsity": r["effective_sparsity"],
            "seconds": r["seconds"],
        })  # fmt: skip
    return out


def _value(record: dict[str, Any], metric: str, log: bool) -> float:
    return math.log(record[metric]) if log else record[metric]


def compare_policies(
    shared: Sequence[dict[str, Any]], per_sequence: Sequence[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Per metric: both policies' means and the paired difference shared - per_sequence (mean,
    bootstrap interval, ``excludes_zero``) over the prompts both have. Perplexity is compared in
    log space (a ratio), so one runaway generation does not dominate the mean."""
    base = {r["id"]: r for r in per_sequence}
    pairs = [(r, base[r["id"]]) for r in shared if r["id"] in base]
    if not pairs:
        raise ValueError("compare_policies: the two record lists share no prompt id")
    out = {}
    for metric in BATCH_POLICY_METRICS:
        log = metric == "judge_ppl"
        valid = [(a, b) for a, b in pairs if math.isfinite(a[metric]) and math.isfinite(b[metric])]
        if not valid:
            continue
        diff = paired_difference(
            [_value(a, metric, log) - _value(b, metric, log) for a, b in valid]
        )
        out[metric] = {
            "shared": sum(a[metric] for a, _ in valid) / len(valid),
            "per_sequence": sum(b[metric] for _, b in valid) / len(valid),
            **{f"diff_{k}": v for k, v in diff.items()},
        }
    return out
