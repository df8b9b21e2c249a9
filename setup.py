"""Builds mvit2_kernels._C: the CPU kernels always, the CUDA kernels where CUDA is really there.

Build knobs (environment): FORCE_CUDA=1 insists on the CUDA kernels, MVIT2_NO_CUDA=1 skips them,
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0"), MAX_JOBS caps ninja's
parallel compiles, MVIT2_CPU_ISA picks the CPU instruction set of the C++ kernels: "native"
(default: this machine's, e.g. AVX-512), "avx2", "avx512" or "generic" (portable, slower).

Build with ``pip install --no-build-isolation -e .`` so that the installed
torch is used and never replaced.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - a build without torch cannot work at all
    raise SystemExit(
        "mvit2_kernels builds against the torch already installed: install torch first and "
        "build with `pip install --no-build-isolation .` (see README)."
    ) from e

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_decision() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (for the banner)."""
    if _flag("MVIT2_NO_CUDA"):
        return False, "MVIT2_NO_CUDA=1"
    toolkit = cpp_extension.CUDA_HOME or shutil.which("nvcc")
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif toolkit is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, f"torch CUDA {torch.version.cuda}, toolkit at {toolkit}"
    if _flag("FORCE_CUDA"):
        raise SystemExit(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


_CPU_ISA_FLAGS = {
    "native": ["-march=native"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def _cpu_isa_flags() -> tuple[list[str], str]:
    isa = os.environ.get("MVIT2_CPU_ISA", "native").lower()
    if isa not in _CPU_ISA_FLAGS:
        raise SystemExit(f"MVIT2_CPU_ISA must be one of {sorted(_CPU_ISA_FLAGS)}, got {isa!r}")
    if os.name == "nt" or platform.machine().lower() not in ("x86_64", "amd64"):
        return [], "compiler default"  # the flags above are x86 GCC/Clang flags
    return _CPU_ISA_FLAGS[isa], isa


def _extension() -> cpp_extension.CppExtension:
    with_cuda, why = _cuda_decision()
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))]
    openmp = ["-fopenmp"] if os.name != "nt" else ["/openmp"]
    isa_flags, isa = _cpu_isa_flags()
    cxx = ["-O3", "-DNDEBUG", *isa_flags, *openmp] if os.name != "nt" else ["/O2", *openmp]
    kwargs = dict(
        extra_compile_args={"cxx": cxx}, extra_link_args=openmp if os.name != "nt" else []
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
        kwargs["extra_compile_args"]["cxx"].append("-DMVIT2_WITH_CUDA")
        # No --use_fast_math: it turns expf into __expf (several ulp off), and the kernels are
        # memory-bound, so the accurate softmax costs nothing and keeps fp32 within torch's error.
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DMVIT2_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension("mvit2_kernels._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("mvit2_kernels._C", sources, **kwargs)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    print(
        f"[mvit2_kernels] building the CPU kernels{' and the CUDA kernels' if with_cuda else ''}"
        f" against torch {torch.__version__}; CPU ISA {isa};"
        f" CUDA {'on' if with_cuda else 'off'}: {why}"
        f"{f'; archs {arch}' if arch else ''}; MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}",
        flush=True,
    )
    return ext


setup(
    packages=find_packages(include=["mvit2_kernels", "mvit2_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
