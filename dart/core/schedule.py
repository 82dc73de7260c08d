"""The schedule of DART's per-sequence phases (spec section 4): which rows trace, which run
under their masks, which are released, and when a row's trace window is complete.

Pure host-side bookkeeping (a few Python lists of length B, touched once per pass): it holds no
tensors and calls nothing. :class:`dart.core.controller.Controller` composes it with the
selection (:mod:`dart.core.selection`) and the accounting (:mod:`dart.core.accounting`).
"""

from __future__ import annotations

from .ffn import DENSE, SPARSE, TRACE

__all__ = ["Phase", "Schedule"]


class Phase:
    TRACE = 0  # dense, collecting statistics
    SPARSE = 1  # masked
    RELEASED = 2  # dense for good


class Schedule:
    """Phases of the rows of the current batch and the pass counter.

    ``masking_step`` m: a row's masks are built at the end of its ``max(m, 1)``-th traced pass;
    ``drift_window``: the drift monitor is polled after every ``drift_window``-th pass;
    ``release_step``: from that pass on every row runs dense for good (None: never).
    """

    def __init__(self, masking_step: int, drift_window: int, release_step: int | None) -> None:
        self.window = max(masking_step, 1)
        self.drift_window = drift_window
        self.release_step = release_step
        self.step = 0
        self.phase: list[int] = []
        self.trace_start: list[int] = []

    def start(self, batch_size: int, phase: int) -> None:
        """New sequences: every row in ``phase``, pass 0 next."""
        self.step = 0
        self.phase = [phase] * batch_size
        self.trace_start = [0] * batch_size

    @property
    def tracing(self) -> bool:
        """Whether some row traces (collects statistics) in the coming pass."""
        return Phase.TRACE in self.phase

    def dense_rows(self, phase: list[int] | None = None) -> list[bool]:
        """Per row: runs dense (tracing or released), of ``phase`` (default the current)."""
        return [p != Phase.SPARSE for p in (self.phase if phase is None else phase)]

    def mode(self) -> str:
        """The FFN mode of the coming pass: DENSE (no row masked), SPARSE (every row masked)
        or TRACE (a mixed batch: one masked pass recording the dense rows' statistics)."""
        if not self.phase or all(p == Phase.RELEASED for p in self.phase):
            return DENSE
        if all(p == Phase.SPARSE for p in self.phase):
            return SPARSE
        return TRACE

    def ready(self, s: int, retracing: list[int]) -> list[int]:
        """Tracing rows whose masks are due at the end of pass ``s``: a full trace window
        behind them, or a look-back re-trace (``retracing``) done in this pass."""
        return [
            b
            for b, p in enumerate(self.phase)
            if p == Phase.TRACE and (b in retracing or s + 1 - self.trace_start[b] >= self.window)
        ]

    def polls_drift(self, s: int) -> bool:
        return (s + 1) % self.drift_window == 0

    def releases(self, s: int) -> bool:
        return self.release_step is not None and s + 1 >= self.release_step

    def retrace(self, rows: list[int], s: int) -> None:
        """``rows`` trace again from pass ``s + 1`` (a drift event at the end of pass s)."""
        for b in rows:
            self.phase[b] = Phase.TRACE
            self.trace_start[b] = s + 1

    def set_all(self, phase: int, batch_size: int) -> None:
        self.phase = [phase] * batch_size
