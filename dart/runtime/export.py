"""`dart export`: a DART-patched decoder as two `torch.export` programs and AOTInductor packages.

Deployment without TorchScript and without `dart` Python code on the hot path:

``prefill(input_ids [B, P], attention_mask [B, P], *state) -> (next_logits [B, V], *idx)``
    The dense prompt pass (left-padded prompts, mask 0 on padding). It also *selects* the kept
    neurons in-graph: per pruned layer the L2 norm over the valid prompt tokens of the FFN hidden
    activation (GRIFFIN: of the per-token L2-normalised activation), ranked as configured
    (`ranking`, output proxies baked in as constants), then
    `torch.ops.dart.topk_indices(scores, k_l)`. `idx_l` is `[B, k_l]` (per sequence) or `[k_l]`
    (`batch_policy="shared"`); one per *pruned* layer (`manifest["pruned_layers"]`), layers
    kept whole run dense and take no indices.
``decode(input_ids [B, 1], position_ids [B, 1], cache_position [1], *idx, *state) -> [B, V]``
    One sparse token step: every pruned FFN runs `torch.ops.dart.gathered_glu_ffn` /
    `gathered_mlp` on the given indices. Indices are inputs, so a runner may re-select (e.g. feed
    other indices) without re-exporting.

``state`` is the mutable decoding state, program inputs mutated in place: a full-length 2-D
attention mask `[B, max_len]` (int64; prefill writes it: the prompt's mask, then ones) and the
static KV cache (`key_cache_i`, `value_cache_i` per layer, `[B, kv_heads, max_len, head_dim]`).
The layout follows HF's `TorchExportableModuleWithStaticCache` (a `StaticCache` initialised
early, sliding-window layers replaced by full static layers), but the tensors are *inputs*
rather than module buffers: two separately compiled packages each own a private copy of their
buffers, while inputs let the runner allocate one state (shapes in the manifest) that prefill
fills and decode continues. Static shapes: fixed batch `B` and `max_len`; the prompt length `P`
is dynamic (`1 <= P < max_len`, the exported programs are shape-generic in P) unless
`prompt_len` is given (then prompts are left-padded to exactly that length).

Semantics: the exported path keeps the prompt's masks for the whole generation, i.e. DART with
`masking_step <= 1` and no drift re-trace and no release (GRIFFIN-style; the same masks as
DART's pass-0 selection). Drift detection and re-tracing stay in the Python path
(`dart.runtime.fast`). Keep counts `k_l` are fixed at export time: fixed fractions/counts directly;
an
`auto` budget is allocated from a calibration prompt traced (eagerly, by `handle.prepare`) at
export time, and the resulting counts are frozen into the programs (the manifest records them).

Files under the output folder (the package): `prefill.pt2`, `decode.pt2` (AOTInductor
packages; each embeds the weights it reads, so the weights are on disk twice), `dart_ops.so` (a
copy of the compiled `dart_ext._C`, the ops the programs call) and `manifest.json`: the format
version, the torch version and the sha256 of the ops library and of each program, which
`dart.runtime.runner.load_package` checks before it loads anything (every file named in the
manifest must lie inside the package). The package is built in a staging folder beside the
target and renamed into place whole, so a reader never sees one export's programs beside
another's manifest; staging folders of killed exports are removed by the next export.
`dart.runtime.runner` (torch only; also `scripts/run_exported.py`) runs a package greedily, token
ids in and out. A package is native code: trust it as you would an executable.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.api import DARTHandle, attach, load_ops
from ..core.config import DARTConfig
from ..core.methods import METHODS, Method
from ..core.quant import quantized_spec, splitting
from ..core.scoring import rank_scores, shared_scores
from ..results import (
    fsync_folder,
    public_modes,
    remove_stale_folders,
    staging_folder,
    write_json,
)
from .fast import static_cache_logits
from .runner import FORMAT, MANIFEST, OPS_LIBRARY, file_sha256, greedy_generate

__all__ = [
    "DARTExportModule",
    "export_decode",
    "export_programs",
    "resolve_export_counts",
]

PREFILL = "prefill.pt2"
DECODE = "decode.pt2"
_WEIGHTS = ("w_gate", "w_up", "w_down_t", "b_in", "b_out", "b_gate")


# ------------------------------------------------------------------------------------------------
# Keep counts


def resolve_export_counts(
    handle: DARTHandle, calibration_ids: torch.Tensor | None = None
) -> list[int]:
    """The per-layer keep counts `k_l` frozen into the programs.

    Fixed fractions/counts: resolved from the config. `auto` budgets: `calibration_ids` (a prompt,
    `[1, T]` or `[T]`) is traced by `handle.prepare` and the budget it allocates is used (the
    programs freeze it for every row: calibration rows with different per-sequence budgets are
    refused).
    """
    c = handle.controller
    if c.fixed_counts is not None:
        return list(c.fixed_counts)
    if calibration_ids is None:
        raise ValueError(
            "an 'auto' budget (layer_topk with 'auto') is allocated from a prompt: pass "
            "calibration_ids (dart export --prompt) to fix the keep counts at export time"
        )
    ids = calibration_ids if calibration_ids.dim() == 2 else calibration_ids.unsqueeze(0)
    handle.prepare(ids.to(next(handle.model.parameters()).device))
    if c.counts is None:
        raise RuntimeError("the calibration prompt did not produce keep counts")
    if c.row_counts is not None and len({tuple(r) for r in c.row_counts}) > 1:
        raise ValueError(
            f"the {ids.shape[0]} calibration prompts got different per-sequence 'auto' budgets "
            "(batch_policy='per_sequence': each row's from its own statistics), but the "
            "exported programs keep one count per layer for every row: pass one calibration "
            "prompt ([1, T]), or attach with batch_policy='shared' for one budget over them"
        )
    return list(c.counts)


# ------------------------------------------------------------------------------------------------
# The exportable module


def _view_recipe(t: torch.Tensor, owner: nn.Module) -> tuple[str, tuple, tuple, int]:
    """How to rebuild `t` (a view of one of `owner`'s parameters) from that parameter inside a
    traced forward: (name, size, stride, storage offset) for `param.as_strided`."""
    ptr = t.untyped_storage().data_ptr()
    for name, p in owner.named_parameters():
        if p.untyped_storage().data_ptr() == ptr:
            return name, tuple(t.shape), tuple(t.stride()), t.storage_offset()
    raise ValueError("an FFN weight is not a view of its module's parameters")


def _exportable(method: Method) -> bool:
    """The exported prefill selects each row's masks from its prompt by the method's statistic
    in-graph: no calibration text, no random scores."""
    return not method.prunes or (method.selects_from_prompt and method.score is None)


class DARTExportModule(nn.Module):
    """A DART-patched model as two exportable programs (`prefill`, `decode`) over explicit
    static-cache state; see the module docstring. `counts[l] >= width` keeps layer l dense.

    The handle is left as it was after every call (FFN modes, selections, controller state).
    """

    def __init__(self, handle: DARTHandle, batch_size: int, max_len: int, counts: list[int]):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        cfg = handle.config
        if not _exportable(handle.method):
            names = ", ".join(m.name for m in METHODS.values() if _exportable(m))
            raise ValueError(
                f"export supports the methods whose masks come from the prompt's statistic, or "
                f"no masks ({names}), not {cfg.method!r}"
            )
        if handle.method.prunes and cfg.backend == "masked":
            raise ValueError("export runs the gathered kernels: attach with backend 'gathered'")
        if cfg.ema_decay is not None or cfg.strategy != "topk":
            raise ValueError("export needs L2 magnitudes (ema_decay=None) and strategy='topk'")
        if cfg.masking_step > 1:
            warnings.warn(
                f"masking_step={cfg.masking_step}: the exported prefill selects from the prompt "
                "alone (masking_step <= 1 semantics)",
                stacklevel=2,
            )
        if len(counts) != len(handle.ffns):
            raise ValueError(f"counts has {len(counts)} layers, the model {len(handle.ffns)}")
        self.handle = handle
        self.model = handle.model
        self.batch_size = batch_size
        self.max_len = max_len
        self.counts = [min(int(k), f.width) for k, f in zip(counts, handle.ffns, strict=True)]
        self.pruned = [i for i, f in enumerate(handle.ffns) if self.counts[i] < f.width]
        self.shared = cfg.batch_policy == "shared"
        self.method = cfg.method
        self.ranking = cfg.ranking
        self.recipes = {
            i: {
                name: _view_recipe(getattr(handle.ffns[i].parts, name), handle.ffns[i].original)
                for name in _WEIGHTS
                if getattr(handle.ffns[i].parts, name) is not None
            }
            for i in self.pruned
        }
        proxies = handle.controller.proxies
        for i in self.pruned:  # output proxies of non-magnitude rankings: graph constants
            if proxies is not None and self.ranking != "magnitude":
                self.register_buffer(f"proxy_max_{i}", proxies[i][0].clone(), persistent=False)
                self.register_buffer(f"proxy_mean_{i}", proxies[i][1].clone(), persistent=False)

        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        config = self.model.config.get_text_config()
        cache = StaticCache(config=config, max_cache_len=max_len)
        for i, layer in enumerate(cache.layers):  # as HF's exportable recipe: no sliding layers
            if type(layer) is not StaticLayer:
                cache.layers[i] = StaticLayer(max_len)
        heads, head_dim = _head_shapes(config)
        cache.early_initialization(batch_size, heads, head_dim, self.dtype, self.device)
        self._cache = cache  # its tensors are re-bound to the state inputs at every call
        self.state_names = ["attention_mask"]
        self._state_shapes = [((batch_size, max_len), torch.long)]
        for i, layer in enumerate(cache.layers):
            self.state_names += [f"key_cache_{i}", f"value_cache_{i}"]
            self._state_shapes += [(tuple(layer.keys.shape), self.dtype)]
            self._state_shapes += [(tuple(layer.values.shape), self.dtype)]

    # -- state ---------------------------------------------------------------------------------
    def new_state(self) -> list[torch.Tensor]:
        """Fresh zeroed state tensors (the runner allocates the same from the manifest)."""
        return [torch.zeros(s, dtype=d, device=self.device) for s, d in self._state_shapes]

    def state_spec(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in zip(self.state_names, self.new_state(), strict=True)
        ]

    def _bind(self, state: tuple[torch.Tensor, ...], cache_position: torch.Tensor):
        if len(state) != len(self.state_names):
            raise ValueError(f"expected {len(self.state_names)} state tensors, got {len(state)}")
        cache = self._cache
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = state[1 + 2 * i], state[2 + 2 * i]
            layer.cumulative_length = cache_position[0].clone()  # where this pass writes
        return state[0], cache

    # -- routing the DART modules ----------------------------------------------------------------
    @contextmanager
    def _routed(self, batch: int, idx: tuple[torch.Tensor, ...] | None):
        """Prefill (idx None): every FFN dense; decode: pruned FFNs gathered on `idx`. The
        controller is paused (its hooks inert); everything is restored on exit."""
        h = self.handle
        routes = dict(zip(self.pruned, idx, strict=True)) if idx is not None else {}
        with ExitStack() as stack:
            stack.enter_context(h.controller.paused(batch))
            for i, f in enumerate(h.ffns):
                if i in routes:
                    parts = replace(f.parts, **self._live_weights(i))
                    stack.enter_context(f.routed(routes[i], parts))
                else:
                    stack.enter_context(f.routed())
            yield

    def _live_weights(self, i: int) -> dict[str, torch.Tensor]:
        """The kernel weight views rebuilt from the (traced) parameters, so that export sees
        parameters rather than captured constant tensors."""
        owner = self.handle.ffns[i].original
        out = {}
        for name, (pname, size, stride, offset) in self.recipes[i].items():
            p = owner.get_parameter(pname)
            same = tuple(p.shape) == size and tuple(p.stride()) == stride
            out[name] = (
                p if same and p.storage_offset() == offset else p.as_strided(size, stride, offset)
            )
        return out

    # -- programs --------------------------------------------------------------------------------
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *state: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Dense prompt pass + in-graph selection: `(next_logits [B, V] fp32, *idx)`."""
        batch, length = input_ids.shape
        cache_position = torch.arange(length, device=input_ids.device)
        full_mask, cache = self._bind(state, cache_position)
        full_mask.fill_(1)
        full_mask[:, :length].copy_(attention_mask)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden: dict[int, torch.Tensor] = {}
        hooks = []
        for i in self.pruned:
            down = self.handle.ffns[i].parts.down
            if not isinstance(down, nn.Module):
                raise TypeError("export needs the FFN down projection to be a module")
            hooks.append(
                down.register_forward_pre_hook(lambda _m, a, i=i: hidden.__setitem__(i, a[0]))
            )
        # quantised FFNs run their dense pass as hidden -> down_proj here, so the hook sees h
        quant = [self.handle.ffns[i].original for i in self.pruned]
        try:
            with self._routed(batch, None), splitting(quant):
                logits = static_cache_logits(
                    self.model, input_ids, attention_mask, positions, cache_position, cache
                )
        finally:
            for hook in hooks:
                hook.remove()
        valid = attention_mask.bool()
        idx = [self._select(i, hidden[i], valid) for i in self.pruned]
        return (logits, *idx)

    def _select(self, i: int, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The controller's prompt selection (pass-0 statistics), as graph ops."""
        h = self.handle.method.statistic(h.view(valid.shape[0], valid.shape[1], -1).float())
        a = torch.where(valid[..., None], h, 0.0)
        m = a.square().sum(1).sqrt()  # ActivationAccumulator (L2) after one pass
        if self.shared:
            m = shared_scores(m)
        pmax = getattr(self, f"proxy_max_{i}", None)
        pmean = getattr(self, f"proxy_mean_{i}", None)
        scores = rank_scores(self.ranking, m, pmax, pmean)
        idx = torch.ops.dart.topk_indices(scores, self.counts[i])
        return idx[0] if self.shared else idx

    def decode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        *idx_and_state: torch.Tensor,
    ) -> torch.Tensor:
        """One sparse step: `next_logits [B, V]` fp32 (the cache is written in place)."""
        n = len(self.pruned)
        idx, state = idx_and_state[:n], idx_and_state[n:]
        full_mask, cache = self._bind(state, cache_position)
        with self._routed(input_ids.shape[0], idx):
            return static_cache_logits(
                self.model, input_ids, full_mask, position_ids, cache_position, cache
            )

    # -- the runner's greedy loop over these programs ------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        programs: tuple[Any, Any] | None = None,
    ) -> torch.Tensor:
        """Greedy tokens `[B, max_new_tokens]` from `programs` (prefill, decode callables, e.g.
        `ep.module()` of the exported programs; default: this module's eager methods), by the
        loop that runs the packages (`dart.runtime.runner.greedy_generate`)."""
        prefill, decode = programs or (self.prefill, self.decode)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = self.new_state()
        return greedy_generate(
            prefill, decode, input_ids, attention_mask, state, max_new_tokens
        ).tokens


