"""Per-token neuron selection: what each per-token mode reads, its masked emulation,
its threshold calibration and the per-layer allocation of a byte budget.

A per-token mode chooses, for every decoded token on its own, which FFN weights to read, by
comparing activation magnitudes with per-layer thresholds calibrated once on a calibration text
(a target keep ratio becomes a magnitude threshold, as in CATS and TEAL). Its "knobs" are the
selections it makes: ``gate`` (and ``gate-weighted``) one, the neurons whose
``|act(gate)|`` (times ``|w_up_i| |w_down_i|`` when weighted) pass the threshold, after reading
the whole gate; ``input`` two, the FFN input's entries (gate and up read only those columns),
then the hidden activations (down reads only those rows).

The share of FFN weight bytes a token reads, for keep fractions ``k`` of its knobs:
``gate``: ``1/3 + 2/3 k``; ``input``: ``2/3 k_x + 1/3 k_h``.

On a model quantised by ``dart.quantize`` the gate-first modes run the fused
``gate_first_glu_ffn_q`` over the quantised rows; their calibration scores the gate with the
quantised rows too (``linear_q``, x rounded to int8 per 32-value block exactly as the fused
kernel rounds it), so a threshold compares what the kernel computes. The input mode is refused
there: dropping single entries of x skips no part of a 32-value quantised block.

Calibration (:func:`calibrate_layer_curves`, :func:`allocate_keeps`, :func:`layer_thresholds`):
the FFN inputs ``x`` and residuals ``r`` of a dense pass over the calibration text are captured
per layer; each layer's error curve ``E_l(k)`` = ``sum ||y_k - y||^2 / sum ||r + y||^2`` (the
FFN output's error relative to the residual stream it is added to) is measured on a grid of
keeps; the greedy allocation (TEAL's) then lowers, step by step, the keep of the layer whose
next step adds the least error per byte saved, until the model reads the target share of its
FFN bytes. ``uniform`` gives every layer the same keep instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .adapters import FFNParts

__all__ = [
    "ALLOCATIONS",
    "KEEP_GRID",
    "PER_TOKEN_MODES",
    "PerTokenMode",
    "allocate_keeps",
    "calibrate_layer_curves",
    "entry_bytes",
    "ffn_shape",
    "layer_thresholds",
    "model_fingerprint",
    "threshold_for_keep",
]

# keeps of the error curves: 1.0, 0.95, ..., 0.05 (the allocation moves on this grid)
KEEP_GRID = tuple(round(1.0 - 0.05 * i, 6) for i in range(20))
ALLOCATIONS = ("greedy", "uniform")


def ffn_shape(parts: FFNParts) -> tuple[int, int]:
    """``(N, d)`` of a gated FFN, fp or quantised (``parts.quant``: no fp weight views)."""
    if parts.quant is not None:
        return parts.width, parts.quant.gate_proj.in_features
    n, d = parts.w_up.shape
    return n, d


def entry_bytes(parts: FFNParts) -> float:
    """Bytes one weight entry of the FFN takes where the kernels read it: the element size of
    fp weights; of quantised rows, their bytes (packed values, scales, mins) per entry (the
    three matrices share one format). The meters turn entries read into bytes with it."""
    if parts.quant is not None:
        n, d = ffn_shape(parts)
        return parts.quant.gate_proj.nbytes() / (n * d)
    return float(parts.w_up.element_size())


def _gate_pre(parts: FFNParts, x: Tensor) -> Tensor:
    """``x W_gate^T``; over quantised rows ``linear_q``, which rounds x to int8 per block of 32
    as the fused quantised kernel does, so calibrated thresholds compare what the kernel
    compares."""
    if parts.quant is not None:
        return parts.quant.gate_proj(x)
    return torch.nn.functional.linear(x, parts.w_gate)


def _up(parts: FFNParts, x: Tensor) -> Tensor:
    if parts.quant is not None:
        return parts.quant.up_proj(x)
    return torch.nn.functional.linear(x, parts.w_up)


def _gate_act(parts: FFNParts, x: Tensor) -> Tensor:
    """``act(x W_gate^T)`` with the model's own activation function (HF's ``ACT2FN``)."""
    from transformers.activations import ACT2FN

    return ACT2FN[parts.act](_gate_pre(parts, x))


def weighted_scale(parts: FFNParts) -> Tensor:
    """``|w_up_i| * |w_down_i|`` per neuron (fp32): scales ``|act(gate)|`` towards the size of
    the neuron's contribution to the output, without reading up or down per token (quantised
    rows: the norms of the dequantised rows, the values the kernel multiplies)."""
    if parts.quant is not None:
        up, down = parts.quant.up_proj.dequantized(), parts.quant.down_proj.dequantized()
    else:
        up, down = parts.w_up, parts.w_down_t
    return (
        torch.linalg.vector_norm(up.float(), dim=1) * torch.linalg.vector_norm(down.float(), dim=1)
    ).to(up.device)


def _united(keep: Tensor, policy: str) -> Tensor:
    """``keep [..., L]`` per token, or (``union``) every token's row the union over the call's
    tokens (one kept set for the whole batch step)."""
    if policy != "union" or keep.numel() == 0:
        return keep
    return keep.reshape(-1, keep.shape[-1]).any(0).expand_as(keep)


def _gate_masked(
    parts: FFNParts, x: Tensor, thr: Tensor, scale: Tensor | None, policy: str = "token"
) -> tuple:
    a = _gate_act(parts, x)
    score = a.abs() if scale is None else a.abs() * scale.to(a.dtype)
    keep = _united(score >= thr[0].to(a.dtype), policy)
    h = a * _up(parts, x) * keep
    n, d = ffn_shape(parts)
    read = n * d + 2 * d * keep.sum(-1, dtype=torch.float32)
    return parts.down(h), read


def _input_masked(
    parts: FFNParts, x: Tensor, thr: Tensor, scale: Tensor | None, policy: str = "token"
) -> tuple:
    keep_x = _united(x.abs() >= thr[0].to(x.dtype), policy)
    h = parts.hidden(x * keep_x)
    keep_h = _united(h.abs() >= thr[1].to(h.dtype), policy)
    n, d = ffn_shape(parts)
    read = 2 * n * keep_x.sum(-1, dtype=torch.float32) + d * keep_h.sum(-1, dtype=torch.float32)
    return parts.down(h * keep_h), read


def _gate_gathered(
    parts: FFNParts,
    x: Tensor,
    thr: Tensor,
    scale: Tensor,
    act: str,
    *layout: Tensor,
    policy: str = "token",
) -> tuple:
    from dart_ext import per_token as ops

    q = parts.quant
    if q is not None:  # quantised rows: the fused kernel where built, else its reference
        rows = (q.gate_proj.rows(), q.up_proj.rows(), q.down_proj.rows())
        fused = x.device.type in ops.FUSED_DEVICES["gate_first_glu_ffn_q"]
        run = ops.fused_gate_first_glu_ffn_q if fused else ops.gate_first_glu_ffn_q_reference
        return run(x, *rows, thr[0], scale, act, None, policy)
    if x.device.type in ops.FUSED_DEVICES["gate_first_glu_ffn"]:  # csrc/cpu, csrc/cuda
        return torch.ops.dart.gate_first_glu_ffn(
            x, parts.w_gate, parts.w_up, parts.w_down_t, thr[0], scale, act, None, policy
        )
    return ops.gate_first_glu_ffn(
        x, parts.w_gate, parts.w_up, parts.w_down_t, thr[0], scale, act, None, policy
    )


def _input_gathered(
    parts: FFNParts,
    x: Tensor,
    thr: Tensor,
    scale: Tensor,
    act: str,
    *layout: Tensor,
    policy: str = "token",
) -> tuple:
    from dart_ext import per_token as ops

    if x.device.type in ops.FUSED_DEVICES["input_sparse_glu_ffn"]:  # over the input-major copies
        w_gate, w_up = layout if layout else (parts.w_gate, parts.w_up)
        return torch.ops.dart.input_sparse_glu_ffn(
            x, w_gate, w_up, parts.w_down_t, thr[0], thr[1], act, policy
        )
    return ops.input_sparse_glu_ffn(
        x, parts.w_gate, parts.w_up, parts.w_down_t, thr[0], thr[1], act, policy
    )


def _input_layout(parts: FFNParts) -> tuple[Tensor, ...]:
    """Gate and up stored input-major (``[N, d]`` views of contiguous ``[d, N]`` copies): the
    input-sparse kernel then reads each kept input column as one contiguous row. The cost: one
    more copy of gate and up (2 N d entries a layer, 2/3 of the FFN's weights) while attached."""
    from dart_ext.per_token import input_major

    return (input_major(parts.w_gate), input_major(parts.w_up))


def _gate_scores(parts: FFNParts, x: Tensor, scale: Tensor | None) -> Tensor:
    s = _gate_act(parts, x).float().abs()
    return s if scale is None else s * scale.float()


@dataclass(frozen=True)
class PerTokenMode:
    """One per-token selection (see the module docstring).

    ``knobs``: names of its selections (one threshold each); ``fixed_read``: the share of the
    FFN bytes read whatever the thresholds (the gate of ``gate``); ``knob_read``: each knob's
    share at keep 1; ``weighted``: scores scaled by :func:`weighted_scale`; ``masked(parts, x,
    thresholds, scale, policy) -> (y, read)``: the exact emulation (full products times 0/1
    masks); ``gathered(parts, x, thresholds, scale, act, *layout, policy=) -> (y, read)``: the
    fused kernels (``torch.ops.dart``) on the device types that have them (CPU; CUDA in a CUDA
    build: ``dart_ext.per_token.FUSED_DEVICES``), the reference ops of
    :mod:`dart_ext.per_token` elsewhere (both read only what is kept); ``read`` is weight
    entries per token; ``policy``: ``token`` (each token its own choice) or ``union`` (one kept
    set for all tokens of the call). ``layout(parts)``: the extra weight copies the fused
    kernel reads (``layout`` above), made once at attach, or None. ``quantised``: runs on
    models quantised by ``dart.quantize`` (gate-first reads whole quantised rows; the input
    mode would need a block-level input selection, since dropping single entries of x skips
    no part of a 32-value block).
    """

    name: str
    knobs: tuple[str, ...]
    fixed_read: float
    knob_read: tuple[float, ...]
    weighted: bool
    masked: Callable[..., tuple[Tensor, Tensor]]
    gathered: Callable[..., tuple[Tensor, Tensor]]
    layout: Callable[[FFNParts], tuple[Tensor, ...]] | None = None
    quantised: bool = False

    def kernel_layout(self, parts: FFNParts, backend: str) -> tuple[Tensor, ...]:
        """The extra weight copies the fused kernel of ``backend`` reads for ``parts`` (the
        input mode's input-major gate and up on CPU), made once at attach; () if none."""
        from dart_ext.per_token import FUSED_DEVICES

        if self.layout is None or backend == "masked" or parts.quant is not None:
            return ()
        if parts.w_up.device.type not in FUSED_DEVICES["input_sparse_glu_ffn"]:
            return ()  # the reference ops read the neuron-major weights
        return self.layout(parts)

    def read_fraction(self, keeps: Sequence[float]) -> float:
        """Share of the FFN's weight bytes a token reads at these knob keeps."""
        return self.fixed_read + sum(w * k for w, k in zip(self.knob_read, keeps, strict=True))

    @property
    def min_read(self) -> float:
        """The least share of bytes the allocation can reach (every knob at the grid's end)."""
        return self.read_fraction([KEEP_GRID[-1]] * len(self.knobs))

    def tied_keep(self, read: float) -> float:
        """The keep every knob gets (tied) for a share ``read`` of the bytes."""
        return (read - self.fixed_read) / sum(self.knob_read)

    def thresholds(self, parts: FFNParts, x: Tensor, keep: float, scale: Tensor | None) -> list:
        """Per-knob thresholds of one layer at keep ``keep`` (every knob tied) from its
        calibration inputs ``x [T, d]``; keep 1 gives 0 (reads everything)."""
        if self.knobs == ("neurons",):
            return [threshold_for_keep(_gate_scores(parts, x, scale), keep)]
        tx = threshold_for_keep(x.float().abs(), keep)
        h = parts.hidden(x * (x.abs() >= tx))
        return [tx, threshold_for_keep(h.float().abs(), keep)]


PER_TOKEN_MODES = MappingProxyType(
    {
        "gate": PerTokenMode(
            "gate",
            ("neurons",),
            1 / 3,
            (2 / 3,),
            False,
            _gate_masked,
            _gate_gathered,
            quantised=True,
        ),
        "gate-weighted": PerTokenMode(
            "gate-weighted",
            ("neurons",),
            1 / 3,
            (2 / 3,),
            True,
            _gate_masked,
            _gate_gathered,
            quantised=True,
        ),
        "input": PerTokenMode(
            "input",
            ("input", "hidden"),
            0.0,
            (2 / 3, 1 / 3),
            False,
            _input_masked,
            _input_gathered,
            _input_layout,
        ),
    }
)


def threshold_for_keep(scores: Tensor, keep: float) -> float:
    """The magnitude threshold that keeps the share ``keep`` of ``scores`` (entries ``>=`` it);
    keep 1 -> 0 (everything, exact zeros included)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: {keep!r} is not in (0, 1]")
    if keep >= 1.0:
        return 0.0
    flat = scores.reshape(-1).float()
    n = max(int(round(keep * flat.numel())), 1)  # the n-th largest: O(numel) selection
    return float(torch.kthvalue(flat.cpu(), flat.numel() - n + 1).values)


@torch.no_grad()
def calibrate_layer_curves(
    mode: PerTokenMode,
    parts: FFNParts,
    x: Tensor,
    r: Tensor,
    scale: Tensor | None,
    grid: Sequence[float] = KEEP_GRID,
) -> list[float]:
    """One layer's error curve ``E(k)`` for every keep of ``grid`` (knobs tied): the FFN
    output's squared error relative to ``||r + y||^2`` over the calibration tokens ``x, r``."""
    y = parts.down(parts.hidden(x)).float()
    ref = max(float(((r.float() + y) ** 2).sum()), 1e-30)
    curve = []
    if mode.knobs == ("neurons",):  # gate and up do not depend on the keep: compute them once
        a = _gate_act(parts, x)
        au = a * _up(parts, x)
        scores = _gate_scores(parts, x, scale)
        for keep in grid:
            ys = parts.down(au * (scores >= threshold_for_keep(scores, keep)))
            curve.append(float(((ys.float() - y) ** 2).sum()) / ref)
        return curve
    for keep in grid:
        thr = torch.tensor(mode.thresholds(parts, x, keep, scale), device=x.device)
        if thr.numel() == 1:
            thr = torch.cat([thr, thr.new_zeros(1)])
        ys, _ = mode.masked(parts, x, thr, scale)
        curve.append(float(((ys.float() - y) ** 2).sum()) / ref)
    return curve


def allocate_keeps(
    mode: PerTokenMode,
    curves: Sequence[Sequence[float]],
    sizes: Sequence[float],
    read: float,
    allocation: str,
    grid: Sequence[float] = KEEP_GRID,
) -> list[float]:
    """Per-layer keeps (knobs tied) for a share ``read`` of all FFN bytes: ``uniform`` (every
    layer the same keep) or ``greedy`` (TEAL: from keep 1, repeatedly lower by one grid step
    the layer whose step adds the least error per byte saved, until the bytes fit).
    ``sizes``: each layer's weight bytes (the byte weights of the sum)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if not mode.min_read - 1e-9 <= read <= 1.0:
        raise ValueError(
            f"a read share of {read:.3f} of the FFN bytes is out of reach of mode "
            f"{mode.name!r} (it reads at least {mode.min_read:.3f})"
        )
    nk = len(mode.knobs)
    if allocation == "uniform":
        return [min(max(mode.tied_keep(read), grid[-1]), 1.0)] * len(curves)
    level = [0] * len(curves)
    total = float(sum(sizes))

    def share() -> float:
        return (
            sum(s * mode.read_fraction([grid[v]] * nk) for s, v in zip(sizes, level, strict=True))
            / total
        )

    while share() > read + 1e-9:
        best, best_cost = None, float("inf")
        for i, curve in enumerate(curves):
            if level[i] + 1 >= len(grid):
                continue
            saved = sizes[i] * (
                mode.read_fraction([grid[level[i]]] * nk)
                - mode.read_fraction([grid[level[i] + 1]] * nk)
            )
            cost = (curve[level[i] + 1] - curve[level[i]]) / saved
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        level[best] += 1
    return [grid[v] for v in level]


def layer_thresholds(
    mode: PerTokenMode, parts: FFNParts, x: Tensor, keep: float, scale: Tensor | None
) -> list[float]:
    """The thresholds ``[t_0, t_1]`` of one layer (unused knobs 0) at keep ``keep``."""
    t = mode.thresholds(parts, x, keep, scale)
    return t + [0.0] * (2 - len(t))


def model_fingerprint(parts: Sequence[FFNParts]) -> str:
    """A short identity of a model's FFN weights (thresholds are valid for this model only)."""
    from .scoring import weight_fingerprint

    h = hashlib.sha256()
    for p in parts:
        if p.quant is not None:  # quantised rows: their packed values and scales
            q = p.quant
            ws = [t for m in (q.gate_proj, q.up_proj, q.down_proj) for t in (m.qdata, m.qscales)]
        else:
            ws = [p.w_gate, p.w_up, p.w_down_t]
        for w in ws:
            if w is not None:
                h.update(weight_fingerprint(w).encode())
    return h.hexdigest()[:16]
