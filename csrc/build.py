"""How csrc/ is compiled into the `kernels._C` extension: sources, flags, target GPUs and the
CUDA toolkit to use. Shared by setup.py (the ahead-of-time build that `pip install` runs)
and `kernels.cuda.build_jit` (torch.utils.cpp_extension.load, for kernel development), so
both compile exactly the same thing.

This file is loaded by path (it is not part of an installed package) and must not import
torch at module level: setup.py has to run, and say why it skips the build, without it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent
SOURCES = ("bindings.cpp", "layer_norm.cu", "bias_gelu.cu", "cross_entropy.cu",
           "attention.cu", "attention_bf16.cu", "attention_bf16_v2.cu", "attention_fp32.cu")
EXTENSION_NAME = "kernels._C"
SKIP_ENV = "GPTK_NO_CUDA_EXT"
# A100 (sm_80) and H100/H200 (sm_90) machine code, plus sm_90 PTX that the driver can JIT
# for newer GPUs. TORCH_CUDA_ARCH_LIST (e.g. "8.0;8.6;9.0") overrides it, as for torch.
DEFAULT_ARCHS = "8.0;9.0+PTX"
# Where setup.py records why it did not build the extension, next to where `_C` would be,
# so `kernels.cuda.unavailable_reason()` can tell the user.
SKIP_RECORD = "_C_build_skipped.txt"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")  # where toolkits install when nvcc is not on PATH

# The C++ standard is torch's choice (C++20 for torch >= 2.10); cpp_extension adds it.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",                    # source lines for compute-sanitizer and profilers; no cost
    "-Xptxas=--warn-on-spills",     # a register spill in a hot kernel shows up in the build log
]


def source_paths() -> list[str]:
    return [str(CSRC / name) for name in SOURCES]


# ----------------------------------------------------------------------------- toolkit

def is_toolkit_root(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def _root_reported_by(nvcc: Path) -> Path | None:
    """Ask nvcc where its toolkit is: a dry run prints `#$ TOP=<root>` (whatever wrapper
    scripts stand in front of the real compiler)."""
    try:
        out = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return Path(match.group(1).strip()).resolve() if match else None


def toolkit_root_of(nvcc: Path) -> Path | None:
    """The CUDA toolkit that the `nvcc` at this path really runs.

    `dirname(dirname(nvcc))` is wrong when nvcc is a wrapper script: on these machines
    /usr/local/bin/nvcc runs `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, and taking /usr/local
    as the toolkit makes the link step look for libcudart in /usr/local/lib64. So: follow
    symlinks first, then ask nvcc itself.
    """
    real = Path(nvcc).resolve()
    if is_toolkit_root(real.parent.parent):
        return real.parent.parent
    reported = _root_reported_by(real)
    return reported if reported is not None and is_toolkit_root(reported) else None


def find_cuda_home(environ=None) -> Path | None:
    """$CUDA_HOME or $CUDA_PATH when set, else the toolkit behind the `nvcc` on PATH,
    else DEFAULT_CUDA_HOME; None when there is no toolkit."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            root = Path(environ[var])
            return root if is_toolkit_root(root) else None
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is not None:
        return toolkit_root_of(Path(nvcc))
    return DEFAULT_CUDA_HOME.resolve() if is_toolkit_root(DEFAULT_CUDA_HOME) else None


def nvcc_release(cuda_home: Path) -> str | None:
    """"13.0" from `nvcc --version`, or None when nvcc does not run."""
    try:
        out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


# ----------------------------------------------------------------------------- flags

def gencode_flags(arch_list: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST-style string: "8.0;9.0+PTX" gives
    sm_80 and sm_90 machine code and compute_90 PTX. Separators: ';', ',' or spaces."""
    flags = []
    for arch in filter(None, re.split(r"[;,\s]+", arch_list.strip())):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if match is None:
            raise ValueError(f"cannot parse CUDA arch {arch!r} in {arch_list!r} "
                             f"(expected e.g. '8.0', '9.0+PTX', '9.0a')")
        number = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    if not flags:
        raise ValueError(f"no CUDA arch in {arch_list!r}")
    return flags


def nvcc_flags(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    return NVCC_FLAGS + gencode_flags(environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)


# ----------------------------------------------------------------------------- decision

def skip_reason(environ=None) -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    environ = os.environ if environ is None else environ
    if environ.get(SKIP_ENV, "0") not in ("", "0"):
        return f"{SKIP_ENV}={environ[SKIP_ENV]} is set"
    try:
        import torch
    except ImportError:
        return ("torch is not importable by the build (install torch first, then "
                "`pip install --no-build-isolation`)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home(environ)
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    release = nvcc_release(cuda_home)
    if release is None:
        return f"{cuda_home / 'bin' / 'nvcc'} does not run"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc {release} at {cuda_home} does not match the CUDA {torch.version.cuda} "
                f"that torch {torch.__version__} was built with")
    return None


def use_toolkit(cuda_home: Path) -> None:
    """Point torch.utils.cpp_extension at `cuda_home`. It computes CUDA_HOME once, when first
    imported, from the nvcc wrapper's folder; the environment variable fixes later imports
    and the assignment fixes an earlier one."""
    os.environ["CUDA_HOME"] = str(cuda_home)
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = str(cuda_home)


def write_skip_record(package_dir: Path, reason: str) -> None:
    (package_dir / SKIP_RECORD).write_text(reason + "\n")


def clear_skip_record(package_dir: Path) -> None:
    (package_dir / SKIP_RECORD).unlink(missing_ok=True)
