"""Multiple-choice log-likelihood scoring (MMLU) without answer leakage.

Protocol: the masks are built from the context (the prompt) only, ``handle.prepare(context)``;
then under ``handle.hold()`` the context plus each continuation is scored. With single-token
continuations (MMLU's `` A``..`` D``) one forward of the context suffices: each choice's
log-likelihood is read at the last context position. ``leaky=True`` reproduces the reference
code's protocol for comparison: masks are rebuilt from context + choice for every choice.
Methods that do not select from the prompt (``dense``, ``static``) need no preparation (no masks
or frozen calibration masks).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..assets.data import MMLU_CONTINUATIONS, format_mmlu_prompt, sample_mmlu
from ..core.api import DARTHandle
from .perplexity import accepts_logits_to_keep

__all__ = ["aggregate_accuracy", "mmlu_items", "score_choices"]


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def mmlu_items(
    tokenizer: Any,
    shots: int = 5,
    limit: int | None = None,
    n_per_subject: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | None = None,
    split: str = "test",
) -> list[dict[str, Any]]:
    """MMLU questions as token ids: ``id``, ``subject``, ``context``, ``choices``, ``answer``."""
    conts = [_encode(tokenizer, c, False) for c in MMLU_CONTINUATIONS]
    items = []
    for q, shot_list in sample_mmlu(n_per_subject, limit, seed, subjects, shots, split):
        prompt = format_mmlu_prompt(q, shot_list)
        items.append(
            {
                "id": f"mmlu{q.index}",
                "subject": q.subject,
                "context": _encode(tokenizer, prompt, True),
                "choices": conts,
                "answer": q.answer,
            }
        )
    return items


def _logprob_of(logits: torch.Tensor, start: int, cont: Sequence[int]) -> float:
    """Sum of log p(cont) where ``logits[start + j]`` predicts ``cont[j]``."""
    lp = F.log_softmax(logits[start : start + len(cont)].float(), dim=-1)
    idx = torch.tensor(cont, device=lp.device)
    return float(lp.gather(1, idx[:, None]).sum())


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    context: Sequence[int],
    choices: Sequence[Sequence[int]],
    handle: DARTHandle | None = None,
    leaky: bool = False,
) -> list[float]:
    """Log-likelihood of each continuation after ``context`` (masks: see module doc)."""
    device = next(model.parameters()).device
    ctx = torch.tensor([list(context)], device=device)
    n = ctx.shape[1]
    prepared = handle is not None and handle.method.selects_from_prompt

    def run(ids: torch.Tensor, last: int = 0) -> torch.Tensor:
        kw = {"logits_to_keep": last} if last and accepts_logits_to_keep(model) else {}
        return model(input_ids=ids, use_cache=False, **kw).logits[0]

    if leaky and prepared:
        out = []
        for c in choices:
            full = torch.cat([ctx, torch.tensor([list(c)], device=device)], 1)
            handle.prepare(full)
            with handle.hold():
                out.append(_logprob_of(run(full), n - 1, c))
        return out
    if prepared:
        handle.prepare(ctx)
    hold = handle.hold() if prepared else _null()
    with hold:
        if all(len(c) == 1 for c in choices):
            lp = F.log_softmax(run(ctx, last=1)[-1].float(), dim=-1)
            return [float(lp[c[0]]) for c in choices]
        out = []
        for c in choices:
            full = torch.cat([ctx, torch.tensor([list(c)], device=device)], 1)
            out.append(_logprob_of(run(full), n - 1, c))
        return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def aggregate_accuracy(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Micro (all questions) and macro (mean over subjects) accuracy."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        per[r["subject"]][0] += int(r["correct"])
        per[r["subject"]][1] += 1
    total = sum(n for _, n in per.values())
    correct = sum(c for c, _ in per.values())
    return {
        "acc_micro": correct / total if total else float("nan"),
        "acc_macro": sum(c / n for c, n in per.values()) / len(per) if per else float("nan"),
        "questions": total,
        "subjects": len(per),
    }
