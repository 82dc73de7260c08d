"""`attach` / `DARTHandle`: patch a Hugging Face decoder in place and undo it exactly."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, FFNParts, LayerRefs, get_adapter
from .config import DARTConfig
from .controller import Controller
from .drift import resolve_watch_layers
from .methods import get_method
from .scoring import ProxyCache, output_proxy, weight_fingerprint

__all__ = ["attach", "DARTHandle", "load_ops"]


def load_ops() -> bool:
    """Load the `dart_ext` kernels (registers `torch.ops.dart.*`); False if not built."""
    try:
        import dart_ext  # noqa: F401
    except ImportError:
        return False
    return True


def _compute_proxies(
    model: nn.Module, adapter: Adapter, parts: list[FFNParts], source: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    vocab = adapter.embedding() if source == "embedding" else adapter.lm_head()
    cache = ProxyCache()
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    proxies = []
    for i, p in enumerate(parts):
        w = p.w_down_t
        key = (name, i, source, weight_fingerprint(w), weight_fingerprint(vocab))
        proxies.append(cache.get_or_compute(key, lambda w=w: output_proxy(w, vocab)))
    return proxies


class DARTHandle:
    """What `attach` returns: the controller, statistics and `detach()`."""

    def __init__(self, model: nn.Module, config: DARTConfig):
        self.model = model
        self.config = config
        self.method = get_method(config.method).for_config(config)
        self.adapter = get_adapter(model)
        self.refs: list[LayerRefs] = self.adapter.layer_refs()
        if config.backend != "masked" and self.method.prunes and not load_ops():
            raise RuntimeError(
                f"backend {config.backend!r} needs the compiled dart_ext kernels; build them "
                "with `pip install --no-build-isolation -e .` or use backend='masked'"
            )
        if self.method.needs_calibration and config.calibration_text is not None:
            raise ValueError(
                "DARTConfig.calibration_text needs a tokenizer: call "
                "handle.calibrate(text, tokenizer) after attach"
            )
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._hooks: list[Any] = []
        self._relaid: list[LayerRefs] = []
        self._held = False
        parts = [self.adapter.ffn_parts(r) for r in self.refs]
        proxies = None
        if config.ranking != "magnitude" and self.method.uses_proxies:
            proxies = _compute_proxies(model, self.adapter, parts, config.proxy_source)
        widths = [p.width for p in parts]
        if config.backend != "masked" and config.fixed_keep_counts(widths) != widths:
            # Neuron-major storage of the column-major projection (in place, no copy kept).
            for refs in self.refs:
                self.adapter.relayout(refs)
                self._relaid.append(refs)
            parts = [self.adapter.ffn_parts(r) for r in self.refs]
        try:
            self.controller = Controller(
                config,
                parts,
                post_ffn_norms=[r.post_ffn_norm for r in self.refs],
                proxies=proxies,
                topk_fn=torch.ops.dart.topk_indices if load_ops() else None,
            )
        except BaseException:
            self._restore_layout()
            raise
        self.ffns = self.controller.layers
        self._patch()
        model._dart_handle = self

    # -- patching -------------------------------------------------------------------------
    def _patch(self) -> None:
        for refs, ffn in zip(self.refs, self.ffns, strict=True):
            self._replace(refs.ffn_parent, refs.ffn_attr, ffn)
            for name in refs.extra_identity:
                self._replace(refs.layer, name, nn.Identity())
            if refs.pre_ffn_norm is not None:
                self._hooks.append(
                    refs.pre_ffn_norm.register_forward_pre_hook(
                        lambda _m, args, i=refs.index: self.controller.capture_residual(i, args[0])
                    )
                )
        drift = self.config.drift
        if self.controller.monitors_drift:
            watched = resolve_watch_layers(drift.layers, len(self.refs))
            for i in watched:
                self._hooks.append(
                    self.refs[i].attn.register_forward_hook(
                        self._attention_hook(i, watched), with_kwargs=True
                    )
                )
        self._hooks.append(
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        )
        self._hooks.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))

    def _restore_layout(self) -> None:
        for refs in self._relaid:
            self.adapter.restore(refs)
        self._relaid = []

    def _replace(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        self._replaced.append((parent, name, getattr(parent, name)))
        setattr(parent, name, module)

    def _attention_hook(self, layer: int, watched: list[int]):
        signal = self.config.drift.signal
        pending: dict[int, torch.Tensor] = {}

        def hook(_module, args, kwargs, output):
            value = output[0] if signal == "attn_output" else output[1]
            if value is None:
                raise RuntimeError(
                    f"drift signal {signal!r} needs attention weights: load the model with "
                    "attn_implementation='eager'"
                )
            if signal == "attn_content":  # plus the attention input the keys come from
                value = (value, args[0] if args else kwargs["hidden_states"])
            pending[layer] = value
            if len(pending) == len(watched):
                self.controller.observe_attention([pending.pop(i) for i in watched])

        return hook

    def _pre_forward(self, _module, args, kwargs):
        c = self.controller
        if not c.auto_step:
            return None
        if self._held:
            return None
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        batch, tokens = x.shape[0], x.shape[1]
        past = kwargs.get("past_key_values")
        past_len = 0 if past is None else int(past.get_seq_length())
        if past_len == 0:
            c.begin(batch, x.device)
        elif batch != c.batch_size:
            raise RuntimeError(
                f"batch size changed mid-sequence ({c.batch_size} -> {batch}); start new "
                "sequences with an empty cache"
            )
        mask = kwargs.get("attention_mask")
        valid = mask[:, -tokens:].bool() if mask is not None and mask.dim() == 2 else None
        c.before_forward(valid)
        return None

    def _post_forward(self, _module, _args, _kwargs, _output):
        if self.controller.auto_step and not self._held:
            self.controller.after_forward()

    # -- public -----------------------------------------------------------------------------
    def calibrate(self, text: str | torch.Tensor, tokenizer=None, max_tokens: int = 512) -> None:
        """Build the frozen masks of a calibrated method (`static`) from a calibration text (or
        token ids)."""
        if not self.method.needs_calibration:
            raise ValueError(
                f"calibrate() is for a calibrated method (static), not {self.method.name!r}"
            )
        device = next(self.model.parameters()).device
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("calibrate(text) needs the tokenizer (or pass token ids)")
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        else:
            ids = text if text.dim() == 2 else text.unsqueeze(0)
        ids = ids[:, :max_tokens].to(device)
        c = self.controller
        with c.calibration(), torch.no_grad():
            self.model(input_ids=ids, use_cache=False)
        c.begin(ids.shape[0], device)  # leave the frozen masks in force

    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Trace `input_ids` as prompts (dense) and build their masks now, whatever the
        masking step. With `hold()`, later forwards are then computed under these masks:
        the log-likelihood protocol (mask from the context only, then score the answer)."""
        self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        self.controller.select_traced()

    @contextmanager
    def hold(self):
        """Freeze the current masks: forwards inside neither start new sequences nor advance
        the schedule (no statistics, no drift checks). The batch size must match the masks'."""
        self._held = True
        try:
            yield self
        finally:
            self._held = False

    def reset(self) -> None:
        """Forget statistics (counters included); masks of a calibrated static run stay."""
        self.controller.reset_stats()

    def drift_history(self) -> list[list[tuple[int, float, float]]]:
        """Per sequence (step, similarity, threshold) at each monitored window."""
        return self.controller.drift_history()

    def stats(self) -> dict:
        return self.controller.stats()

    def detach(self) -> nn.Module:
        """Restore the original model exactly (modules, weight layout, no hooks)."""
        for hook in self._hooks:
            hook.remove()
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._restore_layout()
        self._hooks, self._replaced = [], []
        if getattr(self.model, "_dart_handle", None) is self:
            del self.model._dart_handle
        return self.model


def attach(model: nn.Module, config: DARTConfig | None = None, **overrides: Any) -> DARTHandle:
    """Patch `model` in place with DART (or a baseline, `config.method`); returns the handle.

    `overrides` are DARTConfig fields, applied on top of `config` (or the defaults).
    """
    if getattr(model, "_dart_handle", None) is not None:
        raise RuntimeError("this model already has DART attached: call handle.detach() first")
    if config is None:
        config = DARTConfig.from_dict(overrides)
    elif overrides:
        config = DARTConfig.from_dict({**config.to_dict(), **overrides})
    return DARTHandle(model, config)