def _head_shapes(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


class _Program(nn.Module):
    """One of the two programs as a module (what `torch.export` traces)."""

    def __init__(self, wrapper: DARTExportModule, which: str):
        super().__init__()
        self.wrapper = wrapper
        self.which = which

    def forward(self, *args: torch.Tensor):
        return getattr(self.wrapper, self.which)(*args)


# ------------------------------------------------------------------------------------------------
# Export


def _example_inputs(wrapper: DARTExportModule, prompt_len: int):
    b, dev = wrapper.batch_size, wrapper.device
    ids = torch.ones(b, prompt_len, dtype=torch.long, device=dev)
    prefill_args = (ids, torch.ones_like(ids), *wrapper.new_state())
    idx = []
    for i in wrapper.pruned:
        k = wrapper.counts[i]
        row = torch.arange(k, device=dev)
        idx.append(row if wrapper.shared else row.expand(b, k).contiguous())
    decode_args = (
        torch.ones(b, 1, dtype=torch.long, device=dev),
        torch.full((b, 1), prompt_len, dtype=torch.long, device=dev),
        torch.tensor([prompt_len], device=dev),
        *idx,
        *wrapper.new_state(),
    )
    return prefill_args, decode_args


@torch.no_grad()
def export_programs(
    wrapper: DARTExportModule, prompt_len: int | None = None
) -> dict[str, torch.export.ExportedProgram]:
    """`torch.export` both programs. `prompt_len=None`: P dynamic in [1, max_len - 1]."""
    example_len = prompt_len or min(8, wrapper.max_len - 1)
    prefill_args, decode_args = _example_inputs(wrapper, example_len)
    dynamic = None
    if prompt_len is None:
        p = torch.export.Dim("prompt_len", min=1, max=wrapper.max_len - 1)
        # forward(*args): one spec per positional tensor, grouped as the one *args input
        dynamic = (({1: p}, {1: p}, *([None] * len(wrapper.state_names))),)
    prefill = torch.export.export(
        _Program(wrapper, "prefill"), prefill_args, dynamic_shapes=dynamic, strict=False
    )
    decode = torch.export.export(_Program(wrapper, "decode"), decode_args, strict=False)
    return {"prefill": prefill, "decode": decode}


def _copy_ops_library(folder: Path) -> str:
    """Copy the compiled ops into the package; their sha256 (for the manifest). A torn copy
    fails that check at load, so the manifest, written last, is the package's commit point."""
    import dart_ext._C

    shutil.copyfile(dart_ext._C.__file__, folder / OPS_LIBRARY)
    return file_sha256(folder / OPS_LIBRARY)


def _eos(model: nn.Module) -> int | None:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


def _weights_name(model: nn.Module) -> str:
    """The weights a package carries: "fp" (the model's own) or "q4/32" (`dart.quantize`)."""
    spec = quantized_spec(model)
    return "fp" if spec is None else f"{spec.fmt}/{spec.group}"


def export_decode(
    model_or_handle: nn.Module | DARTHandle,
    path: str | Path,
    batch_size: int = 1,
    max_len: int = 512,
    *,
    config: DARTConfig | None = None,
    calibration_ids: torch.Tensor | None = None,
    prompt_len: int | None = None,
    compile: bool = True,
    inductor_configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `model_or_handle` (a handle, or a model to attach `config` to) into `path`:
    `prefill.pt2`, `decode.pt2` (with `compile=True`; AOTInductor) and `manifest.json`.

    Returns the manifest; its `"exported"` key (not written) holds the `ExportedProgram`s.
    `path` becomes a package (see the module docstring): it is built in a staging folder beside
    `path` and renamed into place whole; an earlier package there is replaced (a folder holding
    other files is refused).
    """
    if not load_ops():
        raise RuntimeError("export needs the compiled dart_ext kernels (torch.ops.dart.*)")
    if isinstance(model_or_handle, DARTHandle):
        handle, attached = model_or_handle, False
    else:
        handle = getattr(model_or_handle, "_dart_handle", None)
        attached = handle is None
        if attached:
            handle = attach(model_or_handle, config or DARTConfig())
    try:
        counts = resolve_export_counts(handle, calibration_ids)
        wrapper = DARTExportModule(handle, batch_size, max_len, counts)
        start = time.perf_counter()
        programs = export_programs(wrapper, prompt_len)
        export_s = time.perf_counter() - start
        out = Path(path)
        _check_replaceable(out)
        remove_stale_folders(out, _STAGING)  # a killed export's half-built package
        stage = staging_folder(out, _STAGING)
        try:
            manifest = _build_package(
                stage, handle, wrapper, programs, prompt_len, compile, inductor_configs
            )
            manifest["export_seconds"] = export_s
            write_json(stage / MANIFEST, manifest)  # the stage's commit point
            public_modes(stage)
            _swap_into_place(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    finally:
        if attached:
            handle.detach()
    manifest["exported"] = programs
    return manifest


def _build_package(
    folder: Path,
    handle: DARTHandle,
    wrapper: DARTExportModule,
    programs: dict[str, torch.export.ExportedProgram],
    prompt_len: int | None,
    compile: bool,
    inductor_configs: dict[str, Any] | None,
) -> dict[str, Any]:
    """Compile the programs and copy the ops library into `folder`; the manifest (not yet
    written) with every file's sha256."""
    compile_s = 0.0
    files = {"prefill": PREFILL, "decode": DECODE} if compile else {}
    if compile:
        start = time.perf_counter()
        for name, file in files.items():
            torch._inductor.aoti_compile_and_package(
                programs[name],
                package_path=str(folder / file),
                inductor_configs=inductor_configs,
            )
        compile_s = time.perf_counter() - start
    model = handle.model
    return {
        "format": FORMAT,
        "programs": files,
        "programs_sha256": {name: file_sha256(folder / file) for name, file in files.items()},
        "batch_size": wrapper.batch_size,
        "max_len": wrapper.max_len,
        "prompt_len": prompt_len,  # None: dynamic, 1 <= P < max_len
        "vocab_size": int(model.get_output_embeddings().out_features),
        "eos_token_id": _eos(model),
        "pad_token_id": getattr(model.config, "pad_token_id", None),
        "dtype": str(wrapper.dtype).removeprefix("torch."),
        "weights": _weights_name(model),
        "device": str(wrapper.device),
        "keep_counts": wrapper.counts,
        "widths": [f.width for f in handle.ffns],
        "pruned_layers": wrapper.pruned,
        "idx_layout": "shared [k]" if wrapper.shared else "per_sequence [B, k]",
        "state": wrapper.state_spec(),
        "ops_library": OPS_LIBRARY,  # relative to the package folder
        "ops_library_sha256": _copy_ops_library(folder),
        "model_type": model.config.model_type,
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "dart_config": handle.config.to_dict(),
        "semantics": "prompt masks kept for the whole generation (no drift re-trace)",
        "torch_version": torch.__version__,
        "compile_seconds": compile_s,
    }


_STAGING = "export"
_PACKAGE_FILES = {PREFILL, DECODE, OPS_LIBRARY, MANIFEST}


def _check_replaceable(out: Path) -> None:
    """`out` may become a package: absent, empty, or an earlier package (only its files)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"export: {out} exists and is not a folder; pass another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in _PACKAGE_FILES)
    if others:
        raise FileExistsError(
            f"export: {out} holds files that are not a dart package's ({', '.join(others[:5])}): "
            "the package replaces the whole folder; pass an empty or new --out"
        )


def _swap_into_place(stage: Path, out: Path) -> None:
    """Rename the finished package `stage` to `out`. An earlier package there is renamed
    aside first and removed after: a reader sees the old package or the new one whole (or,
    killed between the two renames, no package at all), never one's programs with the other's
    manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.rename(stage, out)
        fsync_folder(out.parent)
        return
    aside = staging_folder(out, _STAGING)  # named for this process: stale if it is killed
    try:
        os.rename(out, aside / "package")
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    try:
        os.rename(stage, out)
    except BaseException:  # an error, not a kill: put the earlier package back
        os.rename(aside / "package", out)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    fsync_folder(out.parent)
    shutil.rmtree(aside, ignore_errors=True)
