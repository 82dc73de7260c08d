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

The controller is a thin composition of three parts: the schedule (:mod:`dart.core.schedule`:
phases, trace windows, release), the selection (:mod:`dart.core.selection`: statistics, keep
counts and budgets, masks) and the accounting (:mod:`dart.core.accounting`: counters and the
figures of ``handle.stats()``), plus the drift monitor (:mod:`dart.core.drift`).

Driver interface
----------------
Code that drives or reads a patched model (``dart.core.api``, the compiled loop
``dart.runtime.fast``, ``dart.runtime.export``, lm-eval, the evaluation streams, benches and
scripts) uses only the names in :data:`DRIVER_INTERFACE` (a test scans those modules for any
other attribute and for assignments); everything else is private to the controller. Read-only
state: ``config``, ``method``, ``widths``, ``num_layers``, ``layers`` (the `DARTFFN` modules,
in layer order), ``proxies``, ``batch_size``, ``phase`` (a copy, :class:`Phase` per row),
``sparse_rows``, ``fixed_counts``, ``counts``, ``row_counts`` (a copy), ``needs_sensitivity``,
``monitors_drift``, ``auto_step``, ``retrace_tokens``, ``retrace_rows``, ``per_token_state``,
``counters`` (the live :class:`dart.core.accounting.Counters`, replaced by ``reset_stats``:
read it, never write it). Stepping: ``begin``, ``before_forward``, ``after_forward``,
``finish_rows`` (rows past their EOS), ``retrace_span``, ``begin_retrace`` and ``driven()``
(the caller steps the schedule; the model hooks stay inert). Selection: ``select_traced``,
``repeat_rows``. Forwards outside the schedule: ``paused``, ``calibration``, ``capturing``.
Per-token thresholds: ``calibrate_per_token``, ``load_per_token_state``. Reports: ``stats``,
``reset_stats``, ``drift_history``. The hook methods ``capture_residual`` and
``observe_attention`` (``dart.core.api``'s hooks) and ``record_activations`` /
``record_ffn_output`` / ``batch_size`` (the `DARTFFN` modules'
:class:`dart.core.ffn.StatsRecorder`) complete it for the patching code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .accounting import Accounting, Counters
from .adapters import FFNParts
from .config import DARTConfig
from .drift import make_monitor, resolve_watch_layers
from .ffn import DARTFFN, DENSE, TRACE
from .methods import Method, get_method
from .per_token import model_fingerprint
from .retrace import FFNInputRing, hidden_fraction, rebuild_statistics, replay_signal
from .schedule import Phase, Schedule
from .selection import Selection
from .telemetry import MaskProbe

__all__ = ["DRIVER_INTERFACE", "HOOK_INTERFACE", "Controller", "Phase"]

# The controller's published driver interface (see the module docstring).
DRIVER_INTERFACE = frozenset(
    {
        "config",
        "method",
        "widths",
        "num_layers",
        "layers",
        "proxies",
        "batch_size",
        "phase",
        "sparse_rows",
        "fixed_counts",
        "counts",
        "row_counts",
        "needs_sensitivity",
        "monitors_drift",
        "auto_step",
        "retrace_tokens",
        "retrace_rows",
        "per_token_state",
        "counters",
        "begin",
        "before_forward",
        "finish_rows",
        "after_forward",
        "retrace_span",
        "begin_retrace",
        "driven",
        "select_traced",
        "repeat_rows",
        "paused",
        "calibration",
        "capturing",
        "calibrate_per_token",
        "load_per_token_state",
        "stats",
        "reset_stats",
        "drift_history",
    }
)
# What the patching code's hooks call besides (dart.core.api, the DARTFFN modules).
HOOK_INTERFACE = frozenset(
    {
        "capture_residual",
        "observe_attention",
        "record_activations",
        "record_ffn_output",
        "records_inputs",
        "record_ffn_input",
    }
)


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
        self._method = get_method(config.method).for_config(config)
        self._widths = [p.width for p in parts]
        self._num_layers = len(parts)
        self.post_ffn_norms = list(post_ffn_norms or [None] * self._num_layers)
        self.selection = Selection(config, self._method, self._widths, proxies, topk_fn)
        self.schedule = Schedule(config.masking_step, config.drift.window, config.release_step)
        self.accounting = Accounting(self._widths)
        self.monitor = None
        if self._method.uses_drift and config.drift.enabled:
            self.monitor = make_monitor(config.drift)
        self._auto_step = True  # follow HF forwards via hooks; off for explicit-step loops
        self.frozen = False  # calibrated masks are built once and never rebuilt
        self._calibrating = False
        self.valid: torch.Tensor | None = None
        self._finished: torch.Tensor | None = None  # [B] rows whose sequence has ended (EOS)
        self._batch_size = 0
        self.device = torch.device("cpu")
        lookback = self.monitor is not None and config.drift.retrace == "lookback"
        self._retrace_tokens = config.drift.retrace_tokens if lookback else 0
        # the ffn_inputs re-trace: each layer's FFN inputs of the last R tokens per row
        self.ring: FFNInputRing | None = None
        self.signal_ring: FFNInputRing | None = None  # the drift signal of the same tokens
        rings = config.drift.retrace == "ffn_inputs" and config.drift.retrace_tokens >= 1
        if self.monitor is not None and rings:  # R = 0: the row traces the passes that follow
            self.ring = FFNInputRing(config.drift.retrace_tokens, len(parts))
            if config.drift.signal == "attn_output":
                watched = len(resolve_watch_layers(config.drift.layers, len(parts)))
                self.signal_ring = FFNInputRing(config.drift.retrace_tokens, watched)
        self._retrace_due: list[int] = []  # rows whose drift fired: the next pass re-traces
        self._retracing: list[int] = []  # rows re-traced by the current pass
        self._blend_old: list[torch.Tensor] | None = None  # per-token stats of the old masks
        self._record_rows: torch.Tensor | None = None  # [B] rows whose activations are recorded
        self._residual: dict[int, torch.Tensor] = {}
        self.telemetry = MaskProbe(self._num_layers) if config.telemetry_every else None
        backend = config.backend if self._method.prunes else "masked"  # dense: no kernels
        self.per_token = self._method.per_token
        # a per-token method's batch policy: every sequence its own choice, or one kept set (the
        # union of the sequences' choices) for the whole batch step
        policy = "union" if config.batch_policy == "shared" else "token"
        self._layers = [
            DARTFFN(p, i, backend, self, per_token=self.per_token, per_token_policy=policy)
            for i, p in enumerate(parts)
        ]
        self._per_token_state: dict | None = None  # the calibrated thresholds and their model
        self._capture: dict[int, torch.Tensor] | None = None  # FFN inputs while calibrating
        if self.per_token is not None:  # no neuron masks: keep counts are the widths
            self.selection.fixed_counts = self.selection.counts = list(self._widths)
            self.fingerprint = model_fingerprint(parts)

    # -- the driver interface: read-only state --------------------------------------------------
    @property
    def config(self) -> DARTConfig:
        """The configuration this controller runs."""
        return self.cfg

    @property
    def method(self) -> Method:
        """The method (:mod:`dart.core.methods`) with the config's statistic."""
        return self._method

    @property
    def widths(self) -> list[int]:
        """Neurons per FFN layer (a copy)."""
        return list(self._widths)

    @property
    def num_layers(self) -> int:
        """FFN layers of the model."""
        return self._num_layers

    @property
    def layers(self) -> list[DARTFFN]:
        """The `DARTFFN` modules, in layer order (the list is the controller's: do not change
        it; the modules' own interface, e.g. ``routed()``, is theirs)."""
        return self._layers

    @property
    def proxies(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer the output proxy ``(Pmax, Pmean)`` of the ranking (None: magnitude)."""
        return self.selection.proxies

    @property
    def batch_size(self) -> int:
        """Rows of the current batch (also the `StatsRecorder` interface of the FFNs)."""
        return self._batch_size

    @property
    def phase(self) -> list[int]:
        """Per row of the current batch, its :class:`Phase` for the coming pass (a copy)."""
        return list(self.schedule.phase)

    @property
    def sparse_rows(self) -> list[bool]:
        """Per row of the current batch: runs the coming pass under its masks."""
        return [p == Phase.SPARSE for p in self.schedule.phase]

    @property
    def fixed_counts(self) -> list[int] | None:
        """Per-layer keep counts fixed by the config (None: an ``auto`` budget allocates them
        from each prompt)."""
        return self.selection.fixed_counts

    @property
    def counts(self) -> list[int] | None:
        """Per-layer keep counts of the current masks (per-row budgets: the rows' rounded
        mean); None before an ``auto`` budget was allocated."""
        return self.selection.counts

    @property
    def row_counts(self) -> list[list[int]] | None:
        """Per row, per layer keep counts of per-row ``auto`` budgets (a copy); None
        otherwise."""
        rows = self.selection.row_counts
        return None if rows is None else [list(r) for r in rows]

    @property
    def auto_step(self) -> bool:
        """Whether the model hooks step the schedule (off inside :meth:`driven` and
        :meth:`paused`)."""
        return self._auto_step

    @property
    def retrace_tokens(self) -> int:
        """R of the look-back re-trace (0: none, or no drift monitor)."""
        return self._retrace_tokens

    @property
    def per_token_state(self) -> dict | None:
        """The calibrated per-token thresholds (:meth:`calibrate_per_token`), or None."""
        return self._per_token_state

    @property
    def counters(self) -> Counters:
        """The live counters (read them, never write them; :meth:`reset_stats` replaces the
        object, so a holder can tell a reset from a continuation)."""
        return self.accounting.counters

    # -- internals the tests and the controller's parts read ----------------------------------
    @property
    def acc(self):
        return self.selection.acc

    @property
    def sens(self):
        return self.selection.sens

    @property
    def step(self) -> int:
        return self.schedule.step

    @property
    def monitors_drift(self) -> bool:
        """Whether a drift monitor watches the attention (its hooks are needed)."""
        return self.monitor is not None

    # -- what to collect ---------------------------------------------------------------------
    @property
    def collecting(self) -> bool:
        return self.schedule.tracing

    @property
    def needs_sensitivity(self) -> bool:
        """Whether the coming pass also collects the `auto` budget's sensitivities (its FFN
        outputs are read: a compiled loop runs such passes eagerly)."""
        return self.selection.counts is None and self.collecting

    # -- explicit step API -------------------------------------------------------------------
    @contextmanager
    def driven(self) -> Iterator[Controller]:
        """The caller steps the schedule itself (``begin``, ``before_forward``,
        ``after_forward``, the re-trace calls) around its own forwards; the model hooks stay
        inert. Restored on exit."""
        saved = self._auto_step
        self._auto_step = False
        try:
            yield self
        finally:
            self._auto_step = saved

    def begin(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        """Start new sequences (a new prompt for each of `batch_size` rows)."""
        self._batch_size = batch_size
        self.device = torch.device(device)
        self.valid = None
        self._finished = None
        self.counters.sequences += batch_size
        self._residual.clear()
        self._retrace_due, self._retracing, self._blend_old = [], [], None
        schedule = self.schedule
        if not self._method.prunes:
            schedule.start(batch_size, Phase.RELEASED)
        elif self.per_token is not None:  # the prompt dense, then every token its own choice
            if self._per_token_state is None:
                raise RuntimeError(
                    f"method={self._method.name!r} needs calibration first (its per-token "
                    "thresholds): handle.calibrate(text, tokenizer) (or "
                    "handle.load_per_token_state) after attach"
                )
            schedule.start(batch_size, Phase.TRACE)
        elif self._method.needs_calibration and not self._calibrating:
            if not self.frozen:
                raise RuntimeError(
                    f"method={self._method.name!r} needs calibration first: "
                    "handle.calibrate(text, tokenizer) after attach"
                )
            schedule.start(batch_size, Phase.SPARSE)
        else:
            schedule.start(batch_size, Phase.TRACE)
            self.selection.reset(batch_size, self.device)
            for layer in self._layers:
                layer.clear_selection()
            if self.monitor is not None:
                self.monitor.begin_trace(batch_size, self.device)
            if self.ring is not None:
                self.ring.reset(batch_size)
            if self.signal_ring is not None:
                self.signal_ring.reset(batch_size)
        self._set_modes()

    def before_forward(self, valid: torch.Tensor | None, tokens: int = 1) -> None:
        """`valid` [B, T] marks real (non-padding) tokens of this pass; None = all `tokens`
        real. The tokens of rows marked finished (`finish_rows`) are never real."""
        if self._finished is not None:
            live = ~self._finished[:, None]
            if valid is None:
                valid = live.expand(self.batch_size, tokens)
            else:
                valid = valid.to(self.device, torch.bool) & live
        self.valid = valid
        self._install_probe(valid)

    def finish_rows(self, rows: torch.Tensor) -> None:
        """Rows `rows` [B] (bool) have ended their sequence (EOS) while the batch runs on for
        its longest row: from the next pass on their tokens are padding, so they are not
        traced and not watched for drift (a finished row never triggers a re-trace; the
        kernels still run its row, and the accounting counts that work). Cumulative until
        `begin`; no host synchronisation."""
        rows = rows.to(device=self.device, dtype=torch.bool)
        if rows.shape != (self.batch_size,):
            raise ValueError(f"rows: shape {tuple(rows.shape)} is not [B] = [{self.batch_size}]")
        self._finished = rows.clone() if self._finished is None else self._finished | rows

    def after_forward(self) -> None:
        """End of a pass: account for it, then run the schedule's transitions."""
        schedule = self.schedule
        s = schedule.step
        for layer in self._layers:
            layer.probe = None
        if s >= 1:
            self.accounting.decode_pass(schedule.dense_rows(), self._row_keep_counts())
        self._retrace_due = []  # a re-trace is due only in the pass right after its event
        if self.per_token is not None and schedule.phase:
            schedule.set_all(Phase.SPARSE, self._batch_size)  # after the dense prompt pass
        elif self._method.selects_from_prompt or self._calibrating:
            self._maybe_build(s)
        if self.monitor is not None and schedule.polls_drift(s):
            self._poll_drift(s)
        if schedule.releases(s) and self._method.prunes:
            schedule.set_all(Phase.RELEASED, self._batch_size)
        schedule.step += 1
        self.valid = None
        self._set_modes()

    def _install_probe(self, valid: torch.Tensor | None) -> None:
        """On every `telemetry_every`-th decode pass with sparse rows, the FFNs also measure
        their mask against the dense activations (`dart.core.telemetry`); off: nothing installed."""
        every = self.cfg.telemetry_every
        step, phase = self.schedule.step, self.schedule.phase
        if not every or step < 1 or step % every or Phase.SPARSE not in phase:
            return
        rows = torch.tensor([p == Phase.SPARSE for p in phase], device=self.device)
        self.telemetry.arm(rows, valid)
        for layer in self._layers:
            layer.probe = self.telemetry

    # -- recording (called from the FFN modules and hooks) ------------------------------------
    @torch.no_grad()
    def record_activations(self, layer: int, h: torch.Tensor) -> None:
        valid = self.valid
        if self._record_rows is not None:  # TRACE mode: only the tracing rows' statistics
            b, t = h.shape[:2]
            rows = self._record_rows[:, None].expand(b, t)
            valid = rows if valid is None else valid & rows
        self.selection.acc.update(layer, self._method.statistic(h), valid)

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
        self.selection.sens.update(layer, r, f, self.valid)

    @torch.no_grad()
    def observe_attention(self, signal: list[torch.Tensor]) -> None:
        if self.monitor is not None and self._batch_size:
            self.monitor.observe(signal, self.valid)
            if self.signal_ring is not None:
                for i, x in enumerate(signal):
                    self.signal_ring.record(i, x, self.valid)

    # -- transitions --------------------------------------------------------------------------
    def _set_modes(self) -> None:
        mode = self.schedule.mode()
        self._record_rows = None  # always a tensor in TRACE mode: one compiled variant
        if mode == TRACE:
            tracing = self.schedule.dense_rows()
            self._record_rows = torch.tensor(tracing, dtype=torch.bool, device=self.device)
        for layer in self._layers:
            layer.mode = mode
            if mode == TRACE and layer.selected:
                dense_rows = [b for b, p in enumerate(self.schedule.phase) if p != Phase.SPARSE]
                if dense_rows:
                    layer.release_rows(torch.tensor(dense_rows, device=self.device))

    def _maybe_build(self, s: int) -> None:
        ready = self.schedule.ready(s, self._retracing)
        if not ready:
            return
        if self.selection.shared_mask and len(ready) < self._batch_size:
            return  # a shared mask waits for every row
        if self._retracing and self._blend_old is not None:
            rows = self._row_mask(self._retracing)
            self.selection.acc.blend_rows(rows, self._blend_old, self.cfg.drift.retrace_blend)
        self._retracing, self._blend_old = [], None
        self._build(ready)
        if self._calibrating:
            self.frozen = True

    def _row_mask(self, rows: list[int]) -> torch.Tensor:
        mask = torch.zeros(self._batch_size, dtype=torch.bool, device=self.device)
        mask[rows] = True
        return mask

    def _build(self, rows: list[int]) -> None:
        start = time.perf_counter()
        self._build_selection(rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # rare (once per re-trace): time the kernels
        self.counters.selection_seconds += time.perf_counter() - start

    def _build_selection(self, rows: list[int]) -> None:
        """The masks of `rows` (the selection's), then those rows run sparse."""
        rows_mask = self._row_mask(rows)
        new_phase = list(self.schedule.phase)
        for b in rows:
            new_phase[b] = Phase.SPARSE
        dense_rows = torch.tensor(
            self.schedule.dense_rows(new_phase), dtype=torch.bool, device=self.device
        )
        self.selection.build(self._layers, rows, rows_mask, dense_rows)
        self.schedule.phase = new_phase
        self.accounting.mask_builds(len(rows))
        if self.monitor is not None:
            self.monitor.finalize_trace(rows_mask)

    def _poll_drift(self, s: int) -> None:
        fired = self.monitor.poll()
        if self._finished is not None:  # a row that ended before its window closed
            fired = fired & ~self._finished
        sparse = self.sparse_rows
        rows = [b for b, f in enumerate(fired.tolist()) if f and sparse[b]]
        if not rows:
            return
        if self.cfg.batch_policy == "shared":
            rows = [b for b in range(self._batch_size) if sparse[b]]
        self.accounting.drift_events(s, rows)
        self.schedule.retrace(rows, s)
        rows_mask = self._row_mask(rows)
        if self._retrace_tokens or self.ring is not None:
            self._retrace_due = rows if self._retrace_tokens else []
            if self.cfg.drift.retrace_blend > 0:
                acc = self.selection.acc
                self._blend_old = [acc.per_token(i) for i in range(self._num_layers)]
        self.selection.acc.reset_rows(rows_mask)
        self.monitor.begin_trace(self._batch_size, self.device, rows=rows_mask)
        if self.ring is not None:
            self._rebuild_from_inputs(s, rows)

    def _rebuild_from_inputs(self, s: int, rows: list[int]) -> None:
        """The `ffn_inputs` re-trace, right at the event: the rows' statistics from the FFN
        hidden activations of their buffered inputs, then their new masks (used from the next
        pass); the drift baseline from the buffered signal of the same tokens (`attn_output`),
        else from the windows that follow (pending)."""
        acc, statistic = self.selection.acc, self._method.statistic

        def update(layer: int, h: torch.Tensor, valid: torch.Tensor) -> None:
            acc.update(layer, statistic(h), valid)

        hidden = [layer._parts.hidden for layer in self._layers]
        used = sum(rebuild_statistics(self.ring, rows, hidden, update, self._batch_size))
        work = [  # gate/up rows of every buffered token, no down
            used * n * hidden_fraction(layer.kind)
            for layer, n in zip(self._layers, self._widths, strict=True)
        ]
        self.accounting.rebuilt_from_inputs(used, work)
        if self.signal_ring is not None:
            replay_signal(self.signal_ring, rows, self.monitor, self._batch_size)
        self._retracing = rows
        self._maybe_build(s)

    def _row_keep_counts(self) -> list[list[int]]:
        """Each row's per-layer keep counts under its current selection (its own budget)."""
        return self.selection.row_keep_counts(len(self.schedule.phase))

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
        if self._finished is not None:
            valid = valid & ~self._finished[:, None]
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
        """Neurons of the recomputed positions (see `Accounting.recomputed`)."""
        self.accounting.recomputed(self.schedule.dense_rows(), self._row_keep_counts(), row_tokens)

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
        tracing = [b for b, p in enumerate(self.schedule.phase) if p == Phase.TRACE]
        if tracing and self.per_token is not None:
            self.schedule.set_all(Phase.SPARSE, self._batch_size)
            self._set_modes()
        elif tracing and self._method.prunes:
            self._build(tracing)
            self._set_modes()

    def repeat_rows(self, rows: torch.Tensor) -> None:
        """Row ``i`` continues row ``rows[i]``'s current masks (the log-likelihood protocol
        scores every continuation of a context in one batch, under its context's masks)."""
        sources = rows.tolist()
        self.schedule.phase = [self.schedule.phase[r] for r in sources]
        self._batch_size = rows.numel()
        self.selection.repeat_rows(sources)  # per-row budgets follow their masks
        dense = torch.tensor(self.schedule.dense_rows(), device=self.device)
        for layer in self._layers:
            if layer.selected and layer.idx.dim() == 2:  # per-sequence masks; shared ones fit
                lengths = None if layer.lengths is None else layer.lengths[rows]
                layer.set_selection(layer.idx[rows], dense, lengths)

    @contextmanager
    def paused(self, batch_size: int) -> Iterator[None]:
        """Forwards of `batch_size` rows outside the schedule: the hooks record nothing and
        advance nothing (no statistics, no drift monitor); the state is restored on exit."""
        schedule = self.schedule
        saved = (self._auto_step, self.monitor, schedule.phase, self._batch_size)
        self._auto_step, self.monitor, schedule.phase = False, None, []
        self._batch_size = batch_size
        try:
            yield
        finally:
            self._auto_step, self.monitor, schedule.phase, self._batch_size = saved

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

        saved_modes = [layer.mode for layer in self._layers]
        self._capture = {}
        for layer in self._layers:
            layer.mode = DENSE
            hooks.append(layer.register_forward_pre_hook(grab))
        try:
            with self.paused(1):
                yield out
        finally:
            for hook in hooks:
                hook.remove()
            self._capture = None
            for layer, mode in zip(self._layers, saved_modes, strict=True):
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
            raise ValueError(f"method {self._method.name!r} has no per-token thresholds")
        missing = [i for i in range(self._num_layers) if i not in captured]
        if missing:
            raise ValueError(f"captured: no calibration data for layers {missing}")
        keeps, thresholds, curves, auto = self.selection.per_token_thresholds(
            mode, self._layers, captured, curve_tokens, curves
        )
        state = {
            "method": self._method.name,
            "fingerprint": self.fingerprint,
            "allocation": cfg.per_token_allocation,
            "total_prune": cfg.prune_target,
            "keeps": keeps,
            "thresholds": thresholds,
            "calibration_tokens": int(captured[0][0].shape[0]),
            "error_curves": {str(i): c for i, c in curves.items()} if auto else {},
        }
        self.load_per_token_state(state)
        return state

    def load_per_token_state(self, state: dict) -> None:
        """Install thresholds calibrated earlier (:meth:`calibrate_per_token`'s state); refused,
        nothing changed, when they were calibrated for another model or method."""
        if self.per_token is None:
            raise ValueError(f"method {self._method.name!r} has no per-token thresholds")
        if state.get("method") != self._method.name:
            raise ValueError(
                f"per-token thresholds: calibrated for method {state.get('method')!r}, this "
                f"handle runs {self._method.name!r}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "per-token thresholds: calibrated for another model (FFN weight fingerprint "
                f"{state.get('fingerprint')!r}, this model's is {self.fingerprint!r})"
            )
        t = torch.tensor(state["thresholds"], dtype=torch.float32)
        if t.shape != (self._num_layers, 2):
            raise ValueError(
                f"per-token thresholds: shape {tuple(t.shape)} is not [{self._num_layers}, 2]"
            )
        for layer, row in zip(self._layers, t, strict=True):
            layer.set_thresholds(row.to(layer.pt_thresholds.device))
        self._per_token_state = dict(state)
        self.frozen = True

    def _bytes_read(self) -> dict:
        """The share of FFN weight bytes read per decoded token: measured by the per-token
        FFNs' meters; for mask methods the kept neurons' share (decode passes, or the masks)."""
        if self.per_token is not None:
            read = sum(float(layer.pt_read) for layer in self._layers)
            dense = sum(float(layer.pt_dense) for layer in self._layers)
            return {
                "ffn_bytes_read": read,
                "ffn_bytes_dense": dense,
                "ffn_bytes_read_fraction": read / dense if dense else float("nan"),
            }
        if not self._method.prunes:
            return {"ffn_bytes_read_fraction": 1.0}
        computed = self.accounting.computed_fraction()
        if computed is not None:
            return {"ffn_bytes_read_fraction": computed}
        return {"ffn_bytes_read_fraction": self.selection.kept_neurons() / sum(self._widths)}

    def _per_token_sparsity(self) -> dict:
        """A per-token method's sparsities are of bytes: ``nominal_sparsity`` the share its
        calibrated keeps leave unread, ``effective_sparsity`` the share its tokens left unread
        (the meters); nothing for the mask methods (their neuron counts above)."""
        if self.per_token is None or self._per_token_state is None:
            return {}
        mode, keeps = self.per_token, self._per_token_state["keeps"]
        sizes = [layer.dense_entries * layer.entry_bytes for layer in self._layers]
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
        for layer in self._layers:
            layer.reset_meter()
        self.accounting.reset()
        if self.telemetry is not None:
            self.telemetry.reset()
        if self.monitor is not None and self._batch_size:
            self.monitor.begin_trace(self._batch_size, self.device)

    def drift_history(self) -> list[list[tuple[int, float, float]]]:
        """Per sequence (step, similarity, threshold) at each monitored window."""
        m = self.monitor
        return m.history() if m is not None and m.batch_size else []

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """What ``handle.stats()`` reports: counts and budgets, sparsities, drift events,
        bytes read, extra state (see docs/ARCHITECTURE.md)."""
        sel = self.selection
        counts = sel.counts if sel.counts is not None else list(self._widths)
        total = sum(self._widths)
        rows = sel.row_counts
        state_bytes = {
            "accumulators": sel.acc.state_bytes(),
            "sensitivity": sel.sens.state_bytes(),
            "selections": sum(layer.extra_bytes() for layer in self._layers),
            "proxies": sum(a.numel() * a.element_size() * 2 for a, _ in sel.proxies or []),
            "drift_monitor": self.monitor.state_bytes() if self.monitor else 0,
            "retrace_inputs": sum(
                r.state_bytes() for r in (self.ring, self.signal_ring) if r is not None
            ),
        }
        telemetry = self.telemetry.stats() if self.telemetry is not None else {}
        return {
            "method": self._method.name,
            "backend": self.cfg.backend,
            # per layer: the batch's one budget, or under per-row budgets the rows' mean
            "keep_counts": counts,
            "keep_counts_per_row": [list(r) for r in rows] if rows else None,
            "widths": list(self._widths),
            "nominal_sparsity": 1.0 - sel.kept_neurons() / total,  # a row's mean
            "effective_sparsity": self.accounting.effective_sparsity(),
            **self.accounting.report(),
            **self._bytes_read(),
            **self._per_token_sparsity(),
            "per_token": self._per_token_state,
            **telemetry,
            "sequences": self.counters.sequences,
            "budget_total_prune": self.cfg.prune_target,  # what an auto budget allocated
            "budget_prune_fractions": sel.prune_fractions(),
            "budget_prune_fractions_per_row": (
                [b.prune_fractions for b in sel.row_budgets] if sel.row_budgets else None
            ),
            "extra_state_bytes": state_bytes,
            "extra_state_bytes_total": sum(state_bytes.values()),
        }
