"""Lightning layer over the task registry and the plain functions of :mod:`dart.evaluate`.

* :class:`DARTModule`: one arm (a method at a sparsity) of one task on one model;
  ``predict_step`` runs the task's step (:class:`~dart.evaluate.tasks.StepKind`) on a batch and
  returns its per-sample records. The DART handle is attached at ``on_predict_start`` (after
  Lightning has moved the model to its device, in every process) and detached at the end.
  Metrics are not computed here: they are aggregated from the records (one metrics path, so a
  resumed or multi-process run gives the same figures as one uninterrupted process). What is
  logged is the handle's running telemetry (:func:`dart.core.telemetry.telemetry_metrics`: effective
  sparsity, drift events per 100 tokens, mask recall when ``telemetry_every`` measures it):
  ``test_step`` (``Trainer.test``) runs the same step and ``self.log_dict``s it; a predict step,
  where Lightning has no ``self.log``, hands it to the Trainer's loggers directly.
* :class:`ItemsDataModule`: a task's items (built once, as token ids); each process takes
  ``items[rank::world_size]`` (no padding duplicates), minus the ids already done (resume).
* :class:`RecordWriter`: streams every per-sample record to JSONL as soon as its batch ends
  (``Trainer.predict(..., return_predictions=False)`` keeps nothing in memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from .core.config import DARTConfig
from .core.telemetry import telemetry_metrics
from .evaluate.arms import attach_arm
from .evaluate.store import RecordStore
from .evaluate.tasks import StepContext, Task
from .runtime.fast import FastGenerator

__all__ = ["DARTModule", "ItemsDataModule", "RecordWriter", "StopAfter", "make_trainer"]


class DARTModule(L.LightningModule):
    """One arm of ``task`` on one model; ``options`` are the task's options; ``arm`` the
    fields every record of the arm carries; ``config`` None runs the model dense."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        options: Any,
        config: DARTConfig | None = None,
        arm: dict[str, Any] | None = None,
        calibration_ids: torch.Tensor | None = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.model = model
        self.task = task
        self.options = options
        self.config = config
        self.arm = dict(arm or {})
        self.calibration_ids = calibration_ids
        self.tokenizer = tokenizer
        self._fast: dict[int, FastGenerator] = {}  # by cache length
        self.handle = None
        self.last_stats: dict[str, Any] | None = None

    # -- attach / detach on the final device --------------------------------------------------
    def _attach(self) -> None:
        self.model.eval()
        # ddp_spawn hands tensors to the workers in shared memory: make this process's weights
        # (relaid out in place by the sparse backends) its own.
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.is_shared():
                t.data = t.data.clone()
        if self.config is not None and self.handle is None:
            self.handle = attach_arm(self.model, self.config, self.calibration_ids)

    def detach(self) -> None:
        """Detach the arm (idempotent): the model is restored exactly."""
        self._fast.clear()
        if self.handle is not None:
            self.last_stats = self.handle.stats()
            self.handle.detach()
            self.handle = None

    def on_predict_start(self) -> None:
        self._attach()

    def on_predict_end(self) -> None:
        self.detach()

    def teardown(self, stage: str) -> None:
        self.detach()  # also after an exception

    # -- steps --------------------------------------------------------------------------------
    def _fast_generator(self, batch: list[dict[str, Any]]) -> FastGenerator | None:
        """The compiled loop for this batch; cache lengths are rounded up to 256 tokens so a
        few compiled steps serve every batch."""
        if not getattr(self.options, "compile", False):
            return None
        need = max(len(it["prompt"]) for it in batch) + self.options.max_new_tokens
        max_len = -(-need // 256) * 256
        if max_len not in self._fast:
            self._fast[max_len] = FastGenerator(self.model, self.handle, max_len)
        return self._fast[max_len]

    def _run(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ctx = StepContext(
            self.model, self.handle, self.tokenizer, self.options, self._fast_generator
        )
        with torch.no_grad():
            records = self.task.step.run(ctx, batch)
        return [{**self.arm, **r} for r in records]

    def telemetry(self) -> dict[str, float]:
        """The handle's running telemetry as flat floats (empty for a dense run)."""
        return telemetry_metrics(self.handle.stats()) if self.handle is not None else {}

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        records = self._run(batch)
        metrics = self.telemetry()
        if metrics:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=batch_idx)
        return records

    def on_test_start(self) -> None:
        self._attach()

    def on_test_end(self) -> None:
        self.detach()

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """The predict step's work with its telemetry logged (records are not kept: write
        them with ``Trainer.predict`` and :class:`RecordWriter`)."""
        self._run(batch)
        metrics = self.telemetry()
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))


# -- data ----------------------------------------------------------------------------------------
def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ItemsDataModule(L.LightningDataModule):
    """A fixed list of items (dicts with an ``id``) in batches of ``batch_size``, sharded by
    rank, minus the ``skip`` ids."""

    def __init__(self, items: Sequence[dict[str, Any]], batch_size: int = 1, skip=()):
        super().__init__()
        self.items = list(items)
        self.batch_size = batch_size
        self.skip = set(skip)

    def pending(self) -> list[dict[str, Any]]:
        return [it for it in self.items if it["id"] not in self.skip]

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def _loader(self) -> DataLoader:
        items = self.pending()
        rank, world = _rank_world()
        if world > 1:
            items = items[rank::world]
        return DataLoader(items, batch_size=self.batch_size, collate_fn=_as_list)


# -- writing -------------------------------------------------------------------------------------
class StopAfter(RuntimeError):
    """Raised by :class:`RecordWriter` after ``stop_after`` records (to test resuming)."""


class RecordWriter(BasePredictionWriter):
    """Appends each batch's records to the results folder's JSONL (per rank) at once."""

    def __init__(self, folder: str, stop_after: int | None = None):
        super().__init__(write_interval="batch")
        self.store = RecordStore(folder)
        self.stop_after = stop_after
        self.written = 0

    def _write(self, trainer: L.Trainer, records: list[dict[str, Any]]) -> None:
        self.store.append(records, rank=trainer.global_rank)
        self.written += len(records)
        if self.stop_after is not None and self.written >= self.stop_after:
            raise StopAfter(f"stopped after {self.written} records (stop_after)")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(pl_module, DARTModule):
            pl_module.detach()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self._write(trainer, prediction)


def make_trainer(
    callbacks: list[Any],
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    progress: bool = False,
) -> L.Trainer:
    """A Trainer for evaluation: no logger, checkpoints or summary; no distributed sampler
    (:class:`ItemsDataModule` shards by rank itself); autograd left on (``torch.no_grad`` in the
    step) so sparse backends may relay weights out in place."""
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,
        inference_mode=False,
        callbacks=callbacks,
    )
