"""The comparison runner: every arm through lm-eval into a resumable results folder.

``run_lm_eval`` holds its folder through the run store ``dart eval`` uses
(:class:`~dart.evaluate.store.RunStore`): an exclusive lock for the run's lifetime (a second
run on the folder fails at once, naming the holder), ``fingerprint.json`` (the options that
determine a sample's value, the model's identity, the tokenizer's and lm-eval's version; a
resume under another fingerprint is refused with the list of differences; records without a
fingerprint, or a corrupt one, are refused naming the file), ``arms.json`` (each arm's resolved
DARTConfig, :func:`~dart.evaluate.store.claim_arm`) and ``tasks.json`` (each task's identity:
its resolved lm-eval config and a hash of its documents and few-shot documents; a task whose
definition or data changed is refused, so another ``--tasks-dir`` with the same content
resumes and one with other content does not).

Records: ``samples.jsonl`` holds one record per (arm, task document), written when the task
ends; ``answers.jsonl`` one line per answered lm-eval request (the answer and the sparsity it
ran under), appended as requests are answered: a killed run recomputes nothing it answered,
and every record, resumed or not, carries the mean sparsity of its own requests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluate.arms import Arm, arm_config, folder_arms, parse_arms
from ..evaluate.store import (
    FingerprintMismatchError,
    RecordStore,
    RunStore,
    claim_arm,
    digest,
    fingerprint_diff,
    folder_log,
    mismatch_listing,
    model_identity,
    run_fingerprint,
)
from ..options import ArmOptions, dart_field
from ..results import CorruptFileError, atomic_write_text, read_json, write_json
from ..runtime.loading import load_model
from .model import CONTEXT_PHASES, DARTLM, SPARSITY_KEYS, request_key
from .report import POOLED_TASK, comparison_table
from .tasks import default_tasks_dir, ensure_tasks

__all__ = [
    "LMEvalOptions",
    "ZERO_SHOT_TASKS",
    "compute_metrics",
    "lmeval_fingerprint",
    "results_table",
    "run_lm_eval",
    "task_identity",
    "tokenizer_identity",
]

log = logging.getLogger("dart.lmeval")

# The seven 0-shot tasks of the paper's protocol (MMLU 5-shot and XSum come on top).
ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                   "openbookqa")  # fmt: skip
TASKS_FILE = "tasks.json"  # each task's identity (see claim_tasks)
ANSWERS_STEM = "answers"  # answers.jsonl: every answered request with its sparsity
# Options that pick what runs or where, not what a sample's value is: a resume may change
# them (tasks and documents key the records; the DARTConfig settings (`dart`) are bound per
# arm in arms.json, as resolved, and tasks_dir's per task in tasks.json).
RUN_ONLY = frozenset({"out", "threads", "methods", "total_prune", "tasks", "limit", "tasks_dir",
                      "dart"})  # fmt: skip


@dataclass(kw_only=True)
class LMEvalOptions(ArmOptions):
    """Options of ``dart eval lm-eval`` / ``python -m dart.lmeval run`` (flags and YAML keys
    derived by :mod:`dart.options`): the shared model and arm options, lm-eval's, and the
    DARTConfig settings of every arm (``--dart.*``, YAML ``dart:``)."""

    tasks: list[str] = field(
        default_factory=lambda: list(ZERO_SHOT_TASKS),
        metadata={"help": "offline tasks or groups (boolq, rte, hellaswag, winogrande, "
                  "arc_easy, arc_challenge, openbookqa, piqa, sciq, xsum, mmlu)"},
    )  # fmt: skip
    dtype: str = field(
        default="float32", metadata={"help": "model dtype", "choices": ("float32", "bfloat16")}
    )
    limit: int | None = field(
        default=None, metadata={"help": "per task: score its first N documents (all arms alike)"}
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "shots (default: each task's own, 0 for most)"}
    )
    batch_size: int = field(default=1, metadata={"help": "contexts per batch (per-seq masks)"})
    context: str = field(
        default="masked",
        metadata={"help": "a pruned arm computes each context under its masks (masked) or "
                  "dense, as traced (GRIFFIN's class mode; single-token answers score as "
                  "dense)", "choices": CONTEXT_PHASES},
    )  # fmt: skip
    out: str | None = field(
        default=None, metadata={"help": "results folder (default runs/lmeval-<time>)"}
    )
    tasks_dir: str | None = field(
        default=None, metadata={"help": "offline task YAMLs (default: written to the cache)"}
    )
    calibration_tokens: int = field(default=512, metadata={"help": "static: calibration size"})
    max_gen_toks: int | None = field(
        default=None, metadata={"help": "generation tasks: cap on new tokens"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    dart: dict[str, Any] | None = dart_field()


# -- identities -----------------------------------------------------------------------------------
def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Who the tokenizer is: its class and a hash of its whole definition (a fast tokenizer's
    JSON, else its vocabulary) and special tokens. lm-eval's documents are text, so the
    tokenizer decides the token ids a model sees."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = getattr(tokenizer, "special_tokens_map", {})
    return {"class": type(tokenizer).__name__, "sha256": digest([spec, special])}


def task_identity(task: Any) -> dict[str, Any]:
    """What an lm-eval task scores: its resolved config (prompts, targets, metrics, splits;
    without where its files lie) and a hash of its evaluation and few-shot documents."""
    config = json.loads(json.dumps(task.config.to_dict(), default=str))
    config.pop("dataset_kwargs", None)  # data file paths: the documents' hash stands for them
    config.get("metadata", {}).pop("config_source", None)
    docs = list(task.eval_docs)
    fewshot = task.fewshot_docs() if hasattr(task, "fewshot_docs") else None
    return {
        "config": config,
        "docs": len(docs),
        "docs_sha256": digest(docs),
        "fewshot_sha256": None if fewshot is None else digest(list(fewshot)),
    }


def lmeval_fingerprint(
    opts: LMEvalOptions, model: dict[str, Any], tokenizer: dict[str, Any]
) -> dict[str, Any]:
    """Everything of a run that determines every sample's value: the options (minus
    :data:`RUN_ONLY`), the model's and tokenizer's identity and lm-eval's version (its
    request building and metrics)."""
    import lm_eval

    options = {k: v for k, v in asdict(opts).items() if k not in RUN_ONLY}
    data = {"tokenizer": tokenizer, "lm_eval": lm_eval.__version__}
    return run_fingerprint("lm-eval", options, model, data)


def claim_tasks(folder: Path, identities: dict[str, dict[str, Any]]) -> None:
    """Bind each task of ``folder`` to its identity (:func:`task_identity`) in ``tasks.json``;
    a task that was run under another identity raises
    :class:`~dart.evaluate.store.FingerprintMismatchError` naming what differs."""
    path = folder / TASKS_FILE
    identities = json.loads(json.dumps(identities, default=str))  # as it reads back
    try:
        known = read_json(path)
    except FileNotFoundError:
        known = {}
    except CorruptFileError as e:
        raise FingerprintMismatchError(
            f"{e}; the tasks of {folder} cannot be matched to their data: pass another --out, "
            "or delete the folder to start over"
        ) from e
    diff = []
    for name, ident in identities.items():
        if name in known and known[name] != ident:
            diff += [f"{name}.{d}" for d in fingerprint_diff(known[name], ident)]
    if diff:
        raise FingerprintMismatchError(
            f"results folder {folder}: tasks were run on other definitions or data (another "
            "--tasks-dir or changed task files); resuming would mix their records:"
            + mismatch_listing(diff)
        )
    if any(name not in known for name in identities):
        write_json(path, {**known, **identities})


# -- the run --------------------------------------------------------------------------------------
def run_lm_eval(opts: LMEvalOptions) -> list[dict[str, Any]]:
    """Compare ``opts.methods`` at ``opts.total_prune`` on ``opts.tasks`` through lm-eval.

    The results folder holds ``config.json`` (options), ``fingerprint.json``, ``arms.json``,
    ``tasks.json`` (see the module docstring), ``answers.jsonl`` (every answered request with
    its sparsity), ``samples.jsonl`` (one record per (arm, task document): the task's
    per-sample metrics, the responses and the sparsity of its requests), ``metrics.json``
    (``{task, method, total_prune, metric, value, stderr, n}``; for every pruned arm also the
    paired difference to dense, and DART - GRIFFIN, with its standard error), ``table.md`` and
    ``log.txt``. Rerunning it resumes; a folder of other settings is refused.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out or time.strftime("runs/lmeval-%Y%m%d-%H%M%S"))
    arms = parse_arms(opts.methods, opts.total_prune)
    # every arm's config is checked before anything loads: a bad setting fails at once
    configs = {a: arm_config(a, opts.dart, backend=opts.backend, seed=opts.seed)
               for a in arms}  # fmt: skip
    with RunStore.open(out) as store, folder_log(store.folder, log):
        tasks_dir = ensure_tasks(opts.tasks_dir or default_tasks_dir(), opts.tasks)
        tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        loaded = tm.load(opts.tasks)["tasks"]
        ids = {name: list(range(len(task.eval_docs) if opts.limit is None
                                else min(opts.limit, len(task.eval_docs))))
               for name, task in loaded.items()}  # fmt: skip
        model, tokenizer = load_model(opts.model, dtype=opts.dtype, weights=opts.weights)
        model_id = model_identity(model, opts.model)  # before any arm relays the weights out
        store.claim(lmeval_fingerprint(opts, model_id, tokenizer_identity(tokenizer)))
        claim_tasks(store.folder, {name: task_identity(t) for name, t in loaded.items()})
        write_json(out / "config.json", asdict(opts))
        for arm in arms:
            config = configs[arm] and configs[arm].to_dict()
            claim_arm(out, f"{arm.label}@{arm.total_prune}", config)
            _run_arm(arm, config, opts, model, tokenizer, tm, ids, store, simple_evaluate)
        records = list(store.records)  # the folder's, of this run and any earlier ones
        metrics = compute_metrics(records, folder_arms(arms, records), ids)
        store.write_summary("metrics.json", metrics)
        tables = [results_table(metrics)]
        if any(r["metric"] == "acc" for r in metrics):  # the multiple-choice tasks
            tables.insert(0, comparison_table(metrics, "acc"))
        atomic_write_text(out / "table.md", "\n\n".join(tables) + "\n")
        return metrics


