"""The accounting of a DART run: what the decode tokens computed (neurons per layer, dense
tokens, re-traced tokens), how often masks were built and drift fired, and the figures
``handle.stats()`` derives from them (effective sparsity, drift events per 100 tokens).

Host-side sums only, updated once per pass (never per token inside the FFNs);
:class:`dart.core.controller.Controller` calls it with the schedule's phases and the
selection's keep counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Accounting", "Counters"]


@dataclass
class Counters:
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


class Accounting:
    """The :class:`Counters` of one controller over layers of ``widths`` neurons."""

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)
        self.counters = Counters()

    def reset(self) -> None:
        """Forget every count (a new object: holders of the old one can tell)."""
        self.counters = Counters()

    def _layers(self) -> list[float]:
        c = self.counters
        if not c.layer_neurons:
            c.layer_neurons = [0.0] * len(self.widths)
        return c.layer_neurons

    def decode_pass(self, dense: list[bool], row_counts: list[list[int]]) -> None:
        """One decode pass: row b computed its ``row_counts[b]`` neurons per layer, or all of
        them where ``dense[b]``."""
        c = self.counters
        c.decode_passes += 1
        total = float(sum(self.widths))
        layers = self._layers()
        for is_dense, counts in zip(dense, row_counts, strict=True):
            row = self.widths if is_dense else counts
            c.decode_neurons += float(sum(row))
            c.decode_capacity += total
            for i, k in enumerate(row):
                layers[i] += k
        c.decode_tokens += len(dense)
        c.dense_tokens += sum(dense)

    def recomputed(
        self, dense: list[bool], row_counts: list[list[int]], row_tokens: list[int]
    ) -> None:
        """Neurons of positions recomputed by a look-back re-trace: dense for the re-trace
        rows, under their masks for the others (work done and thrown away). They add to the
        work of the decode tokens, not to their number, so effective sparsity drops with every
        recomputed token."""
        c = self.counters
        layers = self._layers()
        for b, tokens in enumerate(row_tokens):
            c.dense_tokens += tokens if dense[b] else 0
            for i, (k, n) in enumerate(zip(row_counts[b], self.widths, strict=True)):
                layers[i] += tokens * (n if dense[b] else k)
                c.decode_neurons += tokens * (n if dense[b] else k)

    def rebuilt_from_inputs(self, tokens: int, layer_work: list[float]) -> None:
        """An ``ffn_inputs`` re-trace over ``tokens`` buffered tokens: ``layer_work[i]`` neurons'
        worth of hidden-only work in layer i (gate/up rows, no down). It adds to the work of the
        decode tokens, in dense-token units to ``dense_tokens``."""
        c = self.counters
        c.retraced_tokens += tokens
        layers = self._layers()
        for i, work in enumerate(layer_work):
            layers[i] += work
        total = float(sum(layer_work))
        c.decode_neurons += total
        c.dense_tokens += total / sum(self.widths)

    def mask_builds(self, rows: int) -> None:
        self.counters.mask_builds += rows

    def drift_events(self, step: int, rows: list[int]) -> None:
        c = self.counters
        for b in rows:
            c.drift_events.append((step, b))
        c.refreshes += len(rows)

    def layer_sparsity(self) -> list[float]:
        """Per layer, the fraction of its neurons not computed over the decode tokens."""
        c = self.counters
        if not c.decode_tokens:
            return [0.0] * len(self.widths)
        return [
            1.0 - neurons / (c.decode_tokens * n)
            for neurons, n in zip(c.layer_neurons, self.widths, strict=True)
        ]

    def effective_sparsity(self) -> float:
        c = self.counters
        return 1.0 - c.decode_neurons / c.decode_capacity if c.decode_capacity else 0.0

    def computed_fraction(self) -> float | None:
        """Neurons computed over what a dense model computes on the decode tokens (None
        before the first decode pass)."""
        c = self.counters
        return c.decode_neurons / c.decode_capacity if c.decode_capacity else None

    def report(self) -> dict[str, Any]:
        """The counters' part of ``handle.stats()``, in its order (see the controller)."""
        c = self.counters
        tokens = c.decode_tokens
        return {
            "decode_passes": c.decode_passes,
            "mask_builds": c.mask_builds,
            "mask_refreshes": c.refreshes,
            "selection_seconds": c.selection_seconds,
            "effective_sparsity_per_layer": self.layer_sparsity(),
            "decode_tokens": tokens,
            "drift_events": [{"step": s, "row": b} for s, b in c.drift_events],
            "drift_events_per_100_tokens": (
                100.0 * len(c.drift_events) / tokens if tokens else 0.0
            ),
            "dense_token_computations": c.dense_tokens,
            "dense_token_computations_per_token": c.dense_tokens / tokens if tokens else 0.0,
            "retraced_tokens": c.retraced_tokens,
        }
