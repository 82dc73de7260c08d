"""Fault injection: runs killed at random points (SIGKILL of a subprocess after a random delay,
or an exception injected at a random write) and then resumed must end as an uninterrupted run
does: `dart eval` on a tiny model, `dart export` into an existing package, and a packaged
model's first load. Each test counts the interruptions it survived; the module prints the total
(`DART_FAULT_SEED` replays a run's random points).
"""

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
import torch
from tiny_assets import save_tiny
from tiny_models import tiny_model

from dart import DARTConfig
from dart.assets import models
from dart.cli import main
from dart.evaluate import RecordStore
from dart.evaluate.store import record_key
from dart.runtime import export as export_mod
from dart.runtime.export import export_programs as _export_programs
from dart.runtime.runner import load_package

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("DART_FAULT_SEED", time.time_ns() % 2**31))
SURVIVED: dict[str, int] = {}


class Injected(RuntimeError):
    """The fault this module injects (no code under test catches it by type)."""


@pytest.fixture(scope="module", autouse=True)
def report_survivals(request):
    yield
    total = sum(SURVIVED.values())
    detail = ", ".join(f"{k} {v}" for k, v in SURVIVED.items())
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown under -q too
        print(f"\ntest_faults: survived {total} kills ({detail}); seed {SEED}")


