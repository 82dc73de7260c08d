"""Quantised models: `quantize(model, "q4")` makes the whole decode step read quantised weights.

In place, before (or without) `dart.attach`, every decoder MLP becomes a `QuantGLU` holding the
gate and up projections and the TRANSPOSED down projection as quantised rows (neuron-major,
`dart_ext.quant`), so `torch.ops.dart.gathered_glu_ffn_q` over all neurons is the dense FFN and
over the kept ones DART's sparse FFN; every `nn.Linear` of the attention blocks and the LM head
becomes a `QuantLinear` (`torch.ops.dart.linear_q`). Embeddings and norms stay as they are
(an embedding lookup reads one row per token, and the norms are a few KB).

The quantised tensors are buffers (so `.to(device)`, `state_dict`, `torch.compile` and
`torch.export` see them). Scales (and mins) are fp16 values stored as int16 bit patterns: a
`model.to(torch.bfloat16)` casts every floating buffer, and it must not round the scales again.

`attach` then runs over the quantised rows through the usual adapter / `DARTFFN` machinery:
`QuantGLU.dart_ffn_parts` gives the FFN as `FFNParts` whose `quant` field is the module itself
(`hidden` / `down` compute the dense path in parts for tracing, `sparse` runs the kernel on the
kept neurons). Backends: `gathered` (the kernel over the kept rows where they lie), `compact`
(the kept rows copied into compact buffers at each selection, the same kernel streaming them
contiguously: scattered rows cost up to 1.9x their bytes on a CPU) and `masked` (the reference
simulation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .adapters import FFNParts, LlamaAdapter, get_adapter

__all__ = [
    "QuantGLU",
    "QuantLinear",
    "QuantSpec",
    "quantize",
    "quantize_streamed",
    "quantized_spec",
    "splitting",
    "WEIGHT_FORMATS",
    "Weights",
]

# The `weights` option of every front door: "fp" (the model's own weights) or a format name.
Weights = Literal["fp", "q8", "q4", "q4m"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(Weights)
_CHUNK_VALUES = 1 << 24  # values quantised per step (bounds the fp32 temporaries to ~200 MB)


@dataclass(frozen=True)
class QuantSpec:
    """How a model was quantised (`model._dart_quant`)."""

    fmt: str
    group: int


def quantized_spec(model: nn.Module) -> QuantSpec | None:
    """The format a model was quantised to by `quantize`, or None (its own fp weights)."""
    return getattr(model, "_dart_quant", None)


def _quantize_chunked(w: torch.Tensor, fmt: str, group: int):
    """`dart_ext.quant.quantize_rows` over row chunks, so a 150k-row LM head never needs a full
    fp32 copy of itself as temporaries."""
    from dart_ext.quant import QuantRows, quantize_rows

    rows = max(1, _CHUNK_VALUES // max(1, w.shape[1]))
    parts = [quantize_rows(w[i : i + rows], fmt, group) for i in range(0, w.shape[0], rows)]
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return QuantRows(
        fmt,
        group,
        torch.cat([p.data for p in parts]),
        torch.cat([p.scales for p in parts]),
        mins,
    )


class _QuantRowsModule(nn.Module):
    """A module owning one quantised matrix `[rows, d]` as buffers `qdata`, `qscales` (fp16 bits
    in int16) and, for q4m, `qmins`."""

    def _set_rows(self, rows) -> None:
        self.fmt, self.group = rows.fmt, rows.group
        self.register_buffer("qdata", rows.data)
        self.register_buffer("qscales", rows.scales.view(torch.int16))
        if rows.mins is not None:
            self.register_buffer("qmins", rows.mins.view(torch.int16))
        else:
            self.qmins = None

    def rows(self):
        """The matrix as `dart_ext.quant.QuantRows` (views of the buffers: no copy)."""
        return self.rows_of(self.row_buffers())

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix the rows stand for (a temporary: for proxies, tests, tracing); the
        values of `dart_ext.quant.dequantize_rows`, computed per group without expanding the
        scales to a full matrix first (about 3x faster on a 8960 x 1536 matrix)."""
        from dart_ext.quant import BLOCK

        n, packed = self.qdata.shape
        groups = self.qscales.shape[1]
        s = self.qscales.view(torch.float16).float().unsqueeze(-1)  # [N, groups, 1]
        if self.fmt == "q8":
            return (self.qdata.view(n, groups, -1).float() * s).view(n, -1)
        # 4-bit: byte j of a 32-value block holds value j (low nibble) and j + 16 (high)
        b = self.qdata.view(n, packed // (BLOCK // 2), 1, BLOCK // 2)
        u = torch.cat([b & 0x0F, b >> 4], dim=2).view(n, groups, -1).float()
        if self.qmins is None:
            return ((u - 8) * s).view(n, -1)
        return (u * s + self.qmins.view(torch.float16).float().unsqueeze(-1)).view(n, -1)

    def nbytes(self) -> int:
        return self.rows().nbytes()

    def row_buffers(self) -> list[torch.Tensor]:
        """The buffers holding the rows, one row per neuron / output: data, scales, (mins)."""
        return [t for t in (self.qdata, self.qscales, self.qmins) if t is not None]

    def rows_of(self, buffers: list[torch.Tensor]):
        """`rows()` of other buffers in `row_buffers()`'s layout (e.g. a compact copy of some
        rows): `dart_ext.quant.QuantRows` with this module's format and group."""
        from dart_ext.quant import QuantRows

        mins = buffers[2].view(torch.float16) if len(buffers) > 2 else None
        return QuantRows(self.fmt, self.group, buffers[0], buffers[1].view(torch.float16), mins)


class QuantLinear(_QuantRowsModule):
    """`nn.Linear` over quantised rows (`W [out, in]`, one row per output): `linear_q`, with x
    rounded to int8 per block of 32 as llama.cpp's Q8 path does; y in x's dtype."""

    def __init__(self, rows, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = rows.shape
        self._set_rows(rows)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group: int) -> QuantLinear:
        return cls(_quantize_chunked(linear.weight.detach(), fmt, group), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dart.linear_q.default(
            x, self.rows().tensors(), self.fmt, self.group, self.bias
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fmt={self.fmt}, group={self.group}"
        )


class QuantDownT(_QuantRowsModule):
    """The down projection stored TRANSPOSED (`[N, d]`, row j = neuron j's output vector), as the
    gathered kernels read it. `forward(h)` is the dense `h @ W_down^T (+ bias)` on the
    dequantised rows: only tracing passes and export's prefill call it; decode runs the fused
    kernel, which reads these rows directly."""

    def __init__(self, rows, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = rows.shape
        self._set_rows(rows)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = h @ self.dequantized().to(h.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"neurons={self.in_features}, d={self.out_features}, fmt={self.fmt}"


class QuantGLU(nn.Module):
    """A gated FFN over quantised neuron-major rows: gate, up (`QuantLinear`, `[N, d]`) and the
    transposed down projection (`QuantDownT`, `[N, d]`). Dense forward: the fused kernel over
    all N neurons; `sparse` runs it over kept ones; `hidden` / `down` are the dense path in two
    halves (tracing statistics need the hidden vector)."""

    def __init__(
        self,
        gate: QuantLinear,
        up: QuantLinear,
        down: QuantDownT,
        act_fn: nn.Module,
        hidden_act: str,
        dtype: torch.dtype,
    ):
        super().__init__()
        from dart_ext.reference import ACT_ALIASES

        if hidden_act not in ACT_ALIASES:
            raise ValueError(
                f"quantize: no quantised kernel for the FFN activation {hidden_act!r}; "
                f"supported: {', '.join(ACT_ALIASES)}"
            )
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = act_fn
        self.hidden_act = hidden_act
        self.kernel_act = ACT_ALIASES[hidden_act]
        self.width = gate.out_features
        self.register_buffer("all_idx", torch.arange(self.width), persistent=False)
        # follows the model's float casts: the activation dtype (DART's masks are built in it)
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)
        self.split_down = False  # True: dense forward as hidden -> down_proj (see `splitting`)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_ref.dtype

    @classmethod
    def from_hf(cls, mlp: nn.Module, hidden_act: str, fmt: str, group: int) -> QuantGLU:
        """From an HF gated MLP (`gate_proj`/`up_proj`/`down_proj`, or Phi-3's fused
        `gate_up_proj`, gate first)."""
        if hasattr(mlp, "gate_up_proj"):
            fused = mlp.gate_up_proj
            n = fused.weight.shape[0] // 2
            bias = fused.bias
            gate = QuantLinear(
                _quantize_chunked(fused.weight[:n].detach(), fmt, group),
                None if bias is None else bias[:n],
            )
            up = QuantLinear(
                _quantize_chunked(fused.weight[n:].detach(), fmt, group),
                None if bias is None else bias[n:],
            )
            act_fn = mlp.activation_fn
        else:
            gate = QuantLinear.from_linear(mlp.gate_proj, fmt, group)
            up = QuantLinear.from_linear(mlp.up_proj, fmt, group)
            act_fn = mlp.act_fn
        dw = mlp.down_proj.weight
        down = QuantDownT(_quantize_chunked(dw.detach().t(), fmt, group), mlp.down_proj.bias)
        return cls(gate, up, down, act_fn, hidden_act, dw.dtype)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def sparse(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        act: str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The FFN over the neurons `idx` (`[k]` shared or `[B, k]` per sequence; `lengths` as
        in `gathered_glu_ffn`), reading only their quantised rows."""
        mats = [m.rows() for m in self.matrices()]
        return self._kernel(x, mats, self.gate_proj.bias, self.up_proj.bias, idx, act, lengths)

    def matrices(self) -> tuple[QuantLinear, QuantLinear, QuantDownT]:
        return self.gate_proj, self.up_proj, self.down_proj

    def sparse_rows(
        self,
        buffers: list[torch.Tensor],
        x: torch.Tensor,
        idx: torch.Tensor,
        act: str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`sparse` over other rows: `buffers` = the row buffers of gate, up and down in
        `matrices()` order (each `_QuantRowsModule.row_buffers()`' layout), then the gate and
        up biases this FFN has (`[rows, 1]`), e.g. compact copies of the kept rows; `idx` (and
        `lengths`) index those rows."""
        g, u, dn = self.matrices()
        per = len(g.row_buffers())
        mats = [m.rows_of(buffers[i * per : (i + 1) * per]) for i, m in enumerate((g, u, dn))]
        biases = iter(b.squeeze(1) for b in buffers[3 * per :])
        b_gate = next(biases) if g.bias is not None else None
        b_up = next(biases) if u.bias is not None else None
        return self._kernel(x, mats, b_gate, b_up, idx, act, lengths)

    def _kernel(self, x, mats, b_gate, b_up, idx, act, lengths) -> torch.Tensor:
        # the fused kernel over gate, up and down rows `mats` (QuantRows), biases in their layout
        return torch.ops.dart.gathered_glu_ffn_q.default(
            x,
            *(m.tensors() for m in mats),
            self.gate_proj.fmt,
            self.gate_proj.group,
            idx,
            act or self.kernel_act,
            lengths,
            b_gate,
            b_up,
            self.down_proj.bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_down:
            return self.down_proj(self.hidden(x))
        return self.sparse(x, self.all_idx)

    def dart_ffn_parts(self, act: str) -> FFNParts:
        """This FFN as the neuron view `dart.core.adapters` gives DART (no fp weight views)."""
        return FFNParts(
            kind="glu",
            act=act,
            width=self.width,
            w_gate=None,
            w_up=None,
            w_down_t=None,
            b_in=None,
            b_out=None,
            hidden=self.hidden,
            down=self.down_proj,
            original=self,
            quant=self,
        )

    def extra_repr(self) -> str:
        return f"neurons={self.width}, act={self.hidden_act}"


@contextmanager
def splitting(modules: list[nn.Module]) -> Iterator[None]:
    """Dense forwards of these `QuantGLU`s run as `down_proj(hidden(x))` inside (so a hook on
    `down_proj` sees the hidden vector, as export's prefill needs); others are left alone."""
    quant = [m for m in modules if isinstance(m, QuantGLU)]
    for m in quant:
        m.split_down = True
    try:
        yield
    finally:
        for m in quant:
            m.split_down = False


def _attention_linears(attn: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in attn.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]


def _check_format(fmt: str, group: int):
    from dart_ext.quant import get_format

    try:
        f = get_format(fmt)
    except ValueError as err:
        raise ValueError(f"quantize: fmt: {err}") from None
    if not isinstance(group, int) or group not in f.groups:
        raise ValueError(f"quantize: group must be one of {f.groups} for {fmt!r}, got {group!r}")
    return f


def _gated_adapter(model: nn.Module) -> LlamaAdapter:
    """The model's adapter, if it is one of the gated-FFN families quantisation supports."""
    adapter = get_adapter(model)
    if not isinstance(adapter, LlamaAdapter):
        raise ValueError(
            f"quantize supports the gated-FFN families ({', '.join(LlamaAdapter.families)}), "
            f"not {model.config.model_type!r}"
        )
    return adapter


def quantize(
    model: nn.Module,
    fmt: str = "q4",
    group: int = 32,
    *,
    attention: bool = True,
    head: bool | str = True,
) -> nn.Module:
    """Quantise `model` in place to `fmt` (q8, q4 or q4m; groups of `group` = 32 or 64 values
    along each row): every decoder MLP, and (by default) the attention projections and the LM
    head (`head`: True = `fmt`, a format name = that format, e.g. "q8" beside 4-bit blocks as
    llama.cpp's Q4_K_M keeps its output matrix finer; False = left as it is). Returns the model.
    Call it before `dart.attach` (or without it); a model is quantised once. Families: those
    of the Llama adapter (Llama, Mistral, Qwen2/3, SmolLM, Gemma 1-3, Phi-3)."""
    f = _check_format(fmt, group)
    head_fmt = fmt if head is True else head
    if head_fmt:
        _check_format(head_fmt, group)
    if getattr(model, "_dart_handle", None) is not None:
        raise RuntimeError(
            "quantize: this model has DART attached: quantize before dart.attach (or detach "
            "first, then attach again)"
        )
    done = quantized_spec(model)
    if done is not None:
        raise RuntimeError(
            f"quantize: this model is already quantised ({done.fmt}, group {done.group}); "
            "quantising it again would round the rounded weights: load a fresh model"
        )
    adapter = _gated_adapter(model)
    act = adapter.activation()
    refs = adapter.layer_refs()
    out_head = model.get_output_embeddings() if head else None
    if head and type(out_head) is not nn.Linear:
        raise ValueError(f"quantize: the LM head is a {type(out_head).__name__}, not nn.Linear")
    # Every row length is checked before anything changes: no half-quantised model on error.
    todo: list[tuple[str, int]] = []
    for r in refs:
        mlp = r.layer.mlp
        todo.append((f"layers.{r.index}.mlp", mlp.down_proj.weight.shape[0]))
        if attention:
            for _p, name, lin in _attention_linears(r.attn):
                todo.append((f"layers.{r.index}.attn.{name}", lin.in_features))
    if head:
        todo.append(("lm_head", out_head.in_features))
    for where, d in todo:
        if d % group:
            raise ValueError(
                f"quantize: group = {group} does not divide the row length d = {d} of {where}; "
                f"use a group that divides it (format {fmt!r} accepts {f.groups})"
            )
    with torch.no_grad():
        for r in refs:
            r.layer.mlp = QuantGLU.from_hf(r.layer.mlp, act, fmt, group)
            if attention:
                for parent, name, lin in _attention_linears(r.attn):
                    setattr(parent, name, QuantLinear.from_linear(lin, fmt, group))
        if head:
            q_head = QuantLinear.from_linear(out_head, head_fmt, group)
            model.set_output_embeddings(q_head)
            # the input embeddings may have shared the head's weight: they stay fp, untied now
            model.config.tie_word_embeddings = False
    model._dart_quant = QuantSpec(fmt, group)
    return model


def quantize_streamed(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    fmt: str = "q4",
    group: int = 32,
    *,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Fill a model skeleton whose parameters are on the meta device (accelerate's
    `init_empty_weights`) from `(parameter name, fp tensor)` pairs, quantising every decoder MLP,
    attention linear and the LM head (from the embedding when the two are tied) as soon as its
    last tensor arrives: only one block's fp weights are ever held. The other parameters
    (embeddings, norms) are stored in `dtype`. Returns the model, as `quantize` leaves it."""
    f = _check_format(fmt, group)
    adapter = _gated_adapter(model)
    act = adapter.activation()
    names = {m: n for n, m in model.named_modules()}
    units: dict[str, Callable[[], None]] = {}  # module name -> swaps it for its quantised form

    def swap_mlp(layer: nn.Module) -> None:
        layer.mlp = QuantGLU.from_hf(layer.mlp, act, fmt, group).to(dtype)

    def swap_linear(parent: nn.Module, name: str) -> None:
        setattr(parent, name, QuantLinear.from_linear(getattr(parent, name), fmt, group).to(dtype))

    for r in adapter.layer_refs():
        units[names[r.layer.mlp]] = lambda layer=r.layer: swap_mlp(layer)
        for parent, name, lin in _attention_linears(r.attn):
            units[names[lin]] = lambda parent=parent, name=name: swap_linear(parent, name)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    embed = names[model.get_input_embeddings()] + ".weight"
    if not tied:
        units[names[model.get_output_embeddings()]] = lambda: model.set_output_embeddings(
            QuantLinear.from_linear(model.get_output_embeddings(), fmt, group).to(dtype)
        )
    del names  # keyed by the fp modules: it would keep every replaced block alive
    modules = dict(model.named_modules())
    with torch.no_grad():
        for pname, w in tensors:
            unit = next((u for u in units if pname.startswith(u + ".")), None)
            owner, attr = pname.rsplit(".", 1)
            # quantised blocks are rounded from the fp32 values, the rest stored in `dtype`
            value = w if unit is not None else w.to(dtype)
            modules[owner]._parameters[attr] = nn.Parameter(value, requires_grad=False)
            if pname == embed and tied:
                model.set_output_embeddings(QuantLinear(_quantize_chunked(w, fmt, group)))
            if unit is not None and not any(p.is_meta for p in modules[unit].parameters()):
                units.pop(unit)()
                # forget the fp block: this map would otherwise keep its weights alive
                for name in [n for n in modules if n == unit or n.startswith(unit + ".")]:
                    del modules[name]
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or units:
        raise ValueError(
            f"the tensors did not fill the model: no value for {(missing or list(units))[:5]}"
        )
    model.config.tie_word_embeddings = False
    model._dart_quant = QuantSpec(f.name, group)
    return model.eval()


def quant_nbytes(model: nn.Module) -> int:
    """Bytes of the quantised weights a model holds (data, scales, mins)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, _QuantRowsModule))
