"""The C++-side build (CMakeLists.txt) compiles and its ctest kernel checks pass (slow: ~1.5 min
cold on 2 cores, seconds with a warm ccache)."""

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CCACHE_BASEDIR=ROOT, CCACHE_NOHASHDIR="1")
    subprocess.run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            str(build),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    subprocess.run(
        ["cmake", "--build", str(build), "-j2"],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    r = subprocess.run(
        ["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
