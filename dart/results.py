"""Results files: the one atomic writer, standard JSON in and out, unique folders, and plots.

Every file the library writes as a whole (summaries, configs, plots, manifests, caches) goes
through :func:`atomic_path`: the content is written to a unique temp file in the target's
folder, fsynced, given mode 0644, renamed over the target, and the folder is fsynced. A reader
sees the old file or the new one, never half of one, also after a power cut; two writers never
share a temp file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "FILE_MODE",
    "CorruptFileError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_folder",
    "public_modes",
    "remove_stale_folders",
    "staging_folder",
    "plot_drift",
    "read_json",
    "save_figure",
    "strict_json",
    "unique_folder",
    "write_json",
]

FILE_MODE = 0o644  # results are shared: readable by everyone, writable by the owner
NONFINITE_KEY = "nonfinite"  # where strict_json records the values it replaced by null


class CorruptFileError(ValueError):
    """A results file exists but cannot be read; the message names it."""


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp path next to ``path``; fill it, and on a clean exit it replaces
    ``path`` durably (fsync file, chmod 0644, rename, fsync folder). On an error the temp file
    is removed and ``path`` is untouched. For writers that want a path (``torch.save``,
    ``savefig``); the temp name keeps ``path``'s suffix so format guessing works."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _umask() -> int:
    """The process umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would have
    given under the umask (folders 0777, files 0666, less the umask; executables keep their x
    bits): ``mkdtemp``/``mkstemp`` make them private (0700/0600), which locks a shared cache
    or package away from everyone else."""
    mask = _umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        if stat.S_ISDIR(mode):
            os.chmod(p, 0o777 & ~mask)
        else:
            execs = 0o111 if mode & stat.S_IXUSR else 0
            os.chmod(p, (0o666 | execs) & ~mask)


_OWNER = re.compile(r"^(?P<pid>[0-9]+)~(?P<host>[^~]*)~")


def staging_folder(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new empty folder beside ``target`` (``.<name>.<kind>-<pid>~<host>~<random>``) to build
    ``target``'s content in before renaming it into place; its name says which process owns it,
    so :func:`remove_stale_folders` can tell a dead run's leftovers from a live run's."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.{kind}-{os.getpid()}~{socket.gethostname()}~"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_folders(target: str | os.PathLike, kind: str = "tmp") -> list[Path]:
    """Remove the :func:`staging_folder` leftovers of ``target`` whose owner is a process of
    this host that no longer runs (killed mid-write); another live run's, or another host's
    (a shared file system), are left alone. Returns the removed paths."""
    target = Path(target)
    prefix = f".{target.name}.{kind}-"
    removed = []
    if not target.parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        owner = _OWNER.match(p.name[len(prefix) :])
        if owner is None or owner["host"] != host:
            continue
        pid = int(owner["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically and durably (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by ``None``; a dict that held one gains a
    ``"nonfinite"`` entry saying which field held what (``{"value": "inf"}``), so the reason
    is kept while the file stays standard JSON. Tensors/arrays become lists, other unknown
    objects their ``str``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, (str, int, bool)) or data is None:
        return data
    if isinstance(data, dict):
        out, reasons = {}, {}
        for key, value in data.items():
            clean = strict_json(value)
            out[str(key)] = clean
            reasons.update(_nonfinite_fields(str(key), value))
        if reasons:
            out[NONFINITE_KEY] = {**out.get(NONFINITE_KEY, {}), **reasons}
        return out
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if hasattr(data, "tolist"):  # tensors, numpy arrays and scalars
        return strict_json(data.tolist())
    return str(data)


def _nonfinite_fields(key: str, value: Any) -> dict[str, str]:
    """Non-finite floats directly in ``value`` (itself or the items of a flat list)."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return {key: repr(value)}
    if isinstance(value, (list, tuple)):
        return {
            f"{key}[{i}]": repr(v)
            for i, v in enumerate(value)
            if isinstance(v, float) and not math.isfinite(v)
        }
    return {}


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write standard JSON (no ``NaN``/``Infinity``: see :func:`strict_json`) atomically."""
    text = json.dumps(strict_json(data), indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a file that is not valid UTF-8 JSON raises :class:`CorruptFileError`
    naming it (a missing file raises ``FileNotFoundError``)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e})") from e


def unique_folder(parent: str | os.PathLike, stem: str) -> Path:
    """Create and return a new folder ``parent/stem-YYYYmmdd-HHMMSS-micro`` (a ``-2``,
    ``-3``... suffix if that name exists): two runs started at once never share it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    base += f"-{int(now % 1 * 1e6):06d}"
    for n in range(1, 10_000):
        folder = parent / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free folder name {base}-N under {parent}")


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
    """Save a matplotlib figure atomically (unique temp file, see :func:`atomic_path`) and
    close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
