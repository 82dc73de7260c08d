"""Batch masks: the policies' records are judged against dense and paired per prompt."""

from __future__ import annotations

import math

import pytest
from tiny_assets import tiny_tokenizer
from tiny_models import random_ids, tiny_model

from dart import DARTConfig
from dart.evaluate.batch_masks import compare_policies, dense_judge, generate_all, policy_records


def _items(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": random_ids(1, 6 + i, i)[0].tolist()} for i in range(n)]


def test_dense_judge_is_the_teacher_forced_perplexity():
    model = tiny_model("llama")
    prompt, new = [3, 5, 7, 9], [11, 2, 4]
    ids = prompt + new
    logits = model(input_ids=__import__("torch").tensor([ids])).logits[0].float()
    nll = -sum(logits[i].log_softmax(-1)[ids[i + 1]].item() for i in range(3, 6)) / 3
    assert dense_judge(model, prompt, new) == pytest.approx(math.exp(nll), rel=1e-5)
    assert math.isnan(dense_judge(model, prompt, []))


def test_policies_agree_at_batch_one_and_differ_in_a_batch():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = _items(4)
    dense = {r["id"]: r for r in generate_all(model, tok, items, 1, 8)}
    recs = {}
    for policy in ("per_sequence", "shared"):
        cfg = DARTConfig(layer_topk="all:0.3", batch_policy=policy, drift={"window": 2})
        recs[policy, 1] = policy_records(model, tok, items, cfg, 1, 8, dense)
        recs[policy, 4] = policy_records(model, tok, items, cfg, 4, 8, dense)
    # one row per batch: one mask either way, so the outputs are the same
    assert [r["new_tokens"] for r in recs["shared", 1]] == [
        r["new_tokens"] for r in recs["per_sequence", 1]
    ]
    same = compare_policies(recs["shared", 1], recs["per_sequence", 1])
    assert all(m["diff_mean"] == 0.0 for m in same.values())
    assert set(same) == {"judge_ppl", "rougeL_vs_dense", "token_agreement"}
    # per-sequence masks at batch 4 are each row's own: the same tokens as alone
    assert [r["new_tokens"] for r in recs["per_sequence", 4]] == [
        r["new_tokens"] for r in recs["per_sequence", 1]
    ]
    shared = recs["shared", 4]
    assert [r["new_tokens"] for r in shared] != [r["new_tokens"] for r in recs["shared", 1]]
    cmp = compare_policies(shared, recs["per_sequence", 4])
    m = cmp["token_agreement"]
    assert m["diff_ci_low"] <= m["diff_mean"] <= m["diff_ci_high"]
    assert m["shared"] - m["per_sequence"] == pytest.approx(m["diff_mean"])
    # dense judged against itself: agreement 1, ROUGE-L 1
    own = policy_records(model, tok, items, DARTConfig(method="dense"), 2, 8, dense)
    assert all(r["token_agreement"] == 1.0 and r["rougeL_vs_dense"] == 1.0 for r in own)


def test_compare_policies_needs_shared_prompts():
    with pytest.raises(ValueError, match="share no prompt"):
        compare_policies([{"id": "a"}], [{"id": "b"}])
