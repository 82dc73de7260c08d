"""Plain evaluation functions: windows, perplexity, multiple choice, generation, records."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import tiny_tokenizer
from tiny_models import tiny_model

import dart
from dart import DARTConfig
from dart.evaluate import (
    Arm,
    RecordStore,
    aggregate_accuracy,
    aggregate_perplexity,
    arm_config,
    attach_arm,
    generate_batch,
    mmlu_items,
    parse_arms,
    perplexity,
    score_choices,
    score_window,
    sliding_windows,
)
from dart.fast import FastGenerator
from dart.report import load_metrics, markdown_table, plot_metric_vs_sparsity
from dart.results import write_json

NO_DRIFT = {"enabled": False}


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed))


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


def _full_nll(model, ids):
    logits = model(ids[None]).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[1:], reduction="sum"))


def test_dense_perplexity_one_window_matches_full_sequence():
    model, ids = tiny_model("llama"), _ids(40)
    with torch.no_grad():
        ref = _full_nll(model, ids)
    res = perplexity(model, ids, window=64, stride=32)
    assert res["tokens"] == 39 and res["windows"] == 1
    assert res["perplexity"] == pytest.approx(math.exp(ref / 39), rel=1e-5)


def test_dense_perplexity_disjoint_windows_sum_chunks():
    model, ids = tiny_model("llama"), _ids(48)
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
    model, ids = tiny_model("llama"), _ids(24, seed=1)
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


def test_choices_single_token_fast_path_equals_full_scoring():
    model = tiny_model("llama")
    ctx = _ids(12, seed=2).tolist()
    choices = [[5], [6], [7], [8]]
    fast = score_choices(model, ctx, choices)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ctx])).logits[0, -1], -1)
    assert fast == pytest.approx([float(lp[c[0]]) for c in choices], rel=1e-5)
    multi = score_choices(model, ctx, [[5, 9], [6, 9]])
    with torch.no_grad():
        full = torch.tensor([[*ctx, 5, 9]])
        lps = F.log_softmax(model(full).logits[0], -1)
    assert multi[0] == pytest.approx(float(lps[11, 5] + lps[12, 9]), rel=1e-5)


def test_choices_masks_from_context_only_and_leaky_switch():
    model = tiny_model("llama")
    ctx = _ids(12, seed=3).tolist()
    choices = [[5, 9], [6, 10]]
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift=NO_DRIFT))
    clean = score_choices(model, ctx, choices, handle)
    # reproduce by hand: masks from the context, then the answer under them
    handle.prepare(torch.tensor([ctx]))
    with handle.hold(), torch.no_grad():
        lps = F.log_softmax(model(torch.tensor([[*ctx, 5, 9]])).logits[0], -1)
    assert clean[0] == pytest.approx(float(lps[11, 5] + lps[12, 9]), rel=1e-5)
    leaky = score_choices(model, ctx, choices, handle, leaky=True)
    handle.detach()
    assert leaky != pytest.approx(clean, rel=1e-6)


def test_static_choices_use_calibration_masks():
    model = tiny_model("llama")
    handle = attach_arm(model, arm_config(Arm("static", 0.5)), _ids(32)[None])  # all:auto
    got = score_choices(model, _ids(10).tolist(), [[5], [6]], handle)
    handle.detach()
    dense = score_choices(model, _ids(10).tolist(), [[5], [6]])
    assert got != pytest.approx(dense, rel=1e-6)


def test_aggregate_accuracy_macro_and_micro():
    recs = [
        {"subject": "a", "correct": 1},
        {"subject": "a", "correct": 1},
        {"subject": "a", "correct": 0},
        {"subject": "a", "correct": 1},
        {"subject": "b", "correct": 0},
    ]
    acc = aggregate_accuracy(recs)
    assert acc["acc_micro"] == pytest.approx(3 / 5)
    assert acc["acc_macro"] == pytest.approx((3 / 4 + 0) / 2)
    assert acc["subjects"] == 2


def test_mmlu_items_are_seeded_and_token_ids():
    tok = tiny_tokenizer()
    a = mmlu_items(tok, shots=0, limit=5, seed=1)
    b = mmlu_items(tok, shots=0, limit=5, seed=1)
    assert [x["id"] for x in a] == [x["id"] for x in b] and len(a) == 5
    assert all(len(x["choices"]) == 4 and 0 <= x["answer"] < 4 for x in a)
    assert tok.decode(a[0]["context"]).endswith("Answer:")


def test_parse_arms():
    arms = parse_arms("dense,static,dart", "0.5,0.7", "100")
    labels = [(a.label, a.total_prune) for a in arms]
    assert labels == [
        ("dense", 0.0),
        ("static", 0.5),
        ("static", 0.7),
        ("dart", 0.5),
        ("dart-r100", 0.5),
        ("dart", 0.7),
        ("dart-r100", 0.7),
    ]
    with pytest.raises(ValueError, match="unknown methods"):
        parse_arms("dense,foo", "0.5")
    with pytest.raises(ValueError):
        parse_arms("dart", "1.5")
    assert arm_config(Arm("dart", 0.5)).drift.enabled
    assert not arm_config(Arm("dart-nodrift", 0.5)).drift.enabled
    assert arm_config(Arm("dart", 0.7, 100)).release_step == 100
    assert arm_config(Arm("griffin", 0.5), {"backend": "masked"}).backend == "masked"


def test_generate_batch_records_with_padding():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [{"id": "a", "prompt": _ids(6).tolist()}, {"id": "b", "prompt": _ids(10, 1).tolist()}]
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    recs = generate_batch(model, items, 6, 0, None, handle, decode=tok.decode)
    stats = handle.stats()
    handle.detach()
    assert [r["id"] for r in recs] == ["a", "b"]
    assert all(len(r["new_tokens"]) == 6 and isinstance(r["text"], str) for r in recs)
    assert recs[1]["prompt_tokens"] == 10 and stats["sequences"] == 2
    # alone, sequence "a" generates the same tokens (per-sequence masks, padding excluded)
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    alone = generate_batch(model, items[:1], 6, 0, None, handle)
    handle.detach()
    assert alone[0]["new_tokens"] == recs[0]["new_tokens"]
    assert recs[0]["trace"] and all(len(t) == 3 for t in recs[0]["trace"])


def test_generate_batch_in_the_fast_loop_equals_hf_generate():
    model = tiny_model("llama")
    items = [{"id": "a", "prompt": _ids(6).tolist()}, {"id": "b", "prompt": _ids(10, 1).tolist()}]
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 2})
    handle = dart.attach(model, cfg)
    ref = generate_batch(model, items, 12, 0, None, handle)
    handle.detach()
    handle = dart.attach(model, cfg)
    fast = FastGenerator(model, handle, max_len=32, compile=False)
    recs = generate_batch(model, items, 12, 0, None, handle, fast=fast)
    handle.detach()
    assert any(r["events"] for r in ref), "the test needs a drift re-trace"
    for r, f in zip(ref, recs, strict=True):
        assert (f["new_tokens"], f["events"]) == (r["new_tokens"], r["events"])
        # similarities agree up to float rounding (static vs dynamic KV cache attention)
        flat = [torch.tensor(rec["trace"], dtype=torch.float64) for rec in (f, r)]
        torch.testing.assert_close(*flat, rtol=0, atol=1e-5)


def test_record_store_resume_and_torn_line(tmp_path):
    store = RecordStore(tmp_path)
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x1", "v": 1}])
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x2", "v": 2}], rank=1)
    with open(store.path(), "a") as f:
        f.write('{"method": "dart", "total_prune": 0.5, "id": "x3", "v"')  # torn write
    assert store.done() == {("dart", 0.5, "x1"), ("dart", 0.5, "x2")}
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x3", "v": 3}])
    assert {r["id"] for r in store} == {"x1", "x2", "x3"}
    assert len(store.records(method="dart", total_prune=0.5)) == 3
    lines = store.path().read_text().splitlines()
    assert json.loads(lines[-1])["id"] == "x3"


def test_metrics_schema_table_and_plot(tmp_path):
    metrics = [
        {
            "task": "ppl",
            "method": "dense",
            "total_prune": 0.0,
            "metric": "perplexity",
            "value": 9.0,
        },
        {
            "task": "ppl",
            "method": "dart",
            "total_prune": 0.5,
            "metric": "perplexity",
            "value": 12.0,
        },
        {
            "task": "ppl",
            "method": "dart",
            "total_prune": 0.7,
            "metric": "perplexity",
            "value": 20.0,
        },
    ]
    write_json(tmp_path / "metrics.json", metrics)
    assert load_metrics(tmp_path) == metrics
    table = markdown_table(metrics)
    assert "| ppl | dart | 0.50 | 12 |" in table
    assert plot_metric_vs_sparsity(tmp_path / "p.png", metrics, "perplexity").stat().st_size > 0
    write_json(tmp_path / "metrics.json", [{"method": "dart"}])
    with pytest.raises(ValueError, match="lacks"):
        load_metrics(tmp_path)


def test_tokenize_prefix_equals_full_tokenisation():
    from dart.data import load_text, tokenize_corpus
    from dart.evaluate.perplexity import tokenize_prefix

    tok, text = tiny_tokenizer(), load_text("tiny", split="calibration")[:20000]
    for n in (10, 3000, None):
        assert torch.equal(tokenize_prefix(tok, text, n), tokenize_corpus(tok, text, n))
