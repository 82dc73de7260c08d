"""The experiment driver: every arm of a task through Lightning, into a resumable results folder.

The folder holds ``fingerprint.json`` (options, model and data that determine the samples; a
rerun under another fingerprint is refused), ``config.yaml`` (the resolved options),
``samples.jsonl`` (per-sample records keyed by (method, total_prune, id), each with the
sparsity that ran; a rerun skips what is there), ``metrics.json`` (a list of
``{task, method, total_prune, metric, value}`` records, recomputed from all samples),
``stats.json`` (masking statistics per arm), ``timings.json``, ``table.md``, ``log.txt`` and
PNG plots.

The task (its items, step and aggregation) comes from :data:`dart.evaluate.tasks.TASKS`; the
driver only runs arms, writes records and summaries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .assets.data import TEXT_CORPORA, load_text
from .core.config import DARTConfig
from .evaluate.arms import Arm, arm_config, folder_arms
from .evaluate.perplexity import tokenize_prefix
from .evaluate.store import (
    RunStore,
    claim_arm,
    data_identity,
    folder_log,
    model_identity,
    process_rank,
    run_fingerprint,
)
from .evaluate.tasks import Task, compute_metrics, get_task
from .options import ArmOptions, dart_field, options_dict
from .results import atomic_write_text
from .runtime.loading import load_model

__all__ = ["RunOptions", "run_arm", "run_experiment"]

log = logging.getLogger("dart.experiment")


@dataclass(kw_only=True)
class RunOptions(ArmOptions):
    """Options every task shares: the model and the arms (:class:`~dart.options.ArmOptions`,
    shared with every command), the DARTConfig settings, the runtime and the results folder."""

    out: str | None = field(
        default=None,
        metadata={"help": "results folder, rerunning resumes it (default results/<task>-<time>)"},
    )
    calibration: str = field(
        default="wiki",
        metadata={
            "help": "corpus of the static method's calibration text",
            "choices": TEXT_CORPORA,
        },
    )
    calibration_tokens: int = field(
        default=512, metadata={"min": 1, "help": "tokens of the static calibration text"}
    )
    accelerator: str = field(default="auto", metadata={"help": "Lightning accelerator (cpu, gpu)"})
    devices: int = field(default=1, metadata={"min": 1, "help": "Lightning devices (processes)"})
    strategy: str = field(
        default="auto", metadata={"help": "Lightning strategy (auto, ddp, ddp_spawn)"}
    )
    threads: int | None = field(default=None, metadata={"min": 1, "help": "torch CPU threads"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    stop_after: int | None = field(
        default=None,
        metadata={"min": 1, "help": "stop after N records (tests resuming)", "hidden": True},
    )
    # the --dart.* flags and the YAML `dart:` mapping: settings of every arm
    dart: dict[str, Any] | None = dart_field()


def _calibration_ids(run: RunOptions, tokenizer: Any, arms: list[Arm]) -> torch.Tensor | None:
    if not any(a.needs_calibration for a in arms):
        return None
    text = load_text(run.calibration, split="calibration")
    return tokenize_prefix(tokenizer, text, run.calibration_tokens)[None]


def run_experiment(
    task: Task | str, run: RunOptions, options: Any = None, command: str | None = None
) -> list[dict[str, Any]]:
    """Run every arm of ``task`` with the shared options ``run`` and the task's ``options``
    (default: the task's defaults) into ``run.out``; returns the metrics records (also in
    metrics.json). ``command`` is recorded in config.yaml. The folder is locked for the run
    and bound to its fingerprint: a rerun resumes it only under the same options, model and
    data (:class:`~dart.evaluate.store.RunStore`)."""
    task = get_task(task) if isinstance(task, str) else task
    options = task.options() if options is None else options
    if run.out is None:
        raise ValueError("run_experiment: RunOptions.out (the results folder) is not set")
    arms = task.arms(run.methods, run.total_prune, options)
    # every arm's config is checked before anything loads: a bad setting fails at once
    configs = {a: arm_config(a, run.dart, backend=run.backend, seed=run.seed) for a in arms}
    with RunStore.open(run.out) as store, folder_log(store.folder, log):
        return _run_locked(task, run, options, command, store, configs)


def _run_locked(
    task: Task,
    run: RunOptions,
    options: Any,
    command: str | None,
    store: RunStore,
    configs: dict[Arm, DARTConfig | None],
) -> list[dict[str, Any]]:
    import yaml

    from . import lightning as dl

    torch.manual_seed(run.seed)
    if run.threads:
        torch.set_num_threads(run.threads)
    log.info("task %s: loading model %s", task.name, run.model)
    model, tokenizer = load_model(run.model, weights=run.weights)
    model_id = model_identity(model, run.model)  # before any arm relays the weights out
    arms = list(configs)
    calibration = _calibration_ids(run, tokenizer, arms)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    store.records.validate = record_check(task, decode)
    items = task.items(tokenizer, options, run.seed)
    resolved = options_dict(run, options)
    if resolved["weights"] == "fp":  # the default: folders made before the option still resume
        del resolved["weights"]
    store.claim(run_fingerprint(task.name, resolved, model_id, data_identity(items)))
    config = {"task": task.name, **resolved, "command": command}
    atomic_write_text(store.folder / "config.yaml", yaml.safe_dump(config))
    data = dl.ItemsDataModule(items, task.batch_size(options))
    log.info("%d samples x %d arms -> %s", len(items), len(arms), store.folder)
    main_rank = process_rank() == 0
    for arm in arms:
        main_rank = run_arm(store, task, options, arm, configs[arm], model, tokenizer,
                            calibration, data, run, claim=main_rank)  # fmt: skip
    if not main_rank:
        return []  # multi-process runs: rank 0 writes the summaries
    return _summarise(task, store, tokenizer, arms, {it["id"] for it in items})


def run_arm(
    store: RunStore,
    task: Task,
    options: Any,
    arm: Arm,
    config: DARTConfig | None,
    model: torch.nn.Module,
    tokenizer: Any,
    calibration: torch.Tensor | None,
    data: Any,
    run: RunOptions,
    claim: bool = True,
) -> bool:
    """Run the pending items of ``data`` (an :class:`~dart.lightning.ItemsDataModule` of the
    task's items) under one arm into ``store`` (claimed): the arm is bound to its resolved
    ``config`` in ``arms.json`` (``claim``: this process is rank 0), the items it has on disk are
    skipped, the rest run through Lightning with their records, ``stats.json`` and
    ``timings.json`` written as they finish. Returns whether this process is rank 0 (it writes
    the summaries)."""
    from . import lightning as dl

    key = f"{arm.label}@{arm.total_prune}"
    if claim:
        claim_arm(store.folder, key, config and config.to_dict())
    data.skip = store.done_ids(arm.key)
    pending = len(data.pending())
    if not pending:
        log.info("arm %s: all %d samples done", key, len(data.skip))
        return claim
    log.info("arm %s: %d pending (%d done)", key, pending, len(data.skip))
    module = dl.DARTModule(model, task, options, config, arm.to_dict(), calibration, tokenizer)
    writer = dl.RecordWriter(str(store.folder), stop_after=run.stop_after)
    # the stats go first: a batch whose records are written is always counted
    stats = arm_stats_callback(store, key)
    trainer = dl.make_trainer(
        [stats, writer], run.accelerator, run.devices, run.strategy, progress=not run.quiet
    )
    start = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    trainer.strategy.barrier()  # every rank's records are on disk
    main_rank = trainer.global_rank == 0
    if main_rank:
        _record_arm(store, key, seconds, pending)
    return main_rank


def _record_arm(store: RunStore, key: str, seconds: float, samples: int) -> None:
    timing = {"seconds": seconds, "samples": samples, "seconds_per_sample": seconds / samples}
    store.update_summary("timings.json", key, timing)
    log.info("arm %s: %.1f s for %d samples", key, seconds, samples)


# -- stats.json: every batch of every run of an arm ---------------------------------------------
# The controller's counters that add up over batches (drift_events: their number).
_ADDITIVE = (
    "decode_passes",
    "decode_tokens",
    "decode_neurons",
    "decode_capacity",
    "mask_builds",
    "refreshes",
    "drift_events",
    "sequences",
    "selection_seconds",
    "dense_tokens",
    "retraced_tokens",
)


def _raw_counters(counters: Any) -> dict[str, Any]:
    raw = {k: getattr(counters, k) for k in _ADDITIVE}
    raw["drift_events"] = len(raw["drift_events"])
    raw["layer_neurons"] = list(counters.layer_neurons)
    return raw


def _combine(a: dict[str, Any], b: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """``a + sign * b`` counter by counter (the per-layer lists element-wise)."""
    out = {k: a.get(k, 0) + sign * b.get(k, 0) for k in _ADDITIVE}
    la, lb = list(a.get("layer_neurons", [])), list(b.get("layer_neurons", []))
    width = max(len(la), len(lb))
    la, lb = la + [0.0] * (width - len(la)), lb + [0.0] * (width - len(lb))
    out["layer_neurons"] = [x + sign * y for x, y in zip(la, lb, strict=True)]
    return out


class ArmStats:
    """Keeps an arm's ``stats.json`` entry over every batch of every run: a resumed arm's
    counters (passes, mask builds, drift events, sparsity over decode tokens...) add to the
    earlier runs' instead of replacing them. Each batch's counters are the difference of the
    controller's counters across the batch (the whole counters where a step reset them); the
    raw sums are kept under ``counters`` for the next resume. Fields that describe a state
    rather than a count (keep counts, budgets, state bytes) are the latest batch's.
    :func:`arm_stats_callback` makes it a Lightning callback."""

    def __init__(self, store: RunStore, key: str):
        self.store, self.key = store, key
        earlier = store.read_summary("stats.json").get(key)
        earlier = earlier if isinstance(earlier, dict) else {}
        counters = earlier.get("counters")
        try:  # a sound entry of an earlier run adds up; anything else starts afresh
            self.base = _combine(counters, {}) if isinstance(counters, dict) else None
            self.samples = int(earlier.get("samples", 0)) if self.base else 0
        except (TypeError, ValueError):
            self.base = None
        if self.base is None:
            self.base, self.samples = _combine({}, {}), 0
        self.runs = int(earlier.get("runs", 0) or 0) + 1 if self.samples else 1
        self._before: tuple[Any, dict[str, Any]] | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        handle = getattr(pl_module, "handle", None)
        if handle is not None:
            counters = handle.controller.counters
            self._before = (counters, _raw_counters(counters))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        handle = getattr(pl_module, "handle", None)
        if handle is None or self._before is None:
            return
        c = handle.controller
        now = _raw_counters(c.counters)
        same, before = self._before[0] is c.counters, self._before[1]
        self.base = _combine(self.base, _combine(now, before, -1) if same else now)
        self.samples += len(batch)
        if trainer.global_rank == 0:
            self.store.update_summary("stats.json", self.key, self._summary(handle.stats(), c))

    def _summary(self, latest: dict[str, Any], controller: Any) -> dict[str, Any]:
        t = self.base
        tokens = t["decode_tokens"]
        widths = list(controller.widths)
        return {
            **latest,
            "effective_sparsity": (
                1.0 - t["decode_neurons"] / t["decode_capacity"] if t["decode_capacity"] else 0.0
            ),
            "effective_sparsity_per_layer": [
                1.0 - n / (tokens * w) if tokens else 0.0
                for n, w in zip(t["layer_neurons"] or [0.0] * len(widths), widths, strict=True)
            ],
            "decode_passes": t["decode_passes"],
            "decode_tokens": tokens,
            "mask_builds": t["mask_builds"],
            "mask_refreshes": t["refreshes"],
            "selection_seconds": t["selection_seconds"],
            "drift_events": t["drift_events"],
            "drift_events_per_100_tokens": 100.0 * t["drift_events"] / tokens if tokens else 0.0,
            "dense_token_computations": t["dense_tokens"],
            "dense_token_computations_per_token": t["dense_tokens"] / tokens if tokens else 0.0,
            "retraced_tokens": t["retraced_tokens"],
            "sequences": t["sequences"],
            "samples": self.samples,
            "runs": self.runs,
            "counters": t,
        }


def arm_stats_callback(store: RunStore, key: str) -> ArmStats:
    """An :class:`ArmStats` that is a Lightning callback (lightning is imported on use)."""
    import lightning as L

    return type("ArmStatsCallback", (ArmStats, L.Callback), {})(store, key)


_NUMERIC = ("nominal_sparsity", "effective_sparsity")  # averaged by compute_metrics
# what a record with a value of the wrong type raises in a task's aggregation
_UNSOUND = (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError)


def record_check(task: Task, decode: Any) -> Any:
    """``check(record) -> None`` for a record the task's metrics can use, else why not: its
    aggregation over that record alone must work, and the sparsity fields be numbers. A
    results file edited by hand or written by another version then costs a recomputed sample
    with a warning, not a crash of every resume."""

    def check(record: dict[str, Any]) -> str | None:
        for name in _NUMERIC:
            value = record.get(name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"its {name} is {value!r}, not a number"
        try:
            task.aggregate([record], None, decode)
        except _UNSOUND as e:
            return f"its values do not aggregate ({type(e).__name__}: {e})"
        return None

    return check


def _summarise(
    task: Task, store: RunStore, tokenizer: Any, arms: list[Arm], ids: set[str]
) -> list[dict[str, Any]]:
    from .report import drift_plot, markdown_table, plot_metric_vs_sparsity

    records = [r for r in store if r["id"] in ids]
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    metrics = compute_metrics(task, records, folder_arms(arms, records), decode)
    store.write_summary("metrics.json", metrics)
    out = store.folder
    if task.main_metric:
        plot_metric_vs_sparsity(out / f"{task.main_metric}.png", metrics, task.main_metric)
    drift_plot(out / "drift.png", records)
    table = markdown_table(metrics)
    atomic_write_text(out / "table.md", table + "\n")
    log.info("metrics of %s:\n%s", out, table)
    return metrics
