"""Pure-PyTorch reference of every `dart` op: the ground truth of the tests and of other backends.

All math in fp32 (outputs rounded once to the input dtype); index selection with index_select;
top-k tie rule via a stable descending sort (lower index wins among equal scores; NaN = -inf).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import QuantRows, dequantize_rows, quantize_activations

ACT_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def canonical_act(act: str) -> str:
    try:
        return ACT_ALIASES[act]
    except KeyError:
        raise ValueError(
            f"unknown act {act!r}; accepted: silu, gelu (erf), gelu_tanh "
            "(aliases gelu_new, gelu_pytorch_tanh), relu"
        ) from None


def apply_act(act: str, t: torch.Tensor) -> torch.Tensor:
    a = canonical_act(act)
    if a == "silu":
        return F.silu(t)
    if a == "gelu":
        return F.gelu(t)
    if a == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    return F.relu(t)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values.to(torch.int64)


def _rows(idx, lengths):
    """Each sequence's own indices (int64): ``idx[b, :lengths[b]]`` (all of ``idx[b]`` without
    lengths); padding entries are never looked at."""
    idx = idx.long()
    if lengths is None:
        return list(idx)
    return [idx[b, : int(lengths[b])] for b in range(idx.shape[0])]


def _per_batch(x, idx, fn, lengths=None):
    """Applies fn(x_rows [M, d] fp32, idx [k]) for a shared or per-sequence (padded) idx."""
    rows = math.prod(x.shape[:-1])  # not reshape(-1, d): d may be 0
    xf = x.float()
    if idx.dim() == 1:
        return fn(xf.reshape(rows, x.shape[-1]), idx.long()).reshape(x.shape)
    per_row = _rows(idx, lengths)
    return torch.stack([fn(xf[b], ix) for b, ix in enumerate(per_row)]).reshape(x.shape)


def _kept_bias(b, ix):
    return None if b is None else b.float().index_select(0, ix)


def gathered_glu_ffn(
    x, w_gate, w_up, w_down_t, idx, act, lengths=None, b_gate=None, b_up=None, b_down=None
):
    def fn(xr, ix):
        g = F.linear(xr, w_gate.float().index_select(0, ix), _kept_bias(b_gate, ix))
        u = F.linear(xr, w_up.float().index_select(0, ix), _kept_bias(b_up, ix))
        y = (apply_act(act, g) * u) @ w_down_t.float().index_select(0, ix)
        return y if b_down is None else y + b_down.float()

    return _per_batch(x, idx, fn, lengths).to(x.dtype)


def gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act, lengths=None):
    def fn(xr, ix):
        b = None if b_in is None else b_in.float().index_select(0, ix)
        h = apply_act(act, F.linear(xr, w_in.float().index_select(0, ix), b))
        y = h @ w_out_t.float().index_select(0, ix)
        return y if b_out is None else y + b_out.float()

    return _per_batch(x, idx, fn, lengths).to(x.dtype)


def _dequant(parts, fmt, group):
    # the op's list form of a quantised matrix -> its fp32 rows
    mins = parts[2] if len(parts) > 2 else None
    return dequantize_rows(QuantRows(fmt, group, parts[0], parts[1], mins))


def _rounded_x(x):
    return quantize_activations(x) if x.shape[-1] else x.float()


def gathered_glu_ffn_q(
    x, gate, up, down_t, fmt, group, idx, act, lengths=None, b_gate=None, b_up=None, b_down=None
):
    """gathered_glu_ffn over the dequantised rows, the input dots with x rounded to int8 per block
    of 32 (the down projection's input h is never rounded)."""
    wg, wu, wd = (_dequant(m, fmt, group) for m in (gate, up, down_t))
    xq = _rounded_x(x)

    def fn(xr, ix):
        g = F.linear(xr, wg.index_select(0, ix), _kept_bias(b_gate, ix))
        u = F.linear(xr, wu.index_select(0, ix), _kept_bias(b_up, ix))
        y = (apply_act(act, g) * u) @ wd.index_select(0, ix)
        return y if b_down is None else y + b_down.float()

    return _per_batch(xq, idx, fn, lengths).to(x.dtype)


def gathered_mlp_q(x, w_in, b_in, w_out_t, b_out, fmt, group, idx, act, lengths=None):
    wi, wo = _dequant(w_in, fmt, group), _dequant(w_out_t, fmt, group)
    return gathered_mlp(_rounded_x(x), wi, b_in, wo, b_out, idx, act, lengths).to(x.dtype)


def linear_q(x, w, fmt, group, bias=None):
    b = None if bias is None else bias.float()
    return F.linear(_rounded_x(x), _dequant(w, fmt, group), b).to(x.dtype)


def gather_neurons(srcs, idx, lengths=None):
    """Functional form of gather_neurons_: the tensor `out` should hold afterwards (with
    lengths, row b's blocks are zero past its first lengths[b] entries)."""
    if idx.dim() == 1:
        idx = idx.long()
        return torch.cat([s.index_select(0, idx) for s in srcs], dim=0)
    kmax = idx.shape[1]

    def block(s, ix):
        pad = s.new_zeros(kmax - ix.numel(), s.shape[1])
        return torch.cat([s.index_select(0, ix), pad])

    return torch.stack([torch.cat([block(s, ix) for s in srcs]) for ix in _rows(idx, lengths)])


def dense_glu_ffn(x, w_gate, w_up, w_down, act):
    """Dense gated FFN with HF orientation (w_down [d, N])."""
    return F.linear(apply_act(act, F.linear(x, w_gate)) * F.linear(x, w_up), w_down)
