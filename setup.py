"""Build script: the package metadata lives in pyproject.toml; this file only adds the
C++/CUDA extension `kernels._C` (csrc/) when a CUDA toolchain and a CUDA build of torch
are present. Without them the package installs without it, says why in one line, and
records the reason for `kernels.cuda.unavailable_reason()`.

What is compiled, and how, is in csrc/build.py (shared with the JIT build). Knobs:
GPTK_NO_CUDA_EXT=1 skips the extension; TORCH_CUDA_ARCH_LIST picks the GPUs (default
sm_80 and sm_90); MAX_JOBS bounds the parallel ninja compile jobs.
"""
import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "kernels"


def _load_build_config():
    spec = importlib.util.spec_from_file_location("gptk_csrc_build", ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_args(build):
    reason = build.skip_reason()
    if reason is not None:
        print(f"gpt-kernels: not building the CUDA extension {build.EXTENSION_NAME}: {reason}")
        build.write_skip_record(PACKAGE_DIR, reason)
        return {}
    cuda_home = build.find_cuda_home()
    build.use_toolkit(cuda_home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    build.clear_skip_record(PACKAGE_DIR)
    print(f"gpt-kernels: building {build.EXTENSION_NAME} with the CUDA toolkit at {cuda_home}")
    extension = CUDAExtension(
        build.EXTENSION_NAME,
        [str(Path(p).relative_to(ROOT)) for p in build.source_paths()],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.nvcc_flags()},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_args(_load_build_config()))
