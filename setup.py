"""Build of simcrop with its C++/CUDA extension simcrop._C (see docs/extension.md).

The extension is C++ always; CUDA iff torch.version.cuda and CUDA_HOME are both set (never decided from
torch.cuda.is_available(): CI compiles on machines without a GPU). Environment overrides:
  SIMCROP_SKIP_EXT=1    pure-Python install; the fused C++ ops then report "extension not built"
  SIMCROP_SKIP_CUDA=1   C++ kernels only, even with a CUDA torch and toolkit
  SIMCROP_FORCE_CUDA=1  CUDA kernels too; fails loudly when torch is a CPU build or CUDA_HOME is unset
Build against the installed torch: `pip install --no-build-isolation -e .` (MAX_JOBS limits parallel compiles).
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _rel(pattern: str) -> list[str]:
    """Sorted source files matching pattern, relative to the project root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension_build():
    """(ext_modules, cmdclass) for simcrop._C, or ([], {}) under SIMCROP_SKIP_EXT=1."""
    if _env_flag("SIMCROP_SKIP_EXT"):
        print("simcrop: SIMCROP_SKIP_EXT=1, building without the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "building simcrop._C needs the installed torch: use `pip install --no-build-isolation -e .` "
            "(or set SIMCROP_SKIP_EXT=1 for a pure-Python install)"
        ) from exc

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if _env_flag("SIMCROP_SKIP_CUDA"):
        with_cuda = False
    elif _env_flag("SIMCROP_FORCE_CUDA"):
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError(
                f"SIMCROP_FORCE_CUDA=1 but torch {torch.__version__} has torch.version.cuda={torch.version.cuda} "
                f"and CUDA_HOME={CUDA_HOME}: install a CUDA build of torch and point CUDA_HOME at the toolkit"
            )
        with_cuda = True

    sources = ["csrc/ops.cpp", *_rel("csrc/cpu/*.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3"]
    link = []
    # at::parallel_for expands OpenMP pragmas inside the extension: compile and link with OpenMP as torch does
    # (the libgomp.so.1 that torch already loaded then serves both).
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        sources += _rel("csrc/cuda/*.cu")
        extra["nvcc"] = ["-O3", "-lineinfo"]
        macros.append(("SIMCROP_WITH_CUDA", None))
        kind = CUDAExtension
    else:
        kind = CppExtension
    print(f"simcrop: building simcrop._C with {'C++ and CUDA' if with_cuda else 'C++ only'} "
          f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})",
          file=sys.stderr)
    ext = kind("simcrop._C", sources, include_dirs=include_dirs, define_macros=macros,
               extra_compile_args=extra, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
