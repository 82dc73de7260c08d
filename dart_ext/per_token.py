"""Pure-PyTorch references of the per-token FFN ops (issue 26): the contracts a fused kernel
implements, registered as custom ops (namespace ``dart_per_token``) so that a compiled step
(``torch.compile(fullgraph=True)``) treats them as one opaque call of fixed output shape.

Both ops take a gated FFN ``y = (act(x W_gate^T) * (x W_up^T)) W_down`` with the weights stored
neuron-major: ``w_gate``, ``w_up`` ``[N, d]`` and ``w_down_t`` ``[N, d]`` (row i = neuron i), and
choose, for every token on its own, what to read:

``gate_first_glu_ffn(x, w_gate, w_up, w_down_t, threshold, scale, act) -> (y, read)``
    Per token: the gate dot product of every neuron, ``a = act(W_gate x)`` (the whole gate
    matrix is read), the score ``|a_i| * scale_i`` (``scale`` ``[N]``, e.g. all ones, or the
    norms ``|w_up_i| |w_down_i|``), then for the neurons whose score is ``>= threshold`` only:
    the up dot ``u_i = w_up_i . x`` and the down accumulation ``y += a_i u_i w_down_t_i``.
    A kernel reads N gate rows plus 2 rows per kept neuron.
``input_sparse_glu_ffn(x, w_gate, w_up, w_down_t, x_threshold, h_threshold, act) -> (y, read)``
    Per token: the input entries with ``|x_j| >= x_threshold`` are kept; gate and up are
    column-sparse GEMVs over those columns only (``g = W_gate[:, J] x_J``; a kernel wants the
    gate and up stored input-major, ``[d, N]``, so that a kept column is one contiguous row),
    ``h = act(g) * u``; then the down projection reads only the rows with ``|h_i| >= h_threshold``.
    A kernel reads 2N entries per kept input column plus d per kept neuron.

``x`` is ``[..., d]`` (any leading shape, any float dtype; math in fp32, ``y`` rounded once to
``x.dtype``); thresholds are 0-dim fp32 tensors (0 keeps everything: the dense FFN). ``read``
``[...]`` fp32 is the number of weight entries the token read (the bytes meter: divide by
``3 N d`` for the share of the FFN's weights). Bad input (shapes that disagree, an unknown
activation, a non-scalar threshold) raises a ValueError naming the argument.
"""

from __future__ import annotations

import math

import torch

from .reference import apply_act, canonical_act

__all__ = ["gate_first_glu_ffn", "input_sparse_glu_ffn"]


def _check(x, w_gate, w_up, w_down_t, act, **scalars) -> None:
    if x.dim() < 1:
        raise ValueError(f"x: expected [..., d], got a {x.dim()}-d tensor")
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        if w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"{name}: expected [N, {d}] (d of x), got {tuple(w.shape)}")
    if not w_gate.shape[0] == w_up.shape[0] == w_down_t.shape[0]:
        raise ValueError(
            f"w_gate, w_up, w_down_t: neuron counts disagree ({w_gate.shape[0]}, "
            f"{w_up.shape[0]}, {w_down_t.shape[0]})"
        )
    for name, t in scalars.items():
        if t.dim() != 0:
            raise ValueError(f"{name}: expected a 0-dim tensor, got shape {tuple(t.shape)}")
    canonical_act(act)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(math.prod(x.shape[:-1]), x.shape[-1])


@torch.library.custom_op("dart_per_token::gate_first_glu_ffn", mutates_args=())
def gate_first_glu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate-first gathered FFN (see the module docstring)."""
    _check(x, w_gate, w_up, w_down_t, act, threshold=threshold)
    if scale.shape != (w_gate.shape[0],):
        raise ValueError(f"scale: expected [{w_gate.shape[0]}] (N), got {tuple(scale.shape)}")
    n, d = w_gate.shape
    xs = _tokens(x)
    ys, reads = [], []
    wg, wu, wd = w_gate.float(), w_up.float(), w_down_t.float()
    t = threshold.float()
    for xt in xs:  # one token at a time: what a decode kernel does
        a = apply_act(act, wg @ xt)
        kept = torch.nonzero(a.abs() * scale.float() >= t).squeeze(1)
        u = wu.index_select(0, kept) @ xt
        ys.append((a.index_select(0, kept) * u) @ wd.index_select(0, kept))
        reads.append(float(n * d + 2 * kept.numel() * d))
    y = torch.stack(ys) if ys else xs.new_zeros(0, d)
    read = torch.tensor(reads, dtype=torch.float32, device=x.device)
    return y.reshape(x.shape).to(x.dtype), read.reshape(x.shape[:-1])


@gate_first_glu_ffn.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, scale, act):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dart_per_token::input_sparse_glu_ffn", mutates_args=())
def input_sparse_glu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    x_threshold: torch.Tensor,
    h_threshold: torch.Tensor,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-sparse FFN: column-sparse gate/up GEMVs, then row-sparse down (module docstring)."""
    _check(x, w_gate, w_up, w_down_t, act, x_threshold=x_threshold, h_threshold=h_threshold)
    n, d = w_gate.shape
    xs = _tokens(x)
    ys, reads = [], []
    wg, wu, wd = w_gate.float(), w_up.float(), w_down_t.float()
    tx, th = x_threshold.float(), h_threshold.float()
    for xt in xs:
        cols = torch.nonzero(xt.abs() >= tx).squeeze(1)
        xk = xt.index_select(0, cols)
        h = apply_act(act, wg.index_select(1, cols) @ xk) * (wu.index_select(1, cols) @ xk)
        rows = torch.nonzero(h.abs() >= th).squeeze(1)
        ys.append(h.index_select(0, rows) @ wd.index_select(0, rows))
        reads.append(float(2 * n * cols.numel() + d * rows.numel()))
    y = torch.stack(ys) if ys else xs.new_zeros(0, d)
    read = torch.tensor(reads, dtype=torch.float32, device=x.device)
    return y.reshape(x.shape).to(x.dtype), read.reshape(x.shape[:-1])


@input_sparse_glu_ffn.register_fake
def _(x, w_gate, w_up, w_down_t, x_threshold, h_threshold, act):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)
