"""The one place that knows which kernel backends exist, which are usable here, and why not.

A backend is a module that defines a function per op it implements, each with the
op's public signature (see `kernels.ops`). Three exist:

- ``torch``  — pure PyTorch (`kernels.torch_backend`): runs anywhere, the CPU fallback.
- ``triton`` — Triton kernels (`kernels.triton`): needs a CUDA GPU, or the Triton
  interpreter (``TRITON_INTERPRET=1``) on the CPU, which is slow and meant for tests.
- ``cuda``   — the compiled C++/CUDA extension (`kernels.cuda`): needs the built
  extension and a CUDA GPU.

``"auto"`` picks, per call, the fastest backend that is available, implements the op
and runs on the inputs' device (cuda > triton > torch; never the interpreter).
The process-wide default is ``"torch"``; change it with `set_default_backend` or the
``KERNELS_BACKEND`` environment variable.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
AUTO = "auto"
_AUTO_PREFERENCE = ("cuda", "triton", "torch")
_MODULES = {"torch": "kernels.torch_backend", "triton": "kernels.triton", "cuda": "kernels.cuda"}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (or cannot run this op / these inputs)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when it is available

    def __str__(self) -> str:
        return f"{self.name:6s} {'yes' if self.available else 'no ':3s}  {self.reason}"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_torch() -> BackendStatus:
    device = "CUDA GPU and CPU" if torch.cuda.is_available() else "CPU"
    return BackendStatus("torch", True, f"pure PyTorch on {device}")


def _probe_triton() -> BackendStatus:
    try:
        import triton
    except ImportError as exc:
        return BackendStatus("triton", False, f"triton is not installed ({exc})")
    if torch.cuda.is_available():
        where = f"CUDA GPU ({torch.cuda.get_device_name()})"
    elif triton_interpreter_enabled():
        where = "CPU through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        return BackendStatus("triton", False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the "
                                              "kernels on the CPU under the Triton interpreter)")
    if not _module("triton").OPS:
        return BackendStatus("triton", False, "no Triton kernels are implemented yet")
    return BackendStatus("triton", True, f"triton {triton.__version__} on {where}")


def _probe_cuda() -> BackendStatus:
    from kernels import cuda as cuda_backend

    if not cuda_backend.OPS:
        return BackendStatus("cuda", False, "no CUDA extension kernels are implemented yet")
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        return BackendStatus("cuda", False, reason)
    return BackendStatus("cuda", True, f"compiled extension on {torch.cuda.get_device_name()}")


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda}

# Probe results and imported backend modules, filled on first use. Plain dicts rather than
# lru_cache: torch.compile traces a lookup in a filled dict, not a cached call (see `prepare`).
_STATUS: dict[str, BackendStatus] = {}
_LOADED: dict[str, ModuleType] = {}


def backend_status(name: str) -> BackendStatus:
    if name not in _STATUS:
        if name not in _PROBES:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + (AUTO,)}")
        _STATUS[name] = _PROBES[name]()
    return _STATUS[name]


def forget_status(name: str) -> None:
    """Probe `name` again on next use (after something changed, e.g. a JIT build)."""
    _STATUS.pop(name, None)


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here and, if not, why."""
    return {name: backend_status(name) for name in BACKENDS}


def _module(name: str) -> ModuleType:
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name])
    return _LOADED[name]


def prepare(backend: str | None) -> None:
    """Probe and import what `backend` may dispatch to, ahead of time: torch.compile cannot
    trace an import, so a model calls this when it is built, before it is compiled."""
    name = _check_name(backend or get_default_backend())
    for candidate in (_AUTO_PREFERENCE if name == AUTO else (name, "torch")):
        if backend_status(candidate).available:
            _module(candidate)


_default_backend = os.environ.get("KERNELS_BACKEND", "torch")


def set_default_backend(name: str) -> None:
    """Set the backend used by ops called with ``backend=None``."""
    global _default_backend
    _check_name(name)
    _default_backend = name


def get_default_backend() -> str:
    return _check_name(_default_backend)


def _check_name(name: str) -> str:
    if name not in BACKENDS and name != AUTO:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + (AUTO,)}")
    return name


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or triton_interpreter_enabled()  # triton


def _implements(name: str, op: str) -> bool:
    return op in _module(name).OPS


def resolve_name(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that will run `op` on `device` when `backend` is asked for."""
    name = _check_name(backend or get_default_backend())
    if name == AUTO:
        for candidate in _AUTO_PREFERENCE:
            if candidate == "triton" and device.type != "cuda":
                continue  # the interpreter is for tests, never an automatic choice
            if backend_status(candidate).available and _implements(candidate, op) \
                    and _runs_on(candidate, device):
                return candidate
        return "torch"
    status = backend_status(name)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status.reason}")
    if not _implements(name, op):
        raise BackendUnavailableError(f"backend {name!r} does not implement {op!r}")
    if not _runs_on(name, device):
        need = "CUDA tensors" if name == "cuda" else "CUDA tensors (or TRITON_INTERPRET=1)"
        raise BackendUnavailableError(
            f"backend {name!r} needs {need} for {op!r}, got tensors on {device}")
    return name


def resolve(op: str, backend: str | None, device: torch.device):
    """The function that runs `op` for `backend` on `device` (see `resolve_name`)."""
    return _module(resolve_name(op, backend, device)).OPS[op]
