"""lm-evaluation-harness (0.4) for DART: the model type ``dart`` and the comparison runner.

* :mod:`~dart.lmeval.model`: :class:`DARTLM`, lm-eval's HF model with a DART arm attached
  (context-only masks, one trace per context; each answer keeps its sparsity);
* :mod:`~dart.lmeval.runner`: :func:`run_lm_eval`, every arm into a resumable, locked and
  fingerprinted results folder, and its metrics (``dart eval lm-eval``);
* :mod:`~dart.lmeval.tasks`: offline task YAMLs over packaged data;
* :mod:`~dart.lmeval.report`: a folder's arms side by side (no lm-eval import);
* :mod:`~dart.lmeval.registration`: the model type ``dart`` in lm-eval's registry;
* ``python -m dart.lmeval`` (:mod:`~dart.lmeval.__main__`): ``run``, ``protocol``, ``report``,
  or lm-eval's own command line with ``dart`` registered.

``import dart`` registers ``dart`` with lm-eval without importing it, so lm-eval's own API
works after it::

    import dart, lm_eval
    lm_eval.simple_evaluate(model="dart", tasks=["boolq"], limit=20,
        model_args="pretrained=smollm2-135m,method=dart,total_prune=0.5,backend=gathered")

lm-eval 0.4.13 has no plugin entry points, so its ``lm_eval`` executable never imports
``dart``; ``python -m dart.lmeval ARGS`` is that command line (``lm_eval ARGS``) with ``dart``
imported and the offline tasks on its include path.

This package imports its names on first use (PEP 562): importing it imports nothing of lm-eval
or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .__main__ import ProtocolOptions, load_protocol, main, run_protocol
    from .model import CONTEXT_PHASES, DARTLM, request_key
    from .registration import MODEL_NAME, register, register_lazily
    from .runner import (
        ZERO_SHOT_TASKS,
        LMEvalOptions,
        compute_metrics,
        results_table,
        run_lm_eval,
    )

_PUBLIC = {
    "CONTEXT_PHASES": ".model",
    "DARTLM": ".model",
    "request_key": ".model",
    "LMEvalOptions": ".runner",
    "ZERO_SHOT_TASKS": ".runner",
    "compute_metrics": ".runner",
    "results_table": ".runner",
    "run_lm_eval": ".runner",
    "ProtocolOptions": ".__main__",
    "load_protocol": ".__main__",
    "main": ".__main__",
    "run_protocol": ".__main__",
    "MODEL_NAME": ".registration",
    "register": ".registration",
    "register_lazily": ".registration",
}

__all__ = [
    "CONTEXT_PHASES",
    "DARTLM",
    "MODEL_NAME",
    "LMEvalOptions",
    "ProtocolOptions",
    "ZERO_SHOT_TASKS",
    "compute_metrics",
    "load_protocol",
    "main",
    "register",
    "register_lazily",
    "request_key",
    "results_table",
    "run_lm_eval",
    "run_protocol",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dart.lmeval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value
