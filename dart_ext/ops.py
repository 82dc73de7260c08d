"""Fake (meta) kernels and typed Python wrappers of the `dart` ops (`torch.ops.dart.*`).

Op contracts (all ops: tensors on one device; kernels hold no Python state, never sync, and are
deterministic for a fixed thread count (the CPU FFN ops below DART_CPU_GEMM_MIN_TOKENS tokens, the
decode shapes, and the CPU gather give bitwise the same result for any thread count); they read a
private copy of the indices, so a caller's idx changed by another thread mid-call cannot send
them out of bounds; no autograd: inference only):

``topk_indices(scores, k) -> idx``
    scores ``[..., N]`` (fp32/bf16/fp16) -> int64 ``[..., k]``: the indices of the ``k`` largest
    scores of each row, sorted ascending (memory order). ``1 <= k <= N``. Ties: among equal scores
    the lower index wins; NaN counts as -inf.

``gathered_glu_ffn(x, w_gate, w_up, w_down_t, idx, act, lengths=None, b_gate=None, b_up=None,
b_down=None) -> y``
    ``y = sum_j act(x . w_gate[idx_j] + b_gate[idx_j]) * (x . w_up[idx_j] + b_up[idx_j])
    * w_down_t[idx_j] + b_down``; each bias optional (``b_gate``/``b_up`` ``[N]``, ``b_down``
    ``[d]``, x's dtype; Llama's ``mlp_bias``), absent = zero.
    x ``[..., d]``; weights ``[N, d]`` with unit last-dim stride (any row stride: pass
    ``down_proj.weight.t()`` of a down projection stored ``[N, d]`` contiguous; weights are never
    copied whole); weights share x's dtype. idx int64 (int32 accepted) ``[k]`` shared by all tokens,
    or ``[B, k]`` per sequence for x ``[B, T, d]``; values in ``[0, N)``; ``k = 0`` gives zeros.
    ``lengths`` (int64/int32 ``[B]``, values in ``[0, kmax]``, only with a per-sequence idx
    ``[B, kmax]``): row ``b`` uses its first ``lengths[b]`` indices (its own keep count); the
    entries past a row's length are never read, so any padding value is safe.
    Duplicate indices are allowed and counted twice. act in silu, gelu (erf), gelu_tanh (aliases
    gelu_new, gelu_pytorch_tanh), relu. fp32 accumulation; y has x's shape and dtype (contiguous),
    rounded once.

``gathered_mlp(x, w_in, b_in, w_out_t, b_out, idx, act, lengths=None) -> y``
    Plain 2-matrix FFN (GPT-2 / OPT / NeoX): ``h_j = act(x . w_in[idx_j] + b_in[idx_j])``,
    ``y = sum_j h_j * w_out_t[idx_j] + b_out``; biases optional (``b_in [N]``, ``b_out [d]``).
    Same shapes, dtypes, acts and ``lengths`` as above.

``gathered_glu_ffn_q(x, gate, up, down_t, fmt, group, idx, act, lengths=None, b_gate=None,
b_up=None, b_down=None) -> y``, ``gathered_mlp_q(x, w_in, b_in, w_out_t, b_out, fmt, group, idx,
act, lengths=None) -> y``
    The two FFN ops above over quantised rows (formats and byte layout: ``dart_ext.quant``): each
    matrix is a list ``[data, scales]`` or ``[data, scales, mins]`` of one ``fmt`` (q8, q4, q4m)
    and ``group`` (32, 64; it must divide d). The input dots (gate, up, w_in) use x rounded to int8
    per block of 32 values (``quant.quantize_activations``), the down rows are added in fp32; the
    reference is the fp op over the dequantised rows with x so rounded.

``linear_q(x, w, fmt, group, bias=None) -> y``
    ``y = x @ W^T + bias`` over quantised rows ``W [out, in]`` (same lists and rounding of x); y is
    ``[..., out]`` in x's dtype.

``gather_neurons_(out, srcs, idx, lengths=None) -> None``  (mutates ``out``)
    Re-slices kept neuron rows into a persistent buffer. Shared idx ``[k]``: out ``[S*k, d]`` and
    block ``s`` (rows ``s*k .. s*k+k-1``) gets ``srcs[s][idx]``. Per-sequence idx ``[B, k]``: out
    ``[B, S*k, d]``; with ``lengths`` (padded idx ``[B, kmax]``) row ``b``'s block entries past
    ``lengths[b]`` are set to zero, so the compact GEMMs below sum each row's own neurons only.
    srcs are ``[N, d]`` with unit last-dim stride and out's dtype. Biases: pass a ``[N, 1]`` view
    (d = 1 works).

Compact (slice-on-reselect) FFN, run between re-selections as dense GEMMs::

    gather_neurons_(gate_up, [w_gate, w_up], idx)   # gate_up [2k, d]   (per sequence [B, 2k, d])
    gather_neurons_(down_c, [w_down_t], idx)        # down_c  [k, d]    (per sequence [B, k, d])
    gu = F.linear(x, gate_up)                       # per sequence: torch.bmm(x, gate_up.mT)
    h = act(gu[..., :k]) * gu[..., k:]
    y = h @ down_c                                  # per sequence: torch.bmm(h, down_c)

``compact_glu_ffn(x, gate_up, down_c, act)`` does exactly that with torch ops (it runs in x's dtype
with the usual torch GEMM accumulation, so bf16 rounds ``gu`` and ``h`` to bf16, unlike the
gathered ops, which round once). At decode shapes on CPU (under ``KERNEL_MAX_TOKENS`` tokens per
index set) it runs ``gathered_glu_ffn`` over the compact rows with identity indices instead;
``compact_mlp`` is the same for plain FFNs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import QuantRows
from .reference import ACT_ALIASES, apply_act, canonical_act

ACTIVATIONS = tuple(ACT_ALIASES)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IDX_DTYPES = (torch.int64, torch.int32)


def _fail(op, msg):
    raise RuntimeError(f"{op}: {msg}")


def _check_act(op, act):
    if act not in ACT_ALIASES:
        _fail(
            op,
            f"unknown act '{act}'; accepted: silu, gelu (erf), gelu_tanh "
            "(aliases gelu_new, gelu_pytorch_tanh), relu",
        )


def _check_weight(op, name, w, x, d):
    if w.device != x.device:
        _fail(op, f"{name} is on {w.device} but x is on {x.device}")
    if w.dtype != x.dtype:
        _fail(op, f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
    if w.dim() != 2:
        _fail(op, f"{name} must be 2-D [N, d], got shape {tuple(w.shape)}")
    if w.shape[1] != d:
        _fail(op, f"{name} must be [N, d] with d = {d} (x's last dim), got {tuple(w.shape)}")
    if w.shape[1] > 1 and w.stride(1) != 1:
        _fail(op, f"{name} must have unit stride in its last dim, got strides {w.stride()}")


def _check_idx(op, idx, x, n, lengths=None):
    if idx.device != x.device:
        _fail(op, f"idx is on {idx.device} but x is on {x.device}")
    _check_idx_layout(op, idx, lengths)
    if idx.dim() == 2:
        if x.dim() != 3:
            _fail(op, f"a per-sequence idx [B, k] needs x [B, T, d], got x {tuple(x.shape)}")
        if idx.shape[0] != x.shape[0]:
            _fail(op, f"idx has B = {idx.shape[0]} rows but x has batch size {x.shape[0]}")


def _check_idx_layout(op, idx, lengths):
    if idx.dtype not in _IDX_DTYPES:
        _fail(op, f"idx must be int64 (or int32), got {idx.dtype}")
    if idx.dim() not in (1, 2):
        _fail(op, f"idx must be 1-D [k] or 2-D [B, k], got shape {tuple(idx.shape)}")
    if lengths is None:
        return
    if idx.dim() != 2:
        _fail(op, f"lengths need a per-sequence idx [B, kmax] (padded rows), got {idx.shape}")
    if lengths.device != idx.device:
        _fail(op, f"lengths is on {lengths.device} but idx is on {idx.device}")
    if lengths.dtype not in _IDX_DTYPES:
        _fail(op, f"lengths must be int64 (or int32), got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != idx.shape[0]:
        _fail(op, f"lengths must be 1-D [B] = [{idx.shape[0]}], got shape {tuple(lengths.shape)}")


def _check_x(op, x):
    if x.dtype not in _FLOAT_DTYPES:
        _fail(op, f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        _fail(op, "x must be [..., d], got a 0-D tensor")


# ------------------------------------------------------------------------------------------------
# Fake kernels


@torch.library.register_fake("dart::topk_indices")
def _topk_indices_fake(scores, k):
    if scores.dtype not in _FLOAT_DTYPES:
        _fail("topk_indices", f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if scores.dim() < 1:
        _fail("topk_indices", "scores must be [..., N] with at least 1 dim, got 0-D")
    n = scores.shape[-1]
    torch._check(1 <= k, lambda: f"topk_indices: k must satisfy 1 <= k <= N = {n}, got k = {k}")
    torch._check(k <= n, lambda: f"topk_indices: k must satisfy 1 <= k <= N = {n}, got k = {k}")
    return scores.new_empty((*scores.shape[:-1], k), dtype=torch.int64)


def _check_biases(op, x, biases):
    """Optional biases ``(name, tensor or None, size, what)``: 1-D [size] with x's device/dtype."""
    for name, b, size, what in biases:
        if b is None:
            continue
        if b.device != x.device or b.dtype != x.dtype:
            _fail(op, f"{name} must be on x's device with x's dtype, got {b.device} {b.dtype}")
        if b.dim() != 1 or b.shape[0] != size:
            _fail(op, f"{name} must be 1-D [{what}] = [{size}], got shape {tuple(b.shape)}")


