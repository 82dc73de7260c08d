"""`load_model(..., weights=...)`: a model with its own fp weights, or quantised (`dart.quantize`).

This sits in the runtime layer because it joins the two layers below that never import each
other: the assets (`dart.assets.models`: packaged models, the GGUF reader) and the method core
(`dart.core.quant`: the quantised modules).

`weights="q8" | "q4" | "q4m"` on a packaged GGUF model whose fp32 folder is not in the cache yet
reads the GGUF tensor by tensor (`dart.assets.models.iter_gguf_tensors`: each dequantised alone)
and quantises each linear weight to our format as it arrives, into a model skeleton allocated
without weights, so the fp32 model is never held (for the 1.5B model: about 6.7 GB avoided). A
model whose fp folder exists (or a local folder) is loaded in its dtype and quantised in place.
"""

from __future__ import annotations

import logging
import resource
import time

import torch

from ..assets.models import (
    PACKAGED_MODELS,
    converted_folder,
    gguf_config_and_tokenizer,
    iter_gguf_tensors,
)
from ..assets.models import load_model as load_fp_model
from ..core.quant import WEIGHT_FORMATS, quantize, quantize_streamed

__all__ = ["load_model", "peak_rss_bytes"]

log = logging.getLogger(__name__)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    local_files_only: bool = True,
    weights: str = "fp",
    group: int = 32,
    direct: bool | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer (`dart.assets.models.load_model`), with `weights` "fp"
    (its own weights, in `dtype`) or a quantised format (q8, q4, q4m; groups of `group`).

    `direct` (quantised only): True reads a packaged model's GGUF tensor by tensor, quantising
    as it goes (no fp32 model in memory, no fp32 folder written); False loads the fp model and
    quantises it; None (default) reads directly when the packaged model's fp32 folder is not
    cached yet. The model gets `dart_load = {"seconds", "peak_rss_bytes", "direct"}`.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    start = time.perf_counter()
    spec = PACKAGED_MODELS.get(name_or_path.lower()) if isinstance(name_or_path, str) else None
    if weights != "fp" and direct is None:
        direct = spec is not None and not converted_folder(spec).exists()
    if weights != "fp" and direct:
        if spec is None:
            raise ValueError(
                f"direct=True reads a packaged GGUF model ({', '.join(PACKAGED_MODELS)}), "
                f"not {name_or_path!r}"
            )
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config, tokenizer = gguf_config_and_tokenizer(spec)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        with init_empty_weights(include_buffers=False):  # buffers (rotary) are computed
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = iter_gguf_tensors(spec, skeleton)
        model = quantize_streamed(skeleton, tensors, weights, group, dtype=_dtype(dtype))
        model = model.to(device).eval()
    else:
        model, tokenizer = load_fp_model(
            name_or_path, dtype, device, attn_implementation, local_files_only
        )
        if weights != "fp":
            quantize(model, weights, group)
    model.dart_load = {
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss_bytes(),
        "direct": bool(direct) and weights != "fp",
    }
    log.info(
        "loaded %s (weights %s) in %.1f s, peak RSS %.2f GB",
        name_or_path,
        weights,
        model.dart_load["seconds"],
        model.dart_load["peak_rss_bytes"] / 1e9,
    )
    return model, tokenizer


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved
