"""`dart_ext`: the compiled `dart` ops (namespace `torch.ops.dart`) and their Python side.

Importing this package loads the compiled library `dart_ext._C` (which registers the ops with
the dispatcher), then `dart_ext.ops` (fake kernels for torch.compile/export, typed wrappers).
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (loading the shared library registers torch.ops.dart.*)
except ImportError as e:  # pragma: no cover - depends on the build state
    raise ImportError(
        "dart_ext._C (the compiled dart kernels) could not be loaded: "
        f"{e}. Build it from the repository root with "
        "`pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`), with torch already installed."
    ) from e

from . import ops  # noqa: E402
from .ops import (  # noqa: E402
    ACTIVATIONS,
    compact_glu_ffn,
    compact_mlp,
    gather_neurons_,
    gathered_glu_ffn,
    gathered_mlp,
    topk_indices,
)

__all__ = [
    "ACTIVATIONS",
    "compact_glu_ffn",
    "compact_mlp",
    "gather_neurons_",
    "gathered_glu_ffn",
    "gathered_mlp",
    "ops",
    "topk_indices",
]
