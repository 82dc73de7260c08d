"""DART: dynamic inference-time pruning of LLM feed-forward neurons, with real sparse compute.

The public names are imported on first use (PEP 562), so that `dart.runner`, which runs
exported packages, imports with torch alone (no transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import DARTHandle, attach
    from .config import BudgetConfig, ConfigError, DARTConfig, DriftConfig
    from .methods import METHODS, Method, get_method
    from .models import load_model

_PUBLIC = {
    "METHODS": ".methods",
    "BudgetConfig": ".config",
    "ConfigError": ".config",
    "DARTConfig": ".config",
    "DARTHandle": ".api",
    "DriftConfig": ".config",
    "Method": ".methods",
    "attach": ".api",
    "get_method": ".methods",
    "load_model": ".models",
}

__all__ = [
    "METHODS",
    "BudgetConfig",
    "ConfigError",
    "DARTConfig",
    "DARTHandle",
    "DriftConfig",
    "Method",
    "attach",
    "get_method",
    "load_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dart' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value
