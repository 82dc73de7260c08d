"""dart.evaluate.metrics: one ROUGE for text and token ids (the study's token ROUGE-L gives the
values of its former LCS F1), and the repeated n-gram share."""

from __future__ import annotations

import random

import pytest

from dart.evaluate.metrics import repeated_ngrams, rouge_scores


def lcs_f1(a: list[int], b: list[int]) -> float:
    """The study's former token ROUGE-L (scripts/study.py before the move), as the reference."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return 2.0 * prev[-1] / (len(a) + len(b))


def test_text_rouge():
    s = "The cat sat on the mat. It was happy."
    assert rouge_scores(s, s) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}
    )
    assert all(v == 0.0 for v in rouge_scores("alpha beta", "gamma delta").values())
    partial = rouge_scores("the cat sat", "the cat ran away")
    # stemmed words: "the cat" is common; P = 2/3, R = 2/4
    assert partial["rouge1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert partial["rougeL"] == pytest.approx(partial["rouge1"])


def test_token_id_rouge_l_is_the_former_lcs_f1():
    fixed = [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
        ([1, 2, 3, 4], [5, 6, 7, 8], 0.0),
        ([1, 9, 2, 3], [1, 2, 3, 7], 2 * 3 / 8),
        ([], [1], 0.0),
        ([1], [], 0.0),
        ([7, 7, 7], [7], 2 * 1 / 4),
    ]
    for a, b, want in fixed:
        got = rouge_scores(a, b)
        assert set(got) == {"rouge1", "rouge2", "rougeL"}  # no sentences in ids: no Lsum
        assert got["rougeL"] == pytest.approx(want, abs=1e-15)
        assert got["rougeL"] == pytest.approx(lcs_f1(a, b), abs=1e-15)
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        # same LCS, F = 2PR/(P+R) against 2 LCS/(|a|+|b|): equal up to rounding
        assert rouge_scores(a, b)["rougeL"] == pytest.approx(lcs_f1(a, b), rel=1e-12, abs=0)
    # token ROUGE-1/2 are n-gram overlaps of the ids
    assert rouge_scores([1, 2, 3], [1, 2, 4])["rouge1"] == pytest.approx(2 / 3)
    assert rouge_scores([1, 2, 3], [1, 2, 4])["rouge2"] == pytest.approx(1 / 2)


def test_rouge_refuses_mixed_or_bad_arguments():
    with pytest.raises(TypeError, match="both be text or both ids"):
        rouge_scores("a b", [1, 2])
    with pytest.raises(TypeError, match="prediction must be a str or a sequence of int"):
        rouge_scores([1.5, 2.0], [1, 2])
    with pytest.raises(TypeError, match="reference"):
        rouge_scores([1, 2], None)


def test_repeated_ngrams():
    assert repeated_ngrams([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngrams([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)
    assert repeated_ngrams([1, 2]) == 0.0
    assert repeated_ngrams([5, 5, 5], n=1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="n must be at least 1"):
        repeated_ngrams([1, 2], n=0)
