"""Neuron scoring (spec section 2): activation accumulators (L2 / EMA), the static output proxy
and its disk cache, ranking methods, top-k and threshold selection, and the layer-sensitivity
statistics used by ``auto`` budgets. (A method's transform of the activations before they are
accumulated, e.g. GRIFFIN's, is part of the method: :mod:`dart.core.methods`.)

All accumulators keep per-layer, per-sequence state in fp32 tensors; updates are batched over the
sequence and time dimensions with no host synchronisation.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor

from .config import SENSITIVITIES

__all__ = [
    "RANKINGS",
    "ActivationAccumulator",
    "ProxyCache",
    "Ranking",
    "SensitivityAccumulator",
    "get_ranking",
    "output_proxy",
    "rank_scores",
    "select_threshold",
    "select_topk",
    "shared_scores",
    "weight_fingerprint",
]

T = TypeVar("T")


def _valid_mask(valid: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    if valid is None:
        return torch.ones(b, t, dtype=torch.bool, device=device)
    if valid.shape != (b, t):
        raise ValueError(f"valid: shape {tuple(valid.shape)} does not match [B, T] = [{b}, {t}]")
    return valid.to(device=device, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Activation accumulators


class ActivationAccumulator:
    """Per-layer, per-sequence neuron magnitudes ``m`` of the FFN hidden activation.

    State is one fp32 tensor ``[B, N_l]`` per layer (widths may differ across layers).

    * L2 mode (``ema_decay=None``): ``m = sqrt(sum_t a_t^2)`` over all valid tokens seen since
      the last reset (activations are cast to fp32 before squaring).
    * EMA mode (``ema_decay=d``): the first update of a sequence (no tokens seen yet) with
      ``T_b`` valid tokens sets ``m = sum_t w_t |a_t|``, ``w_t ∝ d^j`` where ``j`` is the number of
      valid tokens of that sequence after ``t`` (so any padding layout works), normalised to sum
      to 1. Every later update is a *continuation*: the recursion ``m <- d m + (1-d)|a_t|`` is
      applied token by token in closed form, ``m <- d^T_b m + (1-d) sum_t d^j |a_t|``; for one
      decode token this is exactly ``m <- d m + (1-d)|a_t|``. A chunked prefill therefore equals
      "first chunk normalised, then the recursion", not one normalised prefill.
    """

    def __init__(self, widths: Sequence[int], ema_decay: float | None = None) -> None:
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay: {ema_decay!r} is not None or in (0, 1)")
        self.widths = [int(n) for n in widths]
        self.ema_decay = ema_decay
        self._state: list[Tensor] = []
        self._counts: list[Tensor] = []
        self.batch_size = 0

    @property
    def num_layers(self) -> int:
        return len(self.widths)

    def reset(self, batch_size: int, device: torch.device | str | None = None) -> None:
        """Allocate zeroed state for ``batch_size`` sequences."""
        self.batch_size = batch_size
        self._state = [
            torch.zeros(batch_size, n, dtype=torch.float32, device=device) for n in self.widths
        ]
        self._counts = [
            torch.zeros(batch_size, dtype=torch.int64, device=device) for _ in self.widths
        ]

    def reset_rows(self, mask: Tensor) -> None:
        """Zero the state of the sequences where ``mask`` (``BoolTensor[B]``) is true."""
        keep = ~mask.to(dtype=torch.bool, device=self._state[0].device)
        for s, c in zip(self._state, self._counts, strict=True):
            s.mul_(keep[:, None])
            c.mul_(keep)

    def update(self, layer: int, h: Tensor, valid: Tensor | None = None) -> None:
        """Accumulate ``h [B, T, N]`` (FFN hidden activations) over the valid tokens."""
        state = self._state[layer]
        if h.dim() != 3 or h.shape[0] != state.shape[0] or h.shape[2] != state.shape[1]:
            raise ValueError(
                f"h: shape {tuple(h.shape)} is not [B, T, N] = [{state.shape[0]}, T, "
                f"{state.shape[1]}] for layer {layer}"
            )
        b, t, _ = h.shape
        v = _valid_mask(valid, b, t, h.device)
        a = torch.where(v[..., None], h.float(), 0.0)
        counts = self._counts[layer]
        n_new = v.sum(1)
        if self.ema_decay is None:
            state.add_(a.square().sum(1))
        else:
            d = self.ema_decay
            a = a.abs()
            # j = number of valid tokens after t in the same row
            after = v.flip(1).cumsum(1).flip(1) - v.long()
            w = torch.where(v, torch.pow(d, after.float()), 0.0)
            s = torch.einsum("bt,btn->bn", w, a)
            dt = torch.pow(d, n_new.float())  # d^T_b
            fresh = (counts == 0) & (n_new > 0)
            norm = w.sum(1).clamp_min(torch.finfo(torch.float32).tiny)
            cont = dt[:, None] * state + (1.0 - d) * s
            state.copy_(torch.where(fresh[:, None], s / norm[:, None], cont))
        counts.add_(n_new)

    def magnitudes(self, layer: int) -> Tensor:
        """``m`` of ``layer``: ``Tensor[B, N]`` fp32 (sqrt of the sum of squares in L2 mode)."""
        s = self._state[layer]
        return s.sqrt() if self.ema_decay is None else s.clone()

    def per_token(self, layer: int) -> Tensor:
        """``m`` per token seen, ``Tensor[B, N]`` fp32: the RMS over the tokens in L2 mode
        (``m / sqrt(n)``), ``m`` itself in EMA mode (already a weighted mean)."""
        if self.ema_decay is not None:
            return self._state[layer].clone()
        n = self._counts[layer].clamp_min(1)[:, None].float()
        return (self._state[layer] / n).sqrt()

    def blend_rows(self, rows: Tensor, old: Sequence[Tensor], weight: float) -> None:
        """For ``rows``: make :meth:`per_token` ``weight * old + (1 - weight) * per_token``
        (``old``: an earlier :meth:`per_token` of every layer), keeping the token counts."""
        r = rows.to(dtype=torch.bool, device=self._state[0].device)[:, None]
        for layer, (s, c) in enumerate(zip(self._state, self._counts, strict=True)):
            mixed = weight * old[layer] + (1.0 - weight) * self.per_token(layer)
            if self.ema_decay is None:
                mixed = mixed.square() * c.clamp_min(1)[:, None].float()
            s.copy_(torch.where(r, mixed, s))

    def state_bytes(self) -> int:
        """Bytes of the per-neuron state (``[B, N_l]`` fp32 per layer)."""
        return sum(s.numel() * s.element_size() for s in self._state)


# --------------------------------------------------------------------------------------------
# Output proxy


@torch.no_grad()
def output_proxy(
    w_down_t: Tensor, embedding: Tensor, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Per-neuron ``(Pmax, Pmean)`` of ``|V|`` with ``V = w_down_t @ embedding.T`` (``N x V``),
    computed over vocabulary chunks in fp32 without materialising ``V``."""
    if w_down_t.dim() != 2 or embedding.dim() != 2 or w_down_t.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"w_down_t {tuple(w_down_t.shape)} and embedding {tuple(embedding.shape)} must be "
            "[N, d] and [V, d] with the same d"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} is not >= 1")
    w = w_down_t.float()
    n, vocab = w.shape[0], embedding.shape[0]
    pmax = torch.zeros(n, dtype=torch.float32, device=w.device)
    psum = torch.zeros(n, dtype=torch.float64, device=w.device)
    for start in range(0, vocab, chunk_size):
        e = embedding[start : start + chunk_size].to(device=w.device, dtype=torch.float32)
        block = (w @ e.T).abs_()
        pmax = torch.maximum(pmax, block.amax(1))
        psum += block.sum(1, dtype=torch.float64)
    return pmax, (psum / max(vocab, 1)).float()