@torch.library.register_fake("dart::gathered_glu_ffn")
def _gathered_glu_ffn_fake(
    x, w_gate, w_up, w_down_t, idx, act, lengths=None, b_gate=None, b_up=None, b_down=None
):
    op = "gathered_glu_ffn"
    _check_x(op, x)
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        _check_weight(op, name, w, x, d)
    n = w_gate.shape[0]
    if w_up.shape[0] != n:
        _fail(op, f"w_up has N = {w_up.shape[0]} rows but w_gate has N = {n}")
    if w_down_t.shape[0] != n:
        _fail(op, f"w_down_t has N = {w_down_t.shape[0]} rows but w_gate has N = {n}")
    _check_biases(
        op, x, (("b_gate", b_gate, n, "N"), ("b_up", b_up, n, "N"), ("b_down", b_down, d, "d"))
    )
    _check_act(op, act)
    _check_idx(op, idx, x, n, lengths)
    return x.new_empty(x.shape)


@torch.library.register_fake("dart::gathered_mlp")
def _gathered_mlp_fake(x, w_in, b_in, w_out_t, b_out, idx, act, lengths=None):
    op = "gathered_mlp"
    _check_x(op, x)
    d = x.shape[-1]
    _check_weight(op, "w_in", w_in, x, d)
    _check_weight(op, "w_out_t", w_out_t, x, d)
    n = w_in.shape[0]
    if w_out_t.shape[0] != n:
        _fail(op, f"w_out_t has N = {w_out_t.shape[0]} rows but w_in has N = {n}")
    _check_biases(op, x, (("b_in", b_in, n, "N"), ("b_out", b_out, d, "d")))
    _check_act(op, act)
    _check_idx(op, idx, x, n, lengths)
    return x.new_empty(x.shape)


