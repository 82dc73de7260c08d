"""lm-evaluation-harness (0.4) model type ``dart`` and the comparison runner ``run_lm_eval``.

:class:`DARTLM` is lm-eval's own HF model class (``HFLM``) with a DART handle attached. Only the
log-likelihood path is replaced, to keep the masks honest and cheap:

* masks come from the context only (a dense tracing forward of the context), never from a
  continuation;
* requests that share a context are grouped: each context is computed once, keeping its KV
  cache, and all continuations of a batch of contexts are then computed in one forward of
  their own tokens over that cache (repeated once per continuation, each row under its
  context's masks); GRIFFIN's "class mode". The context itself is computed under its masks
  (``context='masked'``, the default: a second forward after the trace) or dense
  (``context='dense'``: the trace is the context's computation, one forward; the first
  continuation token is then predicted by the dense model, so single-token answers such as
  MMLU's letters or BoolQ's yes/no score as dense);
* a batch holds several contexts with per-sequence masks (``batch_policy='per_sequence'``).

``generate_until`` is HFLM's: ``model.generate`` with the handle's hooks, i.e. DART's full
schedule (trace the prompt, masks, drift checks, re-trace) per sequence. Rolling
log-likelihood (perplexity tasks) goes through the same grouped path, so a window's masks come
from its preceding tokens; use ``dart eval ppl`` for the project's perplexity protocol.

lm-eval 0.4.13 discovers models only through its registry (no entry points), so importing this
module registers ``dart``; ``python -m dart.lmeval --model dart --model_args ... --tasks ...``
is the stock lm-eval command line with ``dart`` registered and the offline tasks included.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..assets.data import load_text
from ..core.api import DARTHandle
from ..core.config import BACKENDS, ConfigError, DARTConfig
from ..core.methods import METHODS, get_method
from ..core.quant import Weights
from ..evaluate.arms import Arm, arm_config, attach_arm, parse_arms
from ..evaluate.perplexity import accepts_logits_to_keep, tokenize_prefix
from ..evaluate.store import RecordStore, claim_arm, folder_log
from ..evaluate.stream import weight_bytes
from ..options import add_options, load_yaml, options_from, resolve_options
from ..results import atomic_write_text, write_json
from ..runtime.loading import load_model
from .report import POOLED_TASK, comparison_table, load_lmeval_metrics, plot_comparison
from .tasks import default_tasks_dir, write_tasks

__all__ = [
    "DARTLM",
    "LMEvalOptions",
    "compute_metrics",
    "load_protocol",
    "main",
    "results_table",
    "run_lm_eval",
]

log = logging.getLogger("dart.lmeval")

# The seven 0-shot tasks of the paper's protocol (MMLU 5-shot and XSum come on top).
ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                   "openbookqa")  # fmt: skip
# How a pruned arm computes a request's context: under the masks built from it (the context
# is traced, then computed again under its masks) or dense (its tracing forward is its
# computation, GRIFFIN's "class mode": one forward, but the first continuation token is then
# predicted by the dense model, so single-token answers score as dense).
CONTEXT_PHASES = ("masked", "dense")


def _arm_dart_config(arm: Arm, overrides: dict | None, backend: str, seed: int):
    return arm_config(arm, dict(overrides or {}), backend=backend, seed=seed)


@register_model("dart")
class DARTLM(HFLM):
    """HFLM with a DART arm attached: ``method`` (dense, static, griffin, random, dart,
    dart-nodrift) at ``total_prune``; ``pretrained`` is a :func:`dart.load_model` name or folder
    (or a loaded model, with ``tokenizer``). ``dart_config``: a DARTConfig YAML/JSON file whose
    fields override the defaults (the arm's method and sparsity win)."""

    def __init__(
        self,
        pretrained: str | torch.nn.Module = "smollm2-135m",
        method: str = "dart",
        total_prune: float = 0.5,
        backend: str = "gathered",
        dtype: str = "float32",
        device: str = "cpu",
        tokenizer: Any = None,
        weights: str = "fp",
        dart_config: str | dict | None = None,
        release_step: int | None = None,
        calibration: str = "wiki",
        calibration_tokens: int = 512,
        seed: int = 0,
        batch_size: int | str = 1,
        context: str = "masked",
        **kwargs: Any,
    ) -> None:
        if context not in CONTEXT_PHASES:
            raise ValueError(f"context={context!r}: expected one of {', '.join(CONTEXT_PHASES)}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            log.warning("device %r is not available here: using the CPU", device)
            device = "cpu"  # lm-eval's command line asks for cuda unless told otherwise
        if isinstance(pretrained, str):
            model, tokenizer = load_model(pretrained, dtype=dtype, device=device, weights=weights)
        else:
            model = pretrained
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: DARTLM(model, tokenizer=...)")
        kwargs.pop("device", None)
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs
        )
        rs = None if release_step in (None, "", "None") else int(release_step)
        prunes = get_method(method).prunes
        self.arm = Arm(method, float(total_prune) if prunes else 0.0, rs)
        overrides = dart_config
        if isinstance(dart_config, str):
            overrides = DARTConfig.load(dart_config).to_dict()
        self.handle: DARTHandle | None = None
        if prunes:
            cfg = _arm_dart_config(self.arm, overrides, backend, int(seed))
            cal = None
            if get_method(cfg.method).needs_calibration:
                text = load_text(calibration, split="calibration")
                cal = tokenize_prefix(tokenizer, text, int(calibration_tokens))[None]
            self.handle = attach_arm(model, cfg, cal)
        self._token_bytes, self._neuron_bytes = weight_bytes(model, self.handle)
        self.sparsity_log: list[dict[str, float]] = []  # one entry per batch of contexts
        self.context = context
        self._last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def close(self) -> None:
        """Detach the arm (the model is restored exactly)."""
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    # -- the context: masks, then one forward that keeps its KV cache -------------------------
    def _run_context(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Logits after each row's context ([B, V]) and its KV cache. A traced method first
        builds each row's masks from its context (a dense tracing forward); the context is then
        computed under them (``context='masked'``), or that tracing forward is the context's
        own computation (``context='dense'``: one forward, GRIFFIN's class mode). The masks
        stay held for the continuations."""
        h = self.handle
        if h is None:
            return self._forward(ids, mask, cache=True)
        c = h.controller
        if h.method.needs_calibration:
            c.begin(ids.shape[0], ids.device)  # the calibrated masks, every row
        elif self.context == "dense":
            out = self._forward(ids, mask, cache=True)  # trace = the context's computation
        else:
            self._forward(ids, mask, cache=False)  # trace the context: its masks
        c.select_traced()
        self.sparsity_log.append(self._sparsity())
        if self.context == "masked":
            with h.hold():
                return self._forward(ids, mask, cache=True)
        if h.method.needs_calibration:
            with h.hold(), _dense_ffns(c):
                return self._forward(ids, mask, cache=True)
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: bool):
        """The last position's logits ([B, V], float) and the KV cache (None without)."""
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=cache, **self._last_only)
        return out.logits[:, -1].float(), out.past_key_values if cache else None

    def _sparsity(self) -> dict[str, float]:
        """FFN neurons skipped and per-token weight bytes skipped under the current masks."""
        c = self.handle.controller
        counts = c.counts if c.counts is not None else c.widths
        skipped = [w - k for w, k in zip(c.widths, counts, strict=True)]
        saved = sum(s * b for s, b in zip(skipped, self._neuron_bytes, strict=True))
        return {
            "ffn_sparsity": sum(skipped) / sum(c.widths),
            "weight_bytes_sparsity": saved / self._token_bytes,
        }

    # -- log-likelihood -------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Score (context, continuation) requests; one trace per distinct context."""
        from tqdm.auto import tqdm

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            groups[tuple(ctx)].append(i)
        contexts = sorted(groups, key=len, reverse=True)  # similar lengths share a batch
        batch = int(override_bs or self.batch_size or 1)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="dart ll")
        for start in range(0, len(contexts), batch):
            chunk = contexts[start : start + batch]
            conts = [[requests[i][2] for i in groups[c]] for c in chunk]
            scores = self._score_contexts([list(c) for c in chunk], conts)
            for c, row in zip(chunk, scores, strict=True):
                for i, answer in zip(groups[c], row, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
        bar.close()
        return results

    @torch.no_grad()
    def _score_contexts(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[tuple[float, bool]]]:
        """Per context: (sum log p(continuation), greedy?) of each of its continuations.

        Each context is computed once; then all continuations of the batch are computed in one
        forward of their own tokens over the context's cache, repeated once per continuation
        (and, for a pruned arm, under its context's masks)."""
        longest = max(len(c) for row in continuations for c in row)
        keep = max(self.max_length - longest + 1, 1)  # left-truncate contexts that do not fit
        contexts = [c[-keep:] for c in contexts]
        ids, mask = self._left_pad(contexts)
        first, cache = self._run_context(ids, mask)
        owner = [b for b, row in enumerate(continuations) for _ in row]
        flat = [c for row in continuations for c in row]
        rest = self._continue(flat, torch.tensor(owner, device=self.device), cache, mask)
        scores: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        for r, (b, cont) in enumerate(zip(owner, flat, strict=True)):
            logits = torch.cat([first[b : b + 1], rest[r, : len(cont) - 1]], 0)
            scores[b].append(_score(logits, cont))
        return scores

    def _continue(self, conts, owner: torch.Tensor, cache, ctx_mask: torch.Tensor) -> torch.Tensor:
        """Logits after each continuation's tokens but its last ([R, W, V]): one forward of
        every continuation over its context's cache (row ``r`` continues context
        ``owner[r]``, under that context's masks)."""
        width = max(len(c) - 1 for c in conts)
        if width == 0:  # single-token continuations: the context's last logits say it all
            return torch.empty(len(conts), 0, self.model.config.vocab_size, device=self.device)
        paused = contextlib.nullcontext()
        if self.handle is not None:
            self.handle.controller.repeat_rows(owner)
            paused = self.handle.controller.paused(len(conts))  # no drift monitor, no stats
        cache.batch_select_indices(owner)
        pad = self.tokenizer.pad_token_id or 0
        rows = [c[:-1] for c in conts]
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        mask = torch.cat([ctx_mask[owner], real.to(ctx_mask)], 1)
        with paused:
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        return out.logits.float()

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return (
            torch.tensor(ids, device=self.device),
            torch.tensor(mask, device=self.device),
        )


def _score(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """``logits[j]`` predicts ``cont[j]``: (sum of log-probabilities, all greedy)."""
    lp = F.log_softmax(logits, dim=-1)
    target = torch.tensor(cont, device=lp.device)
    total = float(lp.gather(1, target[:, None]).sum())
    return total, bool((lp.argmax(-1) == target).all())


@contextlib.contextmanager
def _dense_ffns(controller):
    """Every FFN of ``controller`` computes densely inside (its masks stay installed)."""
    with contextlib.ExitStack() as stack:
        for layer in controller.layers:
            stack.enter_context(layer.routed())
        yield


# -- the comparison runner ----------------------------------------------------------------------
@dataclass
class LMEvalOptions:
    """Options of ``dart eval lm-eval`` / ``python -m dart.lmeval run`` (flags and YAML keys
    derived by :mod:`dart.options`)."""

    tasks: list[str] = field(
        default_factory=lambda: list(ZERO_SHOT_TASKS),
        metadata={"help": "offline tasks or groups (boolq, rte, hellaswag, winogrande, "
                  "arc_easy, arc_challenge, openbookqa, piqa, sciq, xsum, mmlu)"},
    )  # fmt: skip
    methods: list[str] = field(
        default_factory=lambda: ["dense", "griffin", "dart"],
        metadata={"help": "arms", "choices": tuple(METHODS)},
    )
    total_prune: list[float] = field(
        default_factory=lambda: [0.5], metadata={"help": "FFN sparsities of the pruned arms"}
    )
    model: str = field(default="smollm2-135m", metadata={"help": "dart.load_model name/folder"})
    dtype: str = field(
        default="float32", metadata={"help": "model dtype", "choices": ("float32", "bfloat16")}
    )
    weights: Weights = field(
        default="fp",
        metadata={"help": "fp (the model's own weights) or quantised q8, q4, q4m (dart.quantize)"},
    )
    limit: int | None = field(
        default=None, metadata={"help": "per task: score its first N documents (all arms alike)"}
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "shots (default: each task's own, 0 for most)"}
    )
    batch_size: int = field(default=1, metadata={"help": "contexts per batch (per-seq masks)"})
    backend: str = field(
        default="gathered", metadata={"help": "sparse FFN backend", "choices": BACKENDS}
    )
    context: str = field(
        default="masked",
        metadata={"help": "a pruned arm computes each context under its masks (masked) or "
                  "dense, as traced (GRIFFIN's class mode; single-token answers score as "
                  "dense)", "choices": CONTEXT_PHASES},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of lm-eval and DART"})
    out: str | None = field(
        default=None, metadata={"help": "results folder (default runs/lmeval-<time>)"}
    )
    tasks_dir: str | None = field(
        default=None, metadata={"help": "offline task YAMLs (default: written to the cache)"}
    )
    dart_config: str | None = field(
        default=None, metadata={"help": "DARTConfig YAML whose fields override the defaults"}
    )
    calibration_tokens: int = field(default=512, metadata={"help": "static: calibration size"})
    max_gen_toks: int | None = field(
        default=None, metadata={"help": "generation tasks: cap on new tokens"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})


@dataclass
class ProtocolOptions:
    """Options of ``python -m dart.lmeval protocol``: which runs of a protocol config, and
    overrides of every run's options."""

    protocol: str = field(
        metadata={"help": "protocol config, e.g. configs/lmeval/paper.yaml", "positional": True}
    )
    runs: list[str] | None = field(default=None, metadata={"help": "a subset of its runs"})
    methods: list[str] | None = field(
        default=None, metadata={"help": "override the arms", "choices": tuple(METHODS)}
    )
    total_prune: list[float] | None = field(
        default=None, metadata={"help": "override the sparsities"}
    )
    limit: int | None = field(default=None, metadata={"help": "override every run's limit"})
    context: str | None = field(
        default=None, metadata={"help": "override the context phase", "choices": CONTEXT_PHASES}
    )
    out: str | None = field(default=None, metadata={"help": "parent folder of the runs"})


def load_protocol(path: str | os.PathLike) -> dict[str, LMEvalOptions]:
    """The runs of a protocol config: shared options at the top, one entry per run under
    ``runs`` (its options override the shared ones; its folder is ``<out>/<run name>``)."""
    data = load_yaml(path)
    runs = data.pop("runs", None)
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path}: needs a `runs:` mapping of run name -> options")
    out = data.pop("out", "results/lmeval")
    return {
        name: options_from(
            LMEvalOptions, {**data, "out": f"{out}/{name}", **(opts or {})}, f"{path}: {name}"
        )
        for name, opts in runs.items()
    }


def _fingerprint(opts: LMEvalOptions) -> str:
    """What determines a sample's value; a resume with another fingerprint is refused."""
    keys = ("model", "dtype", "num_fewshot", "backend", "seed", "dart_config",
            "calibration_tokens", "max_gen_toks", "batch_size", "context")  # fmt: skip
    data = {k: getattr(opts, k) for k in keys}
    if opts.weights != "fp":  # only then: folders made before the option keep their fingerprint
        data["weights"] = opts.weights
    if opts.dart_config:
        data["dart_config_text"] = Path(opts.dart_config).read_text(encoding="utf-8")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _check_folder(out: Path, fingerprint: str) -> None:
    stamp = out / "fingerprint.json"
    if stamp.exists():
        old = json.loads(stamp.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{out} holds results of other settings ({old.get('settings')}); resume with the "
                "same model/dtype/shots/backend/seed/config, or pass a new --out"
            )


def _task_ids(tm, names: list[str], limit: int | None) -> dict[str, list[int]]:
    """The document indices each leaf task scores: its first ``limit`` (the same for every
    arm; lm-eval takes the first N of a task's evaluation split)."""
    loaded = tm.load(names)["tasks"]
    ids = {}
    for name, task in loaded.items():
        n = len(task.eval_docs)
        ids[name] = list(range(n if limit is None else min(limit, n)))
    return ids


def run_lm_eval(opts: LMEvalOptions) -> list[dict[str, Any]]:
    """Compare ``opts.methods`` at ``opts.total_prune`` on ``opts.tasks`` through lm-eval.

    The results folder holds ``config.json`` (options) and ``fingerprint.json``,
    ``samples.jsonl`` (one record per (arm, task document): the task's per-sample metrics,
    the log-likelihoods and sparsity), ``metrics.json`` (``{task, method, total_prune, metric,
    value, stderr, n}``; for every pruned arm also the paired difference to dense, and DART -
    GRIFFIN, with a 95% interval), ``table.md``, ``cache/`` (lm-eval's request cache per arm:
    an interrupted run recomputes nothing it finished) and ``log.txt``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out or time.strftime("runs/lmeval-%Y%m%d-%H%M%S"))
    fingerprint = _fingerprint(opts)
    _check_folder(out, fingerprint)
    with folder_log(out, log):
        write_json(out / "config.json", asdict(opts))
        settings = {k: v for k, v in asdict(opts).items() if k not in ("out", "threads")}
        write_json(out / "fingerprint.json", {"fingerprint": fingerprint, "settings": settings})
        tasks_dir = Path(opts.tasks_dir) if opts.tasks_dir else default_tasks_dir()
        if not any(tasks_dir.glob("*.yaml")):
            write_tasks(tasks_dir)
        tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        ids = _task_ids(tm, opts.tasks, opts.limit)
        arms = parse_arms(opts.methods, opts.total_prune)
        store = RecordStore(out)
        model, tokenizer = load_model(opts.model, dtype=opts.dtype, weights=opts.weights)
        overrides = DARTConfig.load(opts.dart_config).to_dict() if opts.dart_config else None
        for arm in arms:
            config = _arm_dart_config(arm, overrides, opts.backend, opts.seed)
            resolved = config and config.to_dict()
            claim_arm(out, f"{arm.label}@{arm.total_prune}", resolved)
            _run_arm(arm, resolved, opts, model, tokenizer, tm, ids, store, out, simple_evaluate)
        metrics = compute_metrics(store, arms, ids)
        write_json(out / "metrics.json", metrics)
        tables = [results_table(metrics)]
        if any(r["metric"] == "acc" for r in metrics):  # the multiple-choice tasks
            tables.insert(0, comparison_table(metrics, "acc"))
        atomic_write_text(out / "table.md", "\n\n".join(tables) + "\n")
        return metrics


def _run_arm(arm, config, opts, model, tokenizer, tm, ids, store, out, simple_evaluate) -> None:
    """Score the arm's pending samples under ``config``, the resolved DARTConfig that
    :func:`claim_arm` bound to the folder (so what runs is what was checked)."""
    done = {i for m, p, i in store.done() if (m, p) == arm.key}
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
        context=opts.context,
    )  # fmt: skip
    (out / "cache").mkdir(parents=True, exist_ok=True)
    try:
        for task, docs in pending.items():  # one task at a time: its records land as it ends
            _run_task(lm, arm, opts, tm, task, docs, store, out, simple_evaluate)
    finally:
        lm.close()


def _run_task(lm, arm, opts, tm, task, docs, store, out, simple_evaluate) -> None:
    """Score one task's pending documents ``docs`` with ``lm`` and append their records."""
    start = time.perf_counter()
    lm.sparsity_log.clear()
    gen = {"max_gen_toks": opts.max_gen_toks} if opts.max_gen_toks else None
    result = simple_evaluate(
        model=lm, tasks=[task], samples={task: docs}, num_fewshot=opts.num_fewshot,
        task_manager=tm, log_samples=True, bootstrap_iters=0, gen_kwargs=gen,
        use_cache=str(out / "cache" / f"{arm.label}@{arm.total_prune}"),
        random_seed=opts.seed, numpy_random_seed=opts.seed, torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
    )  # fmt: skip
    mean = _mean_sparsity(lm.sparsity_log)
    for name, samples in result["samples"].items():
        store.append(_record(arm, name, s, mean) for s in samples)
    log.info("arm %s@%s, %s: %d documents, %.1f s", arm.label, arm.total_prune, task,
             len(docs), time.perf_counter() - start)  # fmt: skip


def _mean_sparsity(values: list[dict[str, float]]) -> dict[str, float]:
    if not values:
        return {"ffn_sparsity": 0.0, "weight_bytes_sparsity": 0.0}
    return {k: sum(v[k] for v in values) / len(values) for k in values[0]}


_SKIP = {"doc", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash",
         "target_hash", "filter", "metrics", "doc_id", "target"}  # fmt: skip


def _record(arm: Arm, task: str, sample: dict, sparsity: dict[str, float]) -> dict[str, Any]:
    metrics = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    if not metrics:  # older sample layout: every numeric top-level key is a metric
        metrics = {k: v for k, v in sample.items() if k not in _SKIP and _is_number(v)}
    # one filtered response per request: (log-likelihood, greedy) or generated text
    resps = [r[0] if isinstance(r, (list, tuple)) else r for r in sample["filtered_resps"]]
    return {
        **arm.to_dict(),
        "id": f"{task}:{sample['doc_id']}",
        "task": task,
        "doc_id": sample["doc_id"],
        "target": str(sample.get("target")),
        "metrics": metrics,
        "responses": resps,
        **sparsity,  # the arm's mean over its contexts (0 for dense)
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compute_metrics(
    store: RecordStore, arms: list[Arm], ids: dict[str, list[int]]
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
    for key in ("ffn_sparsity", "weight_bytes_sparsity"):
        vals = [float(r.get(key, 0.0)) for r in recs.values()]
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


def run_protocol(args: ProtocolOptions) -> None:
    """The runs of a protocol config (or ``args.runs`` of them), with ``args``' overrides."""
    runs = load_protocol(args.protocol)
    for name in args.runs or list(runs):
        if name not in runs:
            raise ConfigError(f"no run {name!r} in {args.protocol}; runs: {', '.join(runs)}")
        changes = {k: getattr(args, k) for k in ("methods", "total_prune", "limit", "context")}
        opts = replace(runs[name], **{k: v for k, v in changes.items() if v is not None})
        if args.out:
            opts = replace(opts, out=f"{args.out}/{name}")
        print(f"== {name} -> {opts.out}", flush=True)
        print(results_table(run_lm_eval(opts)), flush=True)


def _parse(parser: argparse.ArgumentParser, argv: list[str], cls: type) -> Any:
    """The options instance of ``argv``; a bad value exits with the parser's usage error."""
    try:
        (opts,) = resolve_options(vars(parser.parse_args(argv)), cls)
    except ConfigError as e:
        parser.error(str(e))
    return opts


def report(argv: list[str]) -> None:
    """``python -m dart.lmeval report FOLDER``: the arms side by side (table on stdout) and,
    with ``--figure``, the per-task and paired-difference plot."""
    parser = argparse.ArgumentParser(
        prog="python -m dart.lmeval report", description="A results folder's arms side by side."
    )
    parser.add_argument("folder", help="a dart.lmeval results folder (holds metrics.json)")
    parser.add_argument("--metric", default="acc", help="per-sample metric (default: acc)")
    parser.add_argument("--figure", default=None, help="write the plot here (.png, .pdf)")
    parser.add_argument("--title", default=None, help="the plot's title")
    args = parser.parse_args(argv)
    try:
        metrics = load_lmeval_metrics(args.folder)
        print(comparison_table(metrics, args.metric))
        if args.figure:
            print(f"figure: {plot_comparison(args.figure, metrics, args.metric, args.title)}")
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    """``python -m dart.lmeval run --tasks ... --methods ... --total-prune ...`` runs the
    comparison, ``python -m dart.lmeval protocol CONFIG`` the runs of a config,
    ``python -m dart.lmeval report FOLDER`` shows a folder's arms side by side; any other
    arguments go to lm-eval's own CLI with ``dart`` registered and the
    offline tasks on its include path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        parser = argparse.ArgumentParser(
            prog="python -m dart.lmeval run", description="Compare arms through lm-eval."
        )
        add_options(parser, LMEvalOptions)
        opts = _parse(parser, argv[1:], LMEvalOptions)
        print(results_table(run_lm_eval(opts)))
        return
    if argv[:1] == ["report"]:
        report(argv[1:])
        return
    if argv[:1] == ["protocol"]:
        parser = argparse.ArgumentParser(
            prog="python -m dart.lmeval protocol", description="Run a protocol config."
        )
        add_options(parser, ProtocolOptions, config=False)
        args = _parse(parser, argv[1:], ProtocolOptions)
        try:
            run_protocol(args)
        except ConfigError as e:
            parser.error(str(e))
        return
    from lm_eval.__main__ import cli_evaluate

    tasks_dir = default_tasks_dir()
    if not any(tasks_dir.glob("*.yaml")):
        write_tasks(tasks_dir)
    if "--include_path" not in argv:
        argv += ["--include_path", str(tasks_dir)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
