"""Mask telemetry: how well the current mask covers the neurons a token actually uses.

A sparse decode pass never computes the pruned neurons, so whether the mask still holds the
largest activations cannot be seen from the pass itself. With ``DARTConfig.telemetry_every = N``
(0 = off) every N-th decode pass is *measured*: each pruning FFN also computes its dense hidden
vector ``h`` with plain torch on the layer's own weights (outside the kernels, no autograd) and
records, per sparse row and valid token,

* ``recall`` = ``|top-k(|h|) ∩ kept| / k`` with ``k`` = the row's kept count in that layer, and
* ``mass kept`` = ``sum(|h| over kept) / sum(|h|)``.

A measured pass computes every FFN densely on top of the sparse one and reads the results back
to the host when the stats are reported, so it is a diagnostic: the compiled loop
(:mod:`dart.runtime.fast`) refuses it, and off it costs nothing (no probe is installed on the FFNs).
"""

from __future__ import annotations

import torch

__all__ = ["MaskProbe", "mask_recall", "telemetry_metrics"]


def mask_recall(h: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, recall of the top-|h| neurons and the fraction of |h| mass under a mask.

    ``h``: hidden activations ``[B, T, N]``; ``kept``: bool ``[B, N]`` (or ``[1, N]``) of the
    kept neurons, whose per-row count is the ``k`` of the top-k. Returns ``(recall, mass)``,
    each ``[B, T]`` float32.
    """
    a = h.detach().float().abs()
    kept = kept.expand(a.shape[0], -1)
    k = kept.sum(-1)  # [B]
    order = a.argsort(dim=-1, descending=True)  # ranks by |h|: the top-k of row b is order[:k_b]
    in_top = torch.arange(a.shape[-1], device=a.device) < k[:, None, None]
    hits = (kept[:, None, :].expand_as(a).gather(-1, order) & in_top).sum(-1)
    recall = hits.float() / k[:, None].clamp_min(1).float()
    mass = (a * kept[:, None, :]).sum(-1) / a.sum(-1).clamp_min(1e-30)
    return recall, mass


class MaskProbe:
    """Per-layer sums of recall and mass kept over the measured (row, token) pairs.

    The controller arms it for a measured pass (:meth:`arm` with the rows running sparse and the
    valid tokens); the FFNs call :meth:`record` with their dense ``h`` and mask.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.recall_sum = [0.0] * self.num_layers
        self.mass_sum = [0.0] * self.num_layers
        self.count = [0] * self.num_layers
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.passes = 0

    def arm(self, rows: torch.Tensor, valid: torch.Tensor | None) -> None:
        """The next pass is measured for the bool ``rows [B]``; ``valid [B, T]`` or None."""
        self._rows, self._valid = rows, valid
        self.passes += 1

    @torch.no_grad()
    def record(self, layer: int, h: torch.Tensor, mask: torch.Tensor) -> None:
        """``h [B, T, N]`` of a pruning layer and its 0/1 ``mask [1 or B, 1, N]``."""
        recall, mass = mask_recall(h, mask[:, 0] > 0)
        use = self._rows.to(h.device)[:, None].expand_as(recall)
        if self._valid is not None:
            use = use & self._valid.to(device=h.device, dtype=torch.bool)
        # kept on device until stats() is asked for: no host sync inside the pass
        self._pending.append((layer, (recall * use).sum(), (mass * use).sum(), use.sum()))

    def _flush(self) -> None:
        for layer, r, m, n in self._pending:
            self.recall_sum[layer] += float(r)
            self.mass_sum[layer] += float(m)
            self.count[layer] += int(n)
        self._pending = []

    def stats(self) -> dict:
        """``mask_recall`` / ``mask_mass_kept`` (means over measured row-tokens of every pruning
        layer), their per-layer lists (None for a layer never measured: it did not prune) and
        ``telemetry_passes``."""
        self._flush()

        def mean(sums: list[float]) -> list[float | None]:
            return [s / n if n else None for s, n in zip(sums, self.count, strict=True)]

        total = sum(self.count)
        return {
            "mask_recall": sum(self.recall_sum) / total if total else None,
            "mask_recall_per_layer": mean(self.recall_sum),
            "mask_mass_kept": sum(self.mass_sum) / total if total else None,
            "mask_mass_kept_per_layer": mean(self.mass_sum),
            "telemetry_passes": self.passes,
        }


# Scalar stats logged by the LightningModule (besides the telemetry ones, when measured).
_LOGGED = ("effective_sparsity", "drift_events_per_100_tokens", "mask_recall", "mask_mass_kept")


def telemetry_metrics(stats: dict) -> dict[str, float]:
    """The loggable numbers of ``handle.stats()``: the scalars of ``_LOGGED`` that are set, plus
    ``effective_sparsity/layer_i`` and ``mask_recall/layer_i`` per layer (flat names, floats)."""
    out = {k: float(stats[k]) for k in _LOGGED if stats.get(k) is not None}
    for i, v in enumerate(stats.get("effective_sparsity_per_layer") or []):
        out[f"effective_sparsity/layer_{i}"] = float(v)
    for i, v in enumerate(stats.get("mask_recall_per_layer") or []):
        if v is not None:
            out[f"mask_recall/layer_{i}"] = float(v)
    return out
