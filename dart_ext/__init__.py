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


def _tag_compile_caches() -> None:
    """Key torch.compile's on-disk caches to this build of the library. Inductor caches compiled
    graphs across processes by graph and config, not by the custom ops' C++ code, so a graph
    compiled against an earlier build (another op signature) would be reused and crash in the
    compiled step. The library's sha256 in `torch.compiler.config.cache_key_tag` keeps builds
    apart (hashing it costs tens of milliseconds at import)."""
    import hashlib

    digest = hashlib.sha256()
    with open(_C.__file__, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    tag = f"dart_ext={digest.hexdigest()[:16]}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current};{tag}" if current else tag


_tag_compile_caches()

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
