"""Quantised weight rows: the formats the `*_q` ops read (pure PyTorch, no compiled code).

A quantised matrix keeps the row-major ``[N, d]`` layout of the fp kernels (for an FFN: the
neuron-major gate and up projections and the TRANSPOSED down projection, so a kept neuron's three
rows are three contiguous reads; for a dense linear ``W [out, in]``: one row per output). Each row
is cut into groups of ``group`` values along d, each with its own scale (and, for ``q4m``, min),
round-to-nearest:

======  ===================================  =====================  =============
format  data (per row)                       value                  bytes / value
======  ===================================  =====================  =============
q8      int8 ``[d]``, ``q`` in [-127, 127]   ``scale * q``          1 + 2/group
q4      uint8 ``[d/2]``, ``u`` in [1, 15]    ``scale * (u - 8)``    0.5 + 2/group
q4m     uint8 ``[d/2]``, ``u`` in [0, 15]    ``scale * u + min``    0.5 + 4/group
======  ===================================  =====================  =============

4-bit packing (llama.cpp's Q4_0 order, which AVX2 unpacks with one shift and one mask): each block
of 32 values is 16 bytes; byte ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in its
high nibble. Scales (and mins) are float16 ``[N, d/group]``: half the bytes of fp32 at a relative
rounding error (2^-11) far below the quantisation step; the scale is rounded UP to fp16 (and the
min DOWN) so every value stays in range and the error bound below holds exactly.

Error bound of round-to-nearest (tested): ``|dequantize(quantize(w)) - w| <= scale / 2`` per value
(plus fp32 rounding), with ``scale = amax / 127`` (q8), ``amax / 7`` (q4) or
``(max - min) / 15`` (q4m) of the value's group.

The ops also round the activations they dot against these rows (x for gate / up / w_in / a dense
linear; never the hidden h of the down projection) to int8 per block of 32 values
(``quantize_activations``), as llama.cpp's Q8 path does: the AVX2 kernels then multiply bytes
with ``_mm256_maddubs_epi16``. The reference (dart_ext.reference) does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # values per packed block (and per activation-quantisation block)


@dataclass(frozen=True)
class QuantFormat:
    """One weight format: how many bits per value, whether groups carry a min, allowed groups."""

    name: str
    bits: int
    has_min: bool
    groups: tuple[int, ...]
    doc: str

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def row_bytes(self, d: int) -> int:
        """Bytes of packed data per row of d values."""
        return d * self.bits // 8

    def bytes_per_value(self, group: int) -> float:
        """Storage per weight value, data + fp16 scale (+ fp16 min)."""
        return self.bits / 8 + (4 if self.has_min else 2) / group


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q8", 8, False, (32, 64), "int8, symmetric, one fp16 scale per group"),
        QuantFormat("q4", 4, False, (32, 64), "int4, symmetric (u - 8), one fp16 scale per group"),
        QuantFormat("q4m", 4, True, (32, 64), "int4, fp16 scale and min per group"),
    )
}


def get_format(name: str) -> QuantFormat:
    """The format called ``name`` (ValueError naming the accepted ones otherwise)."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantisation format {name!r}; accepted: {', '.join(FORMATS)}"
        ) from None


@dataclass(frozen=True)
class QuantRows:
    """A quantised row-major matrix ``[N, d]``: ``data`` (int8 ``[N, d]`` or uint8 ``[N, d/2]``),
    ``scales`` (fp16 ``[N, d/group]``), ``mins`` (fp16 ``[N, d/group]``, q4m only)."""

    fmt: str
    group: int
    data: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    @property
    def format(self) -> QuantFormat:
        return get_format(self.fmt)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.scales.shape[1] * self.group

    def tensors(self) -> list[torch.Tensor]:
        """The op argument of this matrix: ``[data, scales]`` or ``[data, scales, mins]``."""
        return [self.data, self.scales] + ([] if self.mins is None else [self.mins])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> QuantRows:
        mins = None if self.mins is None else self.mins.to(device)
        return QuantRows(self.fmt, self.group, self.data.to(device), self.scales.to(device), mins)


