"""Text and token metrics shared by every evaluation: ROUGE (one implementation, on text or on
token ids) and the repetition share of a generated sequence.

ROUGE is the ``rouge_score`` package's scorer in both cases, so ROUGE-L "against the dense
output" means the same longest-common-subsequence F-measure whether it compares decoded text
(the summarisation and drift tasks) or token ids (the tuning study's greedy continuations).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = ["repeated_ngrams", "rouge_scores"]

TEXT_ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# token ids carry no sentence boundaries, so there is no summary-level (Lsum) variant
ID_ROUGE = ("rouge1", "rouge2", "rougeL")
_SENT_RE = re.compile(r"(?<=[.!?])\s+")


class _Ids:
    """A ``rouge_score`` tokenizer for sequences that are already tokens (ids): as they are."""

    def tokenize(self, tokens: Sequence[int]) -> list[int]:
        return list(tokens)


@lru_cache(maxsize=2)
def _scorer(ids: bool) -> Any:
    from rouge_score import rouge_scorer

    if ids:
        return rouge_scorer.RougeScorer(list(ID_ROUGE), tokenizer=_Ids())
    return rouge_scorer.RougeScorer(list(TEXT_ROUGE), use_stemmer=True)


def _sentence_lines(text: str) -> str:
    return "\n".join(s for s in _SENT_RE.split(text.strip()) if s)


def _is_ids(value: Any, name: str) -> bool:
    if isinstance(value, str):
        return False
    if isinstance(value, Sequence) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return True
    raise TypeError(f"rouge_scores: {name} must be a str or a sequence of int token ids, "
                    f"not {type(value).__name__}")  # fmt: skip


def rouge_scores(
    prediction: str | Sequence[int], reference: str | Sequence[int]
) -> dict[str, float]:
    """ROUGE F-measures of ``prediction`` against ``reference``. On text: ROUGE-1/2/L/Lsum,
    stemmed, Lsum with sentences split onto lines first. On token ids (both arguments lists of
    ints): ROUGE-1/2/L over the ids as they are (ROUGE-L = 2 LCS / (len a + len b)); an empty
    sequence scores 0."""
    ids = _is_ids(prediction, "prediction")
    if ids != _is_ids(reference, "reference"):
        raise TypeError("rouge_scores: prediction and reference must both be text or both ids")
    if ids:
        scores = _scorer(True).score(list(reference), list(prediction))
    else:
        scores = _scorer(False).score(_sentence_lines(reference), _sentence_lines(prediction))
    return {k: float(v.fmeasure) for k, v in scores.items()}


def repeated_ngrams(tokens: Sequence[int], n: int = 4) -> float:
    """Share of the ``n``-grams of ``tokens`` that already occurred earlier in it (0: no loop;
    too short for one n-gram: 0)."""
    if n < 1:
        raise ValueError(f"repeated_ngrams: n must be at least 1, got {n}")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)
