"""DART: dynamic inference-time pruning of LLM feed-forward neurons, with real sparse compute."""

from .api import DARTHandle, attach
from .config import BudgetConfig, ConfigError, DARTConfig, DriftConfig
from .methods import METHODS, Method, get_method
from .models import load_model

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
