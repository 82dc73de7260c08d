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
    """One FFN seen as N neurons. `kind` is "glu" (gate/up/down) or "mlp" (in/out, biases)."""

    kind: str
    act: str  # HF activation name
    width: int
    w_gate: torch.Tensor | None  # [N, d] (glu only)
    w_up: torch.Tensor  # [N, d]: up (glu) or in (mlp)
    w_down_t: torch.Tensor  # [N, d]: down / out projection, neuron-major
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    hidden: Callable[[torch.Tensor], torch.Tensor]  # x -> h [..., N], exact HF arithmetic
    down: Callable[[torch.Tensor], torch.Tensor]  # h -> y, exact HF arithmetic (incl. bias)
    original: nn.Module  # the module the FFN replaces (its forward is the dense path)


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

    def relayout(self, refs: LayerRefs) -> None:
        """Make every neuron's weights contiguous rows (in place, no extra copy kept)."""

    def restore(self, refs: LayerRefs) -> None:
        """Undo `relayout` exactly."""

    def activation(self) -> str:
        for name in ("hidden_activation", "hidden_act", "activation_function"):
            value = getattr(self.config, name, None)
            if isinstance(value, str):
                return value
        raise ValueError(f"{type(self.model).__name__}: cannot find the FFN activation in config")

    def embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def lm_head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight


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
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: fused [2N, d], gate first
            fused = mlp.gate_up_proj.weight
            n = fused.shape[0] // 2
            w_gate, w_up = fused[:n], fused[n:]

            def hidden(x: torch.Tensor) -> torch.Tensor:
                gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
                return up * mlp.activation_fn(gate)
        else:
            w_gate, w_up = mlp.gate_proj.weight, mlp.up_proj.weight
            n = w_up.shape[0]

            def hidden(x: torch.Tensor) -> torch.Tensor:
                return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

        return FFNParts(
            kind="glu",
            act=self.activation(),
            width=n,
            w_gate=w_gate,
            w_up=w_up,
            w_down_t=mlp.down_proj.weight.t(),
            b_in=None,
            b_out=None,
            hidden=hidden,
            down=mlp.down_proj,
            original=mlp,
        )

    def relayout(self, refs: LayerRefs) -> None:
        _column_major_to_rows(refs.layer.mlp.down_proj.weight)

    def restore(self, refs: LayerRefs) -> None:
        _rows_to_column_major(refs.layer.mlp.down_proj.weight)


class GPT2Adapter(Adapter):
    """GPT-2: Conv1D layers store weights `[in, out]`."""

    families = ("gpt2",)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def layer_refs(self) -> list[LayerRefs]:
        return [
            LayerRefs(i, layer, layer.attn, layer.ln_2, None, layer, "mlp")
            for i, layer in enumerate(self.decoder_layers())
        ]

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        mlp = refs.layer.mlp
        return FFNParts(
            kind="mlp",
            act=self.activation(),
            width=mlp.c_fc.weight.shape[1],
            w_gate=None,
            w_up=mlp.c_fc.weight.t(),  # Conv1D weight [d, N] -> neuron rows
            w_down_t=mlp.c_proj.weight,  # already [N, d]
            b_in=mlp.c_fc.bias,
            b_out=mlp.c_proj.bias,
            hidden=lambda x: mlp.act(mlp.c_fc(x)),
            down=mlp.c_proj,
            original=mlp,
        )

    def relayout(self, refs: LayerRefs) -> None:
        _column_major_to_rows(refs.layer.mlp.c_fc.weight)

    def restore(self, refs: LayerRefs) -> None:
        _rows_to_column_major(refs.layer.mlp.c_fc.weight)


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia (parallel or sequential residual)."""

    families = ("gpt_neox",)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.gpt_neox.layers)

    def layer_refs(self) -> list[LayerRefs]:
        return [
            LayerRefs(i, layer, layer.attention, layer.post_attention_layernorm, None, layer, "mlp")
            for i, layer in enumerate(self.decoder_layers())
        ]

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        mlp = refs.layer.mlp
        return FFNParts(
            kind="mlp",
            act=self.activation(),
            width=mlp.dense_h_to_4h.weight.shape[0],
            w_gate=None,
            w_up=mlp.dense_h_to_4h.weight,
            w_down_t=mlp.dense_4h_to_h.weight.t(),
            b_in=mlp.dense_h_to_4h.bias,
            b_out=mlp.dense_4h_to_h.bias,
            hidden=lambda x: mlp.act(mlp.dense_h_to_4h(x)),
            down=mlp.dense_4h_to_h,
            original=mlp,
        )

    def relayout(self, refs: LayerRefs) -> None:
        _column_major_to_rows(refs.layer.mlp.dense_4h_to_h.weight)

    def restore(self, refs: LayerRefs) -> None:
        _rows_to_column_major(refs.layer.mlp.dense_4h_to_h.weight)


class _OPTFFN(nn.Module):
    """OPT has no MLP submodule (fc1 -> act -> fc2 inline): this groups them as one module."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = layer.fc1, layer.fc2, layer.activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class OPTAdapter(Adapter):
    """OPT: the DART FFN takes `fc1`'s place; `activation_fn` and `fc2` become Identity."""

    families = ("opt",)

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

    def ffn_parts(self, refs: LayerRefs) -> FFNParts:
        group = _OPTFFN(refs.layer)
        return FFNParts(
            kind="mlp",
            act=self.activation(),
            width=group.fc1.weight.shape[0],
            w_gate=None,
            w_up=group.fc1.weight,
            w_down_t=group.fc2.weight.t(),
            b_in=group.fc1.bias,
            b_out=group.fc2.bias,
            hidden=lambda x: group.activation_fn(group.fc1(x)),
            down=group.fc2,
            original=group,
        )

    def relayout(self, refs: LayerRefs) -> None:
        _column_major_to_rows(refs.layer.fc2.weight)

    def restore(self, refs: LayerRefs) -> None:
        _rows_to_column_major(refs.layer.fc2.weight)


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