_Q_FORMATS = {"q8": (8, False), "q4": (4, False), "q4m": (4, True)}  # quant.FORMATS, as C++ has it


def _check_qmat(op, name, t, fmt, group, d, x):
    """One quantised matrix {data, scales[, mins]} (dart_ext.quant); returns its row count N."""
    bits, has_min = _Q_FORMATS[fmt]
    want = 3 if has_min else 2
    if len(t) != want:
        parts = "[data, scales, mins]" if has_min else "[data, scales]"
        _fail(op, f"{name} must hold {parts} for this format, got {len(t)} tensors")
    n = t[0].shape[0] if t[0].dim() >= 1 else 0
    for i, (part, p) in enumerate(zip(("data", "scales", "mins"), t, strict=False)):
        if p.device != x.device:
            _fail(op, f"{name} {part} is on {p.device} but x is on {x.device}")
        dt = (torch.int8 if bits == 8 else torch.uint8) if i == 0 else torch.float16
        if p.dtype != dt:
            _fail(op, f"{name} {part} must be {dt} for {bits}-bit rows, got {p.dtype}")
        cols = d * bits // 8 if i == 0 else d // group
        if p.dim() != 2 or p.shape[0] != n or p.shape[1] != cols:
            _fail(op, f"{name} {part} must be [N, {cols}] = [{n}, {cols}], got {tuple(p.shape)}")
        if cols > 1 and p.stride(1) != 1:
            _fail(op, f"{name} {part} must have unit stride in its last dim, got {p.stride()}")
    if has_min and t[1].stride(0) != t[2].stride(0):
        _fail(op, f"{name} scales and mins must share a row stride")
    return n


