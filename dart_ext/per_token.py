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

Two optional arguments (defaults: the semantics above): ``gate_first_glu_ffn(..., idx=None)``
reads only the candidate neurons ``idx [k]`` (a DART superset: gate rows of the candidates, and
``read`` counts ``k d`` for the gate); ``policy="union"`` (both ops) chooses once for all tokens
of the call: a neuron (column, row) is kept when any token keeps it, and every token is computed
over the kept set, its own values unmasked; every token's ``read`` is then the call's reads
(the weights are streamed once for the whole batch step). ``policy="token"`` is the per-token
(per sequence at decode) choice.

The fused CPU kernels (``torch.ops.dart.gate_first_glu_ffn``, ``gate_first_glu_ffn_q``,
``input_sparse_glu_ffn``; ``csrc/cpu/per_token_ops.cpp``) and the CUDA kernels of
``gate_first_glu_ffn`` and ``input_sparse_glu_ffn`` (``csrc/cuda/per_token_ops.cu``, when the
extension is built with CUDA; :data:`FUSED_DEVICES` says which device types have them)
implement these contracts and really skip the unread bytes; their typed wrappers are
:func:`fused_gate_first_glu_ffn`, :func:`fused_gate_first_glu_ffn_q` and
:func:`fused_input_sparse_glu_ffn`. The input-sparse
kernel reads gate and up column-sparse at full speed only when they are stored input-major
(:func:`input_major`: the ``[N, d]`` view of a contiguous ``[d, N]`` copy); neuron-major
``[N, d]`` weights work too (a gather inside each row, which touches whole cache lines).
"""

from __future__ import annotations

import math

import torch

from .quant import QuantRows, dequantize_rows, quantize_activations
from .reference import apply_act, canonical_act

__all__ = [
    "FUSED_DEVICES",
    "POLICIES",
    "fused_gate_first_glu_ffn",
    "fused_gate_first_glu_ffn_q",
    "fused_input_sparse_glu_ffn",
    "gate_first_glu_ffn",
    "gate_first_glu_ffn_q_reference",
    "input_major",
    "input_sparse_glu_ffn",
]

POLICIES = ("token", "union")


def _fused_devices(op: str) -> frozenset[str]:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(key.lower() for key in ("CPU", "CUDA") if has(f"dart::{op}", key))


# op name -> the device types ("cpu", "cuda") for which the built extension has a fused kernel of
# torch.ops.dart.<op> (CUDA ones only in a build with CUDA); fixed at import, so a compiled step
# reads it as a constant
FUSED_DEVICES = {
    op: _fused_devices(op)
    for op in ("gate_first_glu_ffn", "gate_first_glu_ffn_q", "input_sparse_glu_ffn")
}


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


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")


def _groups(m: int, policy: str) -> list[slice]:
    """The token groups that share one choice: each token alone, or all of them (union)."""
    if policy == "union":
        return [slice(0, m)] if m else []
    return [slice(t, t + 1) for t in range(m)]


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
    idx: torch.Tensor | None = None,
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate-first gathered FFN (see the module docstring)."""
    _check(x, w_gate, w_up, w_down_t, act, threshold=threshold)
    _check_policy(policy)
    n, d = w_gate.shape
    if scale.shape != (n,):
        raise ValueError(f"scale: expected [{n}] (N), got {tuple(scale.shape)}")
    if idx is not None:
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx: expected int [k], got {idx.dtype} {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"idx: values must lie in [0, {n})")
    cand = torch.arange(n, device=x.device) if idx is None else idx.long()
    xs = _tokens(x)
    ys, reads = [], []
    wg, wu, wd = w_gate.float()[cand], w_up.float()[cand], w_down_t.float()[cand]
    sc, t = scale.float()[cand], threshold.float()
    for g in _groups(xs.shape[0], policy):  # one token at a time: what a decode kernel does
        xg = xs[g]
        a = apply_act(act, xg @ wg.T)  # [m, k]
        kept = torch.nonzero((a.abs() * sc >= t).any(0)).squeeze(1)
        u = xg @ wu.index_select(0, kept).T
        ys.append((a.index_select(1, kept) * u) @ wd.index_select(0, kept))
        reads += [float(cand.numel() * d + 2 * kept.numel() * d)] * xg.shape[0]
    y = torch.cat(ys) if ys else xs.new_zeros(0, d)
    read = torch.tensor(reads, dtype=torch.float32, device=x.device)
    return y.reshape(x.shape).to(x.dtype), read.reshape(x.shape[:-1])


