"""The KV-cache side of DART's look-back re-trace (the schedule side is in `dart.core.controller`).

A re-trace pass recomputes the last `prior` cached positions together with the new tokens:
the cache is rewound by `prior` positions (a dynamic cache is cropped; a static cache's write
position is moved back, so the pass rewrites those slots), the pass writes fresh keys and values
there, and the rows that did not re-trace get their old keys and values back (`save_rows` before,
`restore_rows` after), so only the re-traced rows' cache changes.

The `ffn_inputs` re-trace (`DriftConfig.retrace = "ffn_inputs"`) needs none of that: an
:class:`FFNInputRing` keeps, per layer, the FFN inputs of each row's last R valid tokens (one
`[B, R + 1, d]` buffer per layer in the model's dtype, written in place by the FFN modules, so it
runs inside a compiled decode step), and at a drift event :func:`rebuild_statistics` computes
only the FFN hidden activations of those inputs (the gate and up projections of a gated FFN, the
input projection of a plain MLP; no attention, no down projection, no cache rewind) into the
row's fresh statistics. The mask built from them is used from the very next pass. With the
`attn_output` drift signal a second ring keeps the watched layers' attention outputs of the same
tokens, and :func:`replay_signal` traces the row's new drift baseline from them, as a look-back
re-trace does from its recompute. The inputs are the ones the model actually saw (computed
under the row's old mask), not a dense recompute: that is the one difference to what a
look-back re-trace collects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

__all__ = [
    "FFNInputRing",
    "hidden_fraction",
    "padding_mask",
    "rebuild_statistics",
    "replay_signal",
    "restore_rows",
    "rewind",
    "save_rows",
]

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


# -- the ffn_inputs re-trace ---------------------------------------------------------------------
class FFNInputRing:
    """Per layer, the FFN inputs of each row's last `tokens` valid tokens.

    Layer l's buffer is `[B, tokens + 1, d]` (the extra slot takes the writes of padding and of
    tokens that a long pass pushes out at once, so every write is one static-shape scatter and a
    compiled step never branches on the data); its own count `[B]` of valid tokens written says
    where the ring stands. Buffers are allocated on a layer's first write (its `d` and dtype).
    """

    def __init__(self, tokens: int, num_layers: int) -> None:
        if tokens < 1:
            raise ValueError(f"tokens: {tokens} is not >= 1")
        self.tokens = tokens
        self.num_layers = num_layers
        self.batch_size = 0
        self._buf: list[torch.Tensor | None] = [None] * num_layers
        self._count: list[torch.Tensor | None] = [None] * num_layers

    def reset(self, batch_size: int) -> None:
        """Forget every row (new sequences); buffers are re-allocated on the next writes."""
        self.batch_size = batch_size
        self._buf = [None] * self.num_layers
        self._count = [None] * self.num_layers

    def record(self, layer: int, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append the valid tokens of `x [B, T, d]` (`valid [B, T]`, None: all) to `layer`'s
        ring; tokens older than the last `tokens` of a row are dropped. No host sync."""
        b, t, d = x.shape
        if b != self.batch_size:
            raise ValueError(f"x: batch {b} is not the ring's batch size {self.batch_size}")
        r = self.tokens
        buf, count = self._buf[layer], self._count[layer]
        if buf is None:
            buf = self._buf[layer] = x.new_zeros(b, r + 1, d)
            count = self._count[layer] = torch.zeros(b, dtype=torch.long, device=x.device)
        v = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        pos = count[:, None] + v.long().cumsum(1) - 1  # stream position of each token
        total = count + v.sum(1)
        keep = v & (pos >= total[:, None] - r)  # at most r tokens per row: distinct slots
        slot = torch.where(keep, pos % r, r)
        buf.scatter_(1, slot[..., None].expand(b, t, d), x.detach().to(buf.dtype))
        count.copy_(total)

    def window(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows`' stored inputs of `layer` in order, oldest first: `x [F, tokens, d]` and
        `valid [F, tokens]` (a row with fewer than `tokens` tokens so far: the first ones)."""
        buf, count = self._buf[layer], self._count[layer]
        if buf is None:
            raise RuntimeError(f"layer {layer}: no FFN inputs recorded since the last reset")
        r = self.tokens
        n = count[rows]
        held = n.clamp_max(r)
        j = torch.arange(r, device=buf.device)
        slot = (n[:, None] - held[:, None] + j[None]) % r  # oldest held token first
        x = buf[rows].gather(1, slot[..., None].expand(-1, -1, buf.shape[-1]))
        return x, j[None] < held[:, None]

    def state_bytes(self) -> int:
        """Bytes of the buffers (and counts) allocated so far."""
        return sum(t.numel() * t.element_size() for t in self._buf + self._count if t is not None)


def hidden_fraction(kind: str) -> float:
    """The share of an FFN's work (weight rows read and multiply-adds per neuron) that its
    hidden activation costs: 2 of the 3 matrices of a gated FFN, 1 of the 2 of a plain MLP."""
    if kind == "glu":
        return 2.0 / 3.0
    if kind == "mlp":
        return 0.5
    raise ValueError(f"kind: {kind!r} is not 'glu' or 'mlp'")


@torch.no_grad()
def rebuild_statistics(
    ring: FFNInputRing,
    rows: Sequence[int],
    hidden: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    update: Callable[[int, torch.Tensor, torch.Tensor], None],
    batch_size: int,
) -> list[int]:
    """Feed `rows`' ring windows through each layer's `hidden` (the FFN hidden activation) and
    into `update(layer, h [B, tokens, N], valid [B, tokens])` (the other rows are all invalid
    zeros). Returns the tokens used per row of `rows` (one host sync per event)."""
    device = next(t.device for t in ring._count if t is not None)
    index = torch.tensor(list(rows), dtype=torch.long, device=device)
    used: list[int] = []
    for layer, fn in enumerate(hidden):
        x, v = ring.window(layer, index)
        h = fn(x)
        full = h.new_zeros(batch_size, *h.shape[1:])
        full[index] = h
        valid = torch.zeros(batch_size, v.shape[1], dtype=torch.bool, device=v.device)
        valid[index] = v
        update(layer, full, valid)
        if layer == 0:
            used = v.sum(1).tolist()
    return used


@torch.no_grad()
def replay_signal(ring: FFNInputRing, rows: Sequence[int], monitor, batch_size: int) -> None:
    """Trace `rows`' drift baseline from the signal of their last tokens (one ring "layer" per
    watched layer, `attn_output` only): the monitor observes those tokens again for `rows`
    alone, and its step count is rewound so each token still counts once."""
    device = next(t.device for t in ring._count if t is not None)
    index = torch.tensor(list(rows), dtype=torch.long, device=device)
    signal = []
    for layer in range(ring.num_layers):
        x, v = ring.window(layer, index)
        full = x.new_zeros(batch_size, *x.shape[1:])
        full[index] = x
        signal.append(full)
    valid = torch.zeros(batch_size, v.shape[1], dtype=torch.bool, device=v.device)
    valid[index] = v
    monitor.observe(signal, valid)
    monitor.rewind(valid.sum(1))
