"""Drift detection (spec section 5): one interface, :class:`DriftMonitor`, two signals.

Per sequence (row ``b`` of a batch) the monitor goes through

1. **trace** (:meth:`DriftMonitor.begin_trace` ... :meth:`DriftMonitor.finalize_trace`): every
   valid token's feature is added to the baseline sum; tokens are also grouped into consecutive
   windows of ``w`` tokens whose means are kept (at most ``max_chunks`` per row: beyond that the
   windows are decimated by keeping every ``2^k``-th one, deterministically).
2. **finalize**: ``baseline`` = mean feature of all trace tokens; ``mu``, ``sigma`` = mean and
   sample standard deviation of the stored trace-window similarities to that baseline;
   ``tau = mu - max(sigma_scale * sigma, threshold_floor)``. A trailing partial window is not
   used. The monitor never arms on fewer than ``min_windows`` (>= 2) complete windows: a row
   whose trace ends with fewer (a short look-back re-trace, a short prompt) becomes
   *pending*: it keeps collecting trace windows from the tokens that follow and is finalized by
   :meth:`DriftMonitor.observe` as soon as it has ``min_windows``; until then it keeps its
   previous baseline and threshold (and is monitored with them when it had any; a row's first
   trace is not monitored before it has a baseline). So a baseline is never one token's feature
   and ``tau`` is always the statistic of at least two windows.
3. **monitor**: new tokens fill a window of ``w`` tokens; at each complete window its mean's
   similarity to the baseline is compared to ``tau``: below -> ``pressure += 1``, else
   ``pressure = max(pressure - 1, 0)``; ``pressure >= pressure_trigger`` sets the row's trigger
   flag and resets its pressure. :meth:`DriftMonitor.poll` returns and clears the flags.

All state is tensors; :meth:`DriftMonitor.observe` does no host synchronisation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from .config import DriftConfig

__all__ = [
    "SIGNALS",
    "AttnContentMonitor",
    "AttnOutputMonitor",
    "AttnProbsMonitor",
    "DriftMonitor",
    "NullMonitor",
    "Signal",
    "distance_bucket_features",
    "get_signal",
    "js_similarity",
    "make_monitor",
    "resolve_watch_layers",
]


def resolve_watch_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Turn ``DriftConfig.layers`` (negative = from the end) into sorted absolute indices."""
    out = set()
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(
                f"DriftConfig.layers: layer {i} is out of range for a model with {num_layers} "
                "layers"
            )
        out.add(j)
    return sorted(out)


def js_similarity(p: Tensor, q: Tensor) -> Tensor:
    """``1 - JS(p, q)`` (base 2, in [0, 1]) over the last dimension of two distributions."""
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    js = 0.5 * (kl_pm + kl_qm) / math.log(2.0)
    return (1.0 - js).clamp(0.0, 1.0)


def _bucket_bounds(num_buckets: int, device: torch.device) -> tuple[Tensor, Tensor]:
    # bucket 0: distance 0; bucket k >= 1: [2^(k-1), 2^k - 1]; the last one is open-ended.
    # Built with device ops (no host-to-device copy, which would synchronise).
    k = torch.arange(num_buckets, device=device)
    one = torch.ones_like(k)
    lo = torch.where(k > 0, one << (k - 1).clamp_min(0), 0)
    hi = torch.where(k == num_buckets - 1, 1 << 62, (one << k) - 1)
    return lo, hi


