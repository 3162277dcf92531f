"""Builds the rfq._C extension: the op schemas (csrc/registration.cpp) and their CPU kernels.

CPU kernels are compiled once per x86 ISA level (default, AVX2, AVX512), each file with its own
flags, and chosen at run time like ATen's own kernels; the default build never uses -march=native.
Environment: RFQ_CUDA=auto|0|1 (CUDA kernels arrive with the CUDA issue), MAX_JOBS (default 2).
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pip's build isolation hides the torch you installed
    sys.exit(
        "rfq: torch is not importable in this build environment.\n"
        "rfq compiles a C++ extension against the torch you run with, so it must be built without\n"
        "pip's build isolation. Install torch first, then run:\n"
        "    pip install -e . --no-build-isolation\n"
    )

os.environ.setdefault("MAX_JOBS", "2")

# Flags per ISA file suffix; the matching CPU_CAPABILITY selects ATen's Vectorized<> backend.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
                  "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                    "-mf16c", "-mbmi", "-mbmi2",
                    "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "_default.cpp": ["-DCPU_CAPABILITY=DEFAULT"],
}
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


class RfqBuildExtension(BuildExtension):
    """BuildExtension with per-source ISA flags (torch's ninja writer has one flag set for all)."""

    def build_extensions(self):
        original = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            postargs = extra_postargs
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    if isinstance(extra_postargs, dict):
                        postargs = dict(extra_postargs, cxx=list(extra_postargs["cxx"]) + flags)
                    else:
                        postargs = list(extra_postargs) + flags
            return original(obj, src, ext, cc_args, postargs, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


def cpu_sources():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not IS_X86:
        sources = [s for s in sources if not s.endswith(("_avx2.cpp", "_avx512.cpp"))]
    return sources


def make_extension():
    sources = ["csrc/registration.cpp"] + cpu_sources()
    define_macros = []  # CppExtension(py_limited_api=True) defines Py_LIMITED_API itself
    if IS_X86:
        define_macros.append(("RFQ_X86_DISPATCH", "1"))
    # -O3 without fast-math: the quantizer needs correctly rounded division (spec §1).
    # -ffp-contract=off: GCC otherwise fuses k*s - x into an FMA and skips the rounding of y.
    cxx = ["-O3", "-std=c++17", "-fno-fast-math", "-ffp-contract=off", "-Wall",
           "-Wno-unused-function"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for's OpenMP body is inline in ATen's headers: without -fopenmp it
        # silently runs on one thread. libgomp resolves to the copy torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    return CppExtension(
        name="rfq._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    packages=["rfq", "rfq.triton_kernels"],
    package_dir={"rfq": "rfq", "rfq.triton_kernels": "triton_kernels"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": RfqBuildExtension.with_options(use_ninja=False)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
