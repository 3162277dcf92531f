"""Builds the rfq._C extension: the op schemas (csrc/registration.cpp), their CPU kernels and,
when CUDA is available, their CUDA kernels (csrc/cuda/*.cu).

CPU kernels are compiled once per x86 ISA level (default, AVX2, AVX512), each file with its own
flags, and chosen at run time like ATen's own kernels; the default build never uses -march=native.
Environment:
    RFQ_CUDA=auto|0|1   auto (default): CUDA kernels when torch is a CUDA build and nvcc is found
                        (CUDA_HOME, or nvcc on PATH); 1: required (error if impossible); 0: CPU only
    TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0+PTX": A100, H100/H200, PTX for newer)
    RFQ_CUDA_INCLUDE    extra include directories for nvcc (os.pathsep-separated), e.g. the CUDA
                        wheel's site-packages/nvidia/cu13/include when the toolkit lacks a header
    MAX_JOBS (default 2)
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
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
# torch >= 2.14's headers need C++20 (operator<=> in c10); older ones build as C++17, as before.
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
CXX_STD = "c++20" if _TORCH_VERSION >= (2, 14) else "c++17"


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


def cuda_wanted():
    """RFQ_CUDA: '0' -> False; '1' -> True or exit with the reason; 'auto' -> whether it can work."""
    mode = os.environ.get("RFQ_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"rfq: RFQ_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problem = None
    if not torch.version.cuda:
        problem = f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    else:
        home = cpp_extension.CUDA_HOME  # CUDA_HOME / CUDA_PATH, else nvcc on PATH, else /usr/local/cuda
        if home is None or not Path(home, "bin", "nvcc").exists():
            problem = (f"nvcc not found (CUDA_HOME={home!r}); set CUDA_HOME to a CUDA "
                       f"{torch.version.cuda.split('.')[0]}.x toolkit")
    if problem is None:
        return True
    if mode == "1":
        sys.exit(f"rfq: RFQ_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    print(f"rfq: building CPU kernels only ({problem}; RFQ_CUDA=1 makes this an error)")
    return False


def cuda_sources():
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def headers():
    """Every header under csrc/: a changed header rebuilds the extension (setuptools otherwise
    compares only the .cpp/.cu timestamps and keeps a stale _C after a kernel-body edit)."""
    return sorted(str(p.relative_to(ROOT)) for ext in ("*.h", "*.cuh")
                  for p in (ROOT / "csrc").rglob(ext))


def make_extension():
    with_cuda = cuda_wanted()
    sources = ["csrc/registration.cpp", "csrc/autograd.cpp"] + cpu_sources()
    define_macros = []  # CppExtension(py_limited_api=True) defines Py_LIMITED_API itself
    if IS_X86:
        define_macros.append(("RFQ_X86_DISPATCH", "1"))
    # -O3 without fast-math: the quantizer needs correctly rounded division (spec §1).
    # -ffp-contract=off: GCC otherwise fuses k*s - x into an FMA and skips the rounding of y.
    cxx = ["-O3", f"-std={CXX_STD}", "-fno-fast-math", "-ffp-contract=off", "-Wall",
           "-Wno-unused-function"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for's OpenMP body is inline in ATen's headers: without -fopenmp it
        # silently runs on one thread. libgomp resolves to the copy torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [str(ROOT / "csrc")]
    if not with_cuda:
        return CppExtension(
            name="rfq._C",
            sources=sources,
            depends=headers(),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    # sm_80 (A100) and sm_90 (H100/H200) machine code, plus PTX that newer GPUs can JIT.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    include_dirs += [d for d in os.environ.get("RFQ_CUDA_INCLUDE", "").split(os.pathsep) if d]
    # -O3 and IEEE division (-prec-div=true is nvcc's default; never --use_fast_math). The kernels
    # call __fdiv_rn/__fmul_rn where rounding matters, so nvcc's FMA contraction is kept elsewhere.
    nvcc = ["-O3", f"-std={CXX_STD}", "-prec-div=true", "-prec-sqrt=true", "-ftz=false",
            f"--threads={os.environ['MAX_JOBS']}", "-Xcompiler=-fno-fast-math",
            "-Xcompiler=-Wall", "-Xcompiler=-Wno-unused-function"]
    return CUDAExtension(
        name="rfq._C",
        sources=sources + cuda_sources(),
        depends=headers(),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["rfq", "rfq.*"]),
    package_data={"rfq": ["assets/*.pt"]},  # the demo's float ResNet-20 (fp16, 0.6 MB)
    ext_modules=[make_extension()],
    cmdclass={"build_ext": RfqBuildExtension.with_options(use_ninja=False)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