def distance_bucket_features(
    probs: Tensor, num_buckets: int = 16, positions: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """Attention mass per log-spaced relative-distance bucket, ``[B, T, H, K]``, renormalised.

    ``probs``: attention weights ``[B, H, T, S]`` (rows = the ``T`` new query tokens, ``S`` = key
    length including the cache). ``positions``: key index of each query, ``[T]`` or ``[B, T]``;
    default ``S - T + arange(T)`` (queries are the last ``T`` keys). Buckets cover distances 0, 1,
    2-3, 4-7, ... with the last bucket open-ended.
    """
    if probs.dim() != 4:
        raise ValueError(f"attention probs: shape {tuple(probs.shape)} is not [B, H, T, S]")
    b, h, t, s = probs.shape
    dev = probs.device
    if positions is None:
        positions = torch.arange(s - t, s, device=dev)
    pos = positions.to(device=dev, dtype=torch.long)
    pos = pos.expand(b, t) if pos.dim() == 1 else pos  # [B, T]
    lo_t, hi_t = _bucket_bounds(num_buckets, dev)
    # keys of bucket k for query q: [q - hi_k, q - lo_k] clipped to [0, S-1]
    end = (pos[..., None] - lo_t + 1).clamp(0, s)  # exclusive, [B, T, K]
    start = torch.minimum((pos[..., None] - hi_t).clamp(0, s), end)
    c = torch.nn.functional.pad(probs.float().cumsum(-1), (1, 0))  # [B, H, T, S+1]
    c_end = c.gather(-1, end[:, None].expand(b, h, t, num_buckets))
    c_start = c.gather(-1, start[:, None].expand(b, h, t, num_buckets))
    mass = (c_end - c_start).clamp_min(0.0).transpose(1, 2)  # [B, T, H, K]
    return mass / mass.sum(-1, keepdim=True).clamp_min(eps)


class DriftMonitor(ABC):
    """Batched, per-sequence drift monitor (see the module docstring for the algorithm).

    Subclasses turn the raw signal into features ``[B, T, G, F]`` (``G`` groups, e.g. watched
    layers or heads) and define a similarity in [0, 1] per group, averaged over groups.
    """

    def __init__(self, cfg: DriftConfig, max_chunks: int = 64, history_size: int = 4096) -> None:
        if max_chunks < 2:
            raise ValueError(f"max_chunks: {max_chunks} is not >= 2")
        self.cfg = cfg
        self.window = cfg.window
        self.max_chunks = max_chunks
        self.history_size = history_size
        self.batch_size = 0
        self._allocated_feature: tuple[int, int] | None = None

    # ---------------------------------------------------------------- subclass hooks
    @abstractmethod
    def features(self, feature_input: object, **kwargs: object) -> Tensor:
        """Raw signal -> per-token features ``[B, T, G, F]`` (fp32)."""

    @abstractmethod
    def group_similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """Similarity ``[..., G]`` of features ``[..., G, F]``."""

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """Similarity of features ``[..., G, F]``, averaged over groups -> ``[...]``."""
        return self.group_similarity(a, b).mean(-1)

    # ---------------------------------------------------------------- state
    def begin_trace(
        self, batch_size: int, device: torch.device | str | None = None, rows: Tensor | None = None
    ) -> None:
        """Start a trace window: for all rows (fresh state, history cleared) when ``rows`` is
        None, else restart it only for the rows where ``rows`` is true."""
        if rows is None or self.batch_size != batch_size:
            self.batch_size = batch_size
            self.device = torch.device(device) if device is not None else torch.device("cpu")

            def z(dt: torch.dtype = torch.float32) -> Tensor:
                return torch.zeros(batch_size, dtype=dt, device=self.device)

            self.tracing = torch.ones(batch_size, dtype=torch.bool, device=self.device)
            self.armed = z(torch.bool)  # has a baseline and threshold
            self.pending = z(torch.bool)  # trace ended with < min_windows windows: still tracing
            self.triggered = z(torch.bool)
            self.pressure = z(torch.long)
            self.tau = z()
            self.mu = z()
            self.sigma = z()
            self.steps = z(torch.long)  # valid tokens observed per row since the full reset
            self.trace_n = z(torch.long)
            self.cur_n = z(torch.long)
            self.chunk_total = z(torch.long)  # complete trace windows seen
            self.chunk_stored = z(torch.long)
            self.chunk_stride = torch.ones(batch_size, dtype=torch.long, device=self.device)
            self.hist_n = z(torch.long)
            self.hist_step = torch.zeros(
                batch_size, self.history_size, dtype=torch.long, device=self.device
            )
            self.hist_sim = torch.zeros(batch_size, self.history_size, device=self.device)
            self.hist_tau = torch.zeros(batch_size, self.history_size, device=self.device)
            self._allocated_feature = None  # feature buffers are allocated on first observe
            self._maybe_tracing = True
            self._maybe_monitoring = False
            return
        r = rows.to(device=self.device, dtype=torch.bool)
        self._maybe_tracing = True
        self.tracing |= r
        self.pending &= ~r  # armed rows keep their baseline until the new one has its windows
        self.triggered &= ~r
        for t in (self.pressure, self.trace_n, self.cur_n, self.chunk_total, self.chunk_stored):
            t.masked_fill_(r, 0)
        self.chunk_stride.masked_fill_(r, 1)
        if self._allocated_feature is not None:
            self.trace_sum.masked_fill_(r[:, None, None], 0.0)
            self.cur_sum.masked_fill_(r[:, None, None], 0.0)
            self.chunks.masked_fill_(r[:, None, None, None], 0.0)

    def _ensure_feature_state(self, g: int, f: int) -> None:
        if self._allocated_feature == (g, f):
            return
        if self._allocated_feature is not None:
            raise ValueError(
                f"feature shape changed from {self._allocated_feature} to {(g, f)} (groups, "
                "features) within one trace"
            )
        b, dev = self.batch_size, self.device
        self.trace_sum = torch.zeros(b, g, f, device=dev)
        self.cur_sum = torch.zeros(b, g, f, device=dev)
        self.chunks = torch.zeros(b, self.max_chunks, g, f, device=dev)
        self.baseline = torch.zeros(b, g, f, device=dev)
        self._allocated_feature = (g, f)

    def _windows(self, feat: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """Split ``feat [B, T, G, F]`` (valid ``v``) into windows continuing ``cur_sum``.

        Returns window means ``[B, J, G, F]`` (only ``j < ncomp`` are complete), ``ncomp [B]``
        and the static number ``J`` of windows; ``cur_sum``/``cur_n`` are updated in place.
        """
        b, t, g, f = feat.shape
        w = self.window
        j_max = (w - 1 + t) // w + 1  # static bound on windows touched by this call
        pos = self.cur_n[:, None] + v.long().cumsum(1) - 1  # position in the window stream
        idx = torch.where(v, pos // w, j_max)  # invalid tokens go to a dummy slot
        sums = torch.zeros(b, j_max + 1, g, f, device=feat.device)
        sums.scatter_add_(1, idx[:, :, None, None].expand(b, t, g, f), feat)
        sums[:, 0] += self.cur_sum
        n_tot = self.cur_n + v.sum(1)
        ncomp = n_tot // w
        self.cur_sum.copy_(sums.gather(1, ncomp[:, None, None, None].expand(b, 1, g, f))[:, 0])
        self.cur_n.copy_(n_tot - ncomp * w)
        return sums[:, :j_max] / w, ncomp, j_max

    def observe(self, feature_input: object, valid: Tensor | None = None, **kwargs: object) -> None:
        """Feed the signal of the new tokens (see the subclass for its shape); ``valid``:
        ``BoolTensor[B, T]`` (default all valid). No host synchronisation."""
        feat = self.features(feature_input, **kwargs)
        b, t, g, f = feat.shape
        if b != self.batch_size:
            raise ValueError(f"signal batch {b} != monitor batch {self.batch_size}")
        self._ensure_feature_state(g, f)
        if valid is None:
            v = torch.ones(b, t, dtype=torch.bool, device=feat.device)
        else:
            if valid.shape != (b, t):
                raise ValueError(f"valid: shape {tuple(valid.shape)} is not [B, T] = [{b}, {t}]")
            v = valid.to(device=feat.device, dtype=torch.bool)
        feat = torch.where(v[..., None, None], feat, 0.0)
        steps_before = self.steps.clone()
        self.steps += v.sum(1)

        tr = self.tracing
        mon = self.armed & (~tr | self.pending)  # pending rows: watched with the old baseline
        # Rows are either tracing or monitoring: one pass over windows serves both.
        active = tr | mon
        va = v & active[:, None]
        self.trace_sum += torch.where(tr[:, None, None], feat.sum(1), 0.0)
        self.trace_n += torch.where(tr, v.sum(1), 0)
        means, ncomp, j_max = self._windows(feat, va)

        # -- trace rows: store complete window means (decimated beyond max_chunks). The Python
        # flags (set by begin/finalize, never read from device) skip work that cannot apply.
        if self._maybe_tracing:
            self._store_chunks(means, torch.where(tr, ncomp, 0))
        if self._maybe_monitoring:
            self._monitor(means, ncomp, j_max, mon, va, steps_before)
        if self._maybe_tracing:  # pending rows are tracing rows (a flag that flips recompiles)
            self._finalize(self.pending & (self.chunk_total >= self.cfg.min_windows))

    def _monitor(
        self, means: Tensor, ncomp: Tensor, j_max: int, mon: Tensor, va: Tensor, steps: Tensor
    ) -> None:
        # -- monitoring rows: hysteresis over the complete windows, in order
        sims = self.similarity(means, self.baseline[:, None])  # [B, J]
        first_pos = self.window - (self.cur_n + ncomp * self.window - va.sum(1))
        for j in range(j_max):
            done = mon & (j < ncomp)
            below = sims[:, j] < self.tau
            p = torch.where(below, self.pressure + 1, (self.pressure - 1).clamp_min(0))
            fire = done & (p >= self.cfg.pressure_trigger)
            self.pressure.copy_(torch.where(done, torch.where(fire, 0, p), self.pressure))
            self.triggered |= fire
            self._log(done, steps + first_pos + j * self.window, sims[:, j])

    def _store_chunks(self, means: Tensor, ncomp: Tensor) -> None:
        b, j_max, g, f = means.shape
        c = self.max_chunks
        total = self.chunk_total + ncomp
        needed = (total + c - 1) // c  # stride must be >= ceil(total / C)
        pow2 = torch.exp2(torch.ceil(torch.log2(needed.clamp_min(1).double()))).long()
        stride = torch.maximum(self.chunk_stride, pow2)
        ratio = stride // self.chunk_stride
        # old slot s holds global window s * old_stride; keep those divisible by the new stride
        slots = torch.arange(c, device=means.device)
        keep_old = (slots[None] < self.chunk_stored[:, None]) & (slots[None] % ratio[:, None] == 0)
        dest_old = torch.where(keep_old, slots[None] // ratio[:, None], c)
        # new window j is global window chunk_total + j
        jj = torch.arange(j_max, device=means.device)
        gidx = self.chunk_total[:, None] + jj[None]
        keep_new = (jj[None] < ncomp[:, None]) & (gidx % stride[:, None] == 0)
        dest_new = torch.where(keep_new, gidx // stride[:, None], c)
        buf = torch.zeros(b, c + 1, g, f, device=means.device)
        buf.scatter_(1, dest_old[..., None, None].expand(b, c, g, f), self.chunks)
        buf.scatter_(1, dest_new[..., None, None].expand(b, j_max, g, f), means)
        # a dropped entry may have been scattered last into slot c: it is discarded anyway
        self.chunks.copy_(buf[:, :c])
        self.chunk_total.copy_(total)
        self.chunk_stride.copy_(stride)
        self.chunk_stored.copy_((total + stride - 1) // stride)

    def _log(self, done: Tensor, step: Tensor, sim: Tensor) -> None:
        slot = self.hist_n.clamp_max(self.history_size - 1)[:, None]
        ok = done & (self.hist_n < self.history_size)
        old_step = self.hist_step.gather(1, slot)[:, 0]
        old_sim = self.hist_sim.gather(1, slot)[:, 0]
        old_tau = self.hist_tau.gather(1, slot)[:, 0]
        self.hist_step.scatter_(1, slot, torch.where(ok, step, old_step)[:, None])
        self.hist_sim.scatter_(1, slot, torch.where(ok, sim, old_sim)[:, None])
        self.hist_tau.scatter_(1, slot, torch.where(ok, self.tau, old_tau)[:, None])
        self.hist_n += done.long()

    def finalize_trace(self, rows: Tensor | None = None) -> None:
        """End the trace for ``rows`` (default: every tracing row): baseline, mu, sigma, tau
        for rows with ``min_windows`` complete windows; the others become pending (see the
        module docstring). One host synchronisation (rare: once per mask build)."""
        r = (
            self.tracing.clone()
            if rows is None
            else rows.to(self.device, torch.bool) & self.tracing
        )
        enough = self.chunk_total >= self.cfg.min_windows
        later = r & ~enough
        self.pending |= later
        if rows is None and not bool(later.any()):
            self._maybe_tracing = False
        self._maybe_monitoring = True
        if self._allocated_feature is not None:  # else nothing observed: no row has a window
            self._finalize(r & enough)

    def _finalize(self, r: Tensor) -> None:
        """Baseline, mu, sigma and tau of rows ``r`` (each with >= min_windows windows); tensor
        operations only (it runs inside :meth:`observe`, possibly in a compiled step)."""
        cfg = self.cfg
        base = self.trace_sum / self.trace_n.clamp_min(1)[:, None, None].float()
        sims = self.similarity(self.chunks, base[:, None])  # [B, C]
        k = self.chunk_stored
        used = torch.arange(self.max_chunks, device=self.device)[None] < k[:, None]
        kf = k.float()
        mu = torch.where(used, sims, 0.0).sum(1) / kf.clamp_min(1.0)
        var = torch.where(used, (sims - mu[:, None]).square(), 0.0).sum(1) / (kf - 1).clamp_min(1)
        sigma = torch.where(k >= 2, var.sqrt(), 0.0)
        tau = mu - torch.clamp_min(cfg.sigma_scale * sigma, cfg.threshold_floor)
        self.baseline.copy_(torch.where(r[:, None, None], base, self.baseline))
        self.mu.copy_(torch.where(r, mu, self.mu))
        self.sigma.copy_(torch.where(r, sigma, self.sigma))
        self.tau.copy_(torch.where(r, tau, self.tau))
        self.armed |= r
        self.tracing &= ~r
        self.pending &= ~r
        self.pressure.masked_fill_(r, 0)
        self.cur_n.masked_fill_(r, 0)
        self.cur_sum.masked_fill_(r[:, None, None], 0.0)

    def rewind(self, tokens: Tensor) -> None:
        """Uncount ``tokens [B]`` valid tokens per row that the next :meth:`observe` feeds again
        (a look-back re-trace re-runs them): the history's steps keep counting each token once."""
        self.steps -= tokens.to(device=self.device, dtype=self.steps.dtype)

    def poll(self) -> Tensor:
        """Rows whose pressure reached the trigger since the last poll (``BoolTensor[B]``);
        clears the flags."""
        out = self.triggered.clone()
        self.triggered.zero_()
        return out

    def state_bytes(self) -> int:
        """Bytes of the monitor's tensor state (baselines, windows, history)."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))

    def history(self) -> list[list[tuple[int, float, float]]]:
        """Per row, ``(step, similarity, tau)`` at each complete monitoring window, where
        ``step`` counts the row's valid tokens observed up to the window's last token (since the
        last full :meth:`begin_trace`). Up to ``history_size`` entries per row are kept."""
        n = self.hist_n.clamp_max(self.history_size).tolist()
        steps, sims, taus = self.hist_step.tolist(), self.hist_sim.tolist(), self.hist_tau.tolist()
        return [
            list(zip(steps[b][: n[b]], sims[b][: n[b]], taus[b][: n[b]], strict=True))
            for b in range(self.batch_size)
        ]


class AttnOutputMonitor(DriftMonitor):
    """Signal ``attn_output``: the self-attention block output (after ``o_proj``) ``[B, T, d]``
    of a watched layer, or a list/tuple of them (one per watched layer). Similarity: cosine of
    the window mean to the baseline, averaged over the watched layers (clamped to [-1, 1])."""

    def features(self, feature_input: object, **kwargs: object) -> Tensor:
        xs = list(feature_input) if isinstance(feature_input, (list, tuple)) else [feature_input]
        for x in xs:
            if not isinstance(x, Tensor) or x.dim() != 3:
                raise ValueError("attn_output signal: expected Tensor[B, T, d] or a list of them")
        return torch.stack([x.float() for x in xs], dim=2)

    def group_similarity(self, a: Tensor, b: Tensor) -> Tensor:
        eps = 1e-12
        num = (a * b).sum(-1)
        den = torch.linalg.vector_norm(a, dim=-1).clamp_min(eps) * torch.linalg.vector_norm(
            b, dim=-1
        ).clamp_min(eps)
        return (num / den).clamp(-1.0, 1.0)


class AttnProbsMonitor(DriftMonitor):
    """Signal ``attn_probs``: attention weights ``[B, H, T, S]`` of a watched layer (or a list,
    one per layer). It needs attention weights, i.e. eager attention
    (``attn_implementation="eager"``) on HF models: SDPA/flash kernels do not return them.

    Each query row becomes the attention mass over ``num_buckets`` log-spaced relative-distance
    buckets per head (see :func:`distance_bucket_features`), renormalised; similarity is
    ``1 - JS`` (base 2) averaged over heads (and layers). Pass ``positions=`` to :meth:`observe`
    when the queries are not the last ``T`` keys (e.g. a static cache).
    """

    def features(self, feature_input: object, **kwargs: object) -> Tensor:
        xs = list(feature_input) if isinstance(feature_input, (list, tuple)) else [feature_input]
        positions = kwargs.get("positions")
        feats = [distance_bucket_features(x, self.cfg.num_buckets, positions) for x in xs]
        return torch.cat(feats, dim=2)

    def group_similarity(self, a: Tensor, b: Tensor) -> Tensor:
        return js_similarity(a, b)


class AttnContentMonitor(AttnProbsMonitor):
    """Signal ``attn_content``: *what* the new tokens attend to, not how far back they look.

    Each key position gets a content cluster when it enters the cache: the attention input
    (the normalised hidden state its key is computed from, before RoPE, so position plays no
    part) of that position, standardised per dimension with the sequence's first-pass mean
    and standard deviation (so a few outlier dimensions do not decide every hash), then hashed
    by ``content_bits`` signs of fixed random projections (seeded, per layer): ``2^bits``
    clusters. A query's feature is its attention mass per cluster, per head; similarity is
    ``1 - JS`` (base 2) as for ``attn_probs``. A new topic moves attention onto keys of other
    clusters even when the distance profile stays the same.

    Feature input: per watched layer, ``(probs [B, H, T, S], hidden [B, T, d])`` (or a list of
    them). Cluster ids are kept per row for every key position; a call whose ``S - T`` is below
    what is kept crops the cache's ids (a crop-and-recompute re-trace), one with ``S == T``
    starts a new sequence. Keys this monitor never saw (forwards outside its schedule) go to an
    extra "unknown" cluster. Needs eager attention, like ``attn_probs``.
    """

    def __init__(self, cfg: DriftConfig, **kwargs: int) -> None:
        super().__init__(cfg, **kwargs)
        self.clusters = 2**cfg.content_bits
        self._planes: dict[int, Tensor] = {}  # per layer [d, bits]
        self._norm: dict[int, tuple[Tensor, Tensor]] = {}  # per layer (mean, std) [B, d]
        self._ids: dict[int, Tensor] = {}  # per layer [B, S] cluster of every key position

    def _cluster_ids(self, layer: int, x: Tensor, new_sequence: bool) -> Tensor:
        x = x.float()
        if layer not in self._planes:
            g = torch.Generator().manual_seed(1_000_003 * (layer + 1))
            self._planes[layer] = torch.randn(x.shape[-1], self.cfg.content_bits, generator=g)
        if new_sequence or self._norm.get(layer, (x,))[0].shape[0] != x.shape[0]:
            self._norm[layer] = (x.mean(1), x.std(1, unbiased=False).clamp_min(1e-6))
        mean, std = self._norm[layer]
        z = (x - mean[:, None]) / std[:, None]
        planes = self._planes[layer].to(x.device)
        bits = (z @ planes > 0).long()  # [B, T, bits]
        weights = 2 ** torch.arange(planes.shape[1], device=x.device)
        return (bits * weights).sum(-1)

    def _positions(self, layer: int, probs: Tensor, x: Tensor) -> Tensor:
        b, _, t, s = probs.shape
        new_sequence = s == t
        new = self._cluster_ids(layer, x, new_sequence)
        old = self._ids.get(layer)
        if new_sequence or old is None or old.shape[0] != b:
            old = probs.new_empty(b, 0, dtype=torch.long)
        old = old[:, : s - t]
        unknown = s - t - old.shape[1]
        if unknown:
            fill = torch.full((b, unknown), self.clusters, dtype=torch.long, device=old.device)
            old = torch.cat([old, fill], 1)  # keys added while the monitor was away
        ids = torch.cat([old.to(new.device), new], 1)
        self._ids[layer] = ids
        return ids

    def features(self, feature_input: object, **kwargs: object) -> Tensor:
        pairs = list(feature_input)
        if pairs and isinstance(pairs[0], Tensor):
            pairs = [pairs]  # one layer's (probs, hidden)
        feats = []
        for layer, pair in enumerate(pairs):
            if len(pair) != 2 or pair[0].dim() != 4 or pair[1].dim() != 3:
                raise ValueError(
                    "attn_content signal: expected (probs [B, H, T, S], hidden [B, T, d]) per "
                    "watched layer"
                )
            probs, x = pair
            ids = self._positions(layer, probs, x)
            onehot = torch.nn.functional.one_hot(ids, self.clusters + 1).float()  # [B, S, C+1]
            mass = (probs.float() @ onehot[:, None]).transpose(1, 2)  # [B, T, H, C+1]
            feats.append(mass / mass.sum(-1, keepdim=True).clamp_min(1e-12))
        return torch.cat(feats, dim=2)


class NullMonitor(DriftMonitor):
    """Drift detection disabled: keeps the interface, never fires."""

    def features(self, feature_input: object, **kwargs: object) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def group_similarity(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def observe(self, feature_input: object, valid: Tensor | None = None, **kwargs: object) -> None:
        return None

    def finalize_trace(self, rows: Tensor | None = None) -> None:
        r = self.tracing.clone() if rows is None else rows.to(self.device, torch.bool)
        self.tracing &= ~r


@dataclass(frozen=True)
class Signal:
    """One drift signal (``DriftConfig.signal``): its monitor class and what the attention
    hook of a watched layer hands it. ``capture(output, args, kwargs)`` takes the attention
    module's output tuple and call arguments and returns the monitor's feature input for that
    layer (None: the model did not return it); ``needs_weights``: it reads the attention
    weights (eager attention)."""

    name: str
    description: str
    monitor: type[DriftMonitor]
    needs_weights: bool
    capture: Callable[[tuple, tuple, dict], object]


def _attn_output(output: tuple, args: tuple, kwargs: dict) -> object:
    return output[0]


def _attn_weights(output: tuple, args: tuple, kwargs: dict) -> object:
    return output[1]


def _attn_weights_and_input(output: tuple, args: tuple, kwargs: dict) -> object:
    # the attention input the keys come from, beside the weights
    if output[1] is None:
        return None
    return output[1], args[0] if args else kwargs["hidden_states"]


_SIGNALS = (
    Signal(
        "attn_output",
        "the attention block output of the watched layers (cosine to the baseline)",
        AttnOutputMonitor,
        needs_weights=False,
        capture=_attn_output,
    ),
    Signal(
        "attn_probs",
        "the attention mass per relative-distance bucket (1 - JS to the baseline)",
        AttnProbsMonitor,
        needs_weights=True,
        capture=_attn_weights,
    ),
    Signal(
        "attn_content",
        "the attention mass per content cluster of the keys (1 - JS to the baseline)",
        AttnContentMonitor,
        needs_weights=True,
        capture=_attn_weights_and_input,
    ),
)

SIGNALS: Mapping[str, Signal] = MappingProxyType({sig.name: sig for sig in _SIGNALS})


def get_signal(name: str) -> Signal:
    """The registered drift signal called ``name``; a ValueError listing the names otherwise."""
    try:
        return SIGNALS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"DriftConfig.signal: {name!r} is not one of {', '.join(SIGNALS)}"
        ) from None


def make_monitor(cfg: DriftConfig, **kwargs: int) -> DriftMonitor:
    """The monitor of the signal ``cfg.signal`` (:data:`SIGNALS`; a :class:`NullMonitor` when
    ``cfg.enabled`` is false)."""
    if not cfg.enabled:
        return NullMonitor(cfg, **kwargs)
    return get_signal(cfg.signal).monitor(cfg, **kwargs)
