"""Results folders that survive interruption, never mix configurations and admit one run.

Per-sample records are JSON lines keyed by ``(method, total_prune, id)``; each line is one
``write`` on a file opened ``O_APPEND`` and the file is fsynced per batch, so a crash loses at
most a torn last line, which readers skip. Each process of a multi-process run appends to its
own file (``samples.jsonl``, ``samples.rank1.jsonl``...); readers merge them and read no other
file. A malformed line, a record without its key, or one the reader's ``validate`` rejects (e.g. a
value that is not a number) is skipped with a warning naming file and line, so its sample is
recomputed.

:class:`RunStore` is one run's hold on a folder: an exclusive lock for the run's lifetime (a
second run on the folder gets :class:`FolderLockedError`), the fingerprint of everything that
determines a sample's value (a resume under another fingerprint gets
:class:`FingerprintMismatchError` saying what differs), and summaries written atomically under
the lock (a corrupt one is set aside and rebuilt, with a warning).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..results import FILE_MODE, CorruptFileError, read_json, write_json

__all__ = [
    "METRIC_KEYS",
    "folder_log",
    "RUN_ONLY_OPTIONS",
    "FingerprintMismatchError",
    "FolderLockedError",
    "claim_arm",
    "RecordStore",
    "RunStore",
    "data_identity",
    "digest",
    "model_identity",
    "process_rank",
    "record_key",
    "run_fingerprint",
]

log = logging.getLogger("dart.evaluate")

FINGERPRINT_FILE = "fingerprint.json"
ARMS_FILE = "arms.json"  # each arm's resolved DARTConfig (see claim_arm)
LOCK_FILE = ".lock"
# Options that say how or where a run goes, not what a sample's value is: resuming may change
# them. ``methods``/``total_prune``/``release_steps`` pick arms, which key the records.
RUN_ONLY_OPTIONS = frozenset(
    {
        "out",
        "command",
        "config",
        "quiet",
        "threads",
        "stop_after",
        "devices",
        "strategy",
        "methods",
        "total_prune",
        "release_steps",
        "prompts_file",  # its prompts are in ``prompts``
    }
)
_SAMPLE_FILE = re.compile(r"^(?P<stem>.+?)(\.rank(?P<rank>[1-9][0-9]*))?\.jsonl$")


class FolderLockedError(RuntimeError):
    """Another run holds the results folder."""


class FingerprintMismatchError(RuntimeError):
    """The folder's records were made under another configuration, model or data."""


def record_key(record: dict[str, Any]) -> tuple[str, float, str]:
    """The resume key of a record: (method label, total_prune, sample id)."""
    return (str(record["method"]), round(float(record["total_prune"]), 6), str(record["id"]))


def _valid_key(record: Any) -> tuple[str, float, str] | None:
    if not isinstance(record, dict):
        return None
    try:
        key = record_key(record)
    except (KeyError, TypeError, ValueError):
        return None
    return key


