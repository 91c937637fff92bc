"""Builds the extension ``pluglm_kernels._C``.

C++ CPU kernels (OpenMP) are always built. CUDA sources are added when nvcc and a CUDA
build of torch are present; no GPU is needed to compile them.

Environment:
  PLUGLM_SKIP_BUILD=1   pure-Python install (references and Triton only)
  PLUGLM_SKIP_CUDA=1    build the C++ CPU kernels only (fast local iteration)
  PLUGLM_FORCE_CUDA=1   fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST  e.g. "9.0"; default "8.0;8.6;8.9;9.0"
  MAX_JOBS              parallel compile jobs (ninja)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The toolkit folder holding bin/nvcc and include/cuda_runtime.h.

    The nvcc on PATH may be a wrapper script, so resolving its parent is not enough:
    check candidates for the header as well.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(str(Path(real).parent.parent))
        # a wrapper script: look for the path it execs
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for tok in text.split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(str(Path(tok).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def nvidia_wheel_includes() -> list[str]:
    """Headers such as cusparse.h that only the nvidia-* wheels carry."""
    out = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            out += [p for p in sorted(glob.glob(os.path.join(base, pattern))) if os.path.isdir(p)]
    return sorted(set(out))


def build_ext_modules():
    if _flag("PLUGLM_SKIP_BUILD"):
        print("pluglm: PLUGLM_SKIP_BUILD=1, installing pure Python (no pluglm_kernels._C)")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # resolved at import time; fix it up
    force = _flag("PLUGLM_FORCE_CUDA")
    why_no_cuda = None
    if _flag("PLUGLM_SKIP_CUDA"):
        why_no_cuda = "PLUGLM_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        why_no_cuda = "torch is a CPU-only build"
    elif cuda_home is None:
        why_no_cuda = "nvcc / CUDA toolkit not found (set CUDA_HOME)"
    with_cuda = why_no_cuda is None
    if force and not with_cuda:
        raise RuntimeError(f"PLUGLM_FORCE_CUDA=1 but CUDA cannot be built: {why_no_cuda}")
    if not with_cuda:
        print(f"pluglm: building CPU kernels only ({why_no_cuda})")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Portable baseline; kernels that want AVX2/AVX-512 dispatch on the CPU at run time.
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch's cpp_extension picks
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext_cls = cpp_extension.CUDAExtension
        define_macros.append(("PLUGLM_WITH_CUDA", "1"))
        extra["cxx"] = cxx + ["-DPLUGLM_WITH_CUDA=1"]
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                         "-DPLUGLM_WITH_CUDA=1"]
        include_dirs += nvidia_wheel_includes()
        print(f"pluglm: building CUDA kernels with {cuda_home} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = ext_cls(
        name="pluglm_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