def _run_arm(arm, config, opts, model, tokenizer, tm, ids, store, simple_evaluate) -> None:
    """Score the arm's pending samples under ``config``, the resolved DARTConfig that
    :func:`claim_arm` bound to the folder (so what runs is what was checked)."""
    done = store.done_ids(arm.key)
    pending = {t: [i for i in docs if f"{t}:{i}" not in done] for t, docs in ids.items()}
    pending = {t: docs for t, docs in pending.items() if docs}
    if not pending:
        log.info("arm %s@%s: all samples done", arm.label, arm.total_prune)
        return
    log.info("arm %s@%s: %d samples pending", arm.label, arm.total_prune,
             sum(map(len, pending.values())))  # fmt: skip
    lm = DARTLM(
        model, method=arm.method, total_prune=arm.total_prune, tokenizer=tokenizer,
        backend=opts.backend, dart_config=config, release_step=arm.release_step,
        calibration_tokens=opts.calibration_tokens, seed=opts.seed, batch_size=opts.batch_size,
        context=opts.context, answers=store.folder / f"{ANSWERS_STEM}.jsonl",
    )  # fmt: skip
    try:
        for task, docs in pending.items():  # one task at a time: its records land as it ends
            _run_task(lm, arm, opts, tm, task, docs, store.records, simple_evaluate)
    finally:
        lm.close()


