"""dart.evaluate.store: records that survive interruption and bad lines, one run per folder,
and resumes that refuse another configuration, model or data."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os

import pytest
from tiny_assets import save_tiny

from dart.cli import main
from dart.core.config import BudgetConfig
from dart.evaluate import store as store_mod
from dart.evaluate.store import (
    FingerprintMismatchError,
    FolderLockedError,
    RecordStore,
    RunStore,
    claim_arm,
    data_identity,
    model_identity,
    run_fingerprint,
)
from dart.report import load_metrics
from dart.results import CorruptFileError

REC = {"method": "dart", "total_prune": 0.5}
FP = {"task": "ppl", "options": {"window": 16}, "model": {"name": "m"}, "data": {"items": 3}}


# -- records -------------------------------------------------------------------------------------
def test_only_the_stores_own_files_are_read(tmp_path):
    store = RecordStore(tmp_path)
    store.append([{**REC, "id": "a"}])
    store.append([{**REC, "id": "b"}], rank=2)
    for stray in ("samples.old.jsonl", "samples-backup.jsonl", "samples.rank0.jsonl"):
        (tmp_path / stray).write_text(json.dumps({**REC, "id": "stray"}) + "\n")
    assert [p.name for p in store.files()] == ["samples.jsonl", "samples.rank2.jsonl"]
    assert {r["id"] for r in store} == {"a", "b"}


def test_bad_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path, caplog):
    store = RecordStore(tmp_path)
    store.append([{**REC, "id": "a"}])
    with open(store.path(), "a") as f:
        f.write('{"method": "dart", "id": "no-prune"}\n')  # valid JSON, a key missing
        f.write('["not", "a", "record"]\n')
        f.write('{"method": "dart", "total_prune": "half", "id": "x"}\n')
        f.write("{torn\n")
    store.append([{**REC, "id": "b"}])
    with caplog.at_level(logging.WARNING, logger="dart.evaluate"):
        assert store.done() == {("dart", 0.5, "a"), ("dart", 0.5, "b")}
        list(store)  # warned once per line, not on every read
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4
    for line in (2, 3, 4, 5):
        assert any(f"{store.path()}:{line}: skipped" in w for w in warned), warned


def test_append_writes_each_line_once_with_o_append(tmp_path, monkeypatch):
    calls: list[tuple[str, object]] = []
    real_open, real_write = os.open, os.write
    monkeypatch.setattr(
        os, "open", lambda p, fl, *a: (calls.append(("open", fl)), real_open(p, fl, *a))[1]
    )
    monkeypatch.setattr(
        os, "write", lambda fd, b: (calls.append(("write", bytes(b))), real_write(fd, b))[1]
    )
    RecordStore(tmp_path).append([{**REC, "id": str(i), "pad": "x" * 70_000} for i in range(3)])
    opens = [fl for op, fl in calls if op == "open"]
    writes = [b for op, b in calls if op == "write"]
    assert len(opens) == 1 and opens[0] & os.O_APPEND
    assert len(writes) == 3 and all(b.count(b"\n") == 1 and b.endswith(b"\n") for b in writes)


def test_a_crash_torn_line_stays_apart_from_the_next_record(tmp_path):
    store = RecordStore(tmp_path)
    store.path().write_text(json.dumps({**REC, "id": "a"}) + '\n{"method": "da')
    store.append([{**REC, "id": "b"}])
    lines = store.path().read_text().splitlines()
    assert lines[1] == '{"method": "da' and json.loads(lines[2])["id"] == "b"


def _append_many(folder: str, tag: str) -> None:
    store = RecordStore(folder)
    for i in range(150):
        store.append([{**REC, "id": f"{tag}{i}", "pad": tag * (1 + 997 * (i % 7))}])


def test_concurrent_appenders_never_split_a_line(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), t)) for t in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = RecordStore(tmp_path).path().read_text().splitlines()
    assert len(lines) == 300 and {json.loads(ln)["id"][0] for ln in lines} == {"x", "y"}


# -- lock and fingerprint -------------------------------------------------------------------------
def test_a_second_run_on_a_held_folder_is_refused(tmp_path):
    with RunStore.open(tmp_path / "f", FP):
        with pytest.raises(FolderLockedError, match=rf"in use by another run \(pid {os.getpid()}"):
            with RunStore.open(tmp_path / "f", FP):
                pass
    with RunStore.open(tmp_path / "f", FP) as store:  # released at the end of the block
        assert store.done_ids(("dart", 0.5)) == set()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(KeyError), RunStore.open(tmp_path, FP):
        raise KeyError("the run failed")
    with RunStore.open(tmp_path, FP):
        pass


def test_other_ranks_neither_lock_nor_write_the_fingerprint(tmp_path):
    with RunStore.open(tmp_path, FP, rank=0), RunStore.open(tmp_path, FP, rank=1):
        pass
    other = tmp_path / "other"
    with RunStore.open(other, FP, rank=1):
        assert not (other / store_mod.FINGERPRINT_FILE).exists()


def test_a_different_fingerprint_is_refused_saying_what_differs(tmp_path):
    with RunStore.open(tmp_path, FP) as store:
        store.records.append([{**REC, "id": "w0"}])
    changed = {**FP, "options": {"window": 32}}
    with pytest.raises(FingerprintMismatchError) as e, RunStore.open(tmp_path, changed):
        pass
    assert "options.window: on disk 16, now 32" in str(e.value)
    assert "another --out" in str(e.value)
    with RunStore.open(tmp_path, FP) as store:  # the same fingerprint resumes
        assert store.done_ids(("dart", 0.5)) == {"w0"}


def test_records_without_a_fingerprint_are_not_resumed(tmp_path):
    RecordStore(tmp_path).append([{**REC, "id": "w0"}])
    with pytest.raises(FingerprintMismatchError, match="no fingerprint.json"):
        with RunStore.open(tmp_path, FP):
            pass


def test_a_corrupt_fingerprint_is_named(tmp_path):
    (tmp_path / "fingerprint.json").write_text("{")
    with pytest.raises(FingerprintMismatchError, match="fingerprint.json is not valid JSON"):
        with RunStore.open(tmp_path, FP):
            pass


def test_records_are_not_read_before_the_fingerprint_is_claimed(tmp_path):
    with RunStore.open(tmp_path) as store, pytest.raises(RuntimeError, match="claim"):
        store.done_ids(("dart", 0.5))


def test_run_fingerprint_ignores_how_and_where_but_not_what():
    model, data = {"name": "m"}, data_identity([{"id": "w0", "ids": [1, 2]}])
    base = {"window": 16, "out": "a", "threads": 2, "quiet": True, "methods": "dense"}
    same = {"window": 16, "out": "b", "threads": 8, "quiet": False, "methods": "dense,dart"}
    assert run_fingerprint("ppl", base, model, data) == run_fingerprint("ppl", same, model, data)
    assert run_fingerprint("ppl", base, model, data) != run_fingerprint(
        "ppl", {**base, "window": 32}, model, data
    )
    other_data = data_identity([{"id": "w0", "ids": [1, 3]}])  # same ids, other tokens
    assert data["items_sha256"] != other_data["items_sha256"]


def test_model_identity_tells_weights_apart_and_ignores_the_folder():
    from tiny_models import tiny_model

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ida = model_identity(a, "m")
    assert ida == model_identity(tiny_model("llama", seed=0), "m")
    assert ida["weights_sha256"] != model_identity(b, "m")["weights_sha256"]
    assert ida["config_sha256"] == model_identity(b, "m")["config_sha256"]
    a.config._name_or_path = "/elsewhere"
    assert model_identity(a, "m") == ida


# -- summaries ------------------------------------------------------------------------------------
def test_update_summary_rebuilds_a_corrupt_file_with_a_warning(tmp_path, caplog):
    (tmp_path / "timings.json").write_text('{"dense@0.0": {"seconds": 1')
    with RunStore.open(tmp_path, FP) as store, caplog.at_level(logging.WARNING):
        store.update_summary("timings.json", "dart@0.5", {"seconds": 2.0})
        store.update_summary("timings.json", "dense@0.0", {"seconds": 1.0})
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "dart@0.5": {"seconds": 2.0},
        "dense@0.0": {"seconds": 1.0},
    }
    assert (tmp_path / "timings.json.corrupt").exists()
    assert any("timings.json is not valid JSON" in r.getMessage() for r in caplog.records)


# -- a real run into one folder ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny(root / "m0", seed=0), save_tiny(root / "m1", seed=1)


def _ppl(model, out, *extra):
    """`dart eval ppl` with --debug: the errors come out as exceptions (the CLI's one-line
    messages are tested in test_cli)."""
    argv = ["--debug", "eval", "ppl", "--model", str(model), "--methods", "dense"]
    argv += ["--max-tokens", "48"]
    return main([*argv, "--window", "16", "--stride", "16", "--out", str(out), "--quiet", *extra])


def test_resume_with_another_model_window_or_text_is_refused(tiny_folders, tmp_path):
    m0, m1 = tiny_folders
    text = tmp_path / "t.txt"
    text.write_text("A local text, long enough for three windows of sixteen characters. " * 2)
    out = tmp_path / "run"
    assert _ppl(m0, out, "--text-file", str(text)) == 0
    lines = (out / "samples.jsonl").read_text()
    with pytest.raises(FingerprintMismatchError, match="options.window: on disk 16, now 24"):
        _ppl(m0, out, "--text-file", str(text), "--window", "24")
    with pytest.raises(FingerprintMismatchError, match="model.weights_sha256"):
        _ppl(m1, out, "--text-file", str(text))
    text.write_text("Another text of the same length, so only its content differs!!!!!! " * 2)
    with pytest.raises(FingerprintMismatchError, match="data.items_sha256"):
        _ppl(m0, out, "--text-file", str(text))
    assert (out / "samples.jsonl").read_text() == lines  # nothing was mixed in


def test_an_arm_run_under_other_defaults_is_not_resumed(tiny_folders, tmp_path):
    """The fingerprint holds what a user sets; arms.json holds each arm's whole resolved config,
    so records made under another library default are refused too (simulated by editing it)."""
    out = tmp_path / "run"
    argv = ["--methods", "dense,dart", "--total-prune", "0.5", "--backend", "masked"]
    assert _ppl(tiny_folders[0], out, *argv) == 0
    arms = json.loads((out / "arms.json").read_text())
    default_blend = BudgetConfig().uniform_blend  # the library default, whatever it is
    assert arms["dense@0.0"] is None
    assert arms["dart@0.5"]["budget"]["uniform_blend"] == default_blend != 0.25
    assert _ppl(tiny_folders[0], out, *argv) == 0  # same defaults: resumes
    arms["dart@0.5"]["budget"]["uniform_blend"] = 0.25  # as an older version would have run it
    (out / "arms.json").write_text(json.dumps(arms))
    lines = (out / "samples.jsonl").read_text()
    with pytest.raises(
        FingerprintMismatchError, match=r"arm dart@0.5 .*\n.*uniform_blend: on disk 0.25"
    ):
        _ppl(tiny_folders[0], out, *argv)
    assert (out / "samples.jsonl").read_text() == lines


def test_claim_arm_names_a_corrupt_file(tmp_path):
    claim_arm(tmp_path, "dense@0.0", None)
    claim_arm(tmp_path, "dense@0.0", None)
    with pytest.raises(FingerprintMismatchError, match="arm x@0.5"):
        claim_arm(tmp_path, "x@0.5", {"a": 1}) or claim_arm(tmp_path, "x@0.5", {"a": 2})
    (tmp_path / "arms.json").write_text("{")
    with pytest.raises(FingerprintMismatchError, match="arms.json is not valid JSON"):
        claim_arm(tmp_path, "dense@0.0", None)


def test_a_run_waits_for_no_one_and_mixes_nothing_on_a_held_folder(tiny_folders, tmp_path):
    out = tmp_path / "held"
    with RunStore.open(out):
        with pytest.raises(FolderLockedError, match="another --out"):
            _ppl(tiny_folders[0], out)
    assert not (out / "samples.jsonl").exists() and not (out / "log.txt").exists()


def test_rerun_survives_bad_records_and_corrupt_summaries(tiny_folders, tmp_path, caplog):
    out = tmp_path / "run"
    assert _ppl(tiny_folders[0], out, "--methods", "dense,dart", "--total-prune", "0.5") == 0
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"method": "dense", "id": "w00001"}\n')  # a valid line without total_prune
    for name in ("timings.json", "stats.json", "metrics.json"):
        (out / name).write_text("{garbage")
    with pytest.raises(CorruptFileError, match=r"metrics\.json is not valid JSON.*rerun"):
        main(["--debug", "report", str(out), "--out", str(tmp_path / "report")])
    # adding an arm to the folder is a resume, not another configuration
    methods = ("--methods", "dense,dart,static", "--total-prune", "0.5")
    with caplog.at_level(logging.WARNING, logger="dart.evaluate"):
        assert _ppl(tiny_folders[0], out, *methods) == 0
    assert any("samples.jsonl:7: skipped" in r.getMessage() for r in caplog.records)
    metrics = load_metrics(out)  # recomputed from the records
    assert {m["method"] for m in metrics} == {"dense", "dart", "static"}
    for name in ("timings.json", "stats.json"):
        assert set(json.loads((out / name).read_text())) == {"static@0.5"}  # rebuilt
        assert (out / f"{name}.corrupt").read_text() == "{garbage"
