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
from .core.config import BACKENDS, DARTConfig
from .core.methods import METHODS
from .core.quant import Weights
from .evaluate.arms import Arm, arm_config
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
from .options import options_dict
from .results import atomic_write_text
from .runtime.loading import load_model

__all__ = ["RunOptions", "run_experiment"]

log = logging.getLogger("dart.experiment")


@dataclass
class RunOptions:
    """Options every task shares: the model, the arms, the runtime and the results folder."""

    model: str = field(
        default="smollm2-135m", metadata={"help": "packaged model name or a local HF folder"}
    )
    weights: Weights = field(
        default="fp",
        metadata={"help": "fp (the model's own weights) or quantised q8, q4, q4m (dart.quantize)"},
    )
    methods: list[str] = field(
        default_factory=lambda: ["dense", "static", "griffin", "dart"],
        metadata={"help": "comma list of methods", "choices": tuple(METHODS)},
    )
    total_prune: list[float] = field(
        default_factory=lambda: [0.5],
        metadata={"help": "FFN sparsity: one value or a comma list (one arm per value)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of sampling and of the random method"})
    out: str | None = field(
        default=None,
        metadata={"help": "results folder, rerunning resumes it (default results/<task>-<time>)"},
    )
    backend: str = field(
        default="gathered", metadata={"help": "sparse FFN backend", "choices": BACKENDS}
    )
    calibration: str = field(
        default="wiki",
        metadata={
            "help": "corpus of the static method's calibration text",
            "choices": TEXT_CORPORA,
        },
    )
    calibration_tokens: int = field(
        default=512, metadata={"help": "tokens of the static calibration text"}
    )
    accelerator: str = field(default="auto", metadata={"help": "Lightning accelerator (cpu, gpu)"})
    devices: int = field(default=1, metadata={"help": "Lightning devices (processes)"})
    strategy: str = field(
        default="auto", metadata={"help": "Lightning strategy (auto, ddp, ddp_spawn)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
    stop_after: int | None = field(
        default=None,
        metadata={"help": "stop after N records (tests resuming)", "hidden": True},
    )
    dart: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "DARTConfig fields of every arm, e.g. {drift: {window: 8}} (YAML only)"},
    )


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
        key = f"{arm.label}@{arm.total_prune}"
        if main_rank:
            claim_arm(store.folder, key, configs[arm] and configs[arm].to_dict())
        data.skip = store.done_ids(arm.key)
        pending = len(data.pending())
        if not pending:
            log.info("arm %s: all %d samples done", key, len(data.skip))
            continue
        log.info("arm %s: %d pending (%d done)", key, pending, len(data.skip))
        module = dl.DARTModule(
            model, task, options, configs[arm], arm.to_dict(), calibration, tokenizer
        )
        writer = dl.RecordWriter(str(store.folder), stop_after=run.stop_after)
        trainer = dl.make_trainer(
            [writer], run.accelerator, run.devices, run.strategy, progress=not run.quiet
        )
        start = time.perf_counter()
        trainer.predict(module, datamodule=data, return_predictions=False)
        seconds = time.perf_counter() - start
        trainer.strategy.barrier()  # every rank's records are on disk
        main_rank = trainer.global_rank == 0
        if main_rank:
            _record_arm(store, key, seconds, pending, module.last_stats)
    if not main_rank:
        return []  # multi-process runs: rank 0 writes the summaries
    return _summarise(task, store, tokenizer, arms, {it["id"] for it in items})


def _record_arm(
    store: RunStore, key: str, seconds: float, samples: int, stats: dict[str, Any] | None
) -> None:
    timing = {"seconds": seconds, "samples": samples, "seconds_per_sample": seconds / samples}
    store.update_summary("timings.json", key, timing)
    if stats is not None:
        stats = {**stats, "drift_events": len(stats["drift_events"])}
        store.update_summary("stats.json", key, stats)
    log.info("arm %s: %.1f s for %d samples", key, seconds, samples)


def _summarise(
    task: Task, store: RunStore, tokenizer: Any, arms: list[Arm], ids: set[str]
) -> list[dict[str, Any]]:
    from .report import drift_plot, markdown_table, plot_metric_vs_sparsity

    records = [r for r in store if r["id"] in ids]
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    metrics = compute_metrics(task, records, arms, decode)
    store.write_summary("metrics.json", metrics)
    out = store.folder
    if task.main_metric:
        plot_metric_vs_sparsity(out / f"{task.main_metric}.png", metrics, task.main_metric)
    drift_plot(out / "drift.png", records)
    table = markdown_table(metrics)
    atomic_write_text(out / "table.md", table + "\n")
    log.info("metrics of %s:\n%s", out, table)
    return metrics