def process_rank() -> int:
    """This process's rank in a multi-process run (0 when launched alone)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class RecordStore:
    """The per-sample records of one results folder."""

    def __init__(
        self,
        folder: str | os.PathLike,
        stem: str = "samples",
        validate: Callable[[dict[str, Any]], str | None] | None = None,
    ):
        self.folder = Path(folder)
        self.stem = stem
        # validate(record) -> why it is unusable (None: sound): such records are skipped like
        # torn lines, so their samples are recomputed rather than crash the aggregation
        self.validate = validate
        self._verdicts: dict[str, str | None] = {}
        self._warned: set[tuple[str, int]] = set()

    def path(self, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank{rank}"
        return self.folder / f"{self.stem}{suffix}.jsonl"

    def files(self) -> list[Path]:
        """This store's record files (``stem.jsonl``, ``stem.rankN.jsonl``), rank order; any
        other ``*.jsonl`` in the folder is not read."""
        found = []
        for p in self.folder.glob(f"{self.stem}*.jsonl"):
            m = _SAMPLE_FILE.match(p.name)
            if m and m["stem"] == self.stem and p.is_file():
                found.append((int(m["rank"] or 0), p))
        return [p for _, p in sorted(found)]

    def append(self, records: Iterable[dict[str, Any]], rank: int = 0) -> None:
        """Append records: each line one ``write`` with ``O_APPEND`` (never split or
        interleaved) under an exclusive ``flock`` of the file, then one fsync."""
        lines = [(json.dumps(r, default=_jsonable) + "\n").encode("utf-8") for r in records]
        if not lines:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(rank)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            # Another appender's write may be under way: a reader can see its line half
            # written, which must not be taken for a crash's torn tail (that would add a line).
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _ends_torn(fd):
                _write_all(fd, b"\n")  # the torn line of a crash stays a line of its own
            for line in lines:
                _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seen: set[tuple] = set()
        for path in self.files():
            with open(path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    rec = self._parse(path, lineno, line)
                    if rec is None:
                        continue
                    key = record_key(rec)
                    if key not in seen:
                        seen.add(key)
                        yield rec

    def _parse(self, path: Path, lineno: int, line: str) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            why = "not a complete JSON line (an interrupted write?)"
            rec = None
        else:
            why = "not a record with method, total_prune and id"
        if rec is not None and _valid_key(rec) is not None:
            if self.validate is None:
                return rec
            if line not in self._verdicts:
                self._verdicts[line] = self.validate(rec)
            why = self._verdicts[line]
            if why is None:
                return rec
        if (str(path), lineno) not in self._warned:
            self._warned.add((str(path), lineno))
            log.warning("%s:%d: skipped, %s; its sample is recomputed", path, lineno, why)
        return None

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


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# -- fingerprints ---------------------------------------------------------------------------------
def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; tensors as lists)."""
    text = json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_identity(model: Any, name: str, samples_per_tensor: int = 4096) -> dict[str, Any]:
    """Who the model is: its name, class, config (minus the folder it came from) and a hash of
    the bytes of up to ``samples_per_tensor`` evenly spaced values of every parameter and
    buffer (a retrained or re-quantised model differs; hashing every byte of a 7B model would
    take longer than the check is worth). Call it before any arm relays the weights out."""
    import torch

    config = getattr(model, "config", None)
    config = dict(config.to_dict()) if hasattr(config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    h = hashlib.sha256()
    with torch.no_grad():
        for tname, t in [*model.named_parameters(), *model.named_buffers()]:
            flat = t.detach().reshape(-1)
            if flat.numel() > samples_per_tensor:
                step = flat.numel() // samples_per_tensor
                flat = flat[::step][:samples_per_tensor]
            h.update(f"{tname}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "name": str(name),
        "class": type(model).__name__,
        "config_sha256": digest(config),
        "weights_sha256": h.hexdigest(),
    }


def data_identity(items: Iterable[Any]) -> dict[str, Any]:
    """What the samples are: how many, and a hash of their content. Items hold token ids
    (prompts, windows, choices), so this also pins the tokenizer."""
    items = list(items)
    return {"items": len(items), "items_sha256": digest(items)}


def run_fingerprint(
    task: str, options: Mapping[str, Any], model: dict[str, Any], data: dict[str, Any]
) -> dict[str, Any]:
    """Everything that determines a sample's value: the task, the resolved options (minus
    :data:`RUN_ONLY_OPTIONS`), the model's identity and the data's identity."""
    kept = {k: v for k, v in sorted(options.items()) if k not in RUN_ONLY_OPTIONS}
    return json.loads(
        json.dumps({"task": task, "options": kept, "model": model, "data": data}, default=str)
    )


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def mismatch_listing(diff: list[str], limit: int = 20) -> str:
    """The tail of a refusal to resume: the first ``limit`` differences, one a line, how many
    more there are, and what to do instead."""
    more = f"\n  ... and {len(diff) - limit} more" if len(diff) > limit else ""
    return (
        "\n  " + "\n  ".join(diff[:limit]) + more
        + "\npass another --out to start a new folder (or delete this one)"
    )  # fmt: skip


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: on disk X, now Y`` for every leaf that differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    return [
        f"{k}: on disk {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


# -- one run's hold on a folder -------------------------------------------------------------------
def claim_arm(folder: Path, arm: str, config: dict[str, Any] | None) -> None:
    """Bind arm ``arm`` (``label@total_prune``) of ``folder`` to its resolved config (every
    ``DARTConfig`` field, library defaults included; None: the unpatched model). The folder's
    fingerprint holds the options a user sets; this catches what it cannot: a changed library
    default, which would otherwise resume an arm's records under another configuration. Raises
    :class:`FingerprintMismatchError` naming what differs."""
    config = json.loads(json.dumps(config, default=str))  # as it reads back
    path = Path(folder) / ARMS_FILE
    try:
        arms = read_json(path)
    except FileNotFoundError:
        arms = {}
    except CorruptFileError as e:
        raise FingerprintMismatchError(
            f"{e}; the arms of {folder} cannot be matched to a configuration: pass another "
            "--out, or delete the folder to start over"
        ) from e
    if arm in arms and arms[arm] != config:
        diff = fingerprint_diff({"config": arms[arm]}, {"config": config})
        raise FingerprintMismatchError(
            f"results folder {folder}: arm {arm} was run under another configuration (a changed "
            "default or setting); resuming would mix its records:" + mismatch_listing(diff)
        )
    if arm not in arms:
        write_json(path, {**arms, arm: config})


class RunStore:
    """A results folder held by one run: use :meth:`open` as a context manager.

    ``rank`` 0 (the launching process) takes the lock and writes the fingerprint; the other
    ranks of a multi-process run only check the fingerprint (their launcher holds the lock)."""

    def __init__(self, folder: Path, rank: int):
        self.folder = folder
        self.rank = rank
        self.records = RecordStore(folder)
        self._lock_fd: int | None = None
        self._fingerprint: dict[str, Any] | None = None

    @classmethod
    @contextmanager
    def open(
        cls,
        folder: str | os.PathLike,
        fingerprint: dict[str, Any] | None = None,
        rank: int | None = None,
    ) -> Iterator[RunStore]:
        """Lock ``folder`` (created if needed) for the block; with ``fingerprint``, also
        :meth:`claim` it. Raises :class:`FolderLockedError` if another run holds it."""
        store = cls(Path(folder), process_rank() if rank is None else rank)
        store.folder.mkdir(parents=True, exist_ok=True)
        if store.rank == 0:
            store._lock()
        try:
            if fingerprint is not None:
                store.claim(fingerprint)
            yield store
        finally:
            store._unlock()

    # -- lock
    def _lock(self) -> None:
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = path.read_text(encoding="utf-8", errors="replace").strip() or "unknown"
            raise FolderLockedError(
                f"results folder {self.folder} is in use by another run ({holder}); wait for "
                "it to finish, or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%c')}"
        os.pwrite(fd, holder.encode("utf-8"), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock; the file stays (no races)
            self._lock_fd = None

    # -- fingerprint
    def claim(self, fingerprint: dict[str, Any]) -> None:
        """Bind the folder to ``fingerprint``: the first run writes it; a later run must bring
        the same one, else :class:`FingerprintMismatchError` says what differs. Records on
        disk without a fingerprint (made before fingerprints existed) are refused likewise."""
        fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back
        path = self.folder / FINGERPRINT_FILE
        if path.exists():
            try:
                on_disk = read_json(path)
            except CorruptFileError as e:
                raise FingerprintMismatchError(
                    f"{e}; the records of {self.folder} cannot be matched to a configuration: "
                    "pass another --out, or delete the folder to start over"
                ) from e
            diff = fingerprint_diff(on_disk, fingerprint)
            if diff:
                raise FingerprintMismatchError(
                    f"results folder {self.folder} holds records of another configuration, "
                    "model or data; resuming would mix them:" + mismatch_listing(diff)
                )
        elif self.records.files():
            raise FingerprintMismatchError(
                f"results folder {self.folder} holds records but no {FINGERPRINT_FILE}: their "
                "configuration is unknown; pass another --out (or delete the folder)"
            )
        elif self.rank == 0:
            write_json(path, fingerprint)
        self._fingerprint = fingerprint

    def _claimed(self) -> None:
        if self._fingerprint is None:
            raise RuntimeError("RunStore.claim(fingerprint) must come before reading records")

    # -- records
    def done_ids(self, arm_key: tuple[str, float]) -> set[str]:
        """Ids of the samples of arm ``(label, total_prune)`` already on disk."""
        self._claimed()
        label, prune = arm_key[0], round(float(arm_key[1]), 6)
        return {i for m, p, i in self.records.done() if (m, p) == (label, prune)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._claimed()
        return iter(self.records)

    # -- summaries (rank 0, under the lock: no read-modify-write race)
    def write_summary(self, name: str, data: Any) -> Path:
        """Replace summary ``name`` (e.g. ``metrics.json``) atomically, as standard JSON."""
        return write_json(self.folder / name, data)

    def update_summary(self, name: str, key: str, value: Any) -> Path:
        """Set ``key`` of the JSON object ``name`` (``timings.json``, ``stats.json``). A corrupt
        file is renamed ``name.corrupt`` with a warning and the object starts afresh."""
        return self.write_summary(name, {**self.read_summary(name), key: value})

    def read_summary(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            data = read_json(path)
        except FileNotFoundError:
            return {}
        except CorruptFileError as e:
            data, why = None, str(e)
        else:
            why = f"{path} holds a {type(data).__name__}, not a JSON object"
        if isinstance(data, dict):
            return data
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s; moved to %s and rebuilt from this run's arms", why, aside)
        return {}


METRIC_KEYS = ("task", "method", "total_prune", "metric", "value")
"""The keys every record of a folder's ``metrics.json`` carries."""


@contextmanager
def folder_log(folder: str | os.PathLike, logger: logging.Logger) -> Iterator[None]:
    """While the block runs, every log record (root logger) also goes to ``folder/log.txt``,
    and ``logger``'s INFO records reach the console."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