def _check_qformat(op, fmt, group, d):
    if fmt not in _Q_FORMATS:
        _fail(op, f"unknown quantisation format '{fmt}'; accepted: {', '.join(_Q_FORMATS)}")
    if group not in (32, 64):
        _fail(op, f"group must be 32 or 64, got {group}")
    if d % group:
        _fail(op, f"group = {group} must divide d = {d} (x's last dim, the rows' length)")


def _q_ffn_fake(op, x, w1, w1_name, w2, wo, wo_name, fmt, group, idx, act, lengths, biases):
    _check_x(op, x)
    d = x.shape[-1]
    _check_qformat(op, fmt, group, d)
    n = _check_qmat(op, w1_name, w1, fmt, group, d, x)
    if w2 is not None:
        n2 = _check_qmat(op, "up", w2, fmt, group, d, x)
        if n2 != n:
            _fail(op, f"up has N = {n2} rows but {w1_name} has N = {n}")
    no = _check_qmat(op, wo_name, wo, fmt, group, d, x)
    if no != n:
        _fail(op, f"{wo_name} has N = {no} rows but {w1_name} has N = {n}")
    _check_biases(op, x, [(name, b, n if size == "N" else d, size) for name, b, size in biases])
    _check_act(op, act)
    _check_idx(op, idx, x, n, lengths)
    return x.new_empty(x.shape)


@torch.library.register_fake("dart::gathered_glu_ffn_q")
def _gathered_glu_ffn_q_fake(
    x, gate, up, down_t, fmt, group, idx, act, lengths=None, b_gate=None, b_up=None, b_down=None
):
    op = "gathered_glu_ffn_q"
    if not up:
        _fail(op, "up must hold [data, scales(, mins)], got []")
    biases = (("b_gate", b_gate, "N"), ("b_up", b_up, "N"), ("b_down", b_down, "d"))
    return _q_ffn_fake(
        op, x, gate, "gate", up, down_t, "down_t", fmt, group, idx, act, lengths, biases
    )


@torch.library.register_fake("dart::gathered_mlp_q")
def _gathered_mlp_q_fake(x, w_in, b_in, w_out_t, b_out, fmt, group, idx, act, lengths=None):
    biases = (("b_in", b_in, "N"), ("b_out", b_out, "d"))
    return _q_ffn_fake(
        "gathered_mlp_q",
        x,
        w_in,
        "w_in",
        None,
        w_out_t,
        "w_out_t",
        fmt,
        group,
        idx,
        act,
        lengths,
        biases,
    )


@torch.library.register_fake("dart::linear_q")
def _linear_q_fake(x, w, fmt, group, bias=None):
    op = "linear_q"
    _check_x(op, x)
    d = x.shape[-1]
    _check_qformat(op, fmt, group, d)
    n = _check_qmat(op, "w", w, fmt, group, d, x)
    _check_biases(op, x, (("bias", bias, n, "N (w's rows)"),))
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("dart::gather_neurons_")
def _gather_neurons_fake(out, srcs, idx, lengths=None):
    op = "gather_neurons_"
    if len(srcs) < 1:
        _fail(op, "srcs must hold at least one [N, d] tensor")
    _check_idx_layout(op, idx, lengths)
    per_seq = idx.dim() == 2
    if out.dim() != (3 if per_seq else 2):
        _fail(
            op,
            f"out must be {'3-D [B, S*k, d]' if per_seq else '2-D [S*k, d]'}, "
            f"got shape {tuple(out.shape)}",
        )
    s, k, d = len(srcs), idx.shape[-1], out.shape[-1]
    if per_seq and out.shape[0] != idx.shape[0]:
        _fail(op, f"out has batch {out.shape[0]} but idx has B = {idx.shape[0]}")
    if out.shape[-2] != s * k:
        _fail(op, f"out must have S*k = {s}*{k} rows, got shape {tuple(out.shape)}")
    n = srcs[0].shape[0] if srcs[0].dim() == 2 else None
    for i, w in enumerate(srcs):
        if w.device != out.device or w.dtype != out.dtype:
            _fail(op, f"srcs[{i}] must be on out's device with out's dtype")
        if w.dim() != 2 or w.shape[0] != n or w.shape[1] != d:
            _fail(op, f"srcs[{i}] must be [N, d] = [{n}, {d}], got shape {tuple(w.shape)}")
    return None


