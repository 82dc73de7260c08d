"""Evaluations as plain functions: perplexity, multiple choice (MMLU), summarisation stand-in,
knowledge drift; the task registry over them; metrics (ROUGE on text or token ids); arms (the
methods compared) and resumable per-sample records; the tuning study's grid and tables. No
Lightning, no plots: the drivers are :mod:`dart.experiment` and :mod:`dart.study`."""

from .arms import Arm, arm_config, attach_arm, parse_arms
from .generative import (
    aggregate_drift,
    aggregate_summarization,
    drift_items,
    generate_batch,
    summarization_items,
)
from .metrics import repeated_ngrams, rouge_scores
from .multiple_choice import aggregate_accuracy, mmlu_items, score_choices
from .perplexity import (
    Window,
    aggregate_perplexity,
    perplexity,
    score_window,
    sliding_windows,
)
from .store import RecordStore, record_key
from .tasks import TASKS, StepContext, StepKind, Task, compute_metrics, get_task

__all__ = [
    "TASKS",
    "Arm",
    "RecordStore",
    "StepContext",
    "StepKind",
    "Task",
    "Window",
    "aggregate_accuracy",
    "aggregate_drift",
    "aggregate_perplexity",
    "aggregate_summarization",
    "arm_config",
    "attach_arm",
    "compute_metrics",
    "drift_items",
    "generate_batch",
    "get_task",
    "mmlu_items",
    "parse_arms",
    "perplexity",
    "record_key",
    "repeated_ngrams",
    "rouge_scores",
    "score_choices",
    "score_window",
    "sliding_windows",
    "summarization_items",
]