def _check_group(fmt: QuantFormat, group: int, d: int) -> None:
    if group not in fmt.groups:
        raise ValueError(f"group must be one of {fmt.groups} for format {fmt.name!r}, got {group}")
    if d % group:
        raise ValueError(f"group = {group} must divide the row length d = {d}")


def _half_up(s: torch.Tensor) -> torch.Tensor:
    """fp32 -> the smallest fp16 >= it (a scale rounded so it never shrinks the range)."""
    h = s.to(torch.float16)
    h = torch.where(h == 0, torch.zeros_like(h), h)  # -0 -> +0: its successor is positive
    bits = h.view(torch.int16)
    # the next fp16 towards +inf: one more ulp of magnitude above 0, one less below
    succ = torch.where(h > 0, bits + 1, torch.where(h < 0, bits - 1, torch.ones_like(bits)))
    return torch.where(h.float() < s, succ, bits).view(torch.float16)


def _half_down(m: torch.Tensor) -> torch.Tensor:
    """fp32 -> the largest fp16 <= it (so min never rises above the group's smallest value)."""
    return -_half_up(-m) if m.numel() else m.to(torch.float16)


def _pack4(u: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [N, d] -> [N, d/2] (block order of the module docstring)."""
    n, d = u.shape
    b = u.reshape(n, d // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(n, d // 2)


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    n, h = p.shape
    b = p.reshape(n, h // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(n, 2 * h)


def quantize_rows(w: torch.Tensor, fmt: str = "q4", group: int = 32) -> QuantRows:
    """Round-to-nearest quantisation of a float matrix ``w [N, d]`` (rows = neurons / outputs)
    into format ``fmt`` with groups of ``group`` values along d."""
    f = get_format(fmt)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise ValueError(f"w must be a 2-D float tensor [N, d], got {getattr(w, 'shape', w)!r}")
    n, d = w.shape
    _check_group(f, group, d)
    if not torch.isfinite(w).all():
        raise ValueError("w must be finite (no inf / nan) to be quantised")
    g = w.detach().float().reshape(n, d // group, group)
    if f.has_min:
        lo, hi = g.amin(-1), g.amax(-1)
        mins = _half_down(lo)
        scales = _half_up((hi - mins.float()) / 15)
        s = scales.float().unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        u = torch.round((g - mins.float().unsqueeze(-1)) / safe).clamp(0, 15)
        data = _pack4(u.to(torch.uint8).reshape(n, d))
    else:
        qmax = 127 if f.bits == 8 else 7
        scales = _half_up(g.abs().amax(-1) / qmax)
        s = scales.float().unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(g / safe).clamp(-qmax, qmax).reshape(n, d)
        data = q.to(torch.int8) if f.bits == 8 else _pack4((q + 8).to(torch.uint8))
        mins = None
    if not torch.isfinite(scales).all():
        raise ValueError(f"w's values are too large for fp16 scales of format {fmt!r}")
    return QuantRows(fmt, group, data.contiguous(), scales.contiguous(), mins)


def dequantize_rows(q: QuantRows) -> torch.Tensor:
    """The fp32 matrix ``[N, d]`` that the quantised rows stand for."""
    f = q.format
    n, d = q.shape
    s = q.scales.float().repeat_interleave(q.group, dim=1)
    if f.bits == 8:
        return q.data.float() * s
    u = _unpack4(q.data).float()
    if f.has_min:
        return u * s + q.mins.float().repeat_interleave(q.group, dim=1)
    return (u - 8) * s


def error_bound(q: QuantRows) -> torch.Tensor:
    """Per-value bound ``[N, d]`` of ``|dequantize_rows(q) - w|``: half a quantisation step."""
    return q.scales.float().repeat_interleave(q.group, dim=1) / 2


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., d]`` (d a multiple of 32, as every quantised row is) rounded as the ops round the
    activations of their int8 dot products: per block of 32 values along d, ``inv = 127 / amax``
    and ``scale = amax / 127`` in fp32, values ``round(x * inv)`` (half to even) in [-127, 127];
    returned dequantised (``value * scale``), in fp32."""
    d = x.shape[-1]
    if d % BLOCK:
        raise ValueError(f"x's last dim must be a multiple of {BLOCK}, got {d}")
    b = x.float().reshape(*x.shape[:-1], d // BLOCK, BLOCK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)
