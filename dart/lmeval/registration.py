"""The model type ``dart`` in lm-eval's registry, registered without importing lm-eval.

lm-eval 0.4.13 finds models only through its registry (``lm_eval.api.registry.model_registry``;
no entry points), which accepts a lazy ``"module:object"`` placeholder. ``import dart`` calls
:func:`register_lazily`: if lm-eval's registry is already imported the placeholder goes in now;
otherwise a one-shot import hook puts it in the moment lm-eval's registry module is first
imported, so ``import dart`` imports nothing of lm-eval (and costs nothing without it), and
``lm_eval.simple_evaluate(model="dart", model_args="pretrained=...,method=dart,total_prune=0.5")``
works after it. The placeholder names :class:`dart.lmeval.model.DARTLM`, which lm-eval imports
on first use (its ``@register_model`` then replaces the placeholder by the class).

This module imports the standard library only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["MODEL_NAME", "MODEL_TARGET", "register", "register_lazily"]

MODEL_NAME = "dart"
MODEL_TARGET = "dart.lmeval.model:DARTLM"
_REGISTRY = "lm_eval.api.registry"
_lock = threading.Lock()


def register(registry: ModuleType | None = None) -> None:
    """Put ``dart`` into lm-eval's model registry (imports ``lm_eval.api.registry`` unless
    given it). lm-eval's own models are registered first: its ``get_model`` registers them
    only while the registry is empty, which ``dart`` alone would break."""
    if registry is None:
        import lm_eval.api.registry as registry
    import lm_eval.models  # noqa: F401  (lm-eval's placeholders: hf, vllm, ...)

    models = registry.model_registry
    if MODEL_NAME not in models:
        models.register(MODEL_NAME, target=MODEL_TARGET)


class _Loader(importlib.abc.Loader):
    """lm-eval registry's own loader, then :func:`register` on the fresh module."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        register(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename... for tracebacks
        return getattr(self.inner, name)


class _RegistryHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of lm-eval's registry module, once."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != _REGISTRY:
            return None
        _uninstall()
        for finder in list(sys.meta_path):  # the finder that would have found it
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_hook = _RegistryHook()


def _uninstall() -> None:
    with _lock:
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)


def register_lazily() -> None:
    """Register ``dart`` with lm-eval now if its registry is imported, else when it is (see
    the module docstring). Without lm-eval installed the hook never fires."""
    module = sys.modules.get(_REGISTRY)
    if module is not None:
        register(module)
        return
    with _lock:
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)
