"""Lightning layer over the plain evaluation functions of :mod:`dart.evaluate`.

* :class:`DARTModule`: one arm (a method at a sparsity) on one model. ``test_step`` scores a
  perplexity window or a multiple-choice question; ``predict_step`` generates. Sums (NLL, token
  and answer counts) are torchmetrics ``SumMetric`` states, so DDP reduces sums, never averages
  of averages. The DART handle is attached at ``on_test_start``/``on_predict_start`` (after
  Lightning has moved the model to its device, in every process) and detached at the end.
* DataModules: :class:`PerplexityDataModule`, :class:`MMLUDataModule`,
  :class:`SummarizationDataModule`, :class:`DriftDataModule`. Items are built once (token ids);
  each process takes ``items[rank::world_size]`` (no padding duplicates), minus the ids already
  done (resume).
* :class:`RecordWriter`: streams every per-sample record to JSONL as soon as its batch ends
  (``Trainer.predict(..., return_predictions=False)`` keeps nothing in memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader
from torchmetrics import SumMetric

from .config import DARTConfig
from .evaluate.arms import attach_arm
from .evaluate.generative import drift_items, generate_batch, summarization_items
from .evaluate.multiple_choice import mmlu_items, score_choices
from .evaluate.perplexity import score_window, sliding_windows, tokenize_prefix
from .evaluate.store import RecordStore
from .fast import FastGenerator

__all__ = [
    "DARTModule",
    "DriftDataModule",
    "ItemsDataModule",
    "MMLUDataModule",
    "PerplexityDataModule",
    "PromptsDataModule",
    "RecordWriter",
    "StopAfter",
    "SummarizationDataModule",
]

TASKS = ("ppl", "mc", "generate")


class DARTModule(L.LightningModule):
    """One arm on one model: ``task`` is ``ppl``, ``mc`` (test) or ``generate`` (predict)."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: str,
        config: DARTConfig | None = None,
        arm: dict[str, Any] | None = None,
        calibration_ids: torch.Tensor | None = None,
        leaky: bool = False,
        max_new_tokens: int = 128,
        tokenizer: Any = None,
        compile: bool = False,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
        self.model = model
        self.task = task
        self.config = config
        self.arm = dict(arm or {"method": "dense", "total_prune": 0.0})
        self.calibration_ids = calibration_ids
        self.leaky = leaky
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.compile = compile  # generate in the compiled static-cache loop (dart.fast)
        self._fast: dict[int, FastGenerator] = {}  # by cache length
        self.handle = None
        self.last_stats: dict[str, Any] | None = None
        self.nll_sum = SumMetric().set_dtype(torch.float64)
        self.token_count = SumMetric().set_dtype(torch.float64)
        self.correct = SumMetric().set_dtype(torch.float64)
        self.answered = SumMetric().set_dtype(torch.float64)

    # -- attach / detach on the final device --------------------------------------------------
    def _attach(self) -> None:
        self.model.eval()
        # ddp_spawn hands tensors to the workers in shared memory: make this process's weights
        # (relaid out in place by the sparse backends) and metric states its own.
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.is_shared():
                t.data = t.data.clone()
        for metric in (self.nll_sum, self.token_count, self.correct, self.answered):
            metric.reset()
        if self.config is not None and self.handle is None:
            self.handle = attach_arm(self.model, self.config, self.calibration_ids)

    def _detach(self) -> None:
        self._fast.clear()
        if self.handle is not None:
            self.last_stats = self.handle.stats()
            self.handle.detach()
            self.handle = None

    def on_test_start(self) -> None:
        self._attach()

    def on_test_end(self) -> None:
        self._detach()

    def on_predict_start(self) -> None:
        self._attach()

    def on_predict_end(self) -> None:
        self._detach()

    def teardown(self, stage: str) -> None:
        self._detach()  # also after an exception: the model is restored exactly

    # -- steps --------------------------------------------------------------------------------
    def _record(self, item: dict[str, Any], **values: Any) -> dict[str, Any]:
        return {**self.arm, "id": item["id"], **values}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        with torch.no_grad():
            if self.task == "ppl":
                ids = torch.tensor(batch["ids"], device=self.device)
                r = score_window(
                    self.model, ids, batch["score_from"], batch["prep_len"], self.handle
                )
                self.nll_sum.update(r["nll"])
                self.token_count.update(r["tokens"])
                return self._record(batch, **r)
            if self.task == "mc":
                lls = score_choices(
                    self.model, batch["context"], batch["choices"], self.handle, self.leaky
                )
                pred = max(range(len(lls)), key=lls.__getitem__)
                correct = int(pred == batch["answer"])
                self.correct.update(correct)
                self.answered.update(1)
                return self._record(
                    batch,
                    subject=batch["subject"],
                    logliks=lls,
                    pred=pred,
                    answer=batch["answer"],
                    correct=correct,
                    context_tokens=len(batch["context"]),
                )
        raise RuntimeError(f"test_step is for tasks 'ppl' and 'mc', not {self.task!r}")

    def on_test_epoch_end(self) -> None:
        if self.task == "ppl":
            nll, tokens = self.nll_sum.compute(), self.token_count.compute()
            ppl = torch.exp(nll / tokens) if tokens > 0 else torch.tensor(math.nan)
            self.log_dict({"nll_sum": nll, "tokens": tokens, "perplexity": ppl})
        elif self.task == "mc":
            correct, answered = self.correct.compute(), self.answered.compute()
            acc = correct / answered if answered > 0 else torch.tensor(math.nan)
            self.log_dict({"correct": correct, "answered": answered, "acc_micro": acc})

    def _fast_generator(self, batch: list[dict[str, Any]]) -> FastGenerator | None:
        """The compiled loop for this batch; cache lengths are rounded up to 256 tokens so a
        few compiled steps serve every batch."""
        if not self.compile:
            return None
        need = max(len(it["prompt"]) for it in batch) + self.max_new_tokens
        max_len = -(-need // 256) * 256
        if max_len not in self._fast:
            self._fast[max_len] = FastGenerator(self.model, self.handle, max_len)
        return self._fast[max_len]

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        tok = self.tokenizer
        records = generate_batch(
            self.model,
            batch,
            self.max_new_tokens,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            handle=self.handle,
            decode=lambda t: tok.decode(t, skip_special_tokens=True),
            fast=self._fast_generator(batch),
        )
        return [{**self.arm, **r} for r in records]


# -- data ----------------------------------------------------------------------------------------
def _first(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ItemsDataModule(L.LightningDataModule):
    """A fixed list of items (dicts with an ``id``), sharded by rank, minus ``skip`` ids."""

    batched = False  # test tasks score one item per step; generation batches prompts

    def __init__(self, items: Sequence[dict[str, Any]], batch_size: int = 1, skip=()):
        super().__init__()
        self.items = list(items)
        self.batch_size = batch_size
        self.skip = set(skip)

    def pending(self) -> list[dict[str, Any]]:
        return [it for it in self.items if it["id"] not in self.skip]

    def _loader(self) -> DataLoader:
        items = self.pending()
        rank, world = _rank_world()
        if world > 1:
            items = items[rank::world]
        if self.batched:
            return DataLoader(items, batch_size=self.batch_size, collate_fn=_as_list)
        return DataLoader(items, batch_size=1, collate_fn=_first)

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class PerplexityDataModule(ItemsDataModule):
    """Sliding windows over a token tensor or a text (``tokenizer`` + ``text``)."""

    def __init__(
        self,
        ids: torch.Tensor | None = None,
        window: int = 512,
        stride: int = 256,
        tokenizer: Any = None,
        text: str | None = None,
        max_tokens: int | None = None,
        skip=(),
    ):
        if ids is None:
            ids = tokenize_prefix(tokenizer, text, max_tokens)
        ids = ids[:max_tokens] if max_tokens else ids
        flat = ids.tolist()
        items = [
            {**w.to_dict(), "ids": flat[w.begin : w.end]}
            for w in sliding_windows(len(flat), window, stride)
        ]
        super().__init__(items, 1, skip)


class MMLUDataModule(ItemsDataModule):
    """MMLU questions (``shots``-shot prompts) as token ids; see :func:`mmlu_items`."""

    def __init__(self, tokenizer: Any, skip=(), **kwargs: Any):
        super().__init__(mmlu_items(tokenizer, **kwargs), 1, skip)


class PromptsDataModule(ItemsDataModule):
    """Prompt-id items (``id``, ``prompt``), batched for generation."""

    batched = True


class SummarizationDataModule(PromptsDataModule):
    """Summarisation stand-in prompts; see :func:`summarization_items`."""

    def __init__(self, tokenizer: Any, batch_size: int = 4, skip=(), **kwargs: Any):
        super().__init__(summarization_items(tokenizer, **kwargs), batch_size, skip)


class DriftDataModule(PromptsDataModule):
    """Two-topic knowledge-drift prompts; see :func:`drift_items`."""

    def __init__(self, tokenizer: Any, batch_size: int = 4, skip=(), **kwargs: Any):
        super().__init__(drift_items(tokenizer, **kwargs), batch_size, skip)


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

    def _write(self, trainer: L.Trainer, records: Any) -> None:
        records = records if isinstance(records, list) else [records]
        self.store.append(records, rank=trainer.global_rank)
        self.written += len(records)
        if self.stop_after is not None and self.written >= self.stop_after:
            raise StopAfter(f"stopped after {self.written} records (stop_after)")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(pl_module, DARTModule):
            pl_module._detach()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._write(trainer, outputs)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        self._write(trainer, prediction)
