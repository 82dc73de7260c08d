"""Run `dart export` packages with torch alone, and the EOS trim every generation path shares.

This module imports nothing but torch and the standard library, so a deployment machine needs
neither transformers nor the `dart_ext` Python package: :func:`load_package` checks the
package's format and torch version, verifies the sha256 of the ops library the package carries
and loads it (`torch.ops.load_library`, which registers `torch.ops.dart.*`), then loads the two
AOTInductor programs. :func:`greedy_generate` is the one greedy loop over a `(prefill, decode)`
pair: the AOTInductor packages here, `scripts/run_exported.py`, and `DARTExportModule.generate`
(exported or eager programs) all run it.

A package is native code (the ops library and the compiled programs are shared objects loaded
into the process): trust it as you would an executable. The hash guards against a torn copy or
an ops library of another build, not against whoever can rewrite the manifest as well.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT",
    "MANIFEST",
    "OPS_LIBRARY",
    "ExportedPackage",
    "GreedyResult",
    "PackageError",
    "file_sha256",
    "greedy_generate",
    "left_pad",
    "load_package",
    "read_manifest",
    "trim_at_eos",
]

# 2: the ops library travels in the package, with its sha256; 3: every program has its sha256
FORMAT = "dart-export/3"
MANIFEST = "manifest.json"
OPS_LIBRARY = "dart_ops.so"  # the package's copy of the compiled dart_ext._C
_loaded_ops: dict[str, str] = {}  # sha256 -> path of the ops libraries this module loaded


class PackageError(RuntimeError):
    """A package that this runner cannot run; the message says what is wrong and what to do."""


def trim_at_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    """`row` up to and including its first `eos_token_id` (all of it without one)."""
    if eos_token_id is None or eos_token_id not in row:
        return row
    return row[: row.index(eos_token_id) + 1]


# ------------------------------------------------------------------------------------------------
# The greedy loop


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # [B, n <= max_new_tokens]; after a row's EOS: EOS repeated
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def tokens_per_s(self) -> float:
        steps = self.tokens.shape[0] * self.decode_steps
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.inference_mode()
def greedy_generate(
    prefill,
    decode,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    state: list[torch.Tensor],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> GreedyResult:
    """Greedy tokens from an exported `(prefill, decode)` pair (see `dart.runtime.export`).

    `prefill(input_ids, attention_mask, *state) -> (logits, *idx)` fills `state` (mask and KV
    cache) in place; `decode(token, position_ids, cache_position, *idx, *state) -> logits` runs
    one step. With `eos_token_id` the loop stops once every row has produced it.
    """
    if max_new_tokens < 1:  # the prefill's token is always emitted
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    start = time.perf_counter()
    logits, *idx = prefill(input_ids, attention_mask, *state)
    token = logits.argmax(-1)
    prefill_seconds = time.perf_counter() - start
    out = [token]
    done = token == eos_token_id if eos_token_id is not None else None
    length = input_ids.shape[1]
    position = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -1:] + 1
    start = time.perf_counter()
    steps = 0
    for t in range(1, max_new_tokens):
        if done is not None and bool(done.all()):
            break
        cache_position = torch.tensor([length + t - 1], device=input_ids.device)
        logits = decode(token[:, None], position, cache_position, *idx, *state)
        if isinstance(logits, (list, tuple)):  # an AOTInductor package returns a list
            logits = logits[0]
        token = logits.argmax(-1)
        if done is not None:
            token = torch.where(done, eos_token_id, token)
            done |= token == eos_token_id
        out.append(token)
        position = position + 1
        steps += 1
    decode_seconds = time.perf_counter() - start
    return GreedyResult(torch.stack(out, 1), prefill_seconds, decode_seconds, steps)


def left_pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[len(rows), length]`, each row left-padded with `pad_id`."""
    for r in rows:
        if not 1 <= len(r) <= length:
            raise ValueError(f"prompts must have 1..{length} tokens, got one of {len(r)}")
    ids = torch.tensor([[pad_id] * (length - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


# ------------------------------------------------------------------------------------------------
# Packages


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the package in `folder`, after checking its format and torch version."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{folder}: no {MANIFEST}, not a dart export package") from None
    except json.JSONDecodeError as e:
        raise PackageError(f"{path}: not valid JSON ({e})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise PackageError(
            f"{path}: package format {found!r}, this runner reads {FORMAT!r}; export the model "
            "again with this version of dart (`dart export`)"
        )
    exported_with = manifest.get("torch_version")
    if exported_with != torch.__version__:
        raise PackageError(
            f"{path}: exported with torch {exported_with}, this process runs torch "
            f"{torch.__version__}; its compiled programs and ops library are built for one torch "
            "build: run it with that torch, or export again with this one"
        )
    return manifest


def _package_file(folder: Path, name: Any, sha256: Any, what: str) -> Path:
    """The file `name` of the package, checked: a relative path inside `folder` (no `..`, no
    absolute path, no link out), present, and of the manifest's `sha256`."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise PackageError(f"{folder}: {what} {name!r} must be a file inside the package")
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise PackageError(f"{folder}: {what} {name!r} must be a file inside the package")
    if not path.is_file():
        raise PackageError(f"{folder}: the {what} {name} is missing from the package")
    if not isinstance(sha256, str):
        raise PackageError(
            f"{folder}: the manifest has no sha256 for the {what} {name}; export the package again"
        )
    digest = file_sha256(path)
    if digest != sha256:
        raise PackageError(
            f"{folder}: the {what} {name} has sha256 {digest}, which does not match the "
            f"manifest's {sha256}: it was changed or damaged after export (or comes from "
            "another export); export the package again"
        )
    return path


def _load_ops_library(folder: Path, manifest: dict[str, Any]) -> None:
    """Verify the package's ops library against the manifest's sha256, then load it (once per
    process; a process that already holds the same library, e.g. via `import dart_ext`, keeps
    it)."""
    path = _package_file(
        folder, manifest.get("ops_library"), manifest.get("ops_library_sha256"), "ops_library"
    )
    digest = manifest["ops_library_sha256"]
    loaded = dict(_loaded_ops)
    extension = sys.modules.get("dart_ext._C")  # the library `import dart_ext` loaded
    if extension is not None:
        loaded.setdefault(file_sha256(extension.__file__), extension.__file__)
    if digest in loaded:
        return
    if loaded:
        raise PackageError(
            f"this process already holds another build of the dart ops "
            f"({', '.join(loaded.values())}), so {path} cannot be loaded next to it: run the "
            "package in a fresh process"
        )
    torch.ops.load_library(str(path))
    _loaded_ops[digest] = str(path)


@dataclass
class ExportedPackage:
    """A loaded package: its manifest and the two AOTInductor programs."""

    folder: Path
    manifest: dict[str, Any]
    prefill: Any
    decode: Any

    def new_state(self) -> list[torch.Tensor]:
        """Zeroed decoding state (attention mask and KV cache) as the manifest specifies."""
        device = torch.device(self.manifest["device"])
        return [
            torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=device)
            for s in self.manifest["state"]
        ]

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool = True
    ) -> GreedyResult:
        """Greedy generation for token-id prompts (one per exported batch row)."""
        m = self.manifest
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if len(prompts) != m["batch_size"]:
            raise ValueError(
                f"the package was exported for batch {m['batch_size']}, got {len(prompts)} prompts"
            )
        length = m["prompt_len"] or max(len(p) for p in prompts)
        if length + max_new_tokens > m["max_len"]:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                f"length {m['max_len']} of the package"
            )
        ids, mask = left_pad(prompts, length, m["pad_token_id"] or 0)
        device = torch.device(m["device"])
        eos = m["eos_token_id"] if stop_at_eos else None
        return greedy_generate(
            self.prefill,
            self.decode,
            ids.to(device),
            mask.to(device),
            self.new_state(),
            max_new_tokens,
            eos,
        )


def load_package(folder: str | Path) -> ExportedPackage:
    """Check and load the package in `folder` (see the module docstring)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    _load_ops_library(folder, manifest)
    programs = manifest.get("programs")
    if not programs:
        raise PackageError(f"{folder}: exported without compiling (--no-compile): no programs")
    if not isinstance(programs, dict) or set(programs) != {"prefill", "decode"}:
        raise PackageError(f"{folder}: the manifest's programs must be prefill and decode")
    hashes = manifest.get("programs_sha256")
    hashes = hashes if isinstance(hashes, dict) else {}
    # every program is checked before any is loaded: a mix of two exports never runs
    paths = {
        name: _package_file(folder, programs[name], hashes.get(name), f"{name} program")
        for name in ("prefill", "decode")
    }
    prefill, decode = (
        torch._inductor.aoti_load_package(str(paths[name])) for name in ("prefill", "decode")
    )
    return ExportedPackage(folder, manifest, prefill, decode)
