"""Per-sequence schedule of DART (spec section 4): trace -> mask -> monitor -> re-trace -> release.

Passes are counted from the prompt's prefill (pass 0). Passes `0..max(m,1)-1` run dense and
collect statistics; the mask is built at the end of pass `max(m,1)-1` and used from pass
`max(m,1)` on. `m = 0` therefore builds the mask from the prompt alone (like `m = 1`): a mask
for pass 0 itself would need every layer's statistics before layer 0 runs (the `auto` budget is
global), which is exactly the reference code's masking-step-shift defect.

A drift event of row b (polled once per drift window) starts a look-back re-trace when
`DriftConfig.retrace_tokens` R > 0: the caller's next forward recomputes the last R positions
(R - 1 earlier tokens, whose KV is cropped from the cache, and the new token) in one batched
pass (`dart.core.retrace` does the cache work; `dart.core.api` and `dart.runtime.fast` drive it).
Row b runs that pass dense (TRACE): its accumulators and drift baseline are rebuilt from exactly
those R tokens and its new mask is built at the end of the pass. The other rows run the pass
under their own masks and count only their new token (their recomputed KV is put back
afterwards). R = 0 keeps the old re-trace: the row traces the next `max(m, 1)` passes from
fresh accumulators.

Host-side state is a few Python lists of length B, touched only on events; the per-token work
is tensor updates inside the FFN and attention hooks, and the drift monitor is polled once per
window, so there is no host sync per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import FFNParts
from .budget import BudgetAllocation, allocate_budget, allocate_budgets, max_keep_counts
from .config import DARTConfig, resolve_keep_counts
from .drift import make_monitor, resolve_watch_layers
from .ffn import DARTFFN, DENSE, SPARSE, TRACE
from .methods import get_method
from .per_token import allocate_keeps, calibrate_layer_curves, layer_thresholds, model_fingerprint
from .retrace import FFNInputRing, hidden_fraction, rebuild_statistics, replay_signal
from .scoring import (
    ActivationAccumulator,
    SensitivityAccumulator,
    rank_scores,
    select_threshold,
    select_topk,
    shared_scores,
)
from .telemetry import MaskProbe

__all__ = ["Controller", "Phase"]


class Phase:
    TRACE = 0  # dense, collecting statistics
    SPARSE = 1  # masked
    RELEASED = 2  # dense for good


@dataclass
class _Counters:
    decode_passes: int = 0
    decode_tokens: int = 0  # decode passes x rows (each row's token counts)
    layer_neurons: list[float] = field(default_factory=list)  # per layer, over decode tokens
    decode_neurons: float = 0.0  # neurons computed, summed over decode passes and rows
    decode_capacity: float = 0.0  # neurons a dense model would compute
    mask_builds: int = 0  # selections of (row, all layers), the initial ones included
    refreshes: int = 0  # selections after a drift re-trace
    drift_events: list[tuple[int, int]] = field(default_factory=list)  # (pass, row)
    sequences: int = 0
    selection_seconds: float = 0.0  # wall time of mask builds (scoring, top-k, re-slicing)
    # decode tokens whose FFN ran dense, recomputed ones included; an ffn_inputs re-trace adds
    # its hidden-only work in dense-token units (a fraction per token)
    dense_tokens: float = 0
    retraced_tokens: int = 0  # tokens traced by re-traces (<= R per event)


class Controller:
    """Drives the `DARTFFN` modules of one model through the schedule.

    Built complete in one step: it makes one `DARTFFN` per `FFNParts` (`layers`), reporting to
    this controller. `post_ffn_norms[l]` is the norm a family applies to layer l's FFN output
    before the residual add (None: none); `proxies[l]` the output proxy `(Pmax, Pmean)` of the
    ranking (None: magnitude ranking); `topk_fn` the top-k kernel (None: torch).
    """

    def __init__(
        self,
        config: DARTConfig,
        parts: list[FFNParts],
        post_ffn_norms: list[nn.Module | None] | None = None,
        proxies: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        topk_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ):
        self.cfg = config
        self.method = get_method(config.method).for_config(config)
        self.widths = [p.width for p in parts]
        self.num_layers = len(parts)
        self.proxies = proxies
        self.topk_fn = topk_fn
        self.post_ffn_norms = list(post_ffn_norms or [None] * self.num_layers)
        self.keeps = config.layer_keeps(self.widths)
        self.fixed_counts = config.fixed_keep_counts(self.widths)
        self.counts: list[int] | None = self.fixed_counts
        self.budget: BudgetAllocation | None = None  # the last auto allocation, for reports
        # per-row `auto` budgets (batch_policy per_sequence): each row's own counts [B][L] and
        # allocations; `counts` then holds the per-layer mean over the rows (batch reports)
        self.row_counts: list[list[int]] | None = None
        self.row_budgets: list[BudgetAllocation] | None = None
        ema = config.ema_decay if self.method.uses_ema else None
        self.acc = ActivationAccumulator(self.widths, ema_decay=ema)
        self.sens = SensitivityAccumulator(self.num_layers, config.budget.sensitivity)
        self.monitor = None
        if self.method.uses_drift and config.drift.enabled:
            self.monitor = make_monitor(config.drift)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.auto_step = True  # follow HF forwards via hooks; off for explicit-step loops
        self.frozen = False  # calibrated masks are built once and never rebuilt
        self._calibrating = False
        self.valid: torch.Tensor | None = None
        self.batch_size = 0
        self.device = torch.device("cpu")
        self.step = 0
        self.phase: list[int] = []
        self.trace_start: list[int] = []
        lookback = self.monitor is not None and config.drift.retrace == "lookback"
        self.retrace_tokens = config.drift.retrace_tokens if lookback else 0
        # the ffn_inputs re-trace: each layer's FFN inputs of the last R tokens per row
        self.ring: FFNInputRing | None = None
        self.signal_ring: FFNInputRing | None = None  # the drift signal of the same tokens
        if self.monitor is not None and config.drift.retrace == "ffn_inputs":
            self.ring = FFNInputRing(config.drift.retrace_tokens, len(parts))
            if config.drift.signal == "attn_output":
                watched = len(resolve_watch_layers(config.drift.layers, len(parts)))
                self.signal_ring = FFNInputRing(config.drift.retrace_tokens, watched)
        self._retrace_due: list[int] = []  # rows whose drift fired: the next pass re-traces
        self._retracing: list[int] = []  # rows re-traced by the current pass
        self._blend_old: list[torch.Tensor] | None = None  # per-token stats of the old masks
        self._record_rows: torch.Tensor | None = None  # [B] rows whose activations are recorded
        self._residual: dict[int, torch.Tensor] = {}
        self.counters = _Counters()
        self.telemetry = MaskProbe(self.num_layers) if config.telemetry_every else None
        backend = config.backend if self.method.prunes else "masked"  # dense: no kernels
        self.per_token = self.method.per_token
        self.layers = [
            DARTFFN(p, i, backend, self, per_token=self.per_token) for i, p in enumerate(parts)
        ]
        self.per_token_state: dict | None = None  # the calibrated thresholds and their model
        self._capture: dict[int, torch.Tensor] | None = None  # FFN inputs while calibrating
        if self.per_token is not None:  # no neuron masks: keep counts are the widths
            self.fixed_counts = self.counts = list(self.widths)
            self.fingerprint = model_fingerprint(parts)

    @property
    def _shared_mask(self) -> bool:
        return self.cfg.batch_policy == "shared" or self.method.shared_mask

    @property
    def monitors_drift(self) -> bool:
        """Whether a drift monitor watches the attention (its hooks are needed)."""
        return self.monitor is not None

    # -- what to collect ---------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        return Phase.TRACE in self.phase

    @property
    def needs_sensitivity(self) -> bool:
        return self.counts is None and self.collecting

    # -- explicit step API -------------------------------------------------------------------
    def begin(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        """Start new sequences (a new prompt for each of `batch_size` rows)."""
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.step = 0
        self.valid = None
        self.counters.sequences += batch_size
        self._residual.clear()
        self._retrace_due, self._retracing, self._blend_old = [], [], None
        if not self.method.prunes:
            self.phase = [Phase.RELEASED] * batch_size
        elif self.per_token is not None:  # the prompt dense, then every token its own choice
            if self.per_token_state is None:
                raise RuntimeError(
                    f"method={self.method.name!r} needs calibration first (its per-token "
                    "thresholds): handle.calibrate(text, tokenizer) (or "
                    "handle.load_per_token_state) after attach"
                )
            self.phase = [Phase.TRACE] * batch_size
        elif self.method.needs_calibration and not self._calibrating:
            if not self.frozen:
                raise RuntimeError(
                    f"method={self.method.name!r} needs calibration first: "
                    "handle.calibrate(text, tokenizer) after attach"
                )
            self.phase = [Phase.SPARSE] * batch_size
        else:
            self.phase = [Phase.TRACE] * batch_size
            self.trace_start = [0] * batch_size
            self.counts = self.fixed_counts
            self.row_counts = self.row_budgets = None
            self.acc.reset(batch_size, self.device)
            self.sens.reset(batch_size, self.device)
            for layer in self.layers:
                layer.clear_selection()
            if self.monitor is not None:
                self.monitor.begin_trace(batch_size, self.device)
            if self.ring is not None:
                self.ring.reset(batch_size)
            if self.signal_ring is not None:
                self.signal_ring.reset(batch_size)
        self._set_modes()

    def before_forward(self, valid: torch.Tensor | None) -> None:
        """`valid` [B, T] marks real (non-padding) tokens of this pass; None = all real."""
        self.valid = valid
        self._install_probe(valid)

    def after_forward(self) -> None:
        """End of a pass: account for it, then run the schedule's transitions."""
        s = self.step
        for layer in self.layers:
            layer.probe = None
        if s >= 1:
            self._account_decode_pass()
            self.counters.dense_tokens += sum(p != Phase.SPARSE for p in self.phase)
        self._retrace_due = []  # a re-trace is due only in the pass right after its event
        if self.per_token is not None and self.phase:
            self.phase = [Phase.SPARSE] * self.batch_size  # after the dense prompt pass
        elif self.method.selects_from_prompt or self._calibrating:
            self._maybe_build(s)
        if self.monitor is not None and (s + 1) % self.cfg.drift.window == 0:
            self._poll_drift(s)
        release = self.cfg.release_step
        if release is not None and s + 1 >= release and self.method.prunes:
            self.phase = [Phase.RELEASED] * self.batch_size
        self.step += 1
        self.valid = None
        self._set_modes()

    def _install_probe(self, valid: torch.Tensor | None) -> None:
        """On every `telemetry_every`-th decode pass with sparse rows, the FFNs also measure
        their mask against the dense activations (`dart.core.telemetry`); off: nothing installed."""
        every = self.cfg.telemetry_every
        if not every or self.step < 1 or self.step % every or Phase.SPARSE not in self.phase:
            return
        rows = torch.tensor([p == Phase.SPARSE for p in self.phase], device=self.device)
        self.telemetry.arm(rows, valid)
        for layer in self.layers:
            layer.probe = self.telemetry

    # -- recording (called from the FFN modules and hooks) ------------------------------------
    @torch.no_grad()
    def record_activations(self, layer: int, h: torch.Tensor) -> None:
        valid = self.valid
        if self._record_rows is not None:  # TRACE mode: only the tracing rows' statistics
            b, t = h.shape[:2]
            rows = self._record_rows[:, None].expand(b, t)
            valid = rows if valid is None else valid & rows
        self.acc.update(layer, self.method.statistic(h), valid)

    @property
    def records_inputs(self) -> bool:
        # the monitor is None inside `paused`: those forwards are not the sequence's tokens
        return self.ring is not None and self.monitor is not None

    @torch.no_grad()
    def record_ffn_input(self, layer: int, x: torch.Tensor) -> None:
        self.ring.record(layer, x, self.valid)

    def capture_residual(self, layer: int, r: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture[layer] = r.detach()
        elif self.needs_sensitivity:
            self._residual[layer] = r

    @torch.no_grad()
    def record_ffn_output(self, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.needs_sensitivity:
            return
        r = self._residual.pop(layer, x).view_as(y)  # post-LN: the FFN input is the residual
        norm = self.post_ffn_norms[layer]
        f = norm(y) if norm is not None else y
        self.sens.update(layer, r, f, self.valid)

    @torch.no_grad()
    def observe_attention(self, signal: list[torch.Tensor]) -> None:
        if self.monitor is not None and self.batch_size:
            self.monitor.observe(signal, self.valid)
            if self.signal_ring is not None:
                for i, x in enumerate(signal):
                    self.signal_ring.record(i, x, self.valid)

    # -- transitions --------------------------------------------------------------------------
    def _set_modes(self) -> None:
        if not self.phase or all(p == Phase.RELEASED for p in self.phase):
            mode = DENSE
        elif all(p == Phase.SPARSE for p in self.phase):
            mode = SPARSE
        else:
            mode = TRACE
        self._record_rows = None  # always a tensor in TRACE mode: one compiled variant
        if mode == TRACE:
            tracing = [p != Phase.SPARSE for p in self.phase]
            self._record_rows = torch.tensor(tracing, dtype=torch.bool, device=self.device)
        for layer in self.layers:
            layer.mode = mode
            if mode == TRACE and layer.selected:
                dense_rows = [b for b, p in enumerate(self.phase) if p != Phase.SPARSE]
                if dense_rows:
                    layer.release_rows(torch.tensor(dense_rows, device=self.device))

    def _maybe_build(self, s: int) -> None:
        window = max(self.cfg.masking_step, 1)
        ready = [
            b
            for b, p in enumerate(self.phase)
            if p == Phase.TRACE and (b in self._retracing or s + 1 - self.trace_start[b] >= window)
        ]
        if not ready:
            return
        if self._shared_mask and len(ready) < self.batch_size:
            return  # a shared mask waits for every row
        if self._retracing and self._blend_old is not None:
            rows = self._row_mask(self._retracing)
            self.acc.blend_rows(rows, self._blend_old, self.cfg.drift.retrace_blend)
        self._retracing, self._blend_old = [], None
        self._build(ready)
        if self._calibrating:
            self.frozen = True

    def _row_mask(self, rows: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        mask[rows] = True
        return mask

    def _build(self, rows: list[int]) -> None:
        start = time.perf_counter()
        self._build_selection(rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # rare (once per re-trace): time the kernels
        self.counters.selection_seconds += time.perf_counter() - start

    @property
    def _per_row_budgets(self) -> bool:
        """Each row's `auto` budget from its own statistics (so batch-mates cannot change a
        sequence's output); `shared` keeps one budget for the batch. The threshold strategy
        picks its own counts and keeps the batch-wide path."""
        return self.fixed_counts is None and not self._shared_mask and self.cfg.strategy == "topk"

    def _allocate(self, rows_mask: torch.Tensor) -> None:
        """The `auto` keep counts: one budget over the rows being traced (shared), or one per
        row from that row's own sensitivities (per sequence)."""
        target = self.cfg.prune_target
        if not self._per_row_budgets:
            scores = self.sens.scores(rows_mask)
            self.budget = allocate_budget(scores, self.widths, target, self.cfg.budget)
            self.counts = resolve_keep_counts(self.keeps, self.widths, self.budget.keep_counts)
            return
        one_hot = torch.eye(self.batch_size, dtype=torch.bool, device=self.device)
        scores = torch.stack([self.sens.scores(row) for row in one_hot])  # [B, L]
        self.row_budgets = allocate_budgets(scores, self.widths, target, self.cfg.budget)
        self.row_counts = [
            resolve_keep_counts(self.keeps, self.widths, b.keep_counts) for b in self.row_budgets
        ]
        self.budget = None
        self.counts = [
            round(sum(layer) / len(layer)) for layer in zip(*self.row_counts, strict=True)
        ]

    def _max_counts(self) -> list[int]:
        """kmax per layer: the most any row's budget can keep, from the config alone, so the
        padded idx [B, kmax] has the same shape alone and in any batch (no recompiles)."""
        auto = max_keep_counts(self.widths, self.cfg.prune_target, self.cfg.budget)
        return resolve_keep_counts(self.keeps, self.widths, auto)

    def _build_selection(self, rows: list[int]) -> None:
        rows_mask = self._row_mask(rows)
        if self.counts is None:
            self._allocate(rows_mask)
        shared = self._shared_mask
        new_phase = list(self.phase)
        for b in rows:
            new_phase[b] = Phase.SPARSE
        dense_rows = torch.tensor(
            [p != Phase.SPARSE for p in new_phase], dtype=torch.bool, device=self.device
        )
        per_row = self.row_counts is not None
        kmax = self._max_counts() if per_row else self.counts
        for layer_index, layer in enumerate(self.layers):
            width = self.widths[layer_index]
            lengths = None
            if per_row:
                counts = [row[layer_index] for row in self.row_counts]
                if min(counts) >= width:
                    continue
                if max(counts) > kmax[layer_index]:  # an invariant of max_keep_counts
                    raise RuntimeError(f"layer {layer_index}: counts {counts} exceed kmax")
                lengths = torch.tensor(counts, dtype=torch.int64, device=self.device)
            elif self.counts[layer_index] >= width:
                continue
            idx = self._select(layer_index, kmax[layer_index], shared, lengths)
            if not shared and layer.selected and len(rows) < self.batch_size:
                merged = layer.idx.clone()
                merged[rows_mask] = idx[rows_mask]
                idx = merged
            layer.set_selection(idx, None if shared else dense_rows, lengths)
        self.phase = new_phase
        self.counters.mask_builds += len(rows)
        if self.monitor is not None:
            self.monitor.finalize_trace(rows_mask)

    def _select(
        self, layer_index: int, k: int, shared: bool, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Kept indices of one layer: `[k]` (shared) or `[B, k]`; with per-row `lengths` a
        padded `[B, k]` whose row b holds its own top `lengths[b]` neurons (ascending), then 0s."""
        m = self.acc.magnitudes(layer_index)
        if shared:
            m = shared_scores(m, ema=self.acc.ema_decay is not None)
        if self.method.score is not None:
            scores = self.method.score(m, self.generator)
        else:
            pmax, pmean = self.proxies[layer_index] if self.proxies else (None, None)
            scores = rank_scores(self.cfg.ranking, m, pmax, pmean)
        layer = self.layers[layer_index]
        if lengths is not None:
            return _top_per_row(scores, k, lengths)
        if self.cfg.strategy == "auto" and not layer.selected:
            idx, _ = select_threshold(scores, self.topk_fn)
        else:
            k = layer.keep if self.cfg.strategy == "auto" else k
            idx = select_topk(scores, k, self.topk_fn)
        return idx[0] if shared else idx

    def _poll_drift(self, s: int) -> None:
        fired = self.monitor.poll()
        sparse = [p == Phase.SPARSE for p in self.phase]
        rows = [b for b, f in enumerate(fired.tolist()) if f and sparse[b]]
        if not rows:
            return
        if self.cfg.batch_policy == "shared":
            rows = [b for b in range(self.batch_size) if sparse[b]]
        for b in rows:
            self.counters.drift_events.append((s, b))
            self.phase[b] = Phase.TRACE
            self.trace_start[b] = s + 1
        self.counters.refreshes += len(rows)
        rows_mask = self._row_mask(rows)
        if self.retrace_tokens or self.ring is not None:
            self._retrace_due = rows if self.retrace_tokens else []
            if self.cfg.drift.retrace_blend > 0:
                self._blend_old = [self.acc.per_token(i) for i in range(self.num_layers)]
        self.acc.reset_rows(rows_mask)
        self.monitor.begin_trace(self.batch_size, self.device, rows=rows_mask)
        if self.ring is not None:
            self._rebuild_from_inputs(s, rows)

    def _rebuild_from_inputs(self, s: int, rows: list[int]) -> None:
        """The `ffn_inputs` re-trace, right at the event: the rows' statistics from the FFN
        hidden activations of their buffered inputs, then their new masks (used from the next
        pass); the drift baseline from the buffered signal of the same tokens (`attn_output`),
        else from the windows that follow (pending)."""

        def update(layer: int, h: torch.Tensor, valid: torch.Tensor) -> None:
            self.acc.update(layer, self.method.statistic(h), valid)

        hidden = [layer._parts.hidden for layer in self.layers]
        used = rebuild_statistics(self.ring, rows, hidden, update, self.batch_size)
        c = self.counters
        c.retraced_tokens += sum(used)
        if not c.layer_neurons:
            c.layer_neurons = [0.0] * self.num_layers
        total = 0.0
        for i, (layer, n) in enumerate(zip(self.layers, self.widths, strict=True)):
            work = sum(used) * n * hidden_fraction(layer.kind)  # gate/up rows, no down
            c.layer_neurons[i] += work
            total += work
        c.decode_neurons += total
        c.dense_tokens += total / sum(self.widths)
        if self.signal_ring is not None:
            replay_signal(self.signal_ring, rows, self.monitor, self.batch_size)
        self._retracing = rows
        self._maybe_build(s)

    def _row_keep_counts(self) -> list[list[int]]:
        """Each row's per-layer keep counts under its current selection (its own budget)."""
        if self.row_counts is not None:
            return self.row_counts
        counts = self.counts if self.counts is not None else self.widths
        return [list(counts)] * len(self.phase)

    # -- look-back re-trace (driven by the caller's forward: dart.core.api, dart.runtime.fast) --
    @property
    def retrace_rows(self) -> list[int]:
        """Rows whose drift fired at the end of the last pass: the next forward should
        recompute their last `retrace_tokens` positions (see :meth:`begin_retrace`)."""
        return list(self._retrace_due)

    def retrace_span(self, available: int, new_tokens: int = 1) -> int:
        """How many earlier positions the re-trace pass recomputes before `new_tokens` new
        ones: R - new_tokens, clamped to the `available` earlier tokens (cache and ids)."""
        return max(min(self.retrace_tokens - new_tokens, available), 0)

    def begin_retrace(self, prior: int, new_tokens: int, valid: torch.Tensor | None) -> None:
        """The coming pass re-runs `prior` earlier positions before its `new_tokens`; `valid`
        [B, prior + new_tokens] marks the real (non-padding) ones (None: all real). Call it
        after `before_forward`, before the forward. The re-trace rows see every position; the
        other rows only their new tokens (their statistics and drift windows are not fed
        twice)."""
        rows = self._retrace_due
        self._retrace_due, self._retracing = [], rows
        if not rows:
            return
        width = prior + new_tokens
        if valid is None:
            valid = torch.ones(self.batch_size, width, dtype=torch.bool, device=self.device)
        valid = valid.to(device=self.device, dtype=torch.bool)
        if valid.shape != (self.batch_size, width):
            raise ValueError(
                f"valid: shape {tuple(valid.shape)} is not [B, prior + new_tokens] = "
                f"[{self.batch_size}, {width}]"
            )
        fired = self._row_mask(rows)
        cols = torch.arange(width, device=self.device)
        self.valid = valid & (fired[:, None] | (cols >= prior)[None])
        recomputed = valid[:, :prior].sum(1)
        if self.monitor is not None:  # those tokens were observed once already
            self.monitor.rewind(torch.where(fired, recomputed, 0))
        traced = self.valid.sum(1).tolist()  # one host sync per re-trace event
        self.counters.retraced_tokens += sum(traced[b] for b in rows)
        self._account_recomputed(recomputed.tolist())

    def _account_recomputed(self, row_tokens: list[int]) -> None:
        """Neurons of the recomputed positions: dense for the re-trace rows, under their masks
        for the others (work done and thrown away). They add to the work of the decode tokens,
        not to their number, so effective sparsity drops with every recomputed token."""
        c = self.counters
        if not c.layer_neurons:
            c.layer_neurons = [0.0] * self.num_layers
        row_counts = self._row_keep_counts()
        for b, tokens in enumerate(row_tokens):
            dense = self.phase[b] != Phase.SPARSE
            c.dense_tokens += tokens if dense else 0
            for i, (k, n) in enumerate(zip(row_counts[b], self.widths, strict=True)):
                c.layer_neurons[i] += tokens * (n if dense else k)
                c.decode_neurons += tokens * (n if dense else k)

    def _account_decode_pass(self) -> None:
        c = self.counters
        c.decode_passes += 1
        total = float(sum(self.widths))
        if not c.layer_neurons:
            c.layer_neurons = [0.0] * self.num_layers
        for p, counts in zip(self.phase, self._row_keep_counts(), strict=True):
            row = counts if p == Phase.SPARSE else self.widths
            c.decode_neurons += float(sum(row))
            c.decode_capacity += total
            for i, k in enumerate(row):
                c.layer_neurons[i] += k
        c.decode_tokens += len(self.phase)

    # -- calibration, explicit selection, forwards outside the schedule -------------------------
    @contextmanager
    def calibration(self) -> Iterator[None]:
        """Forwards inside trace a calibration text whose masks are then frozen for every
        prompt (`method.needs_calibration`); a new calibration replaces the old masks."""
        self._calibrating = True
        self.frozen = False
        try:
            yield
        finally:
            self._calibrating = False

    def select_traced(self) -> None:
        """Build the masks of every row still tracing now, whatever the masking step (the
        log-likelihood protocol: masks from the context, then the answer scored under them)."""
        tracing = [b for b, p in enumerate(self.phase) if p == Phase.TRACE]
        if tracing and self.per_token is not None:
            self.phase = [Phase.SPARSE] * self.batch_size
            self._set_modes()
        elif tracing and self.method.prunes:
            self._build(tracing)
            self._set_modes()

    def repeat_rows(self, rows: torch.Tensor) -> None:
        """Row ``i`` continues row ``rows[i]``'s current masks (the log-likelihood protocol
        scores every continuation of a context in one batch, under its context's masks)."""
        sources = rows.tolist()
        self.phase = [self.phase[r] for r in sources]
        self.batch_size = rows.numel()
        if self.row_counts is not None:  # per-row budgets follow their masks
            self.row_counts = [self.row_counts[r] for r in sources]
            self.row_budgets = [self.row_budgets[r] for r in sources]
        dense = torch.tensor([p != Phase.SPARSE for p in self.phase], device=self.device)
        for layer in self.layers:
            if layer.selected and layer.idx.dim() == 2:  # per-sequence masks; shared ones fit
                lengths = None if layer.lengths is None else layer.lengths[rows]
                layer.set_selection(layer.idx[rows], dense, lengths)

    @contextmanager
    def paused(self, batch_size: int) -> Iterator[None]:
        """Forwards of `batch_size` rows outside the schedule: the hooks record nothing and
        advance nothing (no statistics, no drift monitor); the state is restored on exit."""
        saved = (self.auto_step, self.monitor, self.phase, self.batch_size)
        self.auto_step, self.monitor, self.phase, self.batch_size = False, None, [], batch_size
        try:
            yield
        finally:
            self.auto_step, self.monitor, self.phase, self.batch_size = saved

    # -- per-token thresholds -------------------------------------------------------------------
    @contextmanager
    def capturing(self) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Forwards inside run dense and record, per layer, the FFN input ``x`` and the residual
        entering the FFN block (the pre-FFN norm's input; ``x`` where a family has none), both
        ``[tokens, d]``: the calibration data of :meth:`calibrate_per_token`."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = []

        def grab(module: DARTFFN, args: tuple) -> None:
            x = args[0].detach()
            r = self._capture.pop(module.layer_index, x)
            out[module.layer_index] = (x.reshape(-1, x.shape[-1]), r.reshape(-1, x.shape[-1]))

        saved_modes = [layer.mode for layer in self.layers]
        self._capture = {}
        for layer in self.layers:
            layer.mode = DENSE
            hooks.append(layer.register_forward_pre_hook(grab))
        try:
            with self.paused(1):
                yield out
        finally:
            for hook in hooks:
                hook.remove()
            self._capture = None
            for layer, mode in zip(self.layers, saved_modes, strict=True):
                layer.mode = mode

    @torch.no_grad()
    def calibrate_per_token(
        self,
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]],
        curve_tokens: int = 128,
        curves: dict[int, list[float]] | None = None,
    ) -> dict:
        """Per-layer keeps and thresholds of the per-token method from the captured calibration
        data (:meth:`capturing`): ``auto`` layers share the byte budget ``total_prune`` by
        ``per_token_allocation`` (the greedy one measures each layer's error curve on
        ``curve_tokens`` evenly spaced tokens), fraction/count layers keep that share of every
        knob, dense layers keep all. Installs the thresholds; returns the state
        (:meth:`load_per_token_state` takes it back). ``curves`` (layer -> error curve, the
        state's ``error_curves`` of an earlier calibration of the same mode on the same data)
        skips measuring them again."""
        mode, cfg = self.per_token, self.cfg
        if mode is None:
            raise ValueError(f"method {self.method.name!r} has no per-token thresholds")
        missing = [i for i in range(self.num_layers) if i not in captured]
        if missing:
            raise ValueError(f"captured: no calibration data for layers {missing}")
        keeps: list[float | None] = []
        for keep, n in zip(self.keeps, self.widths, strict=True):
            value = {"dense": 1.0, "fraction": keep.value, "auto": None}.get(keep.kind)
            keeps.append(keep.value / n if keep.kind == "count" else value)
        auto = [i for i, k in enumerate(keeps) if k is None]
        if auto:
            sizes = [3.0 * p.width * p.w_up.shape[1] for p in self._parts_of(auto)]
            fixed = [i for i in range(self.num_layers) if i not in auto]
            all_sizes = [3.0 * p.width * p.w_up.shape[1] for p in self._parts_of(range(len(keeps)))]
            # the auto layers read what the target leaves after the fixed layers' reads
            budget = (1.0 - cfg.prune_target) * sum(all_sizes) - sum(
                all_sizes[i] * mode.read_fraction([keeps[i]] * len(mode.knobs)) for i in fixed
            )
            read = budget / sum(sizes)
            curves = {int(k): v for k, v in (curves or {}).items()}
            if cfg.per_token_allocation == "greedy":
                for i in auto:
                    if i in curves:
                        continue
                    x, r = captured[i]
                    pick = torch.linspace(0, x.shape[0] - 1, min(curve_tokens, x.shape[0]))
                    pick = pick.round().long().to(x.device)
                    layer = self.layers[i]
                    curves[i] = calibrate_layer_curves(
                        mode, layer.parts, x[pick], r[pick], layer.pt_scale
                    )
            chosen = allocate_keeps(
                mode,
                [curves.get(i, [0.0]) for i in auto],
                sizes,
                read,
                cfg.per_token_allocation,
            )
            for i, k in zip(auto, chosen, strict=True):
                keeps[i] = k
        thresholds = []
        for i, layer in enumerate(self.layers):
            x, _ = captured[i]
            thresholds.append(layer_thresholds(mode, layer.parts, x, keeps[i], layer.pt_scale))
        state = {
            "method": self.method.name,
            "fingerprint": self.fingerprint,
            "allocation": cfg.per_token_allocation,
            "total_prune": cfg.prune_target,
            "keeps": keeps,
            "thresholds": thresholds,
            "calibration_tokens": int(captured[0][0].shape[0]),
            "error_curves": {str(i): c for i, c in (curves or {}).items()} if auto else {},
        }
        self.load_per_token_state(state)
        return state

    def _parts_of(self, layers) -> list:
        return [self.layers[i].parts for i in layers]

    def load_per_token_state(self, state: dict) -> None:
        """Install thresholds calibrated earlier (:meth:`calibrate_per_token`'s state); refused,
        nothing changed, when they were calibrated for another model or method."""
        if self.per_token is None:
            raise ValueError(f"method {self.method.name!r} has no per-token thresholds")
        if state.get("method") != self.method.name:
            raise ValueError(
                f"per-token thresholds: calibrated for method {state.get('method')!r}, this "
                f"handle runs {self.method.name!r}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "per-token thresholds: calibrated for another model (FFN weight fingerprint "
                f"{state.get('fingerprint')!r}, this model's is {self.fingerprint!r})"
            )
        t = torch.tensor(state["thresholds"], dtype=torch.float32)
        if t.shape != (self.num_layers, 2):
            raise ValueError(
                f"per-token thresholds: shape {tuple(t.shape)} is not [{self.num_layers}, 2]"
            )
        for layer, row in zip(self.layers, t, strict=True):
            layer.set_thresholds(row.to(layer.pt_thresholds.device))
        self.per_token_state = dict(state)
        self.frozen = True

    def _bytes_read(self) -> dict:
        """The share of FFN weight bytes read per decoded token: measured by the per-token
        FFNs' meters; for mask methods the kept neurons' share (decode passes, or the masks)."""
        if self.per_token is not None:
            read = sum(float(layer.pt_read) for layer in self.layers)
            dense = sum(float(layer.pt_dense) for layer in self.layers)
            return {
                "ffn_bytes_read": read,
                "ffn_bytes_dense": dense,
                "ffn_bytes_read_fraction": read / dense if dense else float("nan"),
            }
        if not self.method.prunes:
            return {"ffn_bytes_read_fraction": 1.0}
        c = self.counters
        if c.decode_capacity:
            return {"ffn_bytes_read_fraction": c.decode_neurons / c.decode_capacity}
        counts = self.counts if self.counts is not None else self.widths
        rows = self.row_counts
        kept = sum(map(sum, rows)) / len(rows) if rows else sum(counts)
        return {"ffn_bytes_read_fraction": kept / sum(self.widths)}

    def _per_token_sparsity(self) -> dict:
        """A per-token method's sparsities are of bytes: ``nominal_sparsity`` the share its
        calibrated keeps leave unread, ``effective_sparsity`` the share its tokens left unread
        (the meters); nothing for the mask methods (their neuron counts above)."""
        if self.per_token is None or self.per_token_state is None:
            return {}
        mode, keeps = self.per_token, self.per_token_state["keeps"]
        sizes = [
            n * p.w_up.shape[1]
            for n, p in zip(self.widths, self._parts_of(range(len(keeps))), strict=True)
        ]
        planned = sum(
            s * mode.read_fraction([k] * len(mode.knobs)) for s, k in zip(sizes, keeps, strict=True)
        ) / sum(sizes)
        measured = self._bytes_read()["ffn_bytes_read_fraction"]
        return {
            "nominal_sparsity": 1.0 - planned,
            "effective_sparsity": 0.0 if math.isnan(measured) else 1.0 - measured,
        }

    def reset_stats(self) -> None:
        """Forget counters and drift history (masks and calibration stay)."""
        for layer in self.layers:
            layer.reset_meter()
        self.counters = _Counters()
        if self.telemetry is not None:
            self.telemetry.reset()
        if self.monitor is not None and self.batch_size:
            self.monitor.begin_trace(self.batch_size, self.device)

    def drift_history(self) -> list[list[tuple[int, float, float]]]:
        """Per sequence (step, similarity, threshold) at each monitored window."""
        m = self.monitor
        return m.history() if m is not None and m.batch_size else []

    # -- reporting ---------------------------------------------------------------------------
    def _layer_sparsity(self) -> list[float]:
        """Per layer, the fraction of its neurons not computed over the decode tokens."""
        c = self.counters
        if not c.decode_tokens:
            return [0.0] * self.num_layers
        return [
            1.0 - neurons / (c.decode_tokens * n)
            for neurons, n in zip(c.layer_neurons, self.widths, strict=True)
        ]

    def _prune_fractions(self) -> list[float] | None:
        """The auto budget's per-layer prune fractions (per-row budgets: the rows' mean)."""
        if self.row_budgets:
            fractions = [b.prune_fractions for b in self.row_budgets]
            return [sum(layer) / len(layer) for layer in zip(*fractions, strict=True)]
        return self.budget.prune_fractions if self.budget else None

    def stats(self) -> dict:
        c = self.counters
        counts = self.counts if self.counts is not None else list(self.widths)
        total = sum(self.widths)
        rows = self.row_counts
        kept = sum(map(sum, rows)) / len(rows) if rows else sum(counts)  # a row's mean
        state_bytes = {
            "accumulators": self.acc.state_bytes(),
            "sensitivity": self.sens.state_bytes(),
            "selections": sum(layer.extra_bytes() for layer in self.layers),
            "proxies": sum(a.numel() * a.element_size() * 2 for a, _ in self.proxies or []),
            "drift_monitor": self.monitor.state_bytes() if self.monitor else 0,
            "retrace_inputs": sum(
                r.state_bytes() for r in (self.ring, self.signal_ring) if r is not None
            ),
        }
        telemetry = self.telemetry.stats() if self.telemetry is not None else {}
        return {
            "method": self.method.name,
            "backend": self.cfg.backend,
            # per layer: the batch's one budget, or under per-row budgets the rows' mean
            "keep_counts": counts,
            "keep_counts_per_row": [list(r) for r in rows] if rows else None,
            "widths": list(self.widths),
            "nominal_sparsity": 1.0 - kept / total,
            "effective_sparsity": (
                1.0 - c.decode_neurons / c.decode_capacity if c.decode_capacity else 0.0
            ),
            "decode_passes": c.decode_passes,
            "mask_builds": c.mask_builds,
            "mask_refreshes": c.refreshes,
            "selection_seconds": c.selection_seconds,
            "effective_sparsity_per_layer": self._layer_sparsity(),
            "decode_tokens": c.decode_tokens,
            "drift_events": [{"step": s, "row": b} for s, b in c.drift_events],
            "drift_events_per_100_tokens": (
                100.0 * len(c.drift_events) / c.decode_tokens if c.decode_tokens else 0.0
            ),
            "dense_token_computations": c.dense_tokens,
            "dense_token_computations_per_token": (
                c.dense_tokens / c.decode_tokens if c.decode_tokens else 0.0
            ),
            "retraced_tokens": c.retraced_tokens,
            **self._bytes_read(),
            **self._per_token_sparsity(),
            "per_token": self.per_token_state,
            **telemetry,
            "sequences": c.sequences,
            "budget_total_prune": self.cfg.prune_target,  # what an auto budget allocated
            "budget_prune_fractions": self._prune_fractions(),
            "budget_prune_fractions_per_row": (
                [b.prune_fractions for b in self.row_budgets] if self.row_budgets else None
            ),
            "extra_state_bytes": state_bytes,
            "extra_state_bytes_total": sum(state_bytes.values()),
        }


def _top_per_row(scores: torch.Tensor, kmax: int, lengths: torch.Tensor) -> torch.Tensor:
    """`[B, kmax]` int64: row b's top `lengths[b]` scores' indices, ascending, then 0 padding.

    The same neurons `select_topk(scores[b], lengths[b])` keeps (ties to the lower index, NaN
    as -inf), computed for the whole batch in one sort, whatever the other rows hold."""
    s = torch.where(torch.isnan(scores), float("-inf"), scores)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :kmax]
    width = scores.shape[-1]
    kept = torch.arange(kmax, device=scores.device) < lengths.to(scores.device)[:, None]
    idx = torch.sort(torch.where(kept, top, width), dim=-1).values
    return torch.where(idx == width, 0, idx)