# Per-token FFNs (contracts and references: dart_ext.per_token; typed wrappers there too)


def _check_pt_scalar(op, name, t, x):
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device} but x is on {x.device}")
    if not t.dtype.is_floating_point:
        _fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 0:
        _fail(op, f"{name} must be a 0-dim tensor, got shape {tuple(t.shape)}")


def _check_pt_common(op, x, n, act, policy, scalars, scale=None, idx=None):
    _check_act(op, act)
    if policy not in ("token", "union"):
        _fail(op, f"policy must be 'token' or 'union', got '{policy}'")
    for name, t in scalars:
        _check_pt_scalar(op, name, t, x)
    if scale is not None:
        if scale.device != x.device:
            _fail(op, f"scale is on {scale.device} but x is on {x.device}")
        if not scale.dtype.is_floating_point:
            _fail(op, f"scale must be a float tensor, got {scale.dtype}")
        if scale.dim() != 1 or scale.shape[0] != n:
            _fail(op, f"scale must be 1-D [N] = [{n}], got shape {tuple(scale.shape)}")
    if idx is not None:
        if idx.dim() != 1:
            _fail(op, f"idx (the candidate neurons) must be 1-D [k], got shape {tuple(idx.shape)}")
        _check_idx(op, idx, x, n)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _check_pt_n(op, names_ns):
    (first, n), *rest = names_ns
    for name, m in rest:
        if m != n:
            _fail(op, f"{name} has N = {m} rows but {first} has N = {n}")
    return n


@torch.library.register_fake("dart::gate_first_glu_ffn")
def _gate_first_glu_ffn_fake(
    x, w_gate, w_up, w_down_t, threshold, scale, act, idx=None, policy="token"
):
    op = "gate_first_glu_ffn"
    _check_x(op, x)
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        _check_weight(op, name, w, x, d)
    n = _check_pt_n(
        op, (("w_gate", w_gate.shape[0]), ("w_up", w_up.shape[0]), ("w_down_t", w_down_t.shape[0]))
    )
    return _check_pt_common(op, x, n, act, policy, (("threshold", threshold),), scale, idx)


@torch.library.register_fake("dart::gate_first_glu_ffn_q")
def _gate_first_glu_ffn_q_fake(
    x, gate, up, down_t, fmt, group, threshold, scale, act, idx=None, policy="token"
):
    op = "gate_first_glu_ffn_q"
    _check_x(op, x)
    d = x.shape[-1]
    _check_qformat(op, fmt, group, d)
    n = _check_pt_n(
        op,
        [
            (name, _check_qmat(op, name, t, fmt, group, d, x))
            for name, t in (("gate", gate), ("up", up), ("down_t", down_t))
        ],
    )
    return _check_pt_common(op, x, n, act, policy, (("threshold", threshold),), scale, idx)


