"""llama.cpp as a reference arm: build its tools from a pinned source, run and parse them.

A CPU user who wants a packaged model fast runs llama.cpp on the very GGUF file that the model
ships as, so every speed and quality figure of `dart` is measured beside it. Nothing here is a
hand-copied binary: the tools are compiled once from the llama.cpp sources vendored in the
pinned ``llama-cpp-python`` sdist (downloaded from PyPI with pip, checked against its sha256)
and cached in ``$DART_CACHE/llamacpp/<version>/bin``.

The build (``ensure_llamacpp``; ``python -m dart.llamacpp build``; ``make llamacpp``):

- CPU only, Release, no network code (``LLAMA_OPENSSL=OFF``, no server, tests or examples),
  static libraries so the binaries do not point back into the build tree that is removed.
- ``GGML_NATIVE=ON``: what llama.cpp's own CMake picks by default and what its users run, so the
  reference is llama.cpp at its best on this CPU (a portable build without
  ``GGML_CPU_ALL_VARIANTS`` would fall back to baseline SIMD and flatter dart). The build records
  the CPU it was made for and is rebuilt when the cache is used on a different one.
- One build at a time (a lock file beside the tool folder); the build runs in a temp folder that
  is renamed into place only when every tool is there, so a killed build is never taken as
  complete. Each step logs to ``$DART_CACHE/llamacpp/logs/<version>-<step>.log``; a failure
  raises :class:`LlamaCppBuildError` naming the step and that log.

What the tools measure:

- ``bench``: ``llama-bench -o json``; with ``n_prompt=0`` it times decoding ``n_gen`` tokens
  from an empty context (tok/s of the generation only, after one warm-up run). llama.cpp's
  worker threads spin-wait between graph nodes, so it is timed on a quiet machine only.
- ``perplexity``: ``llama-perplexity`` cuts the tokenised file into disjoint chunks of ``ctx``
  tokens (chunk i = tokens ``[i*ctx, (i+1)*ctx)``, its first token replaced by BOS when the
  vocabulary adds one), and scores only the second half of each chunk: the predictions of tokens
  ``ctx/2+1 .. ctx-1`` (``ctx/2 - 1`` tokens per chunk), each with at least ``ctx/2`` tokens of
  context. A dart arm compared on the same text must score the same positions.
- ``quantize``: ``llama-quantize --allow-requantize`` from the packaged Q4_K_M file (the only
  weights there are), so Q3_K_M / Q2_K here carry the Q4_K_M rounding too and are somewhat worse
  than files quantised from 16-bit weights.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dart.assets.models import PACKAGED_MODELS, assemble_gguf, cache_dir

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "QUANT_TYPES",
    "TOOLS",
    "BenchRecord",
    "LlamaCppBuildError",
    "LlamaCppError",
    "PerplexityResult",
    "bench",
    "bench_command",
    "ensure_llamacpp",
    "file_type",
    "weight_bytes_per_token",
    "heldout_text_file",
    "packaged_gguf",
    "parse_bench_json",
    "parse_perplexity_output",
    "perplexity",
    "perplexity_command",
    "perplexity_windows",
    "quantize",
    "quantize_command",
    "quantized_path",
    "tool_path",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
TOOLS: tuple[str, ...] = ("llama-bench", "llama-perplexity", "llama-quantize")
# llama-quantize's type names that make sense from a Q4_K_M source (no 16/32-bit targets)
QUANT_TYPES: tuple[str, ...] = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
    "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
)  # fmt: skip
CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
)
BUILD_INFO = "build.json"  # written last inside the staging folder: its presence = complete


class LlamaCppError(RuntimeError):
    """A llama.cpp tool failed or printed something that could not be parsed."""


class LlamaCppBuildError(LlamaCppError):
    """A build step failed; ``step`` and ``log`` name the step and its full log file."""

    def __init__(self, step: str, log: Path, detail: str) -> None:
        self.step, self.log = step, log
        super().__init__(f"building llama.cpp failed at step {step!r}: {detail}; full log: {log}")


# ----------------------------------------------------------------------------- the build


def llamacpp_root() -> Path:
    """``$DART_CACHE/llamacpp``: tool folders, logs, the sdist, quantised files, texts."""
    return cache_dir() / "llamacpp"


def _cpu_fingerprint() -> str:
    """Machine and SIMD flags of this CPU: a native build is only reused where it matches."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:16]


