"""The FFN module DART puts in place of a model's MLP.

Three ways to run a pruned FFN, chosen by the `backend` setting (one `Backend` object each, in
the registry `BACKENDS`; `get_backend(name)`):
- `masked`: the reference simulation: full hidden vector times a 0/1 mask (no saving).
- `gathered`: `torch.ops.dart.gathered_glu_ffn` / `gathered_mlp` read only the kept neurons'
  rows of the original weights (no extra memory).
- `compact`: on each re-selection the kept rows are sliced into persistent compact buffers
  (`torch.ops.dart.gather_neurons_`); between re-selections the FFN is dense GEMMs on them.

A per-token method (`per_token`, :mod:`dart.core.per_token`) has no selection: each token of a
sparse pass picks its own neurons by the thresholds in the buffer `pt_thresholds` (calibrated,
installed by the controller; buffers, so a compiled step reads them as inputs), through the
mode's masked emulation (`masked`) or its fused kernels (`gathered`; over the quantised rows of
a model quantised by `dart.quantize` for the gate-first modes). With a batch, `per_token_policy`
"token" lets every token (sequence) choose alone, "union" keeps one set, the union of the
tokens' choices, for the whole step (`DARTConfig.batch_policy` "per_sequence" / "shared").
The buffers `pt_read` / `pt_dense` count the weight bytes read and the dense bytes of the same
tokens (entries times the bytes an entry takes: element size, or the quantised format's bytes
per value): the meter of `handle.stats()["ffn_bytes_read_fraction"]`.

The module holds no schedule logic: its owner (the controller) sets `mode` and the selection,
and receives the statistics through the small `StatsRecorder` interface, so this module
imports nothing of the controller.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch
from torch import nn

from .adapters import FFNParts
from .per_token import PerTokenMode, entry_bytes, ffn_shape, weighted_scale

__all__ = [
    "BACKENDS",
    "DARTFFN",
    "DENSE",
    "SPARSE",
    "TRACE",
    "Backend",
    "StatsRecorder",
    "get_backend",
]

# Mode of one forward, set by the controller before each pass.
DENSE = "dense"  # original module, nothing recorded
TRACE = "trace"  # full hidden vector, statistics recorded, masks applied to rows that have them
SPARSE = "sparse"  # every row has a mask: run the backend


class StatsRecorder(Protocol):
    """What a `DARTFFN` reports to while tracing (the controller implements it)."""

    @property
    def batch_size(self) -> int:
        """Rows of the current batch (OPT flattens them with the tokens before its FFN)."""

    def record_activations(self, layer: int, h: torch.Tensor) -> None:
        """The FFN hidden activation `h [B, T, N]` of a tracing pass."""

    def record_ffn_output(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """The FFN input `x` and output `y` (`[B, T, d]`) of a tracing pass."""

    @property
    def records_inputs(self) -> bool:
        """Whether every non-dense pass reports its FFN inputs (an `ffn_inputs` re-trace)."""

    def record_ffn_input(self, layer: int, x: torch.Tensor) -> None:
        """The FFN input `x [B, T, d]` of any pass that is not dense for good."""


@dataclass(frozen=True)
class _Routing:
    """The fields of a `DARTFFN` that decide how its forward runs (saved by `routed`)."""

    mode: str
    backend: str
    parts: FFNParts
    idx: torch.Tensor | None
    lengths: torch.Tensor | None
    keep: int
    prunes: bool
    selected: bool


def _kernel_act(backend: Backend, act: str) -> str | None:
    """The kernels' name of an HF activation (their alias table is the one in `dart_ext`);
    None for a backend without kernels (masked), which computes with the model's own
    functions."""
    if not backend.kernels:
        return None
    from dart_ext.reference import ACT_ALIASES

    if act not in ACT_ALIASES:
        raise ValueError(
            f"backend {backend.name!r} has no kernel for activation {act!r}; "
            "use backend='masked' for this model"
        )
    return ACT_ALIASES[act]


class DARTFFN(nn.Module):
    def __init__(
        self,
        parts: FFNParts,
        layer_index: int,
        backend: str,
        recorder: StatsRecorder,
        per_token: PerTokenMode | None = None,
        per_token_policy: str = "token",
    ):
        super().__init__()
        self.original = parts.original  # child module: the dense path is its own forward
        self.layer_index = layer_index
        self.width = parts.width
        self.kind = parts.kind
        self._backend = get_backend(backend)
        self.kernel_act = _kernel_act(self._backend, parts.act)
        # Plain attributes (not submodules / buffers): views of the original parameters.
        self._parts = parts
        object.__setattr__(self, "_recorder", recorder)
        # k of this layer (the padded width kmax under per-row budgets); == width: never prunes
        self.keep = parts.width
        # keep < width as a bool: the forward branches on it, so a compiled step is guarded on
        # whether a layer prunes, not on its count (which changes with every `auto` budget)
        self.prunes = False
        self.selected = False  # whether idx/mask/compact hold the current selection
        self.mode = DENSE
        self.idx: torch.Tensor | None = None  # [k] shared or [B, k] per sequence
        # [B] int64: row b keeps its first lengths[b] entries of a padded idx [B, kmax] (per-row
        # budgets); None: every row keeps all of its idx row
        self.lengths: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # [1 or B, 1, N] 0/1 in the activation dtype
        self.compact: tuple[torch.Tensor, ...] | None = None
        self.probe = None  # a `dart.core.telemetry.MaskProbe` on measured passes only
        self.per_token = per_token
        # "token": every token (sequence) its own kept set; "union": one set for the batch step
        self.per_token_policy = per_token_policy
        if per_token is not None:
            self._init_per_token(per_token)

    def _init_per_token(self, mode: PerTokenMode) -> None:
        p = self._parts
        if self.kind != "glu":
            raise ValueError(
                f"method per-token mode {mode.name!r} needs a gated FFN (gate, up, down); layer "
                f"{self.layer_index} is a {self.kind!r} FFN"
            )
        biases = (("gate", p.b_gate), ("up", p.b_in), ("down", p.b_out))
        if p.quant is not None:
            q = p.quant
            biases = (
                ("gate", q.gate_proj.bias),
                ("up", q.up_proj.bias),
                ("down", q.down_proj.bias),
            )
            if not mode.quantised:
                raise ValueError(
                    f"method per-token mode {mode.name!r} cannot run on weights quantised to "
                    f"{q.gate_proj.fmt!r} (dart.quantize): dropping single entries of x skips no "
                    "part of a quantised 32-value block; use method 'gate' or 'gate-weighted', "
                    "or the model's fp weights"
                )
        biased = [name for name, b in biases if b is not None]
        if biased:  # the per-token kernels and their emulation take no biases
            raise ValueError(
                f"method per-token mode {mode.name!r} runs FFNs without biases; layer "
                f"{self.layer_index} has {', '.join(biased)} biases"
            )
        dev = p.original.all_idx.device if p.quant is not None else p.w_up.device
        n, d = ffn_shape(p)
        # non-persistent: the model's state_dict stays the original's
        self.register_buffer("pt_thresholds", torch.zeros(2, device=dev), persistent=False)
        scale = weighted_scale(p) if mode.weighted else torch.ones(n, device=dev)
        self.register_buffer("pt_scale", scale, persistent=False)
        # [1], not 0-dim: inductor (torch 2.x, CPU) drops the in-place adds of a compiled step
        # to a 0-dim float64 buffer, and the meters would read 0 under FastGenerator
        zero = torch.zeros(1, dtype=torch.float64, device=dev)
        self.register_buffer("pt_read", zero.clone(), persistent=False)
        self.register_buffer("pt_dense", zero.clone(), persistent=False)
        self.dense_entries = 3 * n * d
        # the meters count bytes: entries read times the bytes an entry takes where it is read
        # (its element size, or a quantised format's bytes per value with its scales)
        self.entry_bytes = entry_bytes(p)
        # weight copies in the layout the mode's fused kernel reads (the input mode's input-major
        # gate / up on CPU), buffers so a compiled step reads them as inputs
        layout = mode.kernel_layout(p, self.backend)
        for i, t in enumerate(layout):
            self.register_buffer(f"pt_layout{i}", t, persistent=False)
        self.pt_layout_count = len(layout)

    def set_thresholds(self, thresholds: torch.Tensor) -> None:
        """Install this layer's per-token thresholds (`[2]`, one per knob, unused ones 0) in
        place, so a compiled step sees them without recompiling; pruning from now on."""
        self.pt_thresholds.copy_(thresholds)
        self.selected = self.prunes = True

    def reset_meter(self) -> None:
        if self.per_token is not None:
            self.pt_read.zero_()
            self.pt_dense.zero_()

    # -- selection (called by the controller on a re-selection, never per token) ----------
    def set_selection(
        self,
        idx: torch.Tensor,
        row_keeps_all: torch.Tensor | None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Install kept-neuron indices (`[k]` or `[B, k]`, sorted) and rebuild derived state.

        `row_keeps_all` ([B] bool) marks rows that currently run dense (tracing or released):
        their mask row is all ones so a mixed batch can be computed in one masked pass.
        `lengths` ([B] int64, per-row budgets): row b keeps the first `lengths[b]` entries of its
        padded idx row (`[B, kmax]`, kmax fixed per layer); the rest are never read.
        Tensors are updated in place when their shapes allow, so a compiled step that reads
        them sees the new selection without recompiling.
        """
        p = self._parts
        self._assign("idx", idx, dynamic_dim=-1)
        if lengths is None:
            self.lengths = None
            self.prunes = idx.shape[-1] < self.width
        else:
            self._assign("lengths", lengths.to(device=idx.device, dtype=torch.int64))
            self.prunes = bool((lengths < self.width).any())  # a host read, once per selection
        self.keep = idx.shape[-1]
        self.selected = True
        rows = idx if idx.dim() == 2 else idx.unsqueeze(0)
        if lengths is not None:  # padding entries go to a spare column, cut off below
            kept = torch.arange(rows.shape[-1], device=idx.device) < self.lengths[:, None]
            rows = torch.where(kept, rows, self.width)
        mask = torch.zeros(rows.shape[0], 1, self.width + 1, dtype=p.dtype, device=idx.device)
        mask.scatter_(2, rows.unsqueeze(1), 1.0)
        mask = mask[..., : self.width].contiguous()
        if row_keeps_all is not None:
            mask[row_keeps_all] = 1.0
        self._assign("mask", mask)
        if self._backend.keeps_copies:
            self._reslice()

    @property
    def backend(self) -> str:
        """The name of the backend of sparse passes (:data:`BACKENDS`)."""
        return self._backend.name

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = get_backend(name)

    @property
    def parts(self) -> FFNParts:
        """The weights (neuron-major views) and exact dense functions this FFN runs on."""
        return self._parts

    @contextmanager
    def routed(
        self, idx: torch.Tensor | None = None, parts: FFNParts | None = None
    ) -> Iterator[None]:
        """Forwards outside the controller's schedule: the original module (`idx` None) or the
        gathered kernels on `idx` (`[k]` or `[B, k]`), with the weights of `parts` if given
        (e.g. views rebuilt from traced parameters). The routing is restored on exit."""
        saved = _Routing(
            self.mode,
            self.backend,
            self._parts,
            self.idx,
            self.lengths,
            self.keep,
            self.prunes,
            self.selected,
        )
        try:
            if idx is None:
                self.mode = DENSE
            else:
                if self.kernel_act is None:
                    raise ValueError(
                        "routed(idx) runs the gathered kernels: attach with backend "
                        "'gathered' or 'compact', not 'masked'"
                    )
                self.mode, self.backend, self.idx, self.lengths = SPARSE, "gathered", idx, None
                self.keep, self.prunes, self.selected = idx.shape[-1], True, True
                self._parts = parts or self._parts
            yield
        finally:
            self.mode, self.backend, self._parts = saved.mode, saved.backend, saved.parts
            self.idx, self.lengths, self.keep = saved.idx, saved.lengths, saved.keep
            self.prunes, self.selected = saved.prunes, saved.selected

    def _assign(self, name: str, value: torch.Tensor, dynamic_dim: int | None = None) -> None:
        current = getattr(self, name)
        if current is not None and current.shape == value.shape and current.dtype == value.dtype:
            current.copy_(value)
        else:
            if dynamic_dim is not None:
                _dynamic_rows(value, dynamic_dim)
            setattr(self, name, value)

    def release_rows(self, rows: torch.Tensor) -> None:
        """Make `rows` of the mask dense (tracing again or released)."""
        if self.selected and self.mask is not None and self.mask.shape[0] > 1:
            self.mask[rows] = 1.0

    def clear_selection(self) -> None:
        """Forget the selection (a new sequence); buffers are kept for reuse."""
        self.selected = False
        self.keep = self.width
        self.prunes = False

    def _reslice(self) -> None:
        p = self._parts
        if p.quant is not None:
            return self._reslice_quantised()
        idx = self.idx
        k = idx.shape[-1]
        lead = (idx.shape[0],) if idx.dim() == 2 else ()
        first = [p.w_gate, p.w_up] if self.kind == "glu" else [p.w_up]
        srcs = [first, [p.w_down_t]]
        if self.kind == "mlp" and p.b_in is not None:
            srcs.append([p.b_in.unsqueeze(1)])
        if self.kind == "glu" and (p.b_gate is not None or p.b_in is not None):
            # gate and up biases as [N, 1] rows, gathered beside gate_up: [(B,) 2k, 1]
            srcs.append([_bias_rows(p.b_gate, p.w_up), _bias_rows(p.b_in, p.w_up)])
        shapes = [(*lead, len(s) * k, s[0].shape[1]) for s in srcs]
        old = self.compact
        if old is None or [tuple(t.shape) for t in old] != shapes:
            old = tuple(_dynamic_rows(p.w_up.new_empty(shape), -2) for shape in shapes)
        for buffer, sources in zip(old, srcs, strict=True):
            torch.ops.dart.gather_neurons_(buffer, sources, idx, self.lengths)
        self.compact = old

    def _reslice_quantised(self) -> None:
        """The compact buffers of a quantised FFN: each matrix's kept rows (data, scales, mins)
        and the kept gate / up biases, gathered in idx's order, per sequence one block of kmax
        rows after the other (`[(B,) k, ...]`); the last compact tensor holds the positions of
        row b's rows in them (b * k + j), so the quantised kernel reads contiguous rows
        (`QuantGLU.sparse_rows`)."""
        q, idx = self._parts.quant, self.idx
        k = idx.shape[-1]
        lead = (idx.shape[0],) if idx.dim() == 2 else ()
        sources = [t for m in q.matrices() for t in m.row_buffers()]
        sources += [b.unsqueeze(1) for b in (q.gate_proj.bias, q.up_proj.bias) if b is not None]
        old = self.compact
        shapes = [(*lead, k, t.shape[1]) for t in sources]
        if old is None or [tuple(t.shape) for t in old[:-1]] != shapes:
            old = tuple(
                _dynamic_rows(t.new_empty(shape), -2)
                for t, shape in zip(sources, shapes, strict=True)
            )
            positions = torch.arange(k, device=idx.device)
            if lead:  # row b's block starts at b * k of the flattened buffers
                positions = positions + k * torch.arange(lead[0], device=idx.device)[:, None]
            old += (_dynamic_rows(positions, -1),)
        for buffer, source in zip(old[:-1], sources, strict=True):
            torch.ops.dart.gather_neurons_(buffer, [source], idx, self.lengths)
        self.compact = old

    def _compact_quantised(self, x: torch.Tensor) -> torch.Tensor:
        *buffers, positions = self.compact
        flat = [t.flatten(0, -2) for t in buffers]  # [(B *) k, ...]
        return self._parts.quant.sparse_rows(flat, x, positions, self.kernel_act, self.lengths)

    def extra_bytes(self) -> int:
        """Bytes of state this module holds beyond the model's own weights."""
        tensors = [self.idx, self.lengths, self.mask, *(self.compact or ())]
        if self.per_token is not None:
            tensors += [self.pt_thresholds, self.pt_scale, self.pt_read, self.pt_dense]
            tensors += [getattr(self, f"pt_layout{i}") for i in range(self.pt_layout_count)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_token is not None:  # the prompt (any non-sparse pass) runs dense
            return self._per_token(x) if self.mode == SPARSE and self.prunes else self.original(x)
        if self.mode != DENSE and self._recorder.records_inputs:  # the ffn_inputs re-trace
            batch = self._recorder.batch_size
            self._recorder.record_ffn_input(self.layer_index, x.view(batch, -1, x.shape[-1]))
        if self.mode == DENSE or self.mode == SPARSE and not self.prunes:
            return self.original(x)
        if x.dim() == 2:  # OPT flattens tokens to [B*T, d] before its FFN
            batch = self._recorder.batch_size
            return self._masked(x.view(batch, -1, x.shape[-1])).view(x.shape)
        return self._masked(x)

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        return self._trace(x) if self.mode == TRACE else self._sparse(x)

    def _trace(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parts
        h = p.hidden(x)
        self._recorder.record_activations(self.layer_index, h)
        if self.probe is not None and self.selected:
            self.probe.record(self.layer_index, h, self.mask)
        if self.selected:
            h = h * self.mask
            y = p.down(h)
        elif p.quant is not None:  # unmasked: the fused kernel reads the rows (no fp copy)
            y = self.original(x)
        else:
            y = p.down(h)
        self._recorder.record_ffn_output(self.layer_index, x, y)
        return y

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        p, mode = self._parts, self.per_token
        y, read = self._backend.per_token(self, mode, p, x)
        self.pt_read.add_(read.sum(dtype=torch.float64) * self.entry_bytes)
        self.pt_dense.add_(float(read.numel() * self.dense_entries * self.entry_bytes))
        return y

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        p = self._parts
        if self.probe is not None:  # a measured pass: the dense h, plain torch, no kernels
            with torch.no_grad():
                self.probe.record(self.layer_index, p.hidden(x), self.mask)
        if p.quant is not None:  # quantised rows (dart.core.quant.QuantGLU)
            return self._backend.sparse_quantised(self, x)
        return self._backend.sparse(self, x)

    def _compact_forward(self, x: torch.Tensor) -> torch.Tensor:
        from dart_ext.ops import compact_glu_ffn, compact_mlp  # built kernels: non-masked only

        if self.kind == "glu":
            if len(self.compact) == 2 and self._parts.b_out is None:
                return compact_glu_ffn(x, *self.compact, self.kernel_act, self.lengths)
            return self._compact_glu_biased(x)
        w_in, w_out = self.compact[:2]
        b_in = self.compact[2].squeeze(-1) if len(self.compact) == 3 else None  # [.., k, 1]
        return compact_mlp(x, w_in, b_in, w_out, self._parts.b_out, self.kernel_act, self.lengths)

    def _compact_glu_biased(self, x: torch.Tensor) -> torch.Tensor:
        """The compact GLU with biases (Llama `mlp_bias`), as GEMMs on the compact rows:
        `compact_glu_ffn` takes none. Padding rows past a row's length are zero (weights and
        biases), so they add act(0) * 0 = 0."""
        from dart_ext.reference import apply_act

        gate_up, down_c = self.compact[:2]
        k = down_c.shape[-2]
        gu = torch.matmul(x, gate_up.transpose(-1, -2))
        if len(self.compact) == 3:  # [(B,) 2k, 1] -> [(B,) 1, 2k]: broadcast over tokens
            gu = gu + self.compact[2].transpose(-1, -2)
        y = torch.matmul(apply_act(self.kernel_act, gu[..., :k]) * gu[..., k:], down_c)
        b_down = self._parts.b_out
        return y if b_down is None else y + b_down


def _bias_rows(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A `[N]` bias as `[N, 1]` rows for `gather_neurons_` (zeros where there is none)."""
    if bias is None:
        return like.new_zeros(like.shape[0], 1)
    return bias.unsqueeze(1)


def _dynamic_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Mark the neuron-count dim of a selection tensor dynamic for torch.compile: a compiled
    step then serves every per-layer count (`auto` budgets differ per prompt) without
    recompiling."""
    torch._dynamo.maybe_mark_dynamic(t, dim % t.dim())
    return t


# ------------------------------------------------------------------------------------------
# The backends of sparse passes


@dataclass(frozen=True)
class Backend:
    """One way to run a sparse FFN pass (the ``backend`` setting).

    ``kernels``: runs the compiled ``dart_ext`` kernels (the activation needs a kernel name);
    ``keeps_copies``: slices the kept rows into compact buffers at every selection.
    :meth:`sparse` / :meth:`sparse_quantised` run a sparse pass of a
    `DARTFFN` on its current selection (fp / quantised weights), :meth:`per_token` a pass of
    a per-token method (``(y, entries read per token)``).
    """

    name: str
    description: str
    kernels: bool = True
    keeps_copies: bool = False

    def sparse(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"backend {self.name!r} defines no sparse pass")

    def sparse_quantised(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"backend {self.name!r} defines no quantised sparse pass")

    def per_token(
        self, ffn: DARTFFN, mode: PerTokenMode, p: FFNParts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(f"backend {self.name!r} cannot run per-token methods")


@dataclass(frozen=True)
class _Masked(Backend):
    def sparse(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        p = ffn.parts
        return p.down(p.hidden(x) * ffn.mask)

    def sparse_quantised(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        return self.sparse(ffn, x)  # the quantised parts compute hidden and down themselves

    def per_token(
        self, ffn: DARTFFN, mode: PerTokenMode, p: FFNParts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return mode.masked(p, x, ffn.pt_thresholds, ffn.pt_scale, ffn.per_token_policy)


@dataclass(frozen=True)
class _Gathered(Backend):
    def sparse(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        p = ffn.parts
        if ffn.kind == "glu":
            return torch.ops.dart.gathered_glu_ffn(
                x,
                p.w_gate,
                p.w_up,
                p.w_down_t,
                ffn.idx,
                ffn.kernel_act,
                ffn.lengths,
                b_gate=p.b_gate,
                b_up=p.b_in,
                b_down=p.b_out,
            )
        return torch.ops.dart.gathered_mlp(
            x, p.w_up, p.b_in, p.w_down_t, p.b_out, ffn.idx, ffn.kernel_act, ffn.lengths
        )

    def sparse_quantised(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        return ffn.parts.quant.sparse(x, ffn.idx, ffn.kernel_act, ffn.lengths)

    def per_token(
        self, ffn: DARTFFN, mode: PerTokenMode, p: FFNParts, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layout = [getattr(ffn, f"pt_layout{i}") for i in range(ffn.pt_layout_count)]
        return mode.gathered(
            p,
            x,
            ffn.pt_thresholds,
            ffn.pt_scale,
            ffn.kernel_act,
            *layout,
            policy=ffn.per_token_policy,
        )


@dataclass(frozen=True)
class _Compact(Backend):
    def sparse(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        return ffn._compact_forward(x)

    def sparse_quantised(self, ffn: DARTFFN, x: torch.Tensor) -> torch.Tensor:
        return ffn._compact_quantised(x)


_BACKENDS = (
    _Masked(
        "masked",
        "the reference simulation: the full hidden vector times a 0/1 mask (no saving)",
        kernels=False,
    ),
    _Gathered(
        "gathered",
        "kernels that read only the kept neurons' rows of the original weights (no copy)",
    ),
    _Compact(
        "compact",
        "the kept rows sliced into compact buffers at each selection, dense GEMMs on them "
        "(quantised rows: the quantised kernel streams them contiguously)",
        keeps_copies=True,
    ),
)

BACKENDS: Mapping[str, Backend] = MappingProxyType({b.name: b for b in _BACKENDS})


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; a ValueError listing the names otherwise."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}") from None