def weight_fingerprint(w: Tensor, samples: int = 64) -> str:
    """A cheap identity string of a weight: shape, dtype, sum and a few strided samples."""
    flat = w.detach().reshape(-1)
    idx = torch.linspace(0, max(flat.numel() - 1, 0), steps=min(samples, flat.numel())).long()
    vals = flat[idx.to(flat.device)].double().cpu().tolist() if flat.numel() else []
    total = float(flat.double().sum()) if flat.numel() else 0.0
    return f"{tuple(w.shape)}|{w.dtype}|{total:.10e}|" + ",".join(f"{v:.8e}" for v in vals)


class ProxyCache:
    """On-disk cache of output proxies: one ``.pt`` file per key hash.

    Folder: ``root`` if given, else ``$DART_CACHE/proxy`` if the ``DART_CACHE`` environment
    variable is set, else ``~/.cache/dart/proxy``. Writes are atomic (temp file +
    ``os.replace``); an unreadable entry is recomputed.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            base = os.environ.get("DART_CACHE")
            root = Path(base) / "proxy" if base else Path.home() / ".cache" / "dart" / "proxy"
        self.root = Path(root)

    @staticmethod
    def key(key_parts: Sequence[Any]) -> str:
        """sha256 of the parts, e.g. ``(model_id, layer, source, weight_fingerprint(w))``."""
        h = hashlib.sha256()
        for part in key_parts:
            h.update(repr(part).encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def path(self, key_parts: Sequence[Any]) -> Path:
        return self.root / f"{self.key(key_parts)}.pt"

    def get_or_compute(
        self,
        key_parts: Sequence[Any],
        fn: Callable[[], T],
        map_location: torch.device | str | None = "cpu",
    ) -> T:
        """Return the cached value for ``key_parts`` or compute it with ``fn()`` and store it."""
        p = self.path(key_parts)
        if p.exists():
            try:
                return torch.load(p, map_location=map_location, weights_only=True)
            except Exception:  # corrupt or incompatible entry: recompute
                pass
        value = fn()
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return value


# --------------------------------------------------------------------------------------------
# Ranking and selection


@dataclass(frozen=True)
class Ranking:
    """One way to score neurons from their magnitudes ``m [B, N]`` (fp32) and the output
    proxies ``(Pmax, Pmean)`` (each ``[N]``): ``score(m, pmax, pmean)``; ``needs`` names the
    proxies it reads (``pmax``, ``pmean``), checked by :func:`rank_scores`."""

    name: str
    description: str
    needs: tuple[str, ...]
    score: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]


_RANKINGS = (
    Ranking("magnitude", "the magnitude m", (), lambda m, pmax, pmean: m),
    Ranking("max", "Pmax m", ("pmax",), lambda m, pmax, pmean: pmax.float() * m),
    Ranking("mean", "Pmean m", ("pmean",), lambda m, pmax, pmean: pmean.float() * m),
    Ranking(
        "combined",
        "(Pmax + Pmean) m",
        ("pmax", "pmean"),
        lambda m, pmax, pmean: (pmax.float() + pmean.float()) * m,
    ),
    Ranking(
        "product",
        "Pmax Pmean m^2",
        ("pmax", "pmean"),
        lambda m, pmax, pmean: pmax.float() * pmean.float() * m.square(),
    ),
)

RANKINGS: Mapping[str, Ranking] = MappingProxyType({r.name: r for r in _RANKINGS})


def get_ranking(name: str) -> Ranking:
    """The registered ranking called ``name``; a ValueError listing the names otherwise."""
    try:
        return RANKINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"ranking: {name!r} is not one of {', '.join(RANKINGS)}") from None


def rank_scores(
    method: str, m: Tensor, pmax: Tensor | None = None, pmean: Tensor | None = None
) -> Tensor:
    """Neuron scores ``[B, N]`` by the ranking called ``method`` (:data:`RANKINGS`, spec
    table): magnitude ``m``; max ``Pmax m``; mean ``Pmean m``; combined ``(Pmax + Pmean) m``;
    product ``Pmax Pmean m^2``."""
    ranking = get_ranking(method)
    m = m.float()
    given = {"pmax": pmax, "pmean": pmean}
    for name in ranking.needs:
        p = given[name]
        if p is None:
            raise ValueError(f"ranking {method!r} needs {name} (the output proxy)")
        if p.shape != (m.shape[-1],):
            raise ValueError(f"{name}: shape {tuple(p.shape)} is not [N] = [{m.shape[-1]}]")
    return ranking.score(m, pmax, pmean)


def _nan_to_neginf(scores: Tensor) -> Tensor:
    s = scores.float()
    return torch.where(torch.isnan(s), float("-inf"), s)


def select_topk(
    scores: Tensor, k: int, topk_fn: Callable[[Tensor, int], Tensor] | None = None
) -> Tensor:
    """Indices of the ``k`` largest scores per row, sorted ascending, int64 ``[..., k]``.

    Ties go to the lower index, NaN counts as ``-inf``. ``topk_fn`` (e.g.
    ``torch.ops.dart.topk_indices``) replaces the torch implementation with the same contract.
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k: {k} is not in [1, {n}] (number of neurons)")
    if topk_fn is not None:
        return topk_fn(scores, k)
    s = _nan_to_neginf(scores)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def select_threshold(
    scores: Tensor, topk_fn: Callable[[Tensor, int], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Strategy ``auto``: keep neurons whose score is >= the row mean.

    Returns ``(idx [B, k_max], counts [B])``. Kernels need one ``k`` per batch, so
    ``k_max = max(counts)`` and every row keeps its top ``k_max`` neurons: a superset of its own
    qualifying neurons (rows with fewer qualifying neurons keep extra, next-best ones).
    ``counts`` holds each row's true number. NaN scores are ignored by the mean and never
    qualify. Reading ``k_max`` is one host sync per mask build (not per token).
    """
    s = scores.float()
    mean = torch.nanmean(s, dim=-1, keepdim=True)
    counts = (s >= mean).sum(-1)
    k_max = int(counts.max().clamp_min(1)) if counts.numel() else 1
    return select_topk(scores, k_max, topk_fn), counts


def shared_scores(m: Tensor, valid_rows: Tensor | None = None, ema: bool = False) -> Tensor:
    """Batch-shared magnitudes ``[1, N]`` over the rows in ``valid_rows`` (default: all).

    L2 mode: ``sqrt(sum_b m_b^2)`` (the L2 norm over all tokens of all sequences); EMA mode
    (``ema=True``): the mean of ``m_b``. No valid row gives zeros.
    """
    m = m.float()
    if valid_rows is None:
        w = torch.ones(m.shape[0], dtype=torch.float32, device=m.device)
    else:
        w = valid_rows.to(device=m.device, dtype=torch.float32)
    if ema:
        return (w @ m / w.sum().clamp_min(1.0))[None]
    return (w @ m.square()).sqrt()[None]


# --------------------------------------------------------------------------------------------
# Layer sensitivity (auto budgets)


class SensitivityAccumulator:
    """Per-layer FFN sensitivity ``S_l = (1 - mean c) * mean g`` (spec section 3, step 1).

    Per valid token: ``c = cos(r, r + f)`` (mode ``residual``) or ``cos(r, f)`` (mode ``raw``,
    the reference code), ``g = ||f|| / ||r||``. Tokens with ``||r|| = 0`` (or non-finite values)
    are skipped. Sums and counts are kept per layer and per sequence (``[L, B]``, fp32); a layer
    with no counted token has ``S = 0``.
    """

    def __init__(self, num_layers: int, mode: str = "residual", eps: float = 1e-12) -> None:
        if mode not in SENSITIVITIES:
            raise ValueError(f"sensitivity mode: {mode!r} is not one of {', '.join(SENSITIVITIES)}")
        self.num_layers = num_layers
        self.mode = mode
        self.eps = eps
        self.c_sum = torch.zeros(num_layers, 0)
        self.g_sum = torch.zeros(num_layers, 0)
        self.count = torch.zeros(num_layers, 0)

    def reset(self, batch_size: int, device: torch.device | str | None = None) -> None:
        shape = (self.num_layers, batch_size)
        self.c_sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.g_sum = torch.zeros(shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(shape, dtype=torch.float32, device=device)

    def reset_rows(self, mask: Tensor) -> None:
        keep = ~mask.to(dtype=torch.bool, device=self.count.device)
        for t in (self.c_sum, self.g_sum, self.count):
            t.mul_(keep[None])

    def update(self, layer: int, r: Tensor, f: Tensor, valid: Tensor | None = None) -> None:
        """``r``: residual entering the FFN block ``[B, T, d]``; ``f``: FFN output ``[B, T, d]``."""
        if r.shape != f.shape or r.dim() != 3:
            raise ValueError(f"r {tuple(r.shape)} and f {tuple(f.shape)} must both be [B, T, d]")
        b, t, _ = r.shape
        v = _valid_mask(valid, b, t, r.device)
        rf, ff = r.float(), f.float()
        u = rf + ff if self.mode == "residual" else ff
        rn = torch.linalg.vector_norm(rf, dim=-1)
        un = torch.linalg.vector_norm(u, dim=-1)
        fn = torch.linalg.vector_norm(ff, dim=-1) if self.mode == "residual" else un
        c = (rf * u).sum(-1) / (rn.clamp_min(self.eps) * un.clamp_min(self.eps))
        g = fn / rn.clamp_min(self.eps)
        ok = v & (rn > 0) & torch.isfinite(c) & torch.isfinite(g)
        self.c_sum[layer] += torch.where(ok, c, 0.0).sum(1)
        self.g_sum[layer] += torch.where(ok, g, 0.0).sum(1)
        self.count[layer] += ok.sum(1)

    def state_bytes(self) -> int:
        """Bytes of the sums and counts (``[L, B]`` each)."""
        return sum(t.numel() * t.element_size() for t in (self.c_sum, self.g_sum, self.count))

    def scores(self, rows: Tensor | None = None) -> Tensor:
        """``S`` per layer ``[L]`` over all valid tokens of the rows in ``rows`` (default all)."""
        if rows is None:
            cs, gs, n = self.c_sum.sum(1), self.g_sum.sum(1), self.count.sum(1)
        else:
            w = rows.to(device=self.count.device, dtype=torch.float32)
            cs, gs, n = self.c_sum @ w, self.g_sum @ w, self.count @ w
        s = (1.0 - cs / n.clamp_min(1.0)) * (gs / n.clamp_min(1.0))
        return torch.where(n > 0, s, 0.0)
