"""Per-sample JSONL records that survive interruption: append whole lines, fsync, skip done.

A record is one JSON object per line with ``method``, ``total_prune`` and ``id``. Lines are
appended with one ``write`` and flushed to disk; a torn last line (a crash mid-write) is ignored
on reading, so a rerun recomputes exactly the samples whose records are not complete. Each
process of a multi-process run appends to its own file (``samples.jsonl``,
``samples.rank1.jsonl``...); readers merge them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["RecordStore", "record_key"]


def record_key(record: dict[str, Any]) -> tuple[str, float, str]:
    """The resume key of a record: (method label, total_prune, sample id)."""
    return (str(record["method"]), round(float(record["total_prune"]), 6), str(record["id"]))


class RecordStore:
    """The per-sample records of one results folder."""

    def __init__(self, folder: str | os.PathLike, stem: str = "samples"):
        self.folder = Path(folder)
        self.stem = stem

    def path(self, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank{rank}"
        return self.folder / f"{self.stem}{suffix}.jsonl"

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.stem}*.jsonl"))

    def append(self, records: Iterable[dict[str, Any]], rank: int = 0) -> None:
        """Append records, one complete line each, flushed and fsynced."""
        lines = "".join(json.dumps(r, default=_jsonable) + "\n" for r in records)
        if not lines:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(rank)
        _repair_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seen: set[tuple] = set()
        for path in self.files():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from an interrupted write
                key = record_key(rec)
                if key not in seen:
                    seen.add(key)
                    yield rec

    def records(self, method: str | None = None, total_prune: float | None = None) -> list[dict]:
        out = []
        for r in self:
            if method is not None and r["method"] != method:
                continue
            if total_prune is not None and round(float(r["total_prune"]), 6) != round(
                float(total_prune), 6
            ):
                continue
            out.append(r)
        return out

    def done(self) -> set[tuple[str, float, str]]:
        """Keys of the complete records already on disk."""
        return {record_key(r) for r in self}


def _repair_tail(path: Path) -> None:
    """Terminate a torn last line so the next record starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
