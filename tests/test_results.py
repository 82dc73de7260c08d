"""dart.results: the one atomic writer (durable, 0644, unique temp names), standard JSON, unique
folders."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dart import results


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_atomic_write_is_0644_whatever_the_temp_file_mode(tmp_path):
    path = results.atomic_write_text(tmp_path / "a.json", "{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp alone leaves 0600
    assert path.read_text() == "{}\n"


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name the fds")
def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(_fd_path(fd)), real(fd))[1])
    results.write_json(tmp_path / "sub" / "m.json", {"a": 1})
    folder = str((tmp_path / "sub").resolve())
    assert folder in synced, synced  # the rename is durable
    files = [p for p in synced if p != folder]
    assert len(files) == 1 and Path(files[0]).name.startswith(".m.json.")  # the temp's content
    assert synced.index(files[0]) < synced.index(folder)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "t.json"
    results.write_json(target, {"old": True})
    with pytest.raises(RuntimeError), results.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_temp_names_are_unique_per_writer(tmp_path):
    with results.atomic_path(tmp_path / "p.png") as a, results.atomic_path(tmp_path / "p.png") as b:
        assert a != b and a.suffix == b.suffix == ".png"
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "p.png").read_bytes() == b"a"  # the last to finish wins, whole


def test_save_figure_leaves_another_writers_temp_file_alone(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other = tmp_path / "perplexity.tmp.png"  # the fixed temp name plots used to share
    other.write_bytes(b"another run's plot, half written")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 2])
    path = results.save_figure(fig, tmp_path / "perplexity.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert other.read_bytes() == b"another run's plot, half written"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def _no_constants(name: str):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_write_json_is_standard_json_and_records_non_finite_values(tmp_path):
    data = [
        {"metric": "perplexity", "value": float("inf")},
        {"metric": "rougeL", "value": float("nan"), "per_doc": [0.5, float("-inf")]},
        {"metric": "tokens", "value": 12},
    ]
    text = results.write_json(tmp_path / "metrics.json", data).read_text()
    back = json.loads(text, parse_constant=_no_constants)
    assert back[0] == {"metric": "perplexity", "value": None, "nonfinite": {"value": "inf"}}
    assert back[1]["value"] is None and back[1]["per_doc"] == [0.5, None]
    assert back[1]["nonfinite"] == {"value": "nan", "per_doc[1]": "-inf"}
    assert back[2] == {"metric": "tokens", "value": 12}


def test_strict_json_converts_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    assert results.strict_json({"x": torch.tensor([1.0, float("nan")])}) == {
        "x": [1.0, None],
        "nonfinite": {"x[1]": "nan"},
    }


def test_read_json_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "stats.json"
    bad.write_text('{"dart@0.5": {"seconds": 1.')
    with pytest.raises(results.CorruptFileError, match=r"stats\.json is not valid JSON"):
        results.read_json(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(results.CorruptFileError, match="stats.json"):
        results.read_json(bad)


def test_unique_folder_never_hands_out_one_name_twice(tmp_path):
    folders = [results.unique_folder(tmp_path, "ppl") for _ in range(5)]
    assert len(set(folders)) == 5 and all(f.is_dir() for f in folders)
    stamp = folders[0].name.split("-", 1)[1]  # YYYYmmdd-HHMMSS-micro: sub-second resolution
    assert [len(p) for p in stamp.split("-")[:3]] == [8, 6, 6]