@gate_first_glu_ffn.register_fake
def _(x, w_gate, w_up, w_down_t, threshold, scale, act, idx=None, policy="token"):
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
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-sparse FFN: column-sparse gate/up GEMVs, then row-sparse down (module docstring)."""
    _check(x, w_gate, w_up, w_down_t, act, x_threshold=x_threshold, h_threshold=h_threshold)
    _check_policy(policy)
    n, d = w_gate.shape
    xs = _tokens(x)
    ys, reads = [], []
    wg, wu, wd = w_gate.float(), w_up.float(), w_down_t.float()
    tx, th = x_threshold.float(), h_threshold.float()
    for g in _groups(xs.shape[0], policy):
        xg = xs[g]
        cols = torch.nonzero((xg.abs() >= tx).any(0)).squeeze(1)
        xk = xg.index_select(1, cols)
        h = apply_act(act, xk @ wg.index_select(1, cols).T) * (xk @ wu.index_select(1, cols).T)
        rows = torch.nonzero((h.abs() >= th).any(0)).squeeze(1)
        ys.append(h.index_select(1, rows) @ wd.index_select(0, rows))
        reads += [float(2 * n * cols.numel() + d * rows.numel())] * xg.shape[0]
    y = torch.cat(ys) if ys else xs.new_zeros(0, d)
    read = torch.tensor(reads, dtype=torch.float32, device=x.device)
    return y.reshape(x.shape).to(x.dtype), read.reshape(x.shape[:-1])


@input_sparse_glu_ffn.register_fake
def _(x, w_gate, w_up, w_down_t, x_threshold, h_threshold, act, policy="token"):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


def gate_first_glu_ffn_q_reference(
    x: torch.Tensor,
    gate: QuantRows,
    up: QuantRows,
    down_t: QuantRows,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    act: str,
    idx: torch.Tensor | None = None,
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of :func:`fused_gate_first_glu_ffn_q`: :func:`gate_first_glu_ffn` over the
    dequantised rows with x rounded as the quantised dots round it (``quantize_activations``),
    ``y`` in x's dtype."""
    xq = quantize_activations(x)
    w = [dequantize_rows(q).float() for q in (gate, up, down_t)]
    y, read = gate_first_glu_ffn(xq, *w, threshold, scale, act, idx, policy)
    return y.to(x.dtype), read


# ------------------------------------------------------------------------------------------------
# The fused CPU kernels (torch.ops.dart.*; csrc/cpu/per_token_ops.cpp)


def input_major(w: torch.Tensor) -> torch.Tensor:
    """``w [N, d]`` stored input-major: the ``[N, d]`` view of a contiguous ``[d, N]`` copy, so
    that column j of w (what an input entry x_j multiplies) is one contiguous row. Costs one more
    copy of w unless the neuron-major original is dropped (F.linear works on the view as is)."""
    return w.t().contiguous().t()


def fused_gate_first_glu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    act: str,
    idx: torch.Tensor | None = None,
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel of :func:`gate_first_glu_ffn` (same arguments and results; ``act`` one of
    the kernels' names, ``dart_ext.ACTIVATIONS``)."""
    return torch.ops.dart.gate_first_glu_ffn.default(
        x, w_gate, w_up, w_down_t, threshold, scale, act, idx, policy
    )


def fused_gate_first_glu_ffn_q(
    x: torch.Tensor,
    gate: QuantRows,
    up: QuantRows,
    down_t: QuantRows,
    threshold: torch.Tensor,
    scale: torch.Tensor,
    act: str,
    idx: torch.Tensor | None = None,
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate-first FFN over quantised rows (one format and group for all three matrices);
    contract: :func:`gate_first_glu_ffn_q_reference`."""
    from .ops import _q_common

    fmt, group = _q_common("gate_first_glu_ffn_q", {"gate": gate, "up": up, "down_t": down_t})
    return torch.ops.dart.gate_first_glu_ffn_q.default(
        x,
        gate.tensors(),
        up.tensors(),
        down_t.tensors(),
        fmt,
        group,
        threshold,
        scale,
        act,
        idx,
        policy,
    )


def fused_input_sparse_glu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    x_threshold: torch.Tensor,
    h_threshold: torch.Tensor,
    act: str,
    policy: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel of :func:`input_sparse_glu_ffn`; w_gate and w_up neuron-major ``[N, d]``
    or both :func:`input_major` (the fast layout)."""
    return torch.ops.dart.input_sparse_glu_ffn.default(
        x, w_gate, w_up, w_down_t, x_threshold, h_threshold, act, policy
    )
