"""Sliding-window perplexity: windows, scoring under masks of the context, aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import tiny_tokenizer
from tiny_models import NO_DRIFT, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.evaluate import (
    aggregate_perplexity,
    perplexity,
    score_window,
    sliding_windows,
)


def _full_nll(model, ids):
    logits = model(ids[None]).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[1:], reduction="sum"))


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 32, 8), (33, 16, 16), (5, 8, 3)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = []
    windows = sliding_windows(n, window, stride)
    for i, w in enumerate(windows):
        assert w.end - w.begin <= window
        scored += list(range(w.begin + w.score_from, w.end))
        if i == 0 or stride == window:  # no overlap: the first quarter is the context
            assert w.score_from == 1 and w.prep_len == max(1, (w.end - w.begin) // 4)
        else:  # masks from the overlap = the already-seen context part
            assert w.prep_len == w.score_from
    if stride < window:
        assert scored == list(range(1, n))
    else:  # disjoint windows: a window's first token has no context and is not scored
        assert scored == [t for t in range(n) if t % window]
    assert sum(w.tokens for w in windows) == len(scored)


def test_sliding_windows_bad_arguments():
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError):
        sliding_windows(1, 4, 2)


def test_dense_perplexity_one_window_matches_full_sequence():
    model, ids = tiny_model("llama"), random_ids(1, 40, 0)[0]
    with torch.no_grad():
        ref = _full_nll(model, ids)
    res = perplexity(model, ids, window=64, stride=32)
    assert res["tokens"] == 39 and res["windows"] == 1
    assert res["perplexity"] == pytest.approx(math.exp(ref / 39), rel=1e-5)


def test_dense_perplexity_disjoint_windows_sum_chunks():
    model, ids = tiny_model("llama"), random_ids(1, 48, 0)[0]
    with torch.no_grad():
        nll = _full_nll(model, ids[:16])
        for b in (16, 32):  # later chunks: every token scored, the first predicted from none
            logits = model(ids[b - 0 : b + 16][None]).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[b + 1 : b + 16], reduction="sum"))
    res = perplexity(model, ids, window=16, stride=16)
    # stride == window: each later window scores tokens 1.. of itself (the first has no context)
    assert res["tokens"] == 45
    assert res["nll_per_token"] == pytest.approx(nll / 45, rel=1e-5)


def test_dart_window_is_scored_under_masks_of_its_context():
    model, ids = tiny_model("llama"), random_ids(1, 24, 1)[0]
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift=NO_DRIFT))
    got = score_window(model, ids, score_from=12, prep_len=12, handle=handle)
    handle.prepare(ids[None, :12])
    with handle.hold(), torch.no_grad():
        logits = model(ids[None]).logits[0, 11:-1]
    handle.detach()
    want = float(F.cross_entropy(logits, ids[12:], reduction="sum"))
    assert got["tokens"] == 12 and got["nll"] == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        dense = float(F.cross_entropy(model(ids[None]).logits[0, 11:-1], ids[12:], reduction="sum"))
    assert abs(dense - got["nll"]) > 1e-3  # pruning changed something


def test_aggregate_perplexity_sums_not_averages():
    recs = [{"nll": 10.0, "tokens": 10}, {"nll": 30.0, "tokens": 5}]
    assert aggregate_perplexity(recs)["perplexity"] == pytest.approx(math.exp(40 / 15))


def test_tokenize_prefix_equals_full_tokenisation():
    from dart.assets.data import load_text, tokenize_corpus
    from dart.evaluate.perplexity import tokenize_prefix

    tok, text = tiny_tokenizer(), load_text("tiny", split="calibration")[:20000]
    for n in (10, 3000, None):
        assert torch.equal(tokenize_prefix(tok, text, n), tokenize_corpus(tok, text, n))
