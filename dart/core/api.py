"""`attach` / `DARTHandle`: patch a Hugging Face decoder in place and undo it exactly."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, FFNParts, LayerRefs, get_adapter
from .config import DARTConfig
from .controller import Controller
from .drift import get_signal, resolve_watch_layers
from .methods import get_method
from .retrace import padding_mask, restore_rows, rewind, save_rows
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
        w = p.w_down_t if p.quant is None else p.quant.down_proj.dequantized()
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
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._hooks: list[Any] = []
        self._relaid: list[LayerRefs] = []
        self._held = False
        self._forward_saved: tuple[bool, Any] | None = None
        self._recent_ids: torch.Tensor | None = None  # the last R - 1 input ids of each row
        self._fed_eos: torch.Tensor | None = None  # [B] whether each row's last input was EOS
        # All or nothing: everything that can be refused is checked before the model is
        # touched, and any failure while patching undoes what was done (a half-patched model
        # would have no handle to detach it and would refuse every later attach).
        parts = [self.adapter.ffn_parts(r) for r in self.refs]
        if config.drift.enabled:
            resolve_watch_layers(config.drift.layers, len(self.refs))
        proxies = None
        if config.ranking != "magnitude" and self.method.uses_proxies:
            proxies = _compute_proxies(model, self.adapter, parts, config.proxy_source)
        widths = [p.width for p in parts]
        relayout = config.fixed_keep_counts(widths) != widths or self.method.per_token is not None
        try:
            if config.backend != "masked" and relayout:
                # Neuron-major storage of the column-major projection (in place, no copy kept).
                for refs in self.refs:
                    self.adapter.relayout(refs)
                    self._relaid.append(refs)
                parts = [self.adapter.ffn_parts(r) for r in self.refs]
            self.controller = Controller(
                config,
                parts,
                post_ffn_norms=[r.post_ffn_norm for r in self.refs],
                proxies=proxies,
                topk_fn=torch.ops.dart.topk_indices if load_ops() else None,
            )
            self.ffns = self.controller.layers
            self._patch()
        except BaseException:
            self._undo()
            raise
        model._dart_handle = self

    # -- patching -------------------------------------------------------------------------
    def _patch(self) -> None:
        drift = self.config.drift
        watched = []
        if self.controller.monitors_drift:  # checked before the first module is replaced
            watched = resolve_watch_layers(drift.layers, len(self.refs))
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
        if self.controller.monitors_drift:
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
        if self.controller.retrace_tokens:
            self._wrap_forward()

    def _wrap_forward(self) -> None:
        """Put `_forward` in front of the model's forward (an instance attribute, so the hooks
        above still run around it and `detach` can take it away)."""
        model = self.model
        original = model.forward
        self._forward_saved = ("forward" in vars(model), vars(model).get("forward"))
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self._forward(original, signature, args, kwargs)

        model.forward = forward

    def _unwrap_forward(self) -> None:
        if self._forward_saved is None:
            return
        had, previous = self._forward_saved
        if had:
            self.model.forward = previous
        else:
            del self.model.forward
        self._forward_saved = None

    def _forward(self, original, signature: inspect.Signature, args: tuple, kwargs: dict):
        """The model's forward, turned into a look-back re-trace when a drift event is due
        (see `_retrace`); it also keeps each row's last R - 1 input ids."""
        c = self.controller
        if not c.auto_step or self._held:
            return original(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        out = None
        if c.retrace_rows:
            call = signature.bind(*args, **kwargs).arguments
            for name, p in signature.parameters.items():
                if p.kind is p.VAR_KEYWORD:
                    call.update(call.pop(name, {}))
            if call.get("past_key_values") is not None:
                out = self._retrace(original, call)
        if out is None:
            out = original(*args, **kwargs)
        self._remember(ids)
        return out

    def _remember(self, ids: torch.Tensor | None) -> None:
        keep = self.controller.retrace_tokens - 1
        if ids is None or self._recent_ids is None:  # embeddings: their ids are unknown
            self._recent_ids = None if ids is None else ids[:, -keep:] if keep else ids[:, :0]
            return
        self._recent_ids = torch.cat([self._recent_ids, ids], 1)[:, -keep:] if keep else ids[:, :0]

    def _retrace(self, original, call: dict):
        """One forward that re-runs the last `prior` cached tokens (their ids from the ring
        buffer) before the new ones, for the rows whose drift fired: their KV at those
        positions is recomputed densely, the other rows' is put back afterwards. The logits
        keep the shape the caller expects for its own tokens.

        The other rows' new tokens attend, in this one pass, to their own recomputation of
        those positions (under their current masks) instead of the cached keys and values,
        which may have been computed dense (prompt, trace) or under an older mask: their
        output at this token can differ slightly from a pass without the re-trace."""
        c = self.controller
        fired = c.retrace_rows
        cache, ids = call["past_key_values"], call.get("input_ids")
        past = int(cache.get_seq_length())
        new = ids.shape[1] if ids is not None else call["inputs_embeds"].shape[1]
        known = self._recent_ids.shape[1] if ids is not None and self._recent_ids is not None else 0
        prior = c.retrace_span(min(known, past), new)
        mask = padding_mask(call.get("attention_mask"))
        valid = mask[:, past - prior : past + new].bool() if mask is not None else None
        c.begin_retrace(prior, new, valid)
        if prior == 0:
            return original(**call)
        call["input_ids"] = torch.cat([self._recent_ids[:, -prior:], ids], 1)
        if mask is not None:
            call["attention_mask"] = mask
        position_ids = call.get("position_ids")
        if position_ids is not None:
            back = torch.arange(prior, 0, -1, device=position_ids.device)
            earlier = (position_ids[..., :1] - back).clamp_min(0)
            call["position_ids"] = torch.cat([earlier, position_ids], -1)
        others = [b for b in range(c.batch_size) if b not in fired]
        keep = torch.tensor(others, dtype=torch.long, device=ids.device)
        saved = save_rows(cache, keep, prior) if others else None
        rewind(cache, prior)
        out = original(**call)
        if saved is not None:
            restore_rows(cache, keep, saved, new)
        if out.logits is not None and out.logits.shape[1] > new:
            out.logits = out.logits[:, -new:]
        return out

    def _restore_layout(self) -> None:
        for refs in self._relaid:
            self.adapter.restore(refs)
        self._relaid = []

    def _replace(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        self._replaced.append((parent, name, getattr(parent, name)))
        setattr(parent, name, module)

    def _attention_hook(self, layer: int, watched: list[int]):
        signal = get_signal(self.config.drift.signal)
        pending: dict[int, torch.Tensor] = {}

        def hook(_module, args, kwargs, output):
            value = signal.capture(output, args, kwargs)
            if value is None:
                raise RuntimeError(
                    f"drift signal {signal.name!r} needs attention weights: load the model "
                    "with attn_implementation='eager'"
                )
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
            self._recent_ids = self._fed_eos = None
        elif batch != c.batch_size:
            raise RuntimeError(
                f"batch size changed mid-sequence ({c.batch_size} -> {batch}); start new "
                "sequences with an empty cache"
            )
        elif tokens == 1 and not x.is_floating_point():
            self._mark_finished(x[:, 0])
        mask = kwargs.get("attention_mask")
        valid = mask[:, -tokens:].bool() if mask is not None and mask.dim() == 2 else None
        c.before_forward(valid, tokens)
        return None

    def _mark_finished(self, ids: torch.Tensor) -> None:
        """HF `generate` runs a batch on until its longest row ends: a finished row is fed its
        EOS, then padding (the pad id or EOS again) every step. A row whose input was EOS and is
        now EOS or padding is finished (`Controller.finish_rows`): it no longer traces or
        drives re-traces. Two tokens, not one, so that teacher-forced text with an EOS inside
        (a chat transcript fed token by token) keeps its drift detection."""
        eos, pad = self._stop_ids
        if eos is None:
            return
        eos, pad = eos.to(ids.device), pad.to(ids.device)
        if self._fed_eos is not None:
            self.controller.finish_rows(self._fed_eos & torch.isin(ids, pad))
        self._fed_eos = torch.isin(ids, eos)

    @property
    def _stop_ids(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The model's EOS ids and those ids plus its pad id (None, None: no EOS known), read
        from its generation config (else its config) at every call: they may be changed."""

        def setting(name: str):
            value = getattr(getattr(self.model, "generation_config", None), name, None)
            return getattr(self.model.config, name, None) if value is None else value

        eos, pad = setting("eos_token_id"), setting("pad_token_id")
        if eos is None:
            return None, None
        eos = [eos] if isinstance(eos, int) else list(eos)
        padding = eos + ([pad] if isinstance(pad, int) else [])
        return torch.tensor(eos), torch.tensor(padding)

    def _post_forward(self, _module, _args, _kwargs, _output):
        if self.controller.auto_step and not self._held:
            self.controller.after_forward()

    # -- public -----------------------------------------------------------------------------
    def calibrate(self, text: str | torch.Tensor, tokenizer=None, max_tokens: int = 512) -> None:
        """Build the frozen masks of a calibrated method (`static`), or the per-layer thresholds
        of a per-token method (`gate`, `input`, ...), from a calibration text (or token ids)."""
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
        if self.method.per_token is not None:  # thresholds from the dense pass's FFN inputs
            with c.capturing() as captured, torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
            c.calibrate_per_token(captured)
            return
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

    def per_token_state(self) -> dict:
        """The calibrated per-token thresholds (keeps, thresholds, the model's fingerprint), a
        plain dict to save as JSON and give back to :meth:`load_per_token_state`."""
        state = self.controller.per_token_state
        if state is None:
            raise ValueError(f"method {self.method.name!r} has no calibrated per-token thresholds")
        return dict(state)

    def load_per_token_state(self, state: dict) -> None:
        """Install per-token thresholds saved by :meth:`per_token_state`; refused (nothing
        changed) when they belong to another model or method."""
        self.controller.load_per_token_state(state)

    def reset(self) -> None:
        """Forget statistics (counters included); masks of a calibrated static run stay."""
        self.controller.reset_stats()

    def drift_history(self) -> list[list[tuple[int, float, float]]]:
        """Per sequence (step, similarity, threshold) at each monitored window."""
        return self.controller.drift_history()

    def stats(self) -> dict:
        return self.controller.stats()

    def _undo(self) -> None:
        """Take back every change made so far (hooks, forward, modules, layout), newest
        first; safe on a partly patched model."""
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks = []
        self._unwrap_forward()
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._replaced = []
        self._restore_layout()

    def detach(self) -> nn.Module:
        """Restore the original model exactly (modules, weight layout, no hooks)."""
        self._undo()
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
