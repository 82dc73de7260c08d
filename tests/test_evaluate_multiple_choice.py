"""Multiple-choice scoring (MMLU): masks from the context only, the leaky switch, accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_assets import tiny_tokenizer
from tiny_models import NO_DRIFT, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.evaluate import (
    Arm,
    aggregate_accuracy,
    arm_config,
    attach_arm,
    mmlu_items,
    score_choices,
)


def test_choices_single_token_fast_path_equals_full_scoring():
    model = tiny_model("llama")
    ctx = random_ids(1, 12, 2)[0].tolist()
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
    ctx = random_ids(1, 12, 3)[0].tolist()
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
    handle = attach_arm(model, arm_config(Arm("static", 0.5)), random_ids(1, 32, 0))
    got = score_choices(model, random_ids(1, 10, 0)[0].tolist(), [[5], [6]], handle)
    handle.detach()
    dense = score_choices(model, random_ids(1, 10, 0)[0].tolist(), [[5], [6]])
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
