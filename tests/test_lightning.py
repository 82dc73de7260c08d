"""Lightning layer: test/predict steps equal the plain functions, DDP sums, streamed records."""

from __future__ import annotations

import math
import time

import lightning as L
import pytest
import torch
from tiny_assets import tiny_tokenizer
from tiny_models import tiny_model

from dart import DARTConfig
from dart.evaluate import RecordStore, perplexity
from dart.evaluate.arms import attach_arm
from dart.lightning import (
    DARTModule,
    MMLUDataModule,
    PerplexityDataModule,
    PromptsDataModule,
    RecordWriter,
    StopAfter,
)

CFG = DARTConfig(method="dart", layer_topk="all:0.5", drift={"enabled": False})
ARM = {"method": "dart", "total_prune": 0.5}


def _trainer(tmp_path, **kw) -> L.Trainer:
    kw.setdefault("callbacks", [RecordWriter(str(tmp_path))])
    return L.Trainer(
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        strategy=kw.pop("strategy", "auto"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=False,
        **kw,
    )


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config", [None, CFG])
def test_ppl_test_step_equals_plain_function(tmp_path, config):
    model, ids = tiny_model("llama"), _ids(64)
    arm = ARM if config else {"method": "dense", "total_prune": 0.0}
    module = DARTModule(model, "ppl", config=config, arm=arm)
    out = _trainer(tmp_path).test(module, PerplexityDataModule(ids, 16, 8), verbose=False)[0]
    handle = attach_arm(model, config) if config else None
    ref = perplexity(model, ids, 16, 8, handle)
    if handle:
        handle.detach()
    assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert out["tokens"] == ref["tokens"] == 63
    recs = list(RecordStore(tmp_path))
    assert len(recs) == 7 and all(r["method"] == arm["method"] for r in recs)
    assert module.handle is None and not hasattr(model, "_dart_handle")  # detached at the end


def test_ppl_two_processes_ddp_equals_one(tmp_path):
    """DDP (gloo, 2 CPU processes): sums of NLL and tokens give the 1-process perplexity."""
    model, ids = tiny_model("llama"), _ids(48)
    dm = PerplexityDataModule(ids, 16, 8)  # 5 windows: uneven split across 2 ranks
    one = _trainer(tmp_path / "one").test(DARTModule(model, "ppl", CFG, ARM), dm, verbose=False)[0]
    start = time.perf_counter()
    two = _trainer(tmp_path / "two", devices=2, strategy="ddp_spawn").test(
        DARTModule(model, "ppl", CFG, ARM), PerplexityDataModule(ids, 16, 8), verbose=False
    )[0]
    assert time.perf_counter() - start < 60
    assert two["tokens"] == one["tokens"] == 47
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    files = RecordStore(tmp_path / "two").files()
    assert [f.name for f in files] == ["samples.jsonl", "samples.rank1.jsonl"]
    assert len(list(RecordStore(tmp_path / "two"))) == 5


def test_mc_test_step_and_micro_accuracy(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    dm = MMLUDataModule(tok, shots=0, limit=4, seed=0)
    out = _trainer(tmp_path).test(DARTModule(model, "mc", CFG, ARM), dm, verbose=False)[0]
    recs = list(RecordStore(tmp_path))
    assert out["answered"] == 4
    assert out["acc_micro"] == pytest.approx(sum(r["correct"] for r in recs) / 4)
    assert all(len(r["logliks"]) == 4 and math.isfinite(r["logliks"][0]) for r in recs)


def test_predict_streams_records_and_resumes(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [{"id": f"p{i}", "prompt": _ids(5 + i).tolist()} for i in range(5)]
    module = DARTModule(model, "generate", CFG, ARM, max_new_tokens=4, tokenizer=tok)
    writer = RecordWriter(str(tmp_path), stop_after=2)
    with pytest.raises(StopAfter):
        _trainer(tmp_path, callbacks=[writer]).predict(
            module, PromptsDataModule(items, batch_size=2), return_predictions=False
        )
    done = {i for _, _, i in RecordStore(tmp_path).done()}
    assert done == {"p0", "p1"}
    assert not hasattr(
        model, "_dart_handle"
    )  # detached despite the exception  # the first batch was written before the interruption
    module = DARTModule(model, "generate", CFG, ARM, max_new_tokens=4, tokenizer=tok)
    writer = RecordWriter(str(tmp_path))
    out = _trainer(tmp_path, callbacks=[writer]).predict(
        module, PromptsDataModule(items, batch_size=2, skip=done), return_predictions=False
    )
    assert out is None and writer.written == 3  # only the missing samples ran
    recs = list(RecordStore(tmp_path))
    assert sorted(r["id"] for r in recs) == [f"p{i}" for i in range(5)]
    assert all(len(r["new_tokens"]) == 4 and r["method"] == "dart" for r in recs)