def _rng(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def _kill_when(proc: subprocess.Popen, ready, delay: float) -> bool:
    """SIGKILL `proc` `delay` seconds after `ready()` turns true; False if it ended first."""
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# -- dart eval ------------------------------------------------------------------------------------
def _ppl(folder: Path, out: Path) -> list[str]:
    return ["eval", "ppl", "--model", str(folder), "--methods", "dense,dart", "--total-prune",
            "0.5", "--max-tokens", "80", "--window", "32", "--stride", "16", "--threads", "1",
            "--quiet", "--out", str(out)]  # fmt: skip


def _results(out: Path) -> tuple[dict, dict]:
    """(records by key without timings, metrics.json without timing metrics)."""
    records = {
        record_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in RecordStore(out)
    }
    metrics = json.loads((out / "metrics.json").read_text())
    return records, metrics


def _writes(monkeypatch, fail_at: int | None, counter: list[int]) -> None:
    """Count the run's writes (record appends, atomic file replacements); at write `fail_at`
    raise Injected, an append leaving a torn half line as a kill mid-write would."""
    from dart import results
    from dart.evaluate import store

    append, atomic_path = store.RecordStore.append, results.atomic_path

    def tick() -> bool:
        counter[0] += 1
        return counter[0] == fail_at

    def failing_append(self, records, rank=0):
        records = list(records)
        if tick():
            append(self, records[:-1], rank)
            line = json.dumps(records[-1]).encode()
            with open(self.path(rank), "ab") as f:
                f.write(line[: len(line) // 2])
            raise Injected(f"killed while appending (write {counter[0]})")
        append(self, records, rank)

    from contextlib import contextmanager

    @contextmanager
    def failing_atomic_path(path):
        with atomic_path(path) as tmp:
            yield tmp
            if tick():
                raise Injected(f"killed before replacing {Path(path).name}")

    monkeypatch.setattr(store.RecordStore, "append", failing_append)
    monkeypatch.setattr(results, "atomic_path", failing_atomic_path)


def test_dart_eval_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    rng = _rng("eval")
    folder = save_tiny(tmp_path / "model")
    counter = [0]
    _writes(monkeypatch, None, counter)
    assert main(_ppl(folder, tmp_path / "ref")) == 0
    total_writes = counter[0]
    reference = _results(tmp_path / "ref")
    survived = 0

    # a real SIGKILL of `python -m dart eval` soon after its first record is on disk
    out = tmp_path / "killed"
    samples = out / "samples.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dart", *_ppl(folder, out)],
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = lambda: samples.exists() and samples.stat().st_size > 0  # noqa: E731
    survived += _kill_when(proc, ready, rng.uniform(0.0, 0.6))
    # then failures injected at random writes (torn record lines, summaries never replaced)
    for _ in range(4):
        counter[0] = 0
        _writes(monkeypatch, rng.randint(1, total_writes), counter)
        try:
            main(_ppl(folder, out))
        except Injected:
            survived += 1
    monkeypatch.undo()
    assert main(_ppl(folder, out)) == 0
    assert _results(out) == reference
    SURVIVED["dart eval"] = survived
    assert survived >= 2


# -- dart export ----------------------------------------------------------------------------------
FIXED = DARTConfig(layer_topk="all:0.5", drift={"enabled": False})


_PROGRAMS: dict = {}


def _traced_once(wrapper, prompt_len=None):
    if not _PROGRAMS:
        _PROGRAMS.update(_export_programs(wrapper, prompt_len))
    return dict(_PROGRAMS)


def _fake_aoti(monkeypatch, tag: str, fail_at: int | None = None, counter=None):
    """AOTInductor stand-ins: a program file holds `tag` and its name; with `fail_at`, the
    export's `fail_at`-th step (a program compiled, the ops copied, a rename) raises."""
    counter = counter if counter is not None else [0]

    def step(what: str) -> None:
        counter[0] += 1
        if counter[0] == fail_at:
            raise Injected(f"killed at {what}")

    def compile_and_package(program, package_path, inductor_configs=None):
        Path(package_path).write_bytes(f"{tag}:{Path(package_path).name}".encode())
        step(Path(package_path).name)

    rename, copy = os.rename, export_mod._copy_ops_library

    def failing_rename(src, dst):
        step(f"rename {Path(src).name}")
        rename(src, dst)

    def failing_copy(folder):
        step("ops library")
        return copy(folder)

    # the faults under test are in writing the package, not in torch.export: trace once
    monkeypatch.setattr(export_mod, "export_programs", _traced_once)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: Path(path).read_bytes())
    monkeypatch.setattr(export_mod, "_copy_ops_library", failing_copy)
    monkeypatch.setattr(export_mod.os, "rename", failing_rename)
    return counter


def _state(folder: Path) -> tuple | None:
    return _package(folder) if (folder / "manifest.json").exists() else None


def _package(folder: Path) -> tuple:
    """What a runner gets from the package (its checks passed), timings aside."""
    p = load_package(folder)
    manifest = {k: v for k, v in p.manifest.items() if not k.endswith("_seconds")}
    return manifest, p.prefill, p.decode


EXPORT_SCRIPT = """
import sys, time, torch
from pathlib import Path
from tiny_models import tiny_model
from dart import DARTConfig
from dart.runtime import export
from dart.runtime.export import export_decode

def slow(program, package_path, inductor_configs=None):
    time.sleep(0.3)  # a compile takes a while: the kill lands in it or between programs
    Path(package_path).write_bytes(f"new:{Path(package_path).name}".encode())

torch._inductor.aoti_compile_and_package = slow
export.export_programs = lambda wrapper, prompt_len=None: {"prefill": None, "decode": None}
cfg = DARTConfig(layer_topk="all:0.5", drift={"enabled": False})
export_decode(tiny_model("llama"), sys.argv[1], max_len=48, config=cfg)
"""


def test_an_export_killed_anywhere_leaves_old_or_new_never_a_mix(tmp_path, monkeypatch):
    rng = _rng("export")
    model = tiny_model("llama")
    out, ref = tmp_path / "pkg", tmp_path / "ref"
    _fake_aoti(monkeypatch, "old")
    export_mod.export_decode(model, out, max_len=48, config=FIXED)
    old = _package(out)
    counter = _fake_aoti(monkeypatch, "new")
    export_mod.export_decode(model, ref, max_len=48, config=FIXED)
    steps, new = counter[0], _package(ref)
    survived = 0

    # SIGKILL of an exporting process: old package or new one, never a mix (or, between the
    # two renames, none); the staging folders it leaves go at the next export
    staged = lambda: any(p.name.startswith(".pkg.export-") for p in tmp_path.iterdir())  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    survived += _kill_when(proc, staged, rng.uniform(0.0, 0.7))
    state = _state(out)  # the old package, the new one, or (killed between renames) none
    assert state is None or state[1:] in (old[1:], (b"new:prefill.pt2", b"new:decode.pt2"))
    # exceptions at random steps of a re-export (a program, the ops library, a rename)
    for _ in range(3):
        _fake_aoti(monkeypatch, "new", fail_at=rng.randint(1, steps + 1))
        before = _state(out)
        with pytest.raises(Injected):
            export_mod.export_decode(model, out, max_len=48, config=FIXED)
        survived += 1
        assert _state(out) == before  # the package there is untouched
    _fake_aoti(monkeypatch, "new")
    export_mod.export_decode(model, out, max_len=48, config=FIXED)
    assert _package(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "ref"]  # no leftovers
    SURVIVED["export"] = survived


# -- a packaged model's first load ----------------------------------------------------------------
LOAD_SCRIPT = """
import sys, time
from pathlib import Path
from dart.assets import models

def slow(spec, folder):
    for i in range(40):  # weights written a piece at a time
        (Path(folder) / f"shard{i}.bin").write_bytes(bytes([i]) * 1000)
        time.sleep(0.02)
    (Path(folder) / "config.json").write_text("{}")

models._write_converted = slow
models.PACKAGED_MODELS["fake"] = models.PackagedModel("fake", (), "fake.gguf", "", 0, "fake")
models.resolve_model_path("fake")
"""


def _write(spec, folder):
    for i in range(40):
        (Path(folder) / f"shard{i}.bin").write_bytes(bytes([i]) * 1000)
    (Path(folder) / "config.json").write_text("{}")


def test_a_first_load_killed_anywhere_converts_cleanly_next_time(tmp_path, monkeypatch):
    rng = _rng("load")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DART_CACHE", str(cache))
    spec = models.PackagedModel("fake", (), "fake.gguf", "", 0, "fake")
    monkeypatch.setitem(models.PACKAGED_MODELS, "fake", spec)
    models_dir = cache / "models"
    survived = 0
    for _ in range(2):
        seen = set(models_dir.iterdir()) if models_dir.is_dir() else set()
        proc = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        staged = lambda seen=seen: models_dir.is_dir() and set(models_dir.iterdir()) - seen  # noqa: E731
        survived += _kill_when(proc, staged, rng.uniform(0.0, 0.8))
    monkeypatch.setattr(models, "_write_converted", _write)
    path = Path(models.resolve_model_path("fake"))
    assert sorted(p.name for p in models_dir.iterdir()) == ["fake"]  # the kills' leftovers gone
    assert len(list(path.iterdir())) == 41 and (path / "shard39.bin").read_bytes() == b"'" * 1000
    SURVIVED["first load"] = survived
    assert survived >= 1
