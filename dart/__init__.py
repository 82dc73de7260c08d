"""DART: dynamic inference-time pruning of LLM feed-forward neurons, with real sparse compute.

The public names are imported on first use (PEP 562), so that `dart.runtime.runner`, which runs
exported packages, imports with torch alone (no transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.api import DARTHandle, attach
    from .core.config import BudgetConfig, ConfigError, DARTConfig, DriftConfig
    from .core.methods import METHODS, Method, get_method
    from .core.quant import quantize
    from .runtime import export, fast  # noqa: F401  (public modules, imported on first use)
    from .runtime.fast import FastGenerator
    from .runtime.loading import load_model

_PUBLIC = {
    "METHODS": ".core.methods",
    "BudgetConfig": ".core.config",
    "ConfigError": ".core.config",
    "DARTConfig": ".core.config",
    "DARTHandle": ".core.api",
    "DriftConfig": ".core.config",
    "FastGenerator": ".runtime.fast",
    "Method": ".core.methods",
    "attach": ".core.api",
    "get_method": ".core.methods",
    "load_model": ".runtime.loading",
    "quantize": ".core.quant",
}
# Public modules under their short names (`dart.fast.FastGenerator`), imported on first use.
_MODULES = {"fast": ".runtime.fast", "export": ".runtime.export"}

__all__ = [
    "METHODS",
    "BudgetConfig",
    "ConfigError",
    "DARTConfig",
    "DARTHandle",
    "DriftConfig",
    "FastGenerator",
    "Method",
    "attach",
    "get_method",
    "load_model",
    "quantize",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name], __name__)
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    else:
        raise AttributeError(f"module 'dart' has no attribute {name!r}")
    globals()[name] = value
    return value


# The lm-eval model type `dart` (lm_eval.simple_evaluate(model="dart", ...)): registered the
# moment lm-eval's registry is imported, so `import dart` itself never imports lm-eval (standard
# library only; see dart/lmeval/registration.py).
from .lmeval.registration import register_lazily as _register_lmeval  # noqa: E402

_register_lmeval()
