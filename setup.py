"""Build of the `dart_ext._C` extension (torch.utils.cpp_extension).

Install (editable, the documented and CI way; torch must already be installed):

    pip install --no-build-isolation -e .

`python setup.py build_ext --inplace` also works and puts `dart_ext/_C*.so` next to the sources.

Environment:
    DART_BUILD_CUDA=0/1  force the CPU-only / CUDA build (default: CUDA when torch has CUDA and
                         nvcc / CUDA_HOME is found). With 1 the CUDA sources are compiled even on a
                         machine without a GPU.
    DART_NATIVE=1        compile everything with -march=native: the binary then runs only on CPUs
                         with this machine's instruction sets (SIGILL elsewhere). Default: a
                         portable binary whose hot loops are compiled for AVX-512, AVX2 and the
                         baseline and picked at run time (csrc/cpu/config.cpp), at no measured
                         cost on this machine's benchmark (see docs/DEVELOPMENT.md).
    DART_DEBUG=1         -O0 -g.
    MAX_JOBS             parallel compile jobs (ninja).
ccache is used automatically when found on PATH.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "dart_ext"


def _env_flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def _use_ccache():
    """Compile through ccache when present: point CC/CXX at a ccache masquerade directory
    (a single path: torch's ninja rules cannot take "ccache g++" as the compiler)."""
    ccache = shutil.which("ccache")
    if not ccache:
        return
    os.environ.setdefault("CCACHE_NOHASHDIR", "1")
    os.environ.setdefault("CCACHE_BASEDIR", ROOT)
    masq = "/usr/lib/ccache"
    if not os.path.isfile(os.path.join(masq, "g++")):
        masq = os.path.join(ROOT, "build", "ccache-bin")
        os.makedirs(masq, exist_ok=True)
        for name in ("gcc", "g++"):
            link = os.path.join(masq, name)
            if not os.path.exists(link):
                os.symlink(ccache, link)
    for var, name in (("CC", "gcc"), ("CXX", "g++")):
        if "ccache" not in os.environ.get(var, ""):
            os.environ[var] = os.path.join(masq, name)


def get_extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = bool(_env_flag("DART_DEBUG"))
    native = bool(_env_flag("DART_NATIVE"))
    force_cuda = _env_flag("DART_BUILD_CUDA")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if force_cuda is None:
        use_cuda = torch.version.cuda is not None and has_nvcc
    else:
        use_cuda = force_cuda

    sources = [os.path.join("csrc", "registration.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))

    cxx = [
        "-O0" if debug else "-O3",
        "-fopenmp",
        "-ffp-contract=fast",
        "-fdiagnostics-color=always",
    ]
    cxx += ["-DPy_LIMITED_API=0x030B0000"]
    if debug:
        cxx += ["-g"]
    if native:
        cxx += ["-march=native"]
    extra = {"cxx": cxx}
    if use_cuda:
        extra["nvcc"] = ["-O0" if debug else "-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    ext_cls = CUDAExtension if use_cuda else CppExtension
    return [
        ext_cls(
            f"{LIBRARY_NAME}._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    _use_ccache()
    setup(
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp311"}},
    )


if __name__ == "__main__":
    main()
