"""The task registry: every task declares its options, items, step and aggregation; metrics
come from the per-sample records and carry the sparsity that ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_assets import tiny_tokenizer
from tiny_models import tiny_model

from dart import DARTConfig
from dart.evaluate import Arm, attach_arm
from dart.evaluate.tasks import (
    TASKS,
    GenerateOptions,
    PerplexityOptions,
    StepContext,
    compute_metrics,
    get_task,
    prompt_texts,
)


def test_every_task_declares_documented_options():
    assert set(TASKS) == {"ppl", "mmlu", "summarize", "drift", "stream", "generate"}
    for task in TASKS.values():
        options = task.options()  # every option has a default
        for f in dataclasses.fields(options):
            assert f.metadata.get("help"), f"{task.name}.{f.name} has no help text"
        assert task.batch_size(options) >= 1
        assert task.main_metric is None or isinstance(task.main_metric, str)
    with pytest.raises(ValueError, match="unknown task 'pp'; accepted: ppl, mmlu"):
        get_task("pp")


def test_ppl_items_and_step_record_the_sparsity_that_ran():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    task = TASKS["ppl"]
    options = PerplexityOptions(corpus="tiny", window=32, stride=16, max_tokens=80)
    items = task.items(tok, options, 0)
    assert [it["id"] for it in items] == [f"w{i:05d}" for i in range(4)]  # 80 tokens: 4 windows
    assert all(len(it["ids"]) == it["end"] - it["begin"] <= 32 for it in items)
    handle = attach_arm(model, DARTConfig(layer_topk="all:0.25", drift={"enabled": False}))
    try:
        (rec,) = task.step.run(StepContext(model, handle, tok, options), items[:1])
    finally:
        handle.detach()
    assert rec["id"] == items[0]["id"] and rec["tokens"] > 0
    assert rec["nominal_sparsity"] == pytest.approx(0.75, abs=0.02)
    assert "effective_sparsity" not in rec  # counted over decode passes: a window has none
    (dense,) = task.step.run(StepContext(model, None, tok, options), items[:1])
    assert dense["nominal_sparsity"] == 0.0 and dense["nll"] != pytest.approx(rec["nll"])


def test_arms_of_a_task():
    drift = TASKS["drift"]
    arms = drift.arms(["static", "dart"], [0.5], drift.options(release_steps=[6]))
    assert arms[0] == Arm.reference()  # agreement is measured against dense: it always runs
    assert [a.label for a in arms] == ["dense", "static", "dart", "dart-r6"]
    ppl = TASKS["ppl"]
    assert [a.label for a in ppl.arms(["dart"], [0.5, 0.7], ppl.options())] == ["dart", "dart"]


def _rec(method, prune, ident, tokens, **kw):
    return {"method": method, "total_prune": prune, "id": ident, "new_tokens": tokens, **kw}


def test_compute_metrics_per_arm_with_dense_reference_and_sparsity():
    common = {"trace": [], "events": [], "effective_sparsity": 0.0, "nominal_sparsity": 0.0}
    dense = [_rec("dense", 0.0, "a", [1, 2, 3, 4], **common)]
    sparse = {**common, "effective_sparsity": 0.4, "nominal_sparsity": 0.5}
    dart = [_rec("dart", 0.5, "a", [1, 2, 9, 9], **sparse)]
    arms = [Arm("dense"), Arm("dart", 0.5)]
    metrics = compute_metrics(TASKS["drift"], dense + dart, arms, lambda t: " ".join(map(str, t)))
    by = {(m["method"], m["metric"]): m["value"] for m in metrics}
    assert by[("dart", "token_agreement_first")] == 1.0
    assert by[("dart", "token_agreement_second")] == 0.0
    assert by[("dense", "token_agreement_second")] == 1.0  # dense compared with itself
    assert by[("dart", "nominal_sparsity")] == 0.5 and by[("dart", "effective_sparsity")] == 0.4
    assert {m["task"] for m in metrics} == {"drift"}


def test_generate_prompts_from_flags_then_file_then_default(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("from the file\n\nsecond\n")
    assert prompt_texts(GenerateOptions(prompts=["x"], prompts_file=str(f))) == [
        "x",
        "from the file",
        "second",
    ]
    (default,) = prompt_texts(GenerateOptions())
    assert default  # the first packaged two-topic prompt
    items = TASKS["generate"].items(
        tiny_tokenizer(), GenerateOptions(prompts=["ab"], chat=False), 0
    )
    assert items[0]["id"] == "p0" and isinstance(items[0]["prompt"][0], int)
    assert torch.tensor(items[0]["prompt"]).numel() >= 2


def test_ppl_llamacpp_protocol_records_the_bytes_read():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    task = TASKS["ppl"]
    options = PerplexityOptions(corpus="tiny", window=32, protocol="llamacpp", chunks=2)
    items = task.items(tok, options, 0)
    assert [(it["id"], it["begin"], it["score_from"], it["prep_len"]) for it in items] == [
        ("c00000", 0, 17, 16),
        ("c00001", 32, 17, 16),
    ]
    calibration = torch.tensor(items[1]["ids"])[None]
    handle = attach_arm(model, DARTConfig(method="input", total_prune=0.5), calibration)
    try:
        ctx = StepContext(model, handle, tok, options)
        records = [r for it in items for r in task.step.run(ctx, [it])]
    finally:
        handle.detach()
    (dense,) = task.step.run(StepContext(model, None, tok, options), items[:1])
    assert all(r["tokens"] == 15 for r in records) and dense["ffn_bytes_read_fraction"] == 1.0
    for r in records:  # each window's own meter: near the target, never the dense 1.0
        assert 0.3 < r["ffn_bytes_read_fraction"] < 0.7
    arm = Arm("input", 0.5)
    tagged = [{**r, **arm.to_dict()} for r in records]
    metrics = {m["metric"]: m["value"] for m in compute_metrics(task, tagged, [arm], str)}
    assert metrics["ffn_bytes_read_fraction"] == pytest.approx(
        sum(r["ffn_bytes_read_fraction"] for r in records) / 2
    )