def _run_task(lm, arm, opts, tm, task, docs, records: RecordStore, simple_evaluate) -> None:
    """Score one task's pending documents ``docs`` with ``lm`` and append their records."""
    start = time.perf_counter()
    gen = {"max_gen_toks": opts.max_gen_toks} if opts.max_gen_toks else None
    result = simple_evaluate(
        model=lm, tasks=[task], samples={task: docs}, num_fewshot=opts.num_fewshot,
        task_manager=tm, log_samples=True, bootstrap_iters=0, gen_kwargs=gen,
        random_seed=opts.seed, numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
    )  # fmt: skip
    for name, samples in result["samples"].items():
        records.append(_record(arm, name, s, lm.request_sparsity) for s in samples)
    log.info("arm %s@%s, %s: %d documents, %.1f s", arm.label, arm.total_prune, task,
             len(docs), time.perf_counter() - start)  # fmt: skip


_SKIP = {"doc", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash",
         "target_hash", "filter", "metrics", "doc_id", "target"}  # fmt: skip


def _record(
    arm: Arm, task: str, sample: dict, sparsity: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """A sample's record; its sparsity is the mean over its requests of the sparsity each
    was answered under (computed now or read back from the answers file)."""
    metrics = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    if not metrics:  # older sample layout: every numeric top-level key is a metric
        metrics = {k: v for k, v in sample.items() if k not in _SKIP and _is_number(v)}
    # one filtered response per request: (log-likelihood, greedy) or generated text
    resps = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
    keys = [request_key(args) for args in sample["arguments"]]
    missing = [k for k in keys if k not in sparsity]
    if missing:  # every request goes through DARTLM, which records it: a bug if not
        raise RuntimeError(
            f"{task} document {sample['doc_id']}: {len(missing)} of its requests were answered "
            "without a recorded sparsity"
        )
    return {
        **arm.to_dict(),
        "id": f"{task}:{sample['doc_id']}",
        "task": task,
        "doc_id": sample["doc_id"],
        "target": str(sample.get("target")),
        "metrics": metrics,
        "responses": resps,
        **{k: sum(sparsity[r][k] for r in keys) / len(keys) for k in SPARSITY_KEYS},
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- metrics --------------------------------------------------------------------------------------
def _mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compute_metrics(
    store: Iterable[dict[str, Any]], arms: list[Arm], ids: dict[str, list[int]]
) -> list[dict[str, Any]]:
    """Per (arm, task, metric): mean, standard error, n; per pruned arm the paired difference
    to dense and (where both ran) DART - GRIFFIN on the same documents, with stderr. With more
    than one task, the same over all their samples pooled (task :data:`POOLED_TASK`; metrics
    every task has, e.g. ``acc``), where the per-task intervals are too wide to read."""
    wanted = {f"{t}:{i}" for t, docs in ids.items() for i in docs}
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in store:
        if r["id"] in wanted:
            by[(r["method"], round(float(r["total_prune"]), 6), r["task"])][r["id"]] = r
    groups = {task: [task] for task in ids}
    if len(ids) > 1:
        groups[POOLED_TASK] = list(ids)

    def records(arm: Arm, tasks: list[str]) -> dict[str, dict]:
        return {i: r for t in tasks for i, r in by.get((*arm.key, t), {}).items()}

    out = []
    for arm in arms:
        for label, tasks in groups.items():
            recs = records(arm, tasks)
            if recs:
                others = {o: records(o, tasks) for o in _pairs(arm, arms)}
                out += _group_metrics(label, arm, recs, others)
    return out


def _group_metrics(
    task: str, arm: Arm, recs: dict[str, dict], others: dict[Arm, dict[str, dict]]
) -> list[dict[str, Any]]:
    """The metrics of one arm's records ``recs`` (id -> record) and its paired differences to
    each arm of ``others`` (same ids)."""
    metrics = set.intersection(*(set(r["metrics"]) for r in recs.values()))
    first = next(iter(recs.values()))
    out = []
    for metric in [m for m in first["metrics"] if m in metrics]:
        vals = [float(r["metrics"][metric]) for r in recs.values()]
        mean, se = _mean_ci(vals)
        out.append(_metric(task, arm, metric, mean, se, len(vals)))
        for other, base in others.items():
            common = sorted(set(recs) & set(base))
            if common:
                diff = [float(recs[i]["metrics"][metric]) -
                        float(base[i]["metrics"][metric]) for i in common]  # fmt: skip
                d, dse = _mean_ci(diff)
                out.append(_metric(task, arm, f"{metric}_minus_{other.method}", d, dse,
                                   len(common)))  # fmt: skip
    for key in SPARSITY_KEYS:
        vals = [float(r[key]) for r in recs.values()]
        out.append(_metric(task, arm, key, sum(vals) / len(vals), None, len(vals)))
    return out


def _pairs(arm: Arm, arms: list[Arm]):
    """The arms ``arm`` is compared with: dense, and its method's ``compared_with`` at its
    sparsity."""
    if arm.is_reference:
        return
    for other in arms:
        if other.is_reference:
            yield other
        elif other.method in arm.spec.compared_with and other.total_prune == arm.total_prune:
            yield other


def _metric(task, arm, metric, value, stderr, n) -> dict[str, Any]:
    ok = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731
    return {"task": task, **arm.to_dict(), "metric": metric, "value": ok(value),
            "stderr": ok(stderr) if stderr is not None else None, "n": n}  # fmt: skip


def results_table(metrics: list[dict[str, Any]]) -> str:
    """Markdown: one row per (task, arm), each metric as value +- 95% half-width."""
    rows: dict[tuple, dict[str, str]] = defaultdict(dict)
    for r in metrics:
        v, se = r["value"], r.get("stderr")
        cell = "" if v is None else f"{v:.4f}" + (f" ± {1.96 * se:.4f}" if se else "")
        rows[(r["task"], r["method"], float(r["total_prune"]))][r["metric"]] = cell
    cols = list(dict.fromkeys(m for vals in rows.values() for m in vals))
    lines = ["| task | method | sparsity | " + " | ".join(cols) + " |"]
    lines.append("|" + "---|" * (3 + len(cols)))
    for (task, method, prune), vals in rows.items():
        cells = [vals.get(c, "") for c in cols]
        lines.append(f"| {task} | {method} | {prune:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
