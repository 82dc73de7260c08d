"""DART: dynamic inference-time pruning of LLM feed-forward neurons, with real sparse compute."""

from .api import DARTHandle, attach
from .config import ConfigError, DARTConfig, DriftConfig
from .models import load_model

__all__ = ["ConfigError", "DARTConfig", "DARTHandle", "DriftConfig", "attach", "load_model"]
__version__ = "0.1.0"