def _complete(folder: Path) -> dict | None:
    """The build record of a finished tool folder, or None when it is not a complete build."""
    try:
        info = json.loads((folder / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None
    if not all((folder / "bin" / t).is_file() for t in TOOLS):
        return None
    return info


@contextlib.contextmanager
def _lock(path: Path, progress: bool) -> Iterator[None]:
    """An exclusive lock on ``path`` (kept for the process's life of the block; the OS frees it
    if the process dies, so a killed build never leaves a stale lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"dart: waiting for another llama.cpp build ({path})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_step(
    step: str, cmd: Sequence[str], log: Path, progress: bool, cwd: Path | None = None
) -> None:
    """Run one build command, its output going to ``log`` (and streamed when ``progress``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"dart: llama.cpp build: {step} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as err:  # e.g. cmake not installed
            raise LlamaCppBuildError(step, log, f"cannot run {cmd[0]!r}: {err}") from err
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if progress:
                print(f"  [{step}] {line.rstrip()}", file=sys.stderr, flush=True)
        code = proc.wait()
    if code != 0:
        last = "\n    ".join(tail)
        raise LlamaCppBuildError(step, log, f"exit status {code}; last lines:\n    {last}\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_sdist(root: Path, logs: Path, progress: bool) -> Path:
    """The pinned sdist in ``root/sdist`` (downloaded with pip once, sha256 checked)."""
    target = root / "sdist" / SDIST_FILE
    if not (target.is_file() and _sha256(target) == SDIST_SHA256):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            _run_step("download", [*cmd, spec, "-d", tmp], logs / "download.log", progress)
            got = Path(tmp) / SDIST_FILE
            if not got.is_file():
                raise LlamaCppBuildError(
                    "download", logs / "download.log", f"pip did not produce {SDIST_FILE}"
                )
            digest = _sha256(got)
            if digest != SDIST_SHA256:
                raise LlamaCppBuildError(
                    "download",
                    logs / "download.log",
                    f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}",
                )
            os.replace(got, target)
    return target


def _unpack(sdist: Path, dest: Path, log: Path, progress: bool) -> Path:
    """Extract only vendor/llama.cpp of the sdist into ``dest``; returns the source folder."""
    if progress:
        print(f"dart: llama.cpp build: unpack {sdist.name}", file=sys.stderr, flush=True)
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VENDOR_PREFIX)]
            if not members:
                raise ValueError(f"no {VENDOR_PREFIX} inside")
            tar.extractall(dest, members=members, filter="data")
    except (OSError, ValueError, tarfile.TarError) as err:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"unpacking {sdist}: {err}\n")
        raise LlamaCppBuildError("unpack", log, str(err)) from err
    return dest / VENDOR_PREFIX


def _build_jobs() -> int:
    return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)


def build_into(staging: Path, logs: Path, progress: bool) -> None:
    """Fetch, unpack, configure and build llama.cpp; put the tools in ``staging/bin``.

    Work files live under ``staging/work`` and are removed on success. The caller renames
    ``staging`` into place once this returns and the build record is written.
    """
    root = llamacpp_root()
    sdist = _fetch_sdist(root, logs, progress)
    work = staging / "work"
    src = _unpack(sdist, work, logs / "unpack.log", progress)
    build = work / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", src, "-B", build, *generator, *CMAKE_OPTIONS]
    _run_step("configure", configure, logs / "configure.log", progress)
    compile_cmd = ["cmake", "--build", build, "--config", "Release", "-j", str(_build_jobs())]
    _run_step("compile", [*compile_cmd, "--target", *TOOLS], logs / "compile.log", progress)
    (staging / "bin").mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        found = build / "bin" / tool
        if not found.is_file():
            raise LlamaCppBuildError("compile", logs / "compile.log", f"{found} was not built")
        shutil.copy2(found, staging / "bin" / tool)
    shutil.rmtree(work)


