"""Streaming evaluation (dart.evaluate.stream, `dart eval stream`): documents cut from texts,
teacher-forced decoding through the cache against a full forward, sparsity accounting, paired
bootstrap differences, and an interrupted CLI run that resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import save_tiny, tiny_tokenizer
from tiny_models import tiny_model

from dart.cli import main
from dart.core.config import DARTConfig
from dart.evaluate import RecordStore
from dart.evaluate.arms import attach_arm
from dart.evaluate.stream import (
    aggregate_stream,
    paired_difference,
    paired_metrics,
    score_stream,
    stream_items,
    text_blocks,
    weight_bytes,
)
from dart.lightning import StopAfter
from dart.report import load_metrics

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_text(path, docs: int, length: int, offset: int = 0):
    """``docs`` paragraphs of ``length`` characters (one token each with the tiny tokenizer),
    each from its own letter so that a block's document can be told from its tokens."""
    paras = [LETTERS[(i + offset) % 26] * length for i in range(docs)]
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


def _letter(tok, ids):
    return set(tok.decode(ids))


def test_text_blocks_first_blocks_of_every_document_then_second_ones():
    tok = tiny_tokenizer()
    docs = ["a" * 25, "b" * 9, "c" * 10, "d" * 30]
    blocks = text_blocks(tok, docs, 10, 5)
    assert [_letter(tok, b) for b in blocks] == [{"a"}, {"c"}, {"d"}, {"a"}, {"d"}]
    assert all(len(b) == 10 for b in blocks)
    with pytest.raises(ValueError, match="6 blocks of 10 tokens .* fewer than the 7 needed"):
        text_blocks(tok, docs, 10, 7)


def test_stream_items_same_text_switch_and_other_text(tmp_path):
    tok = tiny_tokenizer()
    a = _write_text(tmp_path / "a.txt", docs=6, length=40)
    b = _write_text(tmp_path / "b.txt", docs=3, length=40, offset=10)
    same = stream_items(tok, 8, 6, 3, text_file=str(a), split="all")
    assert [it["id"] for it in same] == ["d0000", "d0001", "d0002"]
    for it in same:  # the document goes on: prompt and continuation from one paragraph
        assert len(it["prompt"]) == 8 and len(it["continuation"]) == 7
        assert _letter(tok, it["prompt"]) == _letter(tok, it["continuation"])
    switched = stream_items(tok, 8, 6, 3, text_file=str(a), split="all", switch_text_file=str(a))
    for it in switched:  # a switch inside one text: the continuation from another document
        assert _letter(tok, it["prompt"]) != _letter(tok, it["continuation"])
    other = stream_items(tok, 8, 6, 3, text_file=str(a), split="all", switch_text_file=str(b))
    assert [_letter(tok, it["continuation"]) for it in other] == [{"k"}, {"l"}, {"m"}]
    with pytest.raises(ValueError, match="must be at least 1"):
        stream_items(tok, 0, 6, 3, text_file=str(a))
    with pytest.raises(ValueError, match="15 blocks of 7 tokens .* fewer than the 30 needed"):
        stream_items(tok, 8, 6, 30, text_file=str(a), split="all", switch_text_file=str(b))


def test_packaged_corpus_calibration_and_eval_streams_differ():
    tok = tiny_tokenizer()
    cal = stream_items(tok, 16, 8, 2, corpus="tiny", split="calibration")
    ev = stream_items(tok, 16, 8, 2, corpus="tiny", split="eval")
    assert cal[0]["prompt"] != ev[0]["prompt"]


def test_dense_stream_equals_the_full_forward():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (1, 20), generator=g)
    prompt, cont = ids[0, :8].tolist(), ids[0, 8:].tolist()
    r = score_stream(model, prompt, cont)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    nll = F.cross_entropy(logits[8:-1], ids[0, 9:], reduction="none")
    assert r["tokens"] == 11 and r["sparse_tokens"] == 0
    assert r["token_nll"] == pytest.approx(nll.tolist(), abs=1e-4)
    assert r["nll"] == pytest.approx(float(nll.sum()), abs=1e-3)
    assert r["retraces"] == 0 and r["effective_sparsity"] == 0.0
    assert r["dense_token_computations_per_token"] == 1.0


def _linear_bytes(model) -> float:
    """Every nn.Linear weight (the tiny Llama's input embedding is untied: a lookup)."""
    return float(
        sum(
            m.weight.numel() * m.weight.element_size()
            for m in model.modules()
            if isinstance(m, torch.nn.Linear)
        )
    )


def test_frozen_griffin_masks_run_every_decode_pass_sparse():
    model = tiny_model("llama")
    handle = attach_arm(model, DARTConfig(method="griffin", total_prune=0.5))
    try:
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(3, 96, (20,), generator=g).tolist()
        r = score_stream(model, ids[:8], ids[8:], handle)
        total, per_neuron = weight_bytes(model, handle)
    finally:
        handle.detach()
    assert r["sparse_tokens"] == r["tokens"] == 11 and r["retraces"] == 0
    assert r["nll_sparse"] == pytest.approx(r["nll"])
    assert r["effective_sparsity"] == pytest.approx(0.5)
    assert total == _linear_bytes(model)
    assert per_neuron == [3 * 32 * 4] * 3  # gate, up and down rows of one neuron, fp32
    skipped = 3 * 32 * (3 * 32 * 4)  # half of the 64 neurons of 3 layers
    assert r["weight_bytes_sparsity"] == pytest.approx(skipped / total)
    assert r["dense_token_computations_per_token"] == 0.0


