"""Build and load the CPU emulation of the CUDA kernels (csrc/emu/ + csrc/kernels/*.cuh).

The library is compiled with the host C++ compiler (``$CXX`` or ``c++``) from the project's own
files, one object per ``csrc/emu/*.cpp`` (two at a time), into ``build/emu/<config>-<hash>/``;
the hash covers the compiler, the flags and every source and header, so an edit rebuilds and a
rerun reuses. Configurations:

- ``plain``: ``-O2``, the default;
- ``sanitize``: ASan + UBSan, every finding fatal. Python must be started with the ASan runtime
  preloaded (``sanitizer_env()``); ``DART_EMU_CONFIG=sanitize`` selects it for a whole run
  (tests/test_cuda_emulation.py::test_emulated_suite_under_asan_ubsan does both, with the
  random schedule of threads and blocks).

Entry points are ``extern "C"`` functions returning a ``cudaError_t``; ``check`` turns a non-zero
one into ``EmulationError`` with the message the emulation recorded (which thread, what). A kernel
family gets its entry points in its own ``csrc/emu/<family>.cpp`` (including the ``.cuh``, calling
its host launcher), and its test module goes into ``EMULATED_TEST_MODULES`` and calls
``reset_schedule()`` from an autouse fixture.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EMU_DIR = ROOT / "csrc" / "emu"
KERNEL_DIR = ROOT / "csrc" / "kernels"
BUILD_DIR = ROOT / "build" / "emu"

COMMON_FLAGS = [
    "-std=c++17",
    "-fPIC",
    "-DDART_CUDA_EMULATION",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",  # #pragma unroll
    "-fno-strict-aliasing",  # the kernels pun vectors through reinterpret_cast, as CUDA allows
]
CONFIG_FLAGS = {
    "plain": ["-O2"],
    "sanitize": [
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
    ],
}
# Modules whose tests run on the emulation; the sanitizer run replays all of them.
EMULATED_TEST_MODULES = [
    "tests/test_cuda_emulation.py",
    "tests/test_cuda_emulation_ffn.py",
    "tests/test_cuda_emulation_quant.py",
    "tests/test_cuda_emulation_per_token.py",
]

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


class EmulationError(RuntimeError):
    def __init__(self, code: int, message: str):
        super().__init__(f"emulated launch failed with cudaError {code}: {message}")
        self.code = code
        self.message = message


def current_config() -> str:
    config = os.environ.get("DART_EMU_CONFIG", "plain")
    if config not in CONFIG_FLAGS:
        raise ValueError(f"DART_EMU_CONFIG must be one of {sorted(CONFIG_FLAGS)}, got {config!r}")
    return config


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def _build_key(config: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run(
        [*_compiler(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    h.update(version.encode())
    h.update(repr((COMMON_FLAGS, CONFIG_FLAGS[config])).encode())
    for path in sorted([*EMU_DIR.iterdir(), *KERNEL_DIR.iterdir()]):
        if path.suffix in {".cpp", ".h", ".cuh"}:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(config: str | None = None) -> Path:
    """Compile the emulation library for `config` (cached) and return its path."""
    config = config or current_config()
    out_dir = BUILD_DIR / f"{config}-{_build_key(config)}"
    lib = out_dir / "libdart_emu.so"
    if lib.exists():
        return lib
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as lock:  # pytest-xdist workers build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = [*COMMON_FLAGS, *CONFIG_FLAGS[config]]
        sources = sorted(EMU_DIR.glob("*.cpp"))
        objects = [out_dir / (src.stem + ".o") for src in sources]
        jobs = max(1, min(len(sources), os.cpu_count() or 1, 4))
        pending = list(zip(sources, objects, strict=True))
        running: list[tuple[Path, subprocess.Popen]] = []
        errors = []
        while pending or running:
            while pending and len(running) < jobs:
                src, obj = pending.pop(0)
                cmd = [*_compiler(), *flags, "-c", str(src), "-o", str(obj)]
                running.append(
                    (src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                )
            src, proc = running.pop(0)
            log = proc.communicate()[0].decode(errors="replace")
            if proc.returncode != 0:
                errors.append(f"{src.name}:\n{log}")
        if errors:
            raise RuntimeError("building the CUDA emulation failed:\n" + "\n".join(errors))
        tmp = out_dir / "libdart_emu.so.tmp"
        subprocess.run(
            [*_compiler(), *flags, "-shared", *map(str, objects), "-o", str(tmp)],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, lib)
        for stale in BUILD_DIR.glob(f"{config}-*"):  # builds of older sources
            if stale != out_dir:
                shutil.rmtree(stale, ignore_errors=True)
    return lib


def sanitizer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python process that loads the `sanitize` build: the ASan runtime of the
    compiler preloaded, leak checks off (CPython and torch keep allocations until exit)."""
    env = dict(os.environ if base is None else base)
    runtime = subprocess.run(
        [*_compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(runtime):
        raise RuntimeError(f"the compiler {_compiler()} has no ASan runtime (libasan.so)")
    env["LD_PRELOAD"] = runtime
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["DART_EMU_CONFIG"] = "sanitize"
    env["DART_EMU_SCHEDULE"] = "random"
    return env


@functools.cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    lib.dart_emu_last_error_message.restype = ctypes.c_char_p
    lib.dart_emu_counter.restype = ctypes.c_longlong
    lib.dart_emu_counter.argtypes = [ctypes.c_char_p]
    lib.dart_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint]
    return lib


def check(code: int) -> None:
    """Raise EmulationError for a non-zero cudaError_t returned by an entry point."""
    if code != 0:
        message = library().dart_emu_last_error_message().decode()
        library().dart_emu_clear_error()
        raise EmulationError(code, message)


SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


def set_schedule(mode: str, seed: int = 0) -> None:
    """Order of blocks and of threads between sync points: forward, reverse or random."""
    library().dart_emu_set_schedule(SCHEDULES[mode], seed)


def reset_schedule() -> None:
    """The run's default schedule: ``DART_EMU_SCHEDULE`` (forward unless set; the sanitizer run
    uses random, so every emulated test also runs under a second order of threads and blocks).
    Call it from an autouse fixture of each emulated test module."""
    mode = os.environ.get("DART_EMU_SCHEDULE", "forward")
    if mode not in SCHEDULES:
        raise ValueError(f"DART_EMU_SCHEDULE must be one of {sorted(SCHEDULES)}, got {mode!r}")
    set_schedule(mode, seed=1234)


def counter(name: str) -> int:
    return library().dart_emu_counter(name.encode())


def reset_counters() -> None:
    library().dart_emu_reset_counters()


def ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def float_to_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> uint16 bit patterns of float16 / bfloat16, as the emulation converts."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    fn = {"float16": library().dart_emu_float_to_half, "bfloat16": library().dart_emu_float_to_bf16}
    fn[dtype](ptr(x), ptr(out), ctypes.c_longlong(x.size))
    return out


def bits_to_float(b: np.ndarray, dtype: str) -> np.ndarray:
    b = np.ascontiguousarray(b, dtype=np.uint16)
    out = np.empty(b.shape, dtype=np.float32)
    fn = {"float16": library().dart_emu_half_to_float, "bfloat16": library().dart_emu_bf16_to_float}
    fn[dtype](ptr(b), ptr(out), ctypes.c_longlong(b.size))
    return out