def ensure_llamacpp(progress: bool = True, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder holding ``bin/llama-bench``, ``bin/llama-perplexity``, ``bin/llama-quantize``,
    built on first use (16 minutes on 2 busy cores; see the module's notes for the options)."""
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise ValueError(
            f"version {version!r}: only the pinned llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} "
            "is supported (its sdist sha256 is pinned)"
        )
    root = llamacpp_root()
    target = root / version
    cpu = _cpu_fingerprint()
    info = _complete(target)
    if info is not None and info.get("cpu") == cpu:
        return target
    with _lock(root / f"{version}.lock", progress):
        info = _complete(target)  # another process may have finished it while we waited
        if info is not None and info.get("cpu") == cpu:
            return target
        for stale in [*root.glob(f".{version}.build-*"), *root.glob(f".{version}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock)
        logs = root / "logs" / version
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.build-", dir=root))
        start = time.monotonic()
        try:
            build_into(staging, logs, progress)
            record = {
                "llama_cpp_python": version,
                "sdist_sha256": SDIST_SHA256,
                "cmake_options": list(CMAKE_OPTIONS),
                "cpu": cpu,
                "machine": platform.machine(),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "build_seconds": round(time.monotonic() - start, 1),
            }
            (staging / BUILD_INFO).write_text(json.dumps(record, indent=2) + "\n")
            staging.chmod(0o755)  # mkdtemp made it private; the cache is shared like results
            if target.exists():  # an incomplete folder or one built for another CPU
                old = Path(tempfile.mkdtemp(prefix=f".{version}.old-", dir=root))
                os.replace(target, old / "tools")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if progress:
        print(f"dart: llama.cpp tools ready in {target / 'bin'}", file=sys.stderr)
    return target


def tool_path(tool: str, tools: Path | None = None) -> Path:
    """Path of one of :data:`TOOLS` (building them if ``tools`` is None and they are missing)."""
    if tool not in TOOLS:
        raise ValueError(f"tool {tool!r}: use one of {', '.join(TOOLS)}")
    return (tools or ensure_llamacpp()) / "bin" / tool


def _run_tool(cmd: Sequence[str], what: str) -> str:
    """Run a tool, returning stdout + stderr; a failure raises with the output's tail."""
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, errors="replace", check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise LlamaCppError(
            f"{what} failed with exit status {proc.returncode}: {' '.join(map(str, cmd))}\n{tail}"
        )
    return proc.stdout + ("\n" if proc.stdout else "") + proc.stderr


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_file(name: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {path}")
    return path


# ----------------------------------------------------------------------------- llama-bench


@dataclass(frozen=True)
class BenchRecord:
    """One llama-bench test: tok/s of ``n_gen`` decoded tokens (after ``n_prompt`` prompt
    tokens) over the repetitions (``samples_ts``; ``avg_ts`` is their mean)."""

    model_filename: str
    model_type: str  # e.g. "qwen2 1.5B Q4_K - Medium"
    model_size: int  # bytes of the weights
    model_n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    avg_ts: float
    stddev_ts: float
    samples_ts: tuple[float, ...]
    build_commit: str
    cpu_info: str

    def to_dict(self) -> dict:
        return asdict(self)


def bench_command(
    tools: Path,
    gguf: str | os.PathLike,
    threads: int,
    n_gen: int,
    n_prompt: int = 0,
    repetitions: int = 5,
) -> list[str]:
    """The llama-bench command line (JSON on stdout)."""
    _check_positive("threads", threads)
    _check_positive("n_gen", n_gen, 0)
    _check_positive("n_prompt", n_prompt, 0)
    _check_positive("repetitions", repetitions)
    if n_gen == 0 and n_prompt == 0:
        raise ValueError("n_gen and n_prompt are both 0: nothing to time")
    return [
        str(tool_path("llama-bench", tools)),
        "-m", str(gguf),
        "-t", str(threads),
        "-p", str(n_prompt),
        "-n", str(n_gen),
        "-r", str(repetitions),
        "-o", "json",
    ]  # fmt: skip


def parse_bench_json(text: str) -> list[BenchRecord]:
    """The records of ``llama-bench -o json`` output (a JSON list of test objects)."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise LlamaCppError(f"llama-bench printed no JSON list: {err}: {text[:300]!r}") from err
    if not isinstance(data, list):
        raise LlamaCppError(f"llama-bench JSON is a {type(data).__name__}, expected a list")
    records = []
    for i, t in enumerate(data):
        try:
            records.append(
                BenchRecord(
                    model_filename=str(t["model_filename"]),
                    model_type=str(t["model_type"]),
                    model_size=int(t["model_size"]),
                    model_n_params=int(t["model_n_params"]),
                    n_threads=int(t["n_threads"]),
                    n_prompt=int(t["n_prompt"]),
                    n_gen=int(t["n_gen"]),
                    avg_ts=float(t["avg_ts"]),
                    stddev_ts=float(t["stddev_ts"]),
                    samples_ts=tuple(float(s) for s in t["samples_ts"]),
                    build_commit=str(t.get("build_commit", "")),
                    cpu_info=str(t.get("cpu_info", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise LlamaCppError(f"llama-bench test {i}: missing or bad field {err}") from err
    return records


def bench(
    gguf: str | os.PathLike,
    threads: int,
    n_gen: int,
    n_prompt: int = 0,
    repetitions: int = 5,
    tools: Path | None = None,
) -> list[BenchRecord]:
    """Run llama-bench on ``gguf`` (decode speed with ``n_prompt=0``)."""
    gguf = _check_file("gguf", gguf)
    cmd = bench_command(tools or ensure_llamacpp(), gguf, threads, n_gen, n_prompt, repetitions)
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise LlamaCppError(f"llama-bench failed with exit status {proc.returncode}:\n{tail}")
    return parse_bench_json(proc.stdout)


# ----------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """llama-perplexity's final estimate; ``running`` holds its estimate after each chunk."""

    ppl: float
    stderr: float | None  # "+/-" of the final estimate (None when it printed none)
    running: tuple[float, ...]
    ctx: int
    chunks: int

    def to_dict(self) -> dict:
        return asdict(self)


_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.eE+-]+|nan|inf)(?: \+/- ([0-9.eE+-]+|nan))?")
_RUNNING_RE = re.compile(r"\[(\d+)\]([0-9.eE+-]+|nan|inf),")
_CHUNKS_RE = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")


def perplexity_command(
    tools: Path,
    gguf: str | os.PathLike,
    text_file: str | os.PathLike,
    ctx: int = 512,
    chunks: int = 16,
    threads: int | None = None,
) -> list[str]:
    """The llama-perplexity command line (``chunks`` disjoint chunks of ``ctx`` tokens)."""
    _check_positive("ctx", ctx, 8)
    if ctx % 2:
        raise ValueError(f"ctx must be even (half of each chunk is scored), got {ctx}")
    _check_positive("chunks", chunks)
    cmd = [str(tool_path("llama-perplexity", tools)), "-m", str(gguf), "-f", str(text_file)]
    cmd += ["-c", str(ctx), "--chunks", str(chunks)]
    if threads is not None:
        _check_positive("threads", threads)
        cmd += ["-t", str(threads)]
    return cmd


def parse_perplexity_output(text: str) -> PerplexityResult:
    """The final estimate, its ``+/-``, the running estimates and the chunk geometry."""
    if "you need at least" in text:
        line = next(ln for ln in text.splitlines() if "you need at least" in ln)
        raise LlamaCppError(f"llama-perplexity: the text is too short: {line.strip()}")
    final = _FINAL_RE.search(text)
    if final is None:
        tail = "\n".join(text.splitlines()[-10:])
        raise LlamaCppError(f"llama-perplexity printed no 'Final estimate' line:\n{tail}")
    running = tuple(float(v) for _, v in _RUNNING_RE.findall(text))
    geometry = _CHUNKS_RE.search(text)
    chunks, ctx = (int(geometry[1]), int(geometry[2])) if geometry else (len(running), 0)
    return PerplexityResult(
        ppl=float(final[1]),
        stderr=float(final[2]) if final[2] is not None else None,
        running=running,
        ctx=ctx,
        chunks=chunks,
    )


def perplexity_windows(num_tokens: int, ctx: int = 512, chunks: int = 16) -> list:
    """llama-perplexity's chunks as :class:`dart.evaluate.perplexity.Window` objects, so a dart
    arm scored with ``score_window`` over the same token ids scores the same positions.

    Chunk i holds tokens ``[i*ctx, (i+1)*ctx)``; its targets ``ctx/2+1 .. ctx-1`` are scored
    (``score_from = ctx/2 + 1``: llama.cpp reads the logits of positions ``ctx/2 .. ctx-2``);
    a prompt-selecting method builds its masks from the unscored first half (``prep_len``).
    llama.cpp also puts BOS in place of each chunk's first token when the vocabulary adds one
    (``tokenizer.ggml.add_bos_token``; Qwen2.5's does not), which the caller must mirror.
    """
    from dart.evaluate.perplexity import Window

    _check_positive("ctx", ctx, 8)
    _check_positive("chunks", chunks)
    if ctx % 2:
        raise ValueError(f"ctx must be even (half of each chunk is scored), got {ctx}")
    if num_tokens < max(chunks, 2) * ctx:  # llama.cpp also needs at least two chunks' tokens
        raise ValueError(
            f"num_tokens {num_tokens}: {chunks} chunks of {ctx} tokens need at least "
            f"{max(chunks, 2) * ctx}"
        )
    half = ctx // 2
    return [Window(f"c{i:05d}", i * ctx, (i + 1) * ctx, half + 1, half) for i in range(chunks)]


def perplexity(
    gguf: str | os.PathLike,
    text_file: str | os.PathLike,
    ctx: int = 512,
    chunks: int = 16,
    threads: int | None = None,
    tools: Path | None = None,
) -> PerplexityResult:
    """llama-perplexity of ``gguf`` on ``text_file`` (second half of each chunk scored)."""
    gguf = _check_file("gguf", gguf)
    text_file = _check_file("text_file", text_file)
    cmd = perplexity_command(tools or ensure_llamacpp(), gguf, text_file, ctx, chunks, threads)
    result = parse_perplexity_output(_run_tool(cmd, "llama-perplexity"))
    if result.chunks != chunks:
        raise LlamaCppError(
            f"llama-perplexity scored {result.chunks} chunks, {chunks} asked: {text_file} is "
            f"too short for {chunks} chunks of {ctx} tokens"
        )
    return result


# ----------------------------------------------------------------------------- quantize


def quantize_command(
    tools: Path, src: str | os.PathLike, dst: str | os.PathLike, qtype: str, threads: int | None
) -> list[str]:
    """The llama-quantize command line (requantising: the source is already quantised)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"type {qtype!r}: use one of {', '.join(QUANT_TYPES)}")
    cmd = [str(tool_path("llama-quantize", tools)), "--allow-requantize", str(src), str(dst), qtype]
    if threads is not None:
        _check_positive("threads", threads)
        cmd.append(str(threads))
    return cmd


def quantized_path(src: str | os.PathLike, qtype: str) -> Path:
    """Where :func:`quantize` caches ``src`` quantised to ``qtype`` by default."""
    return llamacpp_root() / "quantized" / f"{Path(src).stem}.{qtype}.gguf"


def quantize(
    src_gguf: str | os.PathLike,
    dst_gguf: str | os.PathLike | None,
    qtype: str,
    threads: int | None = None,
    tools: Path | None = None,
) -> Path:
    """``src_gguf`` quantised to ``qtype`` at ``dst_gguf`` (default :func:`quantized_path`).

    Cached: an existing ``dst_gguf`` made from a source of the same name and size with the same
    type (its ``.json`` sidecar says so) is returned as is. The file is written under a temp
    name and renamed, so an interrupted run never leaves a file that looks finished.
    """
    src = _check_file("src_gguf", src_gguf)
    dst = Path(dst_gguf) if dst_gguf is not None else quantized_path(src, qtype)
    if dst.resolve() == src.resolve():
        raise ValueError(f"dst_gguf {dst} is the source file")
    sidecar = dst.with_name(dst.name + ".json")
    want = {"source": src.name, "source_size": src.stat().st_size, "type": qtype}
    with contextlib.suppress(OSError, ValueError):
        if dst.is_file() and json.loads(sidecar.read_text()) == want:
            return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp.gguf", dir=dst.parent)
    os.close(fd)
    try:
        _run_tool(
            quantize_command(tools or ensure_llamacpp(), src, tmp, qtype, threads), "quantize"
        )
        os.chmod(tmp, 0o644)  # mkstemp made it private
        os.replace(tmp, dst)
        sidecar.write_text(json.dumps(want) + "\n")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ----------------------------------------------------------------------------- inputs

# llama.h's `llama_ftype` values (stable: they are written into GGUF files) of the common types
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


def file_type(gguf: str | os.PathLike) -> str:
    """The quantisation type a GGUF file declares (``general.file_type``), e.g. ``Q4_K_M``."""
    from gguf import GGUFReader

    field = GGUFReader(_check_file("gguf", gguf)).fields.get("general.file_type")
    if field is None:
        raise LlamaCppError(f"{gguf} declares no general.file_type")
    value = int(field.contents())
    return FILE_TYPES.get(value, f"ftype{value}")


def weight_bytes_per_token(gguf: str | os.PathLike) -> int:
    """Bytes of the tensors read to decode one token: every tensor but the token embedding
    (one row of it is read), which counts only when it doubles as the output head (tied)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(_check_file("gguf", gguf)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def packaged_gguf(model: str) -> Path:
    """The GGUF file of a packaged model (assembled once from its parts, checked against the
    pins). A model with no GGUF (a local folder, a hub id, a random model) is refused.

    A multi-part model is assembled into ``$DART_CACHE/llamacpp/gguf``, apart from the file
    that ``dart.load_model`` assembles and deletes after converting it.
    """
    spec = PACKAGED_MODELS.get(model.lower())
    if spec is None:
        raise ValueError(
            f"model {model!r} has no GGUF file: llama.cpp runs only on a packaged model "
            f"({', '.join(PACKAGED_MODELS)})"
        )
    if len(spec.parts) == 1:
        return assemble_gguf(spec)
    return assemble_gguf(spec, llamacpp_root() / "gguf" / spec.gguf_file)


def heldout_text_file(corpus: str = "wiki", path: str | os.PathLike | None = None) -> Path:
    """The packaged corpus's ``eval`` split (never calibration) written to a text file, so that
    llama.cpp and dart score the very same text. Rewritten atomically only when it differs."""
    from dart.assets.data import load_text
    from dart.results import atomic_write_text

    text = load_text(corpus, "eval")
    target = Path(path) if path is not None else llamacpp_root() / "text" / f"{corpus}-eval.txt"
    with contextlib.suppress(OSError):
        if target.read_text(encoding="utf-8") == text:
            return target
    atomic_write_text(target, text)
    return target


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dart.llamacpp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the llama.cpp tools into the cache (once)")
    g = sub.add_parser("gguf", help="print the GGUF path of a packaged model")
    g.add_argument("model")
    q = sub.add_parser("quantize", help="quantise a packaged model's GGUF; print the path")
    q.add_argument("model")
    q.add_argument("type", choices=QUANT_TYPES)
    b = sub.add_parser("bench", help="llama-bench decode speed (JSON records)")
    b.add_argument("gguf", help="a GGUF file or a packaged model name")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    b.add_argument("--n-gen", type=int, default=128)
    b.add_argument("--repetitions", type=int, default=5)
    r = sub.add_parser("perplexity", help="llama-perplexity on the held-out wiki text")
    r.add_argument("gguf", help="a GGUF file or a packaged model name")
    r.add_argument("--ctx", type=int, default=512)
    r.add_argument("--chunks", type=int, default=16)
    r.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    def gguf_of(name: str) -> Path:
        return Path(name) if Path(name).is_file() else packaged_gguf(name)

    if args.command == "build":
        print(ensure_llamacpp() / "bin")
    elif args.command == "gguf":
        print(packaged_gguf(args.model))
    elif args.command == "quantize":
        print(quantize(packaged_gguf(args.model), None, args.type))
    elif args.command == "bench":
        recs = bench(gguf_of(args.gguf), args.threads, args.n_gen, 0, args.repetitions)
        print(json.dumps([r.to_dict() for r in recs], indent=2))
    else:
        res = perplexity(gguf_of(args.gguf), heldout_text_file(), args.ctx, args.chunks,
                         args.threads)  # fmt: skip
        print(json.dumps(res.to_dict(), indent=2))


if __name__ == "__main__":
    main()