def test_drift_retraces_are_counted_and_their_passes_run_dense():
    model = tiny_model("llama")
    drift = {
        "window": 2,
        "sigma_scale": 0.0,
        "threshold_floor": 0.0,
        "pressure_trigger": 1,
        "retrace": "lookback",
    }
    handle = attach_arm(model, DARTConfig(method="dart", total_prune=0.5, drift=drift))
    try:
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(3, 96, (60,), generator=g).tolist()
        r = score_stream(model, ids[:10], ids[10:], handle)
        again = score_stream(model, ids[:10], ids[10:], handle)  # a document starts afresh
    finally:
        handle.detach()
    assert r["retraces"] >= 1 and len(r["events"]) == r["retraces"]
    assert r["sparse_tokens"] < r["tokens"] == 49
    if "dense_token_computations_per_token" not in handle.stats():
        dense = (r["tokens"] - r["sparse_tokens"]) / r["tokens"]
        assert r["dense_token_computations_per_token"] == pytest.approx(dense)
    assert r["effective_sparsity"] < 0.5
    # bytes read: sparse passes skip the pruned rows, a re-trace pass reads everything once
    # (the tiny model's layers have equal widths and neuron sizes: pruned rows = nominal share)
    skipped = r["nominal_sparsity"] * 3 * 64 * (3 * 32 * 4) / _linear_bytes(model)
    assert r["weight_bytes_sparsity"] == pytest.approx(r["sparse_tokens"] / r["tokens"] * skipped)
    assert r["trace"] and all(len(t) == 3 for t in r["trace"])
    assert again["token_nll"] == pytest.approx(r["token_nll"], abs=1e-5)
    assert again["retraces"] == r["retraces"]


def test_paired_difference_bootstrap_interval():
    const = paired_difference([0.3] * 10)
    assert const["mean"] == pytest.approx(0.3)
    assert const["ci_low"] == pytest.approx(0.3) and const["ci_high"] == pytest.approx(0.3)
    assert const["excludes_zero"] == 1.0 and const["n"] == 10
    noisy = paired_difference([1.0, -1.0] * 10, seed=1)
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["excludes_zero"] == 0.0
    assert paired_difference([1.0, -1.0] * 10, seed=1) == noisy  # seeded
    shifted = paired_difference([x + 3.0 for x in [1.0, -1.0] * 10])
    assert shifted["ci_low"] > 0 and shifted["excludes_zero"] == 1.0
    with pytest.raises(ValueError, match="no pairs"):
        paired_difference([])


def _rec(i, nll, tokens=4, sparse=4, retraces=0):
    return {"id": f"d{i}", "nll": nll, "tokens": tokens, "sparse_tokens": sparse,
            "nll_sparse": nll * sparse / tokens, "retraces": retraces,
            "dense_token_computations_per_token": (tokens - sparse) / tokens,
            "weight_bytes_sparsity": 0.3}  # fmt: skip


def test_aggregate_and_paired_metrics():
    arm = [_rec(0, 8.0, sparse=2, retraces=1), _rec(1, 4.0)]
    base = [_rec(0, 4.0), _rec(1, 4.0), _rec(2, 100.0)]
    m = aggregate_stream(arm, {r["id"]: r for r in base})
    assert m["nll_per_token"] == pytest.approx(12.0 / 8)
    assert m["perplexity"] == pytest.approx(math.exp(1.5))
    assert m["nll_per_sparse_token"] == pytest.approx((4.0 + 4.0) / 6)
    assert m["retraces"] == 0.5 and m["retraces_per_200_tokens"] == pytest.approx(25.0)
    assert m["dense_token_computations_per_token"] == pytest.approx(0.25)
    assert m["nll_minus_dense"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2, document d2 unpaired
    assert m["nll_minus_dense_n"] == 2
    assert paired_metrics(arm, [_rec(9, 1.0)], "x") == {}


def test_cli_stream_switch_resumes_and_pairs_with_dense(tmp_path):
    folder = save_tiny(tmp_path / "model")
    a = _write_text(tmp_path / "a.txt", docs=3, length=30)
    b = _write_text(tmp_path / "b.txt", docs=3, length=30, offset=5)
    argv = ["eval", "stream", "--model", str(folder), "--methods", "dense,griffin,dart",
            "--total-prune", "0.5", "--text-file", str(a), "--switch-text-file", str(b),
            "--split", "all", "--documents", "3", "--prompt-tokens", "12",
            "--continuation-tokens", "10", "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    with pytest.raises(StopAfter):
        main([*argv, "--stop-after", "2"])
    assert len(list(RecordStore(tmp_path / "out"))) == 2
    assert main(argv) == 0
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 9  # 3 documents x 3 arms, none twice
    metrics = {(m["method"], m["metric"]): m["value"] for m in load_metrics(tmp_path / "out")}
    assert metrics[("dense", "retraces")] == 0
    assert ("griffin", "nll_minus_dense_ci_low") in metrics
    assert metrics[("griffin", "effective_sparsity")] == pytest.approx(0.5)
    rec = json.loads(lines[0])
    assert rec["tokens"] == 10 and len(rec["token_nll"]) == 10
