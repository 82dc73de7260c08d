"""Mask telemetry: recall of the top-|h| neurons under the mask, measured on opt-in passes, in
`handle.stats()` and logged by the LightningModule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from tiny_assets import tiny_tokenizer
from tiny_models import NO_DRIFT, random_ids, tiny_model

import dart
from dart.core.telemetry import mask_recall, telemetry_metrics
from dart.evaluate.tasks import TASKS, GenerateOptions
from dart.lightning import DARTModule, ItemsDataModule
from dart.runtime.fast import FastGenerator

KEYS = ("mask_recall", "mask_recall_per_layer", "mask_mass_kept", "telemetry_passes")


def _kept(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], n, dtype=torch.bool).scatter_(1, idx, True)


def test_recall_is_one_for_a_dense_mask_and_for_the_tokens_own_topk():
    h = torch.randn(3, 4, 32)
    recall, mass = mask_recall(h, torch.ones(1, 32, dtype=torch.bool))
    assert torch.equal(recall, torch.ones(3, 4)) and torch.allclose(mass, torch.ones(3, 4))
    for b in range(3):  # each row's mask = the top-9 of its own token
        own = _kept(h[b, -1:].abs().topk(9).indices, 32)
        recall, mass = mask_recall(h[b : b + 1, -1:], own)
        assert recall.item() == 1.0 and 0.0 < mass.item() < 1.0


def test_recall_and_mass_equal_hand_computed_values_with_per_row_counts():
    h = torch.tensor([[[3.0, -5.0, 1.0, 0.5]], [[0.1, 0.2, -4.0, 2.0]]])
    kept = torch.tensor([[True, False, True, False], [False, True, True, True]])
    recall, mass = mask_recall(h, kept)
    # row 0: k = 2, top-2 |h| = {1, 0}, kept {0, 2} -> 1/2; mass (3 + 1) / 9.5
    # row 1: k = 3, top-3 |h| = {2, 3, 1}, kept {1, 2, 3} -> 3/3; mass 6.2 / 6.3
    assert recall[:, 0].tolist() == [0.5, 1.0]
    assert mass[:, 0].tolist() == pytest.approx([4.0 / 9.5, 6.2 / 6.3])


def _attach(model, every: int, backend: str = "gathered"):
    cfg = dart.DARTConfig(layer_topk="all:0.5", drift=NO_DRIFT, backend=backend)
    return dart.attach(model, cfg, telemetry_every=every)


def _decode(model, ids, steps: int) -> list[torch.Tensor]:
    out = model(ids, use_cache=True)
    cache, nxt, logits = out.past_key_values, out.logits[:, -1:].argmax(-1), [out.logits]
    for _ in range(steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("backend", ["masked", "gathered"])
def test_measured_passes_report_recall_and_leave_outputs_unchanged(backend):
    model, ids = tiny_model("llama"), random_ids(2, 8, 3)
    handle = _attach(model, 0, backend)
    plain = _decode(model, ids, 4)
    off = handle.stats()
    handle.detach()
    handle = _attach(model, 2, backend)
    measured = _decode(model, ids, 4)
    stats = handle.stats()
    handle.detach()
    for a, b in zip(plain, measured, strict=True):
        torch.testing.assert_close(a, b)  # measuring does not change what is computed
    assert not any(k in off for k in KEYS)  # off: no telemetry keys at all
    assert stats["telemetry_passes"] == 2  # decode passes 2 and 4 of 4
    per_layer = stats["mask_recall_per_layer"]
    assert len(per_layer) == model.config.num_hidden_layers
    assert all(0.0 < r < 1.0 for r in per_layer)  # a prompt mask misses some of the top-k
    assert stats["mask_recall"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert 0.0 < stats["mask_mass_kept"] < 1.0


def test_telemetry_off_installs_no_probe():
    model = tiny_model("llama")
    handle = _attach(model, 0)
    seen = []
    hooks = [f.register_forward_pre_hook(lambda m, a: seen.append(m.probe)) for f in handle.ffns]
    _decode(model, random_ids(1, 6, 0), 3)
    handle.detach()
    for h in hooks:
        h.remove()
    assert seen and all(p is None for p in seen) and handle.controller.telemetry is None


def test_compiled_loop_refuses_telemetry():
    model = tiny_model("llama")
    handle = _attach(model, 1)
    with pytest.raises(ValueError, match="telemetry_every"):
        FastGenerator(model, handle, max_len=32, compile=False)
    handle.detach()


def test_bad_telemetry_every_is_named():
    with pytest.raises(dart.ConfigError, match="telemetry_every"):
        dart.DARTConfig(telemetry_every=-1)


def test_telemetry_metrics_flattens_the_stats():
    stats = {
        "effective_sparsity": 0.4,
        "drift_events_per_100_tokens": 2.0,
        "effective_sparsity_per_layer": [0.3, 0.5],
        "mask_recall": 0.75,
        "mask_recall_per_layer": [0.5, None],
        "mask_mass_kept": 0.9,
    }
    assert telemetry_metrics(stats) == {
        "effective_sparsity": 0.4,
        "drift_events_per_100_tokens": 2.0,
        "mask_recall": 0.75,
        "mask_mass_kept": 0.9,
        "effective_sparsity/layer_0": 0.3,
        "effective_sparsity/layer_1": 0.5,
        "mask_recall/layer_0": 0.5,
    }


class _Capture(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    name, version = "capture", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("loop", ["test", "predict"])
def test_lightning_logs_the_telemetry(loop):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [{"id": f"p{i}", "prompt": random_ids(1, 6 + i, 0)[0].tolist()} for i in range(3)]
    cfg = dart.DARTConfig(layer_topk="all:0.5", drift=NO_DRIFT, telemetry_every=1)
    options = GenerateOptions(max_new_tokens=4, batch_size=2)
    module = DARTModule(model, TASKS["generate"], options, cfg, tokenizer=tok)
    logger = _Capture()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        inference_mode=False,
    )
    data = ItemsDataModule(items, 2)
    if loop == "test":
        trainer.test(module, data, verbose=False)
    else:
        trainer.predict(module, data, return_predictions=False)
    assert len(logger.metrics) == 2  # one per batch
    last = logger.metrics[-1]
    for key in ("mask_recall", "mask_mass_kept", "effective_sparsity", "mask_recall/layer_0"):
        assert 0.0 < last[key] <= 1.0, key
    assert "drift_events_per_100_tokens" in last
    assert not hasattr(model, "_dart_handle")  # detached at the end
