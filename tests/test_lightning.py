"""Lightning layer: a task's predict step gives the plain functions' records, DDP shards them,
records stream to disk and a rerun resumes."""

from __future__ import annotations

import math

import lightning as L
import pytest
from tiny_assets import tiny_tokenizer
from tiny_models import random_ids, tiny_model

from dart import DARTConfig
from dart.evaluate import RecordStore, aggregate_accuracy, aggregate_perplexity, perplexity
from dart.evaluate.arms import attach_arm
from dart.evaluate.multiple_choice import mmlu_items
from dart.evaluate.perplexity import window_items
from dart.evaluate.tasks import TASKS, GenerateOptions, MMLUOptions, PerplexityOptions
from dart.lightning import DARTModule, ItemsDataModule, RecordWriter, StopAfter, make_trainer

CFG = DARTConfig(method="dart", layer_topk="all:0.5", drift={"enabled": False})
ARM = {"method": "dart", "total_prune": 0.5}
DENSE = {"method": "dense", "total_prune": 0.0}
PPL = PerplexityOptions(window=16, stride=8)


def _trainer(tmp_path, callbacks=None, **kw) -> L.Trainer:
    return make_trainer(callbacks or [RecordWriter(str(tmp_path))], "cpu", **kw)


def _predict(trainer: L.Trainer, module: DARTModule, data: ItemsDataModule) -> None:
    assert trainer.predict(module, data, return_predictions=False) is None


@pytest.mark.parametrize("config", [None, CFG])
def test_ppl_predict_step_records_equal_plain_function(tmp_path, config):
    model, ids = tiny_model("llama"), random_ids(1, 64, 0)[0]
    arm = ARM if config else DENSE
    module = DARTModule(model, TASKS["ppl"], PPL, config=config, arm=arm)
    _predict(_trainer(tmp_path), module, ItemsDataModule(window_items(ids.tolist(), 16, 8)))
    recs = list(RecordStore(tmp_path))
    got = aggregate_perplexity(recs)
    handle = attach_arm(model, config) if config else None
    ref = perplexity(model, ids, 16, 8, handle)
    if handle:
        handle.detach()
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert got["tokens"] == ref["tokens"] == 63
    assert len(recs) == 7 and all(r["method"] == arm["method"] for r in recs)
    # every record holds the sparsity that ran (all:0.5 keeps half of every layer)
    want = 0.5 if config else 0.0
    assert all(r["nominal_sparsity"] == pytest.approx(want, abs=0.02) for r in recs)
    assert module.handle is None and not hasattr(model, "_dart_handle")  # detached at the end


def test_ppl_two_processes_ddp_equals_one(tmp_path):
    """DDP (gloo, 2 CPU processes): the records of both ranks give the 1-process perplexity."""
    model, items = tiny_model("llama"), window_items(random_ids(1, 48, 0)[0].tolist(), 16, 8)
    assert len(items) == 5  # an uneven split across 2 ranks
    one = DARTModule(model, TASKS["ppl"], PPL, CFG, ARM)
    _predict(_trainer(tmp_path / "one"), one, ItemsDataModule(items))
    two = DARTModule(model, TASKS["ppl"], PPL, CFG, ARM)
    _predict(
        _trainer(tmp_path / "two", devices=2, strategy="ddp_spawn"), two, ItemsDataModule(items)
    )
    files = RecordStore(tmp_path / "two").files()
    assert [f.name for f in files] == ["samples.jsonl", "samples.rank1.jsonl"]
    one_recs, two_recs = list(RecordStore(tmp_path / "one")), list(RecordStore(tmp_path / "two"))
    assert len(two_recs) == 5
    got, want = aggregate_perplexity(two_recs), aggregate_perplexity(one_recs)
    assert got["tokens"] == want["tokens"] == 47
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_mc_predict_step_and_micro_accuracy(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = mmlu_items(tok, shots=0, limit=4, seed=0)
    module = DARTModule(model, TASKS["mmlu"], MMLUOptions(shots=0), CFG, ARM)
    _predict(_trainer(tmp_path), module, ItemsDataModule(items))
    recs = list(RecordStore(tmp_path))
    assert len(recs) == 4
    assert aggregate_accuracy(recs)["acc_micro"] == pytest.approx(
        sum(r["correct"] for r in recs) / 4
    )
    assert all(len(r["logliks"]) == 4 and math.isfinite(r["logliks"][0]) for r in recs)
    assert all(r["pred"] == max(range(4), key=r["logliks"].__getitem__) for r in recs)


def test_predict_streams_records_and_resumes(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [{"id": f"p{i}", "prompt": random_ids(1, 5 + i, 0)[0].tolist()} for i in range(5)]
    options = GenerateOptions(max_new_tokens=4, batch_size=2)
    task = TASKS["generate"]
    module = DARTModule(model, task, options, CFG, ARM, tokenizer=tok)
    writer = RecordWriter(str(tmp_path), stop_after=2)
    with pytest.raises(StopAfter):
        _predict(_trainer(tmp_path, callbacks=[writer]), module, ItemsDataModule(items, 2))
    done = {i for _, _, i in RecordStore(tmp_path).done()}
    assert done == {"p0", "p1"}  # the first batch was written before the interruption
    assert not hasattr(model, "_dart_handle")  # detached despite the exception
    module = DARTModule(model, task, options, CFG, ARM, tokenizer=tok)
    writer = RecordWriter(str(tmp_path))
    _predict(_trainer(tmp_path, callbacks=[writer]), module, ItemsDataModule(items, 2, done))
    assert writer.written == 3  # only the missing samples ran
    recs = list(RecordStore(tmp_path))
    assert sorted(r["id"] for r in recs) == [f"p{i}" for i in range(5)]
    assert all(len(r["new_tokens"]) == 4 and r["method"] == "dart" for r in recs)
