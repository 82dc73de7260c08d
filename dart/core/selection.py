"""Mask selection (spec sections 2-3): from the statistics a trace collected to the neurons each
layer keeps, installed in the `DARTFFN` modules.

:class:`Selection` owns the statistics (activation accumulators, layer sensitivities), the keep
counts (fixed ones from the config, ``auto`` budgets allocated from the sensitivities: one for
the batch or one per row) and the choice of neurons (the method's score or the ranking of
:mod:`dart.core.scoring`, then top-k or the threshold strategy). It knows nothing of the
schedule: :class:`dart.core.controller.Controller` says which rows to build and when.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .budget import BudgetAllocation, allocate_budget, allocate_budgets, max_keep_counts
from .config import DARTConfig, resolve_keep_counts
from .ffn import DARTFFN
from .methods import Method
from .per_token import PerTokenMode, allocate_keeps, calibrate_layer_curves, layer_thresholds
from .scoring import (
    ActivationAccumulator,
    SensitivityAccumulator,
    rank_scores,
    select_threshold,
    select_topk,
    shared_scores,
)

__all__ = ["Selection", "top_per_row"]


class Selection:
    """The statistics and keep counts of one model's layers (``widths``), and the mask builds.

    ``proxies[l]`` is the output proxy ``(Pmax, Pmean)`` of layer l's ranking (None: magnitude
    ranking); ``topk_fn`` the top-k kernel (None: torch).
    """

    def __init__(
        self,
        config: DARTConfig,
        method: Method,
        widths: list[int],
        proxies: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        topk_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        self.cfg = config
        self.method = method
        self.widths = list(widths)
        self.proxies = proxies
        self.topk_fn = topk_fn
        self.keeps = config.layer_keeps(self.widths)
        self.fixed_counts = config.fixed_keep_counts(self.widths)
        self.counts: list[int] | None = self.fixed_counts
        self.budget: BudgetAllocation | None = None  # the last auto allocation, for reports
        # per-row `auto` budgets (batch_policy per_sequence): each row's own counts [B][L] and
        # allocations; `counts` then holds the per-layer mean over the rows (batch reports)
        self.row_counts: list[list[int]] | None = None
        self.row_budgets: list[BudgetAllocation] | None = None
        ema = config.ema_decay if method.uses_ema else None
        self.acc = ActivationAccumulator(self.widths, ema_decay=ema)
        self.sens = SensitivityAccumulator(len(self.widths), config.budget.sensitivity)
        self.generator = torch.Generator().manual_seed(config.seed)

    @property
    def shared_mask(self) -> bool:
        return self.cfg.batch_policy == "shared" or self.method.shared_mask

    @property
    def per_row_budgets(self) -> bool:
        """Each row's `auto` budget from its own statistics (so batch-mates cannot change a
        sequence's output); `shared` keeps one budget for the batch. The threshold strategy
        picks its own counts and keeps the batch-wide path."""
        return self.fixed_counts is None and not self.shared_mask and self.cfg.strategy == "topk"

    def reset(self, batch_size: int, device: torch.device) -> None:
        """New sequences: fixed counts again, zeroed statistics."""
        self.counts = self.fixed_counts
        self.row_counts = self.row_budgets = None
        self.acc.reset(batch_size, device)
        self.sens.reset(batch_size, device)

    def row_keep_counts(self, batch_size: int) -> list[list[int]]:
        """Each row's per-layer keep counts under its current selection (its own budget)."""
        if self.row_counts is not None:
            return self.row_counts
        counts = self.counts if self.counts is not None else self.widths
        return [list(counts)] * batch_size

    def repeat_rows(self, sources: list[int]) -> None:
        """Row ``i`` takes row ``sources[i]``'s per-row budget (if any)."""
        if self.row_counts is not None:
            self.row_counts = [self.row_counts[r] for r in sources]
            self.row_budgets = [self.row_budgets[r] for r in sources]

    def allocate(self, rows_mask: torch.Tensor) -> None:
        """The `auto` keep counts: one budget over the rows being traced (shared), or one per
        row from that row's own sensitivities (per sequence)."""
        target = self.cfg.prune_target
        if not self.per_row_budgets:
            scores = self.sens.scores(rows_mask)
            self.budget = allocate_budget(scores, self.widths, target, self.cfg.budget)
            self.counts = resolve_keep_counts(self.keeps, self.widths, self.budget.keep_counts)
            return
        batch_size = rows_mask.shape[0]
        one_hot = torch.eye(batch_size, dtype=torch.bool, device=rows_mask.device)
        scores = torch.stack([self.sens.scores(row) for row in one_hot])  # [B, L]
        self.row_budgets = allocate_budgets(scores, self.widths, target, self.cfg.budget)
        self.row_counts = [
            resolve_keep_counts(self.keeps, self.widths, b.keep_counts) for b in self.row_budgets
        ]
        self.budget = None
        self.counts = [
            round(sum(layer) / len(layer)) for layer in zip(*self.row_counts, strict=True)
        ]

    def max_counts(self) -> list[int]:
        """kmax per layer: the most any row's budget can keep, from the config alone, so the
        padded idx [B, kmax] has the same shape alone and in any batch (no recompiles)."""
        auto = max_keep_counts(self.widths, self.cfg.prune_target, self.cfg.budget)
        return resolve_keep_counts(self.keeps, self.widths, auto)

    def build(
        self,
        layers: list[DARTFFN],
        rows: list[int],
        rows_mask: torch.Tensor,
        dense_rows: torch.Tensor,
    ) -> None:
        """Select and install the masks of ``rows`` (``rows_mask`` [B] bool) in every layer;
        ``dense_rows`` [B] bool marks the rows that run dense after the build (their mask rows
        all ones). Other rows keep their current selection."""
        if self.counts is None:
            self.allocate(rows_mask)
        shared = self.shared_mask
        batch_size = rows_mask.shape[0]
        device = rows_mask.device
        per_row = self.row_counts is not None
        kmax = self.max_counts() if per_row else self.counts
        for layer_index, layer in enumerate(layers):
            width = self.widths[layer_index]
            lengths = None
            if per_row:
                counts = [row[layer_index] for row in self.row_counts]
                if min(counts) >= width:
                    continue
                if max(counts) > kmax[layer_index]:  # an invariant of max_keep_counts
                    raise RuntimeError(f"layer {layer_index}: counts {counts} exceed kmax")
                lengths = torch.tensor(counts, dtype=torch.int64, device=device)
            elif self.counts[layer_index] >= width:
                continue
            idx = self.select(layer_index, layer, kmax[layer_index], shared, lengths)
            if not shared and layer.selected and len(rows) < batch_size:
                merged = layer.idx.clone()
                merged[rows_mask] = idx[rows_mask]
                idx = merged
            layer.set_selection(idx, None if shared else dense_rows, lengths)

    def select(
        self,
        layer_index: int,
        layer: DARTFFN,
        k: int,
        shared: bool,
        lengths: torch.Tensor | None = None,
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
        if lengths is not None:
            return top_per_row(scores, k, lengths)
        if self.cfg.strategy == "auto" and not layer.selected:
            idx, _ = select_threshold(scores, self.topk_fn)
        else:
            k = layer.keep if self.cfg.strategy == "auto" else k
            idx = select_topk(scores, k, self.topk_fn)
        return idx[0] if shared else idx

    @torch.no_grad()
    def per_token_thresholds(
        self,
        mode: PerTokenMode,
        layers: list[DARTFFN],
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]],
        curve_tokens: int,
        curves: dict[int, list[float]] | None,
    ) -> tuple[list[float], list[list[float]], dict[int, list[float]], list[int]]:
        """A per-token method's per-layer keeps and thresholds from the calibration data
        ``captured`` (layer -> ``(x, r)``, see ``Controller.capturing``): ``auto`` layers share
        the byte budget ``total_prune`` by ``per_token_allocation`` (the greedy one measures each
        layer's error curve on ``curve_tokens`` evenly spaced tokens, unless ``curves`` has it),
        fraction/count layers keep that share of every knob, dense layers keep all. Returns
        ``(keeps, thresholds, curves, auto layers)``."""
        keeps: list[float | None] = []
        for keep, n in zip(self.keeps, self.widths, strict=True):
            value = {"dense": 1.0, "fraction": keep.value, "auto": None}.get(keep.kind)
            keeps.append(keep.value / n if keep.kind == "count" else value)
        auto = [i for i, k in enumerate(keeps) if k is None]
        if auto:
            all_sizes = [f.dense_entries * f.entry_bytes for f in layers]  # weight bytes
            sizes = [all_sizes[i] for i in auto]
            fixed = [i for i in range(len(layers)) if i not in auto]
            # the auto layers read what the target leaves after the fixed layers' reads
            budget = (1.0 - self.cfg.prune_target) * sum(all_sizes) - sum(
                all_sizes[i] * mode.read_fraction([keeps[i]] * len(mode.knobs)) for i in fixed
            )
            read = budget / sum(sizes)
            curves = {int(k): v for k, v in (curves or {}).items()}
            if self.cfg.per_token_allocation == "greedy":
                for i in auto:
                    if i in curves:
                        continue
                    x, r = captured[i]
                    pick = torch.linspace(0, x.shape[0] - 1, min(curve_tokens, x.shape[0]))
                    pick = pick.round().long().to(x.device)
                    layer = layers[i]
                    curves[i] = calibrate_layer_curves(
                        mode, layer.parts, x[pick], r[pick], layer.pt_scale
                    )
            chosen = allocate_keeps(
                mode,
                [curves.get(i, [0.0]) for i in auto],
                sizes,
                read,
                self.cfg.per_token_allocation,
            )
            for i, k in zip(auto, chosen, strict=True):
                keeps[i] = k
        thresholds = []
        for i, layer in enumerate(layers):
            x, _ = captured[i]
            thresholds.append(layer_thresholds(mode, layer.parts, x, keeps[i], layer.pt_scale))
        return keeps, thresholds, curves if auto else {}, auto

    def kept_neurons(self) -> float:
        """Neurons kept per token over all layers (per-row budgets: a row's mean)."""
        counts = self.counts if self.counts is not None else self.widths
        rows = self.row_counts
        return sum(map(sum, rows)) / len(rows) if rows else sum(counts)

    def prune_fractions(self) -> list[float] | None:
        """The auto budget's per-layer prune fractions (per-row budgets: the rows' mean)."""
        if self.row_budgets:
            fractions = [b.prune_fractions for b in self.row_budgets]
            return [sum(layer) / len(layer) for layer in zip(*fractions, strict=True)]
        return self.budget.prune_fractions if self.budget else None


def top_per_row(scores: torch.Tensor, kmax: int, lengths: torch.Tensor) -> torch.Tensor:
    """`[B, kmax]` int64: row b's top `lengths[b]` scores' indices, ascending, then 0 padding.

    The same neurons `select_topk(scores[b], lengths[b])` keeps (ties to the lower index, NaN
    as -inf), computed for the whole batch in one sort, whatever the other rows hold."""
    s = torch.where(torch.isnan(scores), float("-inf"), scores)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :kmax]
    width = scores.shape[-1]
    kept = torch.arange(kmax, device=scores.device) < lengths.to(scores.device)[:, None]
    idx = torch.sort(torch.where(kept, top, width), dim=-1).values
    return torch.where(idx == width, 0, idx)
