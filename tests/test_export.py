"""`dart export`: torch.export of the prefill/decode programs, their tokens against the eager
compiled-loop path (`dart.runtime.fast`), and the AOTInductor packages run by the torch-only runner
in a
separate process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_assets import save_tiny
from tiny_models import random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.cli import main
from dart.runtime.export import (
    DARTExportModule,
    export_decode,
    export_programs,
    resolve_export_counts,
)
from dart.runtime.fast import FastGenerator
from dart.runtime.runner import OPS_LIBRARY, PackageError, file_sha256, load_package

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scripts" / "run_exported.py"
# Run in a subprocess before anything else: imports of transformers and dart_ext fail, as on a
# machine with torch alone.
TORCH_ONLY = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('transformers', 'dart_ext'):\n"
    "            raise ImportError(f'{name} is blocked: torch only')\n"
    "sys.meta_path.insert(0, Block())\n"
)
MAX_LEN = 48
FIXED = DARTConfig(layer_topk="all:0.5", drift={"enabled": False})


def _batch(length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, length), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


def _eager_tokens(model, cfg, ids, mask, new_tokens):
    """The reference: the dart.runtime.fast loop (eager step) with DART attached, masks from pass
    0."""
    handle = dart.attach(model, cfg)
    try:
        fast = FastGenerator(model, handle, max_len=MAX_LEN, compile=False)
        result = fast.generate(ids, mask, max_new_tokens=new_tokens)
        assert result.stats["mask_builds"] == ids.shape[0]
        return result.tokens, result.stats["keep_counts"]
    finally:
        handle.detach()


def _ops(ep, namespace="dart"):
    return {str(n.target) for n in ep.graph.nodes if str(n.target).startswith(namespace + ".")}


def test_exported_programs_equal_the_eager_wrapper():
    model = tiny_model("llama")
    handle = dart.attach(model, FIXED)
    wrapper = DARTExportModule(handle, 2, MAX_LEN, resolve_export_counts(handle))
    programs = export_programs(wrapper)  # prompt length dynamic
    prefill, decode = programs["prefill"], programs["decode"]
    assert _ops(prefill) == {"dart.topk_indices.default"}
    assert _ops(decode) == {"dart.gathered_glu_ffn.default"}
    # the kernels' weight views are rebuilt from parameters, not captured as constant copies
    assert all(k.endswith("inv_freq") for k in decode.constants)
    for length in (12, 5):  # the example length was 8
        ids, mask = _batch(length)
        state_e, state_x = wrapper.new_state(), wrapper.new_state()
        with torch.no_grad():
            eager = wrapper.prefill(ids, mask, *state_e)
            exported = prefill.module()(ids, mask, *state_x)
        assert len(eager) == 1 + len(wrapper.pruned) == 4
        torch.testing.assert_close(exported[0], eager[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(exported[1:], eager[1:], strict=True):
            assert a.shape == (2, 32) and torch.equal(a, b)
        for a, b in zip(state_x, state_e, strict=True):  # the state is written in place
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert state_e[0][1, :3].eq(0).all() and state_e[0][1, 3:].eq(1).all()
        step = (
            eager[0].argmax(-1)[:, None],
            mask.sum(-1, keepdim=True),
            torch.tensor([length]),
            *eager[1:],
        )
        with torch.no_grad():
            y_e = wrapper.decode(*step, *state_e)
            y_x = decode.module()(*step, *state_x)
        torch.testing.assert_close(y_x, y_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state_x[1], state_e[1], rtol=1e-5, atol=1e-5)
    # the handle is untouched: modes, selections and the controller's hooks state
    assert all(f.mode == "dense" and f.idx is None for f in handle.ffns)
    assert handle.controller.auto_step
    handle.detach()


@pytest.mark.parametrize(
    "cfg",
    [
        FIXED,
        DARTConfig(layer_topk="all:0.5,1:dense", batch_policy="shared", drift={"enabled": False}),
        DARTConfig(layer_topk="all:0.4", method="griffin"),
    ],
    ids=["per_sequence", "shared+dense_layer", "griffin"],
)
def test_exported_greedy_tokens_equal_fast_generator(cfg):
    model = tiny_model("llama")
    ids, mask = _batch()
    ref, _ = _eager_tokens(model, cfg, ids, mask, 20)
    handle = dart.attach(model, cfg)
    wrapper = DARTExportModule(handle, 2, MAX_LEN, resolve_export_counts(handle))
    programs = export_programs(wrapper)
    modules = (programs["prefill"].module(), programs["decode"].module())
    assert torch.equal(wrapper.generate(ids, mask, 20), ref)
    assert torch.equal(wrapper.generate(ids, mask, 20, programs=modules), ref)
    handle.detach()


def test_auto_budget_counts_come_from_the_calibration_prompt():
    model = tiny_model("llama")
    cfg = DARTConfig(total_prune=0.5, drift={"enabled": False})  # layer_topk all:auto
    ids = _batch()[0][:1]
    ref, ref_counts = _eager_tokens(model, cfg, ids, torch.ones_like(ids), 16)
    handle = dart.attach(model, cfg)
    with pytest.raises(ValueError, match="calibration"):
        resolve_export_counts(handle)
    counts = resolve_export_counts(handle, ids)
    assert counts == ref_counts and counts != handle.controller.widths
    wrapper = DARTExportModule(handle, 1, MAX_LEN, counts)
    programs = export_programs(wrapper, prompt_len=ids.shape[1])  # fixed prompt length
    modules = (programs["prefill"].module(), programs["decode"].module())
    assert torch.equal(wrapper.generate(ids, max_new_tokens=16, programs=modules), ref)
    handle.detach()


def test_calibration_rows_with_different_budgets_are_refused():
    """Per-sequence budgets give each calibration row its own counts; the programs keep one."""
    model = tiny_model("llama", layers=8)  # these prompts' budgets differ (test_per_sequence)
    ids = random_ids(4, 12, seed=7)
    handle = dart.attach(model, DARTConfig(total_prune=0.5, drift={"enabled": False}))
    with pytest.raises(ValueError, match="different per-sequence 'auto' budgets.*one calibration"):
        resolve_export_counts(handle, ids)
    handle.detach()
    cfg = DARTConfig(total_prune=0.5, drift={"enabled": False}, batch_policy="shared")
    handle = dart.attach(model, cfg)
    assert resolve_export_counts(handle, ids) == handle.stats()["keep_counts"]
    handle.detach()


@pytest.mark.parametrize("method", ["random", "static"])
def test_methods_without_prompt_statistics_are_refused(method):
    handle = dart.attach(tiny_model("llama"), FIXED, method=method)
    try:
        with pytest.raises(ValueError, match=f"not '{method}'") as err:
            DARTExportModule(handle, 1, MAX_LEN, list(handle.controller.widths))
        assert "dart" in str(err.value) and "griffin" in str(err.value)
    finally:
        handle.detach()


def test_aoti_package_reproduces_eager_tokens_in_a_torch_only_process(tmp_path):
    model = tiny_model("llama")
    ids, mask = _batch()
    ref, _ = _eager_tokens(model, FIXED, ids, mask, 16)
    manifest = export_decode(model, tmp_path / "pkg", batch_size=2, max_len=MAX_LEN, config=FIXED)
    assert not hasattr(model, "_dart_handle")  # attached for the export, then detached
    written = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert written["keep_counts"] == [32, 32, 32] and written["pruned_layers"] == [0, 1, 2]
    assert written["vocab_size"] == 96 and written["eos_token_id"] == 2
    assert written["state"][0] == {
        "name": "attention_mask",
        "shape": [2, MAX_LEN],
        "dtype": "int64",
    }
    assert manifest["exported"]
    # the package carries its ops library (a relative path): it still runs once moved
    assert written["ops_library"] == OPS_LIBRARY
    package = shutil.move(tmp_path / "pkg", tmp_path / "moved")
    prompts = [",".join(map(str, ids[0].tolist())), ",".join(map(str, ids[1, 3:].tolist()))]
    run = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", TORCH_ONLY + run, str(RUNNER), str(package)]
    cmd += [a for p in prompts for a in ("--prompt-ids", p)]
    cmd += ["--max-new-tokens", "16", "--ignore-eos", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tokens"] == ref.tolist()


def test_the_runner_imports_with_torch_alone():
    code = TORCH_ONLY + "import dart.runtime.runner; assert 'transformers' not in sys.modules"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def uncompiled_package(tmp_path_factory):
    """A package exported without AOTInductor (its manifest and ops library are checked
    before any program is loaded)."""
    folder = tmp_path_factory.mktemp("pkg")
    export_decode(tiny_model("llama"), folder, max_len=MAX_LEN, config=FIXED, compile=False)
    return folder


def _copy(folder, tmp_path, **manifest_changes):
    copy = Path(shutil.copytree(folder, tmp_path / "pkg"))
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return copy


def test_a_package_passes_its_checks_and_says_it_has_no_programs(uncompiled_package, tmp_path):
    manifest = json.loads((uncompiled_package / "manifest.json").read_text())
    assert manifest["ops_library_sha256"] == file_sha256(uncompiled_package / OPS_LIBRARY)
    with pytest.raises(PackageError, match="no programs"):
        load_package(_copy(uncompiled_package, tmp_path))


def test_a_changed_ops_library_is_refused(uncompiled_package, tmp_path):
    copy = _copy(uncompiled_package, tmp_path)
    with open(copy / OPS_LIBRARY, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackageError, match="sha256 .* does not match the manifest"):
        load_package(copy)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format": "dart-export/1"}, "package format 'dart-export/1', this runner reads"),
        ({"torch_version": "1.0.0"}, "exported with torch 1.0.0, this process runs torch"),
        ({"ops_library": "/usr/lib/libc.so.6"}, "must be a file inside the package"),
        ({"ops_library": "../escape.so"}, "must be a file inside the package"),
    ],
    ids=["format", "torch", "absolute", "outside"],
)
def test_a_package_of_another_format_or_torch_is_refused(
    uncompiled_package, tmp_path, change, message
):
    with pytest.raises(PackageError, match=message):
        load_package(_copy(uncompiled_package, tmp_path, **change))


def test_the_manifest_is_replaced_atomically(uncompiled_package, tmp_path, monkeypatch):
    """A failed write leaves the previous manifest whole (temp file + rename)."""
    copy = _copy(uncompiled_package, tmp_path)
    before = (copy / "manifest.json").read_text()

    def interrupted(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        export_decode(tiny_model("llama"), copy, max_len=32, config=FIXED, compile=False)
    assert (copy / "manifest.json").read_text() == before
    assert sorted(p.name for p in copy.iterdir()) == ["dart_ops.so", "manifest.json"]


def test_dart_export_writes_a_manifest(tmp_path):
    """`dart export` (flags from cli.ExportOptions, the DARTConfig as --dart.* flags)."""
    folder = save_tiny(tmp_path / "model")
    argv = ["export", "--model", str(folder), "--out", str(tmp_path / "pkg"), "--max-len", "64"]
    argv += ["--dart.total_prune", "0.5", "--prompt", "The quick brown fox.", "--no-compile"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["max_len"] == 64 and manifest["prompt_len"] is None
    assert manifest["programs"] == {} and manifest["dart_config"]["total_prune"] == 0.5
    kept = sum(manifest["keep_counts"]) / sum(manifest["widths"])
    assert 0.45 <= kept <= 0.55


def _fake_aoti(monkeypatch, fail_on: str | None = None):
    """AOTInductor stand-ins: `aoti_compile_and_package` writes a file naming the program and
    its export (a count), raising at `fail_on`; `aoti_load_package` returns the path."""
    calls = {"n": 0}

    def compile_and_package(program, package_path, inductor_configs=None):
        name = Path(package_path).name
        if name == fail_on:
            raise KeyboardInterrupt(f"killed while compiling {name}")
        calls["n"] += 1
        Path(package_path).write_bytes(f"{name} #{calls['n']}".encode())

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: path)


def test_an_interrupted_re_export_leaves_the_old_package_whole(tmp_path, monkeypatch):
    """Re-exporting into a package and dying between its two programs leaves the previous
    package as it was (it loads, with its own programs); no staging folder survives; a new
    export replaces the package whole (issue 24.5)."""
    model = tiny_model("llama")
    folder = tmp_path / "pkg"
    _fake_aoti(monkeypatch)
    export_decode(model, folder, max_len=MAX_LEN, config=FIXED)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _fake_aoti(monkeypatch, fail_on="decode.pt2")
    with pytest.raises(KeyboardInterrupt):
        export_decode(model, folder, max_len=MAX_LEN, config=FIXED)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no staging left behind
    package = load_package(folder)
    assert Path(package.prefill).read_bytes() == b"prefill.pt2 #1"
    _fake_aoti(monkeypatch)
    export_decode(model, folder, max_len=MAX_LEN, config=FIXED)
    package = load_package(folder)
    assert Path(package.prefill).read_bytes() == b"prefill.pt2 #1"  # a fresh count: new files
    assert Path(package.decode).read_bytes() == b"decode.pt2 #2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert (folder / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):  # never deletes someone's files
        export_decode(model, folder, max_len=MAX_LEN, config=FIXED)


@pytest.mark.parametrize(
    "programs,message",
    [
        ({"prefill": "../other/prefill.pt2"}, "prefill program '../other/prefill.pt2' must be"),
        ({"prefill": "/tmp/prefill.pt2"}, "prefill program '/tmp/prefill.pt2' must be a file"),
        ({"decode": "prefill.pt2"}, "decode.* does not match the manifest"),
    ],
    ids=["outside", "absolute", "other-file"],
)
def test_programs_must_be_inside_the_package_and_match_their_sha256(
    tmp_path, monkeypatch, programs, message
):
    model = tiny_model("llama")
    _fake_aoti(monkeypatch)
    folder = tmp_path / "pkg"
    export_decode(model, folder, max_len=MAX_LEN, config=FIXED)
    (tmp_path / "other").mkdir()
    shutil.copy(folder / "prefill.pt2", tmp_path / "other" / "prefill.pt2")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["programs"].update(programs)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        load_package(folder)
    manifest["programs"] = {"prefill": "prefill.pt2", "decode": "decode.pt2"}
    (folder / "decode.pt2").write_bytes(b"decode of another export")  # a mix of two exports
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="decode program .* does not match the manifest"):
        load_package(folder)
