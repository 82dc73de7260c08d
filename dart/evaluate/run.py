"""One experiment run: every arm of a task through Lightning, into a resumable results folder.

The folder holds ``fingerprint.json`` (options, model and data that determine the samples; a
rerun under another fingerprint is refused), ``config.yaml`` (the resolved options),
``samples.jsonl`` (per-sample records keyed by (method, total_prune, id); a rerun skips what is
there), ``metrics.json`` (a list of
``{task, method, total_prune, metric, value}`` records, recomputed from all samples), ``stats.json``
(masking statistics per arm), ``timings.json``, ``log.txt`` and PNG plots.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..data import load_text, load_text_file
from ..models import load_model
from ..results import atomic_write_text
from .arms import Arm, arm_config, parse_arms
from .generative import aggregate_drift, aggregate_summarization
from .multiple_choice import aggregate_accuracy
from .perplexity import aggregate_perplexity, tokenize_prefix
from .store import RecordStore, RunStore, data_identity, model_identity, run_fingerprint

__all__ = ["TASKS", "compute_metrics", "run_experiment"]

TASKS = ("ppl", "mmlu", "summarize", "drift", "generate")
log = logging.getLogger("dart.evaluate")


def _setup_logging(out: Path) -> logging.Handler:
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    log.setLevel(logging.INFO)
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
    return handler


def _datamodule(task: str, opts: dict[str, Any], tokenizer: Any, skip: set[str]):
    from .. import lightning as dl

    if task == "ppl":
        if opts.get("text_file"):
            text = load_text_file(opts["text_file"])
        else:
            text = load_text(opts.get("corpus") or "wiki", split=opts.get("split") or "eval")
        return dl.PerplexityDataModule(
            tokenizer=tokenizer,
            text=text,
            window=opts["window"],
            stride=opts["stride"],
            max_tokens=opts.get("max_tokens"),
            skip=skip,
        )
    if task == "mmlu":
        subjects = opts.get("subjects")
        if isinstance(subjects, str):
            subjects = [s.strip() for s in subjects.split(",") if s.strip()]
        return dl.MMLUDataModule(
            tokenizer,
            skip=skip,
            shots=opts["shots"],
            limit=opts.get("limit"),
            n_per_subject=opts.get("n_per_subject"),
            seed=opts["seed"],
            subjects=subjects or None,
            split=opts.get("split") or "test",
        )
    if task == "summarize":
        return dl.SummarizationDataModule(
            tokenizer,
            batch_size=opts["batch_size"],
            skip=skip,
            limit=opts.get("limit"),
            seed=opts["seed"],
            max_prompt_tokens=opts["max_prompt_tokens"],
            split=opts.get("split") or "eval",
        )
    if task in ("drift", "generate"):
        if task == "generate" and opts.get("prompts"):
            from ..generation import encode_prompts

            items = [
                {
                    "id": f"p{i}",
                    "prompt": encode_prompts(tokenizer, [p], chat=opts.get("chat", True))[
                        "input_ids"
                    ][0].tolist(),
                }
                for i, p in enumerate(opts["prompts"])
            ]
            return dl.PromptsDataModule(items, opts["batch_size"], skip)
        return dl.DriftDataModule(
            tokenizer, batch_size=opts["batch_size"], skip=skip, limit=opts.get("limit")
        )
    raise ValueError(f"unknown task {task!r}")


def run_experiment(task: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every arm of ``task`` (``ppl``, ``mmlu``, ``summarize``, ``drift``, ``generate``)
    with the resolved options ``opts``; returns the metrics records (also in metrics.json)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    with RunStore.open(opts["out"]) as store:  # one run per folder, for the run's lifetime
        return _run_locked(task, opts, store)


def _run_locked(task: str, opts: dict[str, Any], store: RunStore) -> list[dict[str, Any]]:
    import lightning as L
    import yaml

    from .. import lightning as dl

    out = Path(opts["out"])
    handler = _setup_logging(out)
    try:
        torch.manual_seed(opts["seed"])
        if opts.get("threads"):
            torch.set_num_threads(opts["threads"])
        log.info("task %s: loading model %s", task, opts["model"])
        model, tokenizer = load_model(opts["model"])
        model_id = model_identity(model, opts["model"])  # before any arm relays weights out
        arms = parse_arms(opts["methods"], opts["total_prune"], opts.get("release_steps"))
        if task == "drift" and not any(a.method == "dense" for a in arms):
            arms.insert(0, Arm("dense"))  # agreement is measured against dense
        calibration = None
        if any(a.method == "static" for a in arms):
            cal_text = load_text(opts.get("calibration") or "wiki", split="calibration")
            calibration = tokenize_prefix(tokenizer, cal_text, opts["calibration_tokens"])[None]
        dm_all = _datamodule(task, opts, tokenizer, set())
        store.claim(run_fingerprint(task, opts, model_id, data_identity(dm_all.items)))
        atomic_write_text(out / "config.yaml", yaml.safe_dump({"task": task, **opts}))
        log.info("%d samples x %d arms -> %s", len(dm_all.items), len(arms), out)
        main_rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
        for arm in arms:
            done = store.done_ids(arm.key)
            dm = dm_all
            dm.skip = done
            pending = len(dm.pending())
            if not pending:
                log.info("arm %s@%s: all %d samples done", arm.label, arm.total_prune, len(done))
                continue
            log.info(
                "arm %s@%s: %d pending (%d done)", arm.label, arm.total_prune, pending, len(done)
            )
            cfg = (
                None
                if arm.method == "dense"
                else arm_config(arm, opts.get("dart"), backend=opts["backend"], seed=opts["seed"])
            )
            module = dl.DARTModule(
                model,
                "ppl" if task == "ppl" else "mc" if task == "mmlu" else "generate",
                config=cfg,
                arm=arm.to_dict(),
                calibration_ids=calibration,
                leaky=bool(opts.get("leaky")),
                max_new_tokens=opts.get("max_new_tokens") or 128,
                tokenizer=tokenizer,
                compile=bool(opts.get("compile")),
            )
            writer = dl.RecordWriter(str(out), stop_after=opts.get("stop_after"))
            trainer = L.Trainer(
                accelerator=opts.get("accelerator") or "auto",
                devices=opts.get("devices") or 1,
                strategy=opts.get("strategy") or "auto",
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=not opts.get("quiet"),
                use_distributed_sampler=False,
                inference_mode=False,
                callbacks=[writer],
            )
            start = time.perf_counter()
            if task in ("ppl", "mmlu"):
                trainer.test(module, datamodule=dm, verbose=False)
            else:
                trainer.predict(module, datamodule=dm, return_predictions=False)
            seconds = time.perf_counter() - start
            trainer.strategy.barrier()  # every rank's records are on disk
            main_rank = trainer.global_rank == 0
            key = f"{arm.label}@{arm.total_prune}"
            if not main_rank:
                continue
            store.update_summary(
                "timings.json",
                key,
                {"seconds": seconds, "samples": pending, "seconds_per_sample": seconds / pending},
            )
            if module.last_stats is not None:
                stats = dict(module.last_stats)
                stats["drift_events"] = len(stats["drift_events"])
                store.update_summary("stats.json", key, stats)
            log.info("arm %s: %.1f s for %d samples", key, seconds, pending)
        if not main_rank:
            return []  # multi-process runs: rank 0 writes the summaries
        ids = {it["id"] for it in dm_all.items}
        metrics = compute_metrics(task, store, tokenizer, arms, ids)
        store.write_summary("metrics.json", metrics)
        _plots(task, out, store, metrics)
        from ..report import markdown_table

        table = markdown_table(metrics)
        atomic_write_text(out / "table.md", table + "\n")
        log.info("metrics of %s:\n%s", out, table)
        return metrics
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def compute_metrics(
    task: str,
    store: RecordStore | RunStore,
    tokenizer: Any,
    arms: list[Arm],
    ids: set[str] | None = None,
) -> list[dict[str, Any]]:
    """metrics.json records, from the per-sample records of the arms (of samples ``ids``)."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in store:
        if ids is not None and r["id"] not in ids:
            continue
        groups[(r["method"], round(float(r["total_prune"]), 6))].append(r)
    dense = {r["id"]: r for r in groups.get(("dense", 0.0), [])}
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    out = []
    for arm in arms:
        recs = groups.get(arm.key, [])
        if not recs:
            continue
        if task == "ppl":
            values = aggregate_perplexity(recs)
        elif task == "mmlu":
            values = aggregate_accuracy(recs)
        elif task == "summarize":
            values = aggregate_summarization(recs, dense if arm.method != "dense" else None)
        elif task == "drift":
            values = aggregate_drift(recs, dense, decode)
        else:
            values = {
                "samples": len(recs),
                "effective_sparsity": sum(r["effective_sparsity"] for r in recs) / len(recs),
                "new_tokens": sum(len(r["new_tokens"]) for r in recs) / len(recs),
            }
        for metric, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                continue
            out.append({"task": task, **arm.to_dict(), "metric": metric, "value": value})
    return out


def _plots(task: str, out: Path, store: RunStore, metrics: list[dict]) -> None:
    from ..report import plot_metric_vs_sparsity
    from ..results import plot_drift

    main = {
        "ppl": "perplexity",
        "mmlu": "acc_micro",
        "summarize": "rougeL",
        "drift": "rougeL_vs_dense_second",
    }.get(task)
    if main:
        plot_metric_vs_sparsity(out / f"{main}.png", metrics, main)
    if task in ("drift", "generate"):
        first: dict[str, dict] = {}
        for r in store:
            label = f"{r['method']}@{r['total_prune']}"
            if r.get("trace") and (label not in first or r["id"] < first[label]["id"]):
                first[label] = r
        if first:
            ident = min(r["id"] for r in first.values())
            traces = {
                k: [tuple(t) for t in r["trace"]] for k, r in first.items() if r["id"] == ident
            }
            events = {k: r["events"] for k, r in first.items() if r["id"] == ident}
            plot_drift(out / "drift.png", traces, events, title=f"Drift signal, prompt {ident}")
