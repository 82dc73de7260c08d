"""Results folders: atomic writes of JSON/YAML/text, and plots."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "write_json", "plot_drift", "save_figure"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temp file and `os.replace`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def plot_drift(
    path: str | os.PathLike,
    traces: dict[str, list[tuple[int, float, float]]],
    events: dict[str, list[int]],
    title: str = "Drift signal during generation",
) -> Path:
    """One panel per arm: window similarity to the trace baseline, its threshold, re-traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in traces if traces[a]]
    fig, axes = plt.subplots(max(len(arms), 1), 1, figsize=(9, 2.6 * max(len(arms), 1)))
    axes = [axes] if len(arms) <= 1 else list(axes)
    for ax, arm in zip(axes, arms, strict=False):
        steps = [s for s, _, _ in traces[arm]]
        ax.plot(steps, [v for _, v, _ in traces[arm]], marker=".", label="window similarity")
        ax.step(steps, [t for _, _, t in traces[arm]], where="post", ls="--", label="threshold")
        for i, step in enumerate(events.get(arm, [])):
            ax.axvline(step, color="red", alpha=0.6, label="re-trace" if i == 0 else None)
        ax.set_title(arm)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("similarity")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically (temp file + `os.replace`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
