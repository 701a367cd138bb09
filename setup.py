"""Builds the compiled op ``agi_monai._C`` from ``csrc/``.

C++ CPU kernels are always built. CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit (nvcc) is found; ``AGI_MONAI_WITH_CUDA=1`` forces them (and fails loudly if impossible),
``AGI_MONAI_WITH_CUDA=0`` leaves them out. Install with ``pip install --no-build-isolation -e .``
after torch (build isolation would build against a different torch than the one installed).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

if os.environ.get("CUDA_HOME") is None and os.path.isdir("/usr/local/cuda"):
    # torch guesses the toolkit root from nvcc's location, which is wrong for wrapper scripts; it reads
    # CUDA_HOME when torch.utils.cpp_extension is imported, so this must come first.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit(
        "agi-monai: torch must be installed before building the extension, and pip must be run with "
        "--no-build-isolation (see README.md, 'Install')."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _want_cuda() -> bool:
    choice = os.environ.get("AGI_MONAI_WITH_CUDA", "auto").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    has_nvcc = shutil.which("nvcc") is not None or (
        os.environ.get("CUDA_HOME") and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    )
    possible = torch.version.cuda is not None and bool(has_nvcc)
    if choice in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit(
                f"agi-monai: AGI_MONAI_WITH_CUDA=1 but torch {torch.__version__} is "
                f"{'a CPU-only build' if torch.version.cuda is None else 'a CUDA build'} and nvcc was "
                f"{'found' if has_nvcc else 'not found'}."
            )
        return True
    return possible


def _extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "autograd", "*.cpp")))
    # -g0 after setuptools' default -g: the debug info multiplies the .so size by ~5.
    cxx_flags = ["-O3", "-g0"]  # the C++ standard comes from torch (C++20 for torch >= 2.13)
    link_flags = ["-s"]
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp the CPU kernels run on
        # one thread. (The process shares torch's libgomp.so.1, loaded first.)
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not _want_cuda():
        print("agi-monai: building the C++ (CPU) kernels only", flush=True)
        return cpp_extension.CppExtension(
            "agi_monai._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU torch cannot detect the architecture; build for the common ones (+PTX for newer).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    print(
        f"agi-monai: building the C++ and CUDA kernels (CUDA {torch.version.cuda}, "
        f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'detected')})",
        flush=True,
    )
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    nvcc_threads = str(max(1, min(os.cpu_count() or 1, 8)))
    return cpp_extension.CUDAExtension(
        "agi_monai._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--threads", nvcc_threads]},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)