@torch.library.register_fake("dart::input_sparse_glu_ffn")
def _input_sparse_glu_ffn_fake(
    x, w_gate, w_up, w_down_t, x_threshold, h_threshold, act, policy="token"
):
    op = "input_sparse_glu_ffn"
    _check_x(op, x)
    d = x.shape[-1]
    majors = []
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        if w.device != x.device:
            _fail(op, f"{name} is on {w.device} but x is on {x.device}")
        if w.dtype != x.dtype:
            _fail(op, f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
        if w.dim() != 2 or w.shape[1] != d:
            _fail(op, f"{name} must be [N, d] with d = {d} (x's last dim), got {tuple(w.shape)}")
        row_major = w.shape[1] <= 1 or w.stride(1) == 1
        if not row_major and w.shape[0] > 1 and w.stride(0) != 1:
            _fail(op, f"{name} must be neuron-major or input-major, got strides {w.stride()}")
        majors.append(not row_major)
    if majors[0] != majors[1]:
        kinds = ["input-major" if m else "neuron-major" for m in majors]
        _fail(
            op,
            f"w_gate is {kinds[0]} but w_up is {kinds[1]} (store both alike: the column-sparse "
            "loop reads them together)",
        )
    _check_weight(op, "w_down_t", w_down_t, x, d)
    n = _check_pt_n(
        op, (("w_gate", w_gate.shape[0]), ("w_up", w_up.shape[0]), ("w_down_t", w_down_t.shape[0]))
    )
    scalars = (("x_threshold", x_threshold), ("h_threshold", h_threshold))
    return _check_pt_common(op, x, n, act, policy, scalars)


# ------------------------------------------------------------------------------------------------
# Typed wrappers


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the k largest scores per row; ties -> lower index; NaN=-inf."""
    return torch.ops.dart.topk_indices.default(scores, k)


def gathered_glu_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    idx: torch.Tensor,
    act: str = "silu",
    lengths: torch.Tensor | None = None,
    *,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated FFN over the kept neurons ``idx`` only (per sequence: row b's first ``lengths[b]``),
    with optional biases ``b_gate [N]``, ``b_up [N]``, ``b_down [d]`` (see the module docstring)."""
    return torch.ops.dart.gathered_glu_ffn.default(
        x, w_gate, w_up, w_down_t, idx, act, lengths, b_gate, b_up, b_down
    )


def gathered_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out_t: torch.Tensor,
    b_out: torch.Tensor | None,
    idx: torch.Tensor,
    act: str = "gelu_tanh",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain 2-matrix FFN over the kept neurons ``idx`` only (see the module docstring)."""
    return torch.ops.dart.gathered_mlp.default(x, w_in, b_in, w_out_t, b_out, idx, act, lengths)


def _q_common(op: str, mats: dict[str, QuantRows]) -> tuple[str, int]:
    """The one (format, group) of a call's quantised matrices (ValueError if they differ)."""
    kinds = {(q.fmt, q.group) for q in mats.values()}
    if len(kinds) != 1:
        got = ", ".join(f"{n}: {q.fmt}/{q.group}" for n, q in mats.items())
        raise ValueError(f"{op}: all quantised matrices must share format and group, got {got}")
    return kinds.pop()


def gathered_glu_ffn_q(
    x: torch.Tensor,
    gate: QuantRows,
    up: QuantRows,
    down_t: QuantRows,
    idx: torch.Tensor,
    act: str = "silu",
    lengths: torch.Tensor | None = None,
    *,
    b_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gathered_glu_ffn` over quantised rows ``[N, d]`` (``dart_ext.quant.quantize_rows``
    of the gate, up and TRANSPOSED down projections, one format and group)."""
    fmt, group = _q_common("gathered_glu_ffn_q", {"gate": gate, "up": up, "down_t": down_t})
    return torch.ops.dart.gathered_glu_ffn_q.default(
        x,
        gate.tensors(),
        up.tensors(),
        down_t.tensors(),
        fmt,
        group,
        idx,
        act,
        lengths,
        b_gate,
        b_up,
        b_down,
    )


def gathered_mlp_q(
    x: torch.Tensor,
    w_in: QuantRows,
    b_in: torch.Tensor | None,
    w_out_t: QuantRows,
    b_out: torch.Tensor | None,
    idx: torch.Tensor,
    act: str = "gelu_tanh",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gathered_mlp` over quantised rows ``[N, d]`` (w_in, TRANSPOSED w_out)."""
    fmt, group = _q_common("gathered_mlp_q", {"w_in": w_in, "w_out_t": w_out_t})
    return torch.ops.dart.gathered_mlp_q.default(
        x, w_in.tensors(), b_in, w_out_t.tensors(), b_out, fmt, group, idx, act, lengths
    )


def linear_q(x: torch.Tensor, w: QuantRows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` over a quantised ``W [out, in]`` (rows = outputs): y ``[..., out]``
    in x's dtype, fp32 accumulation, x rounded to int8 per block of 32 as in the FFN ops."""
    return torch.ops.dart.linear_q.default(x, w.tensors(), w.fmt, w.group, bias)


def gather_neurons_(
    out: torch.Tensor,
    srcs: list[torch.Tensor],
    idx: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> None:
    """In place: ``out`` <- concatenation over s of ``srcs[s][idx]``.

    Per sequence for idx ``[B, k]`` (out ``[B, S*k, d]``); with ``lengths`` the entries past a
    row's length give zero rows."""
    torch.ops.dart.gather_neurons_.default(out, list(srcs), idx, lengths)


# Below this many tokens per index set (the CPU kernels' own GEMM threshold, as the C++ side parsed
# DART_CPU_GEMM_MIN_TOKENS) the compact buffers are streamed by the dart kernels with identity
# indices: at decode shapes they read contiguous rows faster than torch's GEMV (which reads bf16 at
# about half the fp32 bandwidth on CPU), and they round once from fp32 like the gathered ops.
KERNEL_MAX_TOKENS = torch.ops.dart.cpu_gemm_min_tokens()


def _kernel_route(x: torch.Tensor, per_sequence: bool) -> bool:
    tokens = x.shape[-2] if per_sequence else x.numel() // max(x.shape[-1], 1)
    return x.device.type == "cpu" and tokens < KERNEL_MAX_TOKENS


def _per_sequence(op: str, x: torch.Tensor, name: str, buffer: torch.Tensor) -> bool:
    if buffer.dim() == 2:
        return False
    if x.dim() != 3 or buffer.dim() != 3 or buffer.shape[0] != x.shape[0]:
        raise ValueError(
            f"{op}: per-sequence buffers [B, ., d] need x [B, T, d] with the same B, got x "
            f"{tuple(x.shape)} and {name} {tuple(buffer.shape)}"
        )
    return True


def _check_compact(op: str, x: torch.Tensor, buffers) -> None:
    """The same checks for both routes: x a float [..., d] with d >= 1, and every compact buffer
    ``(name, tensor or None, expected shape, spec)`` on x's device with x's dtype and its
    documented shape (a malformed buffer would otherwise broadcast on the GEMM route)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., d] with d >= 1, got shape {tuple(x.shape)}")
    for name, t, shape, spec in buffers:
        if t is None:
            continue
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(
                f"{op}: {name} must be on x's device with x's dtype ({x.device}, {x.dtype}), "
                f"got {t.device}, {t.dtype}"
            )
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: {name} must be [{spec}] = {list(shape)}, got {list(t.shape)}")


def _row_indices(
    x: torch.Tensor, ident: torch.Tensor, lengths: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(idx, lengths) of each sequence's kernel call over its compact rows: the identity
    ``[k]``, or ``[1, k]`` with that row's ``[1]`` length (no host read: compiled steps use it)."""
    if lengths is None:
        return [(ident, None)] * x.shape[0]
    return [(ident[None], lengths[b : b + 1]) for b in range(x.shape[0])]


def _check_lengths(op: str, x: torch.Tensor, per_sequence: bool, lengths) -> None:
    if lengths is None:
        return
    if not per_sequence:
        raise ValueError(f"{op}: lengths need per-sequence buffers [B, ., d] and x [B, T, d]")
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[0] or lengths.device != x.device:
        raise ValueError(
            f"{op}: lengths must be [B] = [{x.shape[0]}] on {x.device}, got "
            f"{tuple(lengths.shape)} on {lengths.device}"
        )


def _lead(x: torch.Tensor, per_sequence: bool) -> tuple[tuple, str]:
    """Leading shape and spec prefix of the compact buffers: (B,) per sequence, else none."""
    return ((x.shape[0],), "B, ") if per_sequence else ((), "")


def compact_glu_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_c: torch.Tensor,
    act: str = "silu",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFN on compact buffers: gate_up ``[2k, d]`` / down_c ``[k, d]`` (shared) or
    ``[B, 2k, d]`` / ``[B, k, d]`` (per sequence, x ``[B, T, d]``), as filled by gather_neurons_.

    ``gu = F.linear(x, gate_up); h = act(gu[..., :k]) * gu[..., k:]; y = h @ down_c``; at decode
    shapes on CPU the same through ``gathered_glu_ffn`` over the compact rows. ``lengths`` ``[B]``
    (per sequence, as given to gather_neurons_, whose padding rows are zero): the kernel route
    reads row b's first ``lengths[b]`` compact rows only; the GEMM route sums the zero rows.
    """
    op = "compact_glu_ffn"
    canonical_act(act)
    per_sequence = _per_sequence(op, x, "gate_up", gate_up)
    _check_lengths(op, x, per_sequence, lengths)
    k = down_c.shape[-2] if down_c.dim() >= 2 else 0
    d = x.shape[-1] if x.dim() else 0
    lead, b = _lead(x, per_sequence)
    _check_compact(
        op,
        x,
        [
            ("gate_up", gate_up, (*lead, 2 * k, d), f"{b}2k, d"),
            ("down_c", down_c, (*lead, k, d), f"{b}k, d"),
        ],
    )
    if k and _kernel_route(x, per_sequence):
        ident = torch.arange(k, device=x.device)
        if not per_sequence:
            return torch.ops.dart.gathered_glu_ffn(x, gate_up[:k], gate_up[k:], down_c, ident, act)
        rows = zip(x.split(1), gate_up, down_c, _row_indices(x, ident, lengths), strict=True)
        return torch.cat(
            [
                torch.ops.dart.gathered_glu_ffn(xb, gu[:k], gu[k:], dc, ix, act, n)
                for xb, gu, dc, (ix, n) in rows
            ]
        )
    if not per_sequence:
        gu = F.linear(x, gate_up)
        return (apply_act(act, gu[..., :k]) * gu[..., k:]) @ down_c
    gu = torch.bmm(x, gate_up.transpose(1, 2))
    return torch.bmm(apply_act(act, gu[..., :k]) * gu[..., k:], down_c)


def compact_mlp(
    x: torch.Tensor,
    w_in_c: torch.Tensor,
    b_in_c: torch.Tensor | None,
    w_out_c: torch.Tensor,
    b_out: torch.Tensor | None,
    act: str,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain FFN on compact buffers: w_in_c / w_out_c ``[k, d]`` (shared) or ``[B, k, d]`` (per
    sequence), b_in_c the kept input biases ``[k]`` / ``[B, k]`` (or None), b_out ``[d]``.

    ``y = act(x @ w_in_c^T + b_in_c) @ w_out_c + b_out``; at decode shapes on CPU the same
    through ``gathered_mlp`` over the compact rows; ``lengths`` as in :func:`compact_glu_ffn`.
    """
    op = "compact_mlp"
    canonical_act(act)
    per_sequence = _per_sequence(op, x, "w_in_c", w_in_c)
    _check_lengths(op, x, per_sequence, lengths)
    k = w_out_c.shape[-2] if w_out_c.dim() >= 2 else 0
    d = x.shape[-1] if x.dim() else 0
    lead, b = _lead(x, per_sequence)
    _check_compact(
        op,
        x,
        [
            ("w_in_c", w_in_c, (*lead, k, d), f"{b}k, d"),
            ("w_out_c", w_out_c, (*lead, k, d), f"{b}k, d"),
            ("b_in_c", b_in_c, (*lead, k), f"{b}k"),
            ("b_out", b_out, (d,), "d"),
        ],
    )
    if k and _kernel_route(x, per_sequence):
        ident = torch.arange(k, device=x.device)
        if not per_sequence:
            return torch.ops.dart.gathered_mlp(x, w_in_c, b_in_c, w_out_c, b_out, ident, act)
        biases = [None] * x.shape[0] if b_in_c is None else b_in_c
        rows = zip(
            x.split(1), w_in_c, biases, w_out_c, _row_indices(x, ident, lengths), strict=True
        )
        return torch.cat(
            [
                torch.ops.dart.gathered_mlp(xb, wi, bi, wo, b_out, ix, act, n)
                for xb, wi, bi, wo, (ix, n) in rows
            ]
        )
    z = torch.matmul(x, w_in_c.transpose(-1, -2))
    if b_in_c is not None:
        z = z + (b_in_c.unsqueeze(1) if per_sequence else b_in_c)
    y = torch.matmul(apply_act(act, z), w_out_c)
    return y if b_out is None else y + b_out
