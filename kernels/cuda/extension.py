"""Loading the compiled extension `kernels._C` (csrc/), or compiling it just in time.

    unavailable_reason()   why the `cuda` backend cannot run here, or None
    ext()                  the extension module (BackendUnavailableError when missing)
    build_jit()            compile csrc/ now (kernel development: edit, build_jit, rerun)

`generation()` counts the (re)loads, so the backend registry knows when a JIT build has
made its cached status stale. This module imports no other part of `kernels` but the
error types: the registry imports it to probe the backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from kernels.availability import BackendUnavailableError

EXTENSION = "kernels._C"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # kernels/
CSRC_DIR = PACKAGE_DIR.parent / "csrc"
# Written by setup.py when it skips the build (the name is csrc/build.py's SKIP_RECORD).
SKIP_RECORD = PACKAGE_DIR / "_C_build_skipped.txt"
JIT_ENV = "GPTK_CUDA_JIT"  # =1: compile csrc/ on first use instead of importing kernels._C
MIN_CAPABILITY = (8, 0)    # bf16 mma.sync.m16n8k16 needs sm_80 (Ampere) or newer

# (module or None, why it is missing or None), filled on first use; reset by build_jit.
_loaded: dict[str, tuple[Optional[ModuleType], Optional[str]]] = {}
_generation = [0]


def load_build_config() -> ModuleType:
    """csrc/build.py (sources, flags, toolkit discovery), loaded by path: it exists only in
    a source checkout, which is also the only place the extension can be compiled from."""
    path = CSRC_DIR / "build.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: compiling the CUDA kernels needs a source "
                                f"checkout of the project")
    spec = importlib.util.spec_from_file_location("gptk_csrc_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_jit(build_directory: Optional[str], verbose: bool) -> ModuleType:
    build = load_build_config()
    reason = build.skip_reason()
    if reason is not None:
        raise RuntimeError(f"cannot compile the CUDA extension: {reason}")
    build.use_toolkit(build.find_cuda_home())
    from torch.utils.cpp_extension import load

    return load(name="gptk_C_jit", sources=build.source_paths(), extra_cflags=build.CXX_FLAGS,
                extra_cuda_cflags=build.nvcc_flags(), build_directory=build_directory,
                verbose=verbose)


def build_jit(build_directory: Optional[str] = None, verbose: bool = False) -> ModuleType:
    """Compile csrc/ now with torch.utils.cpp_extension.load (ninja; rebuilt only when a
    source changed) and make it this backend's extension: the kernel-development loop is
    edit a .cu file, call this (or run with GPTK_CUDA_JIT=1), rerun the tests."""
    module = _compile_jit(build_directory, verbose)
    _loaded["extension"] = (module, None)
    _generation[0] += 1
    return module


def forget() -> None:
    """Load (or report missing) the extension afresh on next use."""
    _loaded.clear()
    _generation[0] += 1


def generation() -> int:
    return _generation[0]


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(the extension module, None) or (None, why it is missing)."""
    if "extension" not in _loaded:
        _loaded["extension"] = _import_or_explain()
    return _loaded["extension"]


def _import_or_explain() -> tuple[Optional[ModuleType], Optional[str]]:
    if os.environ.get(JIT_ENV) == "1":
        try:
            return _compile_jit(None, verbose=False), None
        except Exception as exc:  # any build failure becomes the backend's reason
            return None, f"the JIT build of the CUDA extension ({JIT_ENV}=1) failed: {exc}"
    try:
        return importlib.import_module(EXTENSION), None
    except ImportError as exc:
        if extension_path() is not None:
            return None, f"the CUDA extension {EXTENSION} is built but does not load: {exc}"
        if SKIP_RECORD.is_file():
            why = f"setup.py skipped it: {SKIP_RECORD.read_text().strip()}"
        else:
            why = ("install with `pip install --no-build-isolation -e .` where nvcc and a CUDA "
                   f"build of torch are present, or set {JIT_ENV}=1 to compile it on first use")
        return None, f"the CUDA extension {EXTENSION} is not built ({why})"


def extension_path() -> Optional[Path]:
    """The compiled extension's shared library (e.g. for `cuobjdump --dump-resource-usage`),
    found without importing it; None when it is not built."""
    module = _loaded.get("extension", (None, None))[0]
    if module is not None:
        return Path(module.__file__)
    spec = importlib.util.find_spec(EXTENSION)
    return Path(spec.origin) if spec is not None and spec.origin else None


def unavailable_reason() -> Optional[str]:
    """Why the `cuda` backend cannot run here, or None when it can."""
    module, why = _load()
    if module is None:
        return why
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"the kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                f"newer (bf16 tensor cores); {torch.cuda.get_device_name()} is "
                f"{capability[0]}.{capability[1]}")
    return None


def ext() -> ModuleType:
    """The extension module; BackendUnavailableError saying why when it cannot load."""
    module, why = _load()
    if module is None:
        raise BackendUnavailableError(f"backend 'cuda' is not available: {why}")
    return module
