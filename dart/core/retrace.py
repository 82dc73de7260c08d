"""The KV-cache side of DART's look-back re-trace (the schedule side is in `dart.core.controller`).

A re-trace pass recomputes the last `prior` cached positions together with the new tokens:
the cache is rewound by `prior` positions (a dynamic cache is cropped; a static cache's write
position is moved back, so the pass rewrites those slots), the pass writes fresh keys and values
there, and the rows that did not re-trace get their old keys and values back (`save_rows` before,
`restore_rows` after), so only the re-traced rows' cache changes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

__all__ = ["padding_mask", "restore_rows", "rewind", "save_rows"]

Saved = list[tuple[torch.Tensor, torch.Tensor] | None]


def _layers(cache: Cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(
            f"a look-back re-trace needs a transformers Cache with layers, not "
            f"{type(cache).__name__}; set DriftConfig.retrace_tokens=0"
        )
    return layers


def _end(layer) -> int:
    """Index just past the last cached position of `layer`'s key/value tensors."""
    if isinstance(layer, StaticLayer):
        return int(layer.cumulative_length)  # one host sync per re-trace event
    return layer.keys.shape[-2]


def rewind(cache: Cache, positions: int) -> None:
    """Drop the last `positions` cached positions, so the next forward recomputes them."""
    if positions == 0:
        return
    for layer in _layers(cache):
        if not layer.is_initialized:
            continue
        if isinstance(layer, StaticLayer) and not layer.is_sliding:
            layer.cumulative_length.sub_(positions)
        elif isinstance(layer, DynamicLayer):
            layer.crop(-positions)  # a sliding window past its size raises here
        else:
            raise TypeError(
                f"a look-back re-trace cannot rewind a {type(layer).__name__} cache layer; "
                "use a DynamicCache or a full-attention StaticCache, or set "
                "DriftConfig.retrace_tokens=0"
            )


def save_rows(cache: Cache, rows: torch.Tensor, positions: int) -> Saved:
    """Copies of the keys and values of batch `rows` at the last `positions` positions."""
    saved: Saved = []
    for layer in _layers(cache):
        if not layer.is_initialized or positions == 0:
            saved.append(None)
            continue
        end = _end(layer)
        span = slice(end - positions, end)
        saved.append((layer.keys[rows, :, span].clone(), layer.values[rows, :, span].clone()))
    return saved


def restore_rows(cache: Cache, rows: torch.Tensor, saved: Saved, new_tokens: int) -> None:
    """Put `save_rows`'s copies back after a pass that appended `new_tokens` positions."""
    for layer, kv in zip(_layers(cache), saved, strict=True):
        if kv is None:
            continue
        end = _end(layer) - new_tokens
        span = slice(end - kv[0].shape[2], end)
        layer.keys[rows, :, span] = kv[0]
        layer.values[rows, :, span] = kv[1]


def padding_mask(mask: torch.Tensor | dict | None) -> torch.Tensor | None:
    """A 2-D `[B, keys]` 0/1 padding mask from what a forward was given: the mask itself if 2-D;
    from a 4-D mask (HF generate builds one for a static cache) or a dict of them (per attention
    type) the keys that the last query sees, which are the non-padding ones up to it."""
    if mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(
            f"attention_mask: a look-back re-trace needs a 2-D or 4-D mask, not {mask!r}"
        )
    last = mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    return visible.long()
