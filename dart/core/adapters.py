"""Model-family adapters: where each family keeps its FFN, attention and norms.

Everything else in `dart` sees an FFN as `FFNParts`: neuron-major weight views (row i = neuron i,
rows contiguous) for the kernels, plus `hidden(x)` / `down(h)` functions that reproduce the
original module's arithmetic exactly (used for dense and masked computation).

Weights are never copied. Where a family stores the neuron axis as columns (HF `down_proj`
`[d, N]`, GPT-2's `c_fc`), `relayout()` re-stores that tensor neuron-major in place (the module
keeps a transposed *view*, so its own forward is unchanged) and `restore()` puts the original
layout back bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FFNParts", "LayerRefs", "Adapter", "get_adapter", "SUPPORTED_FAMILIES"]


@dataclass
class FFNParts:
    """One FFN seen as N neurons. `kind` is "glu" (gate/up/down) or "mlp" (in/out).

    Biases (None where the projection has none): `b_in` `[N]` is the up (glu) or in (mlp)
    projection's, `b_out` `[d]` the down / out projection's, `b_gate` `[N]` the gate's (glu)."""

    kind: str
    act: str  # HF activation name
    width: int
    w_gate: torch.Tensor | None  # [N, d] (glu only)
    w_up: torch.Tensor | None  # [N, d]: up (glu) or in (mlp); None when quantised
    w_down_t: torch.Tensor | None  # [N, d]: down / out projection, neuron-major; None if quant
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    hidden: Callable[[torch.Tensor], torch.Tensor]  # x -> h [..., N], exact HF arithmetic
    down: Callable[[torch.Tensor], torch.Tensor]  # h -> y, exact HF arithmetic (incl. bias)
    original: nn.Module  # the module the FFN replaces (its forward is the dense path)
    b_gate: torch.Tensor | None = None
    # A quantised FFN (`dart.core.quant.QuantGLU`): its rows replace the fp weight views above,
    # and `quant.sparse(x, idx, act, lengths)` is the gathered kernel over them.
    quant: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (DART's masks multiply the hidden vector in it)."""
        return self.w_up.dtype if self.quant is None else self.quant.dtype


@dataclass
class LayerRefs:
    index: int
    layer: nn.Module
    attn: nn.Module
    pre_ffn_norm: nn.Module | None  # its input is the residual entering the FFN block
    post_ffn_norm: nn.Module | None  # applied to the FFN output before the residual add
    ffn_parent: nn.Module
    ffn_attr: str  # ffn_parent.<ffn_attr> is the module DART replaces
    extra_identity: tuple[str, ...] = field(default=())  # sibling attrs replaced by Identity


def _check_linear(
    module: nn.Module, what: str, shape: tuple[int, int], bias_size: int | None = None
) -> None:
    """Refuse a projection the kernels would misread: not a plain float `nn.Linear` (e.g. a
    quantised layer, whose `weight` is not the matrix its forward uses) or of the wrong shape.
    `bias_size`: the length a bias must have if the projection has one."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor):
        raise ValueError(
            f"{what} is a {type(module).__name__}, not an nn.Linear: dart's kernels read plain "
            "float weight matrices; load the model unquantised"
        )
    if not weight.is_floating_point() or tuple(weight.shape) != shape:
        raise ValueError(
            f"{what}: weight {tuple(weight.shape)} {weight.dtype}, expected a float {shape}"
        )
    bias = module.bias
    if bias is not None and tuple(bias.shape) != (bias_size or shape[0],):
        raise ValueError(f"{what}: bias {tuple(bias.shape)}, expected ({bias_size or shape[0]},)")


def _column_major_to_rows(linear_weight: nn.Parameter) -> None:
    """Re-store a `[d, N]` weight as `[N, d]` contiguous, leaving the parameter as a view."""
    if linear_weight.t().is_contiguous():
        return
    linear_weight.data = linear_weight.data.t().contiguous().t()


def _rows_to_column_major(linear_weight: nn.Parameter) -> None:
    if not linear_weight.is_contiguous():
        linear_weight.data = linear_weight.data.contiguous()


class Adapter:
    """Base adapter. Subclasses fill in where the parts live for one family."""

    families: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- structure ---------------------------------------------------------------------------
    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def layer_refs(self) -> list[LayerRefs]:
        raise NotImplementedError

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        raise NotImplementedError

    def neuron_columns(self, refs: LayerRefs) -> nn.Parameter | None:
        """The FFN weight that stores the neuron axis as columns (`[d, N]`); None when the FFN
        is quantised (its rows are neuron-major already)."""
        raise NotImplementedError

    def relayout(self, refs: LayerRefs) -> None:
        """Make every neuron's weights contiguous rows (in place, no extra copy kept)."""
        weight = self.neuron_columns(refs)
        if weight is not None:
            _column_major_to_rows(weight)

    def restore(self, refs: LayerRefs) -> None:
        """Undo `relayout` exactly."""
        weight = self.neuron_columns(refs)
        if weight is not None:
            _rows_to_column_major(weight)

    def activation(self) -> str:
        for name in ("hidden_activation", "hidden_act", "activation_function"):
            value = getattr(self.config, name, None)
            if isinstance(value, str):
                return value
        raise ValueError(f"{type(self.model).__name__}: cannot find the FFN activation in config")

    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def lm_head(self) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        # a quantised head (dart.core.quant.QuantLinear) has rows, not a weight
        return head.dequantized() if hasattr(head, "dequantized") else head.weight


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/Qwen3, SmolLM, Gemma/Gemma2/Gemma3 (text), Phi-3."""

    families = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def layer_refs(self) -> list[LayerRefs]:
        refs = []
        for i, layer in enumerate(self.decoder_layers()):
            pre = getattr(layer, "pre_feedforward_layernorm", None)
            post = getattr(layer, "post_feedforward_layernorm", None)
            if pre is None:
                pre = layer.post_attention_layernorm
            refs.append(LayerRefs(i, layer, layer.self_attn, pre, post, layer, "mlp"))
        return refs

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        mlp = refs.layer.mlp
        if hasattr(mlp, "dart_ffn_parts"):  # quantised (dart.core.quant.QuantGLU)
            return mlp.dart_ffn_parts(self.activation())
        where = f"layer {refs.index} mlp"
        d = self.config.hidden_size
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: fused [2N, d], gate first
            fused = mlp.gate_up_proj.weight
            n = fused.shape[0] // 2
            _check_linear(mlp.gate_up_proj, f"{where}.gate_up_proj", (2 * n, d))
            w_gate, w_up = fused[:n], fused[n:]
            bias = mlp.gate_up_proj.bias
            b_gate, b_up = (None, None) if bias is None else (bias[:n], bias[n:])

            def hidden(x: torch.Tensor) -> torch.Tensor:
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
                return up * mlp.activation_fn(gate)
        else:
            n = mlp.up_proj.weight.shape[0]
            _check_linear(mlp.gate_proj, f"{where}.gate_proj", (n, d))
            _check_linear(mlp.up_proj, f"{where}.up_proj", (n, d))
            w_gate, w_up = mlp.gate_proj.weight, mlp.up_proj.weight
            b_gate, b_up = mlp.gate_proj.bias, mlp.up_proj.bias

            def hidden(x: torch.Tensor) -> torch.Tensor:
                return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

        _check_linear(mlp.down_proj, f"{where}.down_proj", (d, n))
        return FFNParts(
            kind="glu",
            act=self.activation(),
            width=n,
            w_gate=w_gate,
            w_up=w_up,
            w_down_t=mlp.down_proj.weight.t(),
            b_in=b_up,
            b_out=mlp.down_proj.bias,
            hidden=hidden,
            down=mlp.down_proj,
            original=mlp,
            b_gate=b_gate,
        )

    def neuron_columns(self, refs: LayerRefs) -> nn.Parameter | None:
        down = refs.layer.mlp.down_proj
        return getattr(down, "weight", None)  # None: quantised rows, neuron-major already


class _TwoMatrixAdapter(Adapter):
    """Families whose FFN is `fc_out(act(fc_in(x)))` with biases; subclasses name the parts."""

    fc_in: str
    fc_out: str
    act: str
    conv1d = False  # GPT-2's Conv1D stores weights `[in, out]` (nn.Linear: `[out, in]`)

    def ffn_module(self, refs: LayerRefs) -> nn.Module:
        """The module holding `fc_in`, `act`, `fc_out` (its forward is the dense FFN)."""
        return refs.layer.mlp

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        module = self.ffn_module(refs)
        fc_in, fc_out = getattr(module, self.fc_in), getattr(module, self.fc_out)
        act = getattr(module, self.act)
        where = f"layer {refs.index} {self.fc_in}/{self.fc_out}"
        d = self.config.hidden_size
        if self.conv1d:
            n = fc_in.weight.shape[1]
            for name, proj, shape, bias in (
                (self.fc_in, fc_in, (d, n), n),
                (self.fc_out, fc_out, (n, d), d),
            ):
                if type(proj).__name__ != "Conv1D" or tuple(proj.weight.shape) != shape:
                    raise ValueError(
                        f"layer {refs.index} {name}: a {type(proj).__name__} with weight "
                        f"{tuple(getattr(proj, 'weight', torch.empty(0)).shape)}, expected a "
                        f"Conv1D {shape}"
                    )
                if proj.bias is not None and tuple(proj.bias.shape) != (bias,):
                    raise ValueError(f"layer {refs.index} {name}: bias {tuple(proj.bias.shape)}")
            w_in, w_out_t = fc_in.weight.t(), fc_out.weight  # [d, N] -> neuron rows; [N, d]
        else:
            n = fc_in.weight.shape[0]
            _check_linear(fc_in, f"{where}: {self.fc_in}", (n, d))
            _check_linear(fc_out, f"{where}: {self.fc_out}", (d, n))
            w_in, w_out_t = fc_in.weight, fc_out.weight.t()
        return FFNParts(
            kind="mlp",
            act=self.activation(),
            width=w_in.shape[0],
            w_gate=None,
            w_up=w_in,
            w_down_t=w_out_t,
            b_in=fc_in.bias,
            b_out=fc_out.bias,
            hidden=lambda x: act(fc_in(x)),
            down=fc_out,
            original=module,
        )

    def neuron_columns(self, refs: LayerRefs) -> nn.Parameter:
        module = self.ffn_module(refs)
        return getattr(module, self.fc_in if self.conv1d else self.fc_out).weight


class GPT2Adapter(_TwoMatrixAdapter):
    """GPT-2: Conv1D layers store weights `[in, out]`."""

    families = ("gpt2",)
    fc_in, fc_out, act, conv1d = "c_fc", "c_proj", "act", True

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def layer_refs(self) -> list[LayerRefs]:
        return [
            LayerRefs(i, layer, layer.attn, layer.ln_2, None, layer, "mlp")
            for i, layer in enumerate(self.decoder_layers())
        ]


class GPTNeoXAdapter(_TwoMatrixAdapter):
    """GPT-NeoX / Pythia (parallel or sequential residual)."""

    families = ("gpt_neox",)
    fc_in, fc_out, act = "dense_h_to_4h", "dense_4h_to_h", "act"

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.gpt_neox.layers)

    def layer_refs(self) -> list[LayerRefs]:
        return [
            LayerRefs(i, layer, layer.attention, layer.post_attention_layernorm, None, layer, "mlp")
            for i, layer in enumerate(self.decoder_layers())
        ]


class _OPTFFN(nn.Module):
    """OPT has no MLP submodule (fc1 -> act -> fc2 inline): this groups them as one module."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = layer.fc1, layer.fc2, layer.activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class OPTAdapter(_TwoMatrixAdapter):
    """OPT: the DART FFN takes `fc1`'s place; `activation_fn` and `fc2` become Identity."""

    families = ("opt",)
    fc_in, fc_out, act = "fc1", "fc2", "activation_fn"

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.model.decoder.layers)

    def layer_refs(self) -> list[LayerRefs]:
        refs = []
        for i, layer in enumerate(self.decoder_layers()):
            # Post-LN OPT variants feed fc1 the raw residual: then the FFN input is the residual.
            pre = layer.final_layer_norm if layer.do_layer_norm_before else None
            refs.append(
                LayerRefs(
                    i, layer, layer.self_attn, pre, None, layer, "fc1", ("activation_fn", "fc2")
                )
            )
        return refs

    def ffn_module(self, refs: LayerRefs) -> nn.Module:
        return _OPTFFN(refs.layer)


_ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, GPT2Adapter, GPTNeoXAdapter, OPTAdapter)
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(f for a in _ADAPTERS for f in a.families)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`'s family; a clear error listing the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.families:
            return adapter(model)
    raise ValueError(
        f"dart does not support model type {model_type!r} ({type(model).__name__}); "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )
