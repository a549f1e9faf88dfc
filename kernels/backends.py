"""The one place that knows which kernel backends exist, which can run here and why not,
and which one runs a given call.

A backend is a package that provides, for the ops it implements, a function with the
op's canonical signature (`OPS`, keyed by op name; see `kernels.specs`), and declares
which calls it supports: `unsupported(call)` returns None, or the limit the call exceeds
(a dtype it lacks, a head dim too large, ...). Three exist:

- ``torch``  — pure PyTorch (`kernels.torch_backend`): every op, every call, anywhere; the
  CPU fallback.
- ``triton`` — Triton kernels (`kernels.triton`): needs a CUDA GPU, or the Triton
  interpreter (``TRITON_INTERPRET=1``) on the CPU, which is slow and meant for tests.
- ``cuda``   — the compiled C++/CUDA extension (`kernels.cuda`): needs the built
  extension and a CUDA GPU.

``"auto"`` runs each call on the first implementation of the op's route
(`kernels.routing`: per op and GPU architecture, the fastest correct one in the committed
GPU records, PyTorch's own included; on the CPU, ``torch``) that is available, runs on the
inputs' device (never the interpreter) and supports the call, so it never picks a backend
that would then refuse. An explicitly named backend that cannot run a call raises
`BackendUnavailableError` naming the limit. The process-wide default is
``"torch"``; change it with `set_default_backend` or the ``KERNELS_BACKEND`` variable.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from types import ModuleType
from typing import Callable

import torch

from kernels import routing
from kernels.availability import (BackendStatus, BackendUnavailableError,
                                  triton_interpreter_enabled)
from kernels.specs import OPS, Call

BACKENDS = ("torch", "triton", "cuda")
AUTO = "auto"
_MODULES = {"torch": "kernels.torch_backend", "triton": "kernels.triton", "cuda": "kernels.cuda"}

__all__ = ["AUTO", "BACKENDS", "BackendStatus", "BackendUnavailableError", "available_backends",
           "backend_status", "get_default_backend", "prepare", "resolve", "resolve_name",
           "set_default_backend", "triton_interpreter_enabled", "why_unsupported"]


# ----------------------------------------------------------------------------- availability

def _probe_torch() -> BackendStatus:
    device = "CUDA GPU and CPU" if torch.cuda.is_available() else "CPU"
    return BackendStatus("torch", True, f"pure PyTorch on {device}")


def _probe_triton() -> BackendStatus:
    # Without importing triton (slow): a CPU run that never uses it should not pay for it.
    if importlib.util.find_spec("triton") is None:
        return BackendStatus("triton", False, "triton is not installed")
    version = importlib.metadata.version("triton")
    if torch.cuda.is_available():
        where = f"CUDA GPU ({torch.cuda.get_device_name()})"
    elif triton_interpreter_enabled():
        where = "CPU through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        return BackendStatus("triton", False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the "
                                              "kernels on the CPU under the Triton interpreter)")
    return BackendStatus("triton", True, f"triton {version} on {where}")


def _probe_cuda() -> BackendStatus:
    from kernels.cuda import extension

    reason = extension.unavailable_reason()
    if reason is not None:
        return BackendStatus("cuda", False, reason)
    return BackendStatus("cuda", True, f"compiled extension on {torch.cuda.get_device_name()}")


_PROBES = {"torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda}

# Probe results and imported backend modules, filled on first use. Plain dicts rather than
# lru_cache: torch.compile traces a lookup in a filled dict, not a cached call (see `prepare`).
_STATUS: dict[str, tuple[int, BackendStatus]] = {}
_LOADED: dict[str, ModuleType] = {}


def _probe_generation(name: str) -> int:
    """Changes when what a probe depends on may have changed: a JIT build of the cuda
    extension (`kernels.cuda.build_jit`) makes the cached cuda status stale."""
    if name != "cuda":
        return 0
    from kernels.cuda import extension
    return extension.generation()


def backend_status(name: str) -> BackendStatus:
    """Whether backend `name` can run here, and why (not)."""
    if name not in _PROBES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS + (AUTO,)}")
    generation = _probe_generation(name)
    cached = _STATUS.get(name)
    if cached is None or cached[0] != generation:
        cached = _STATUS[name] = (generation, _PROBES[name]())
    return cached[1]


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
    for candidate in (BACKENDS if name == AUTO else (name, "torch")):
        if backend_status(candidate).available:
            _module(candidate)


# ----------------------------------------------------------------------------- the default

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


# ----------------------------------------------------------------------------- choosing

def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())


def _can_take(name: str, op: str, device: torch.device) -> bool:
    """Available, implementing `op` and running on `device`: the checks that do not
    depend on the call's arguments."""
    # _runs_on first: it is cheap, and rules cuda out for CPU tensors without a probe.
    return (_runs_on(name, device) and backend_status(name).available
            and op in _module(name).OPS)


# (backend, op, device) triples found to pass `_can_take`, so that a call asks it once per
# op and device rather than on every call (~1-2 us of probes and lookups each time). Only
# the yes answers are kept: a backend that becomes available later (a JIT build of the
# extension) is seen at once, and an available backend stays available.
_ABLE: set[tuple[str, str, torch.device]] = set()


def _able(name: str, op: str, device: torch.device) -> bool:
    if (name, op, device) in _ABLE:
        return True
    if not _can_take(name, op, device):
        return False
    _ABLE.add((name, op, device))
    return True


def _implementation(candidate: str, call: Call) -> Callable | None:
    """The function of one of a route's implementations (`kernels.routing`) for `call`, or
    None when it cannot take this call here."""
    backend, variant = routing.split(candidate)
    if not _able(backend, call.op, call.device) or _module(backend).unsupported(call):
        return None
    if variant is None:
        return _module(backend).OPS[call.op]
    return _variants(backend, call.op).get(variant)


def _variants(backend: str, op: str) -> dict[str, Callable]:
    """A backend's variants of `op` (e.g. the torch backend's attention with one SDPA
    kernel preferred), by name; a backend declares them in VARIANTS, if it has any."""
    return getattr(_module(backend), "VARIANTS", {}).get(op, {})


def resolve_name(op: str, backend: str | None, device: torch.device) -> str:
    """The implementation `backend` stands for when running `op` on `device` with arguments
    it supports (for describing a run; `resolve` decides per call): a backend name, or for
    `auto` the first of the op's route that can run here."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    name = _check_name(backend or get_default_backend())
    if name == AUTO:
        for candidate in routing.candidates(op, device):
            backend_name, variant = routing.split(candidate)
            if _can_take(backend_name, op, device) and (
                    variant is None or variant in _variants(backend_name, op)):
                return candidate
        return "torch"
    _explain_if_unable(name, op, device)
    return name


def _explain_if_unable(name: str, op: str, device: torch.device) -> None:
    status = backend_status(name)
    if not status.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {status.reason}")
    if op not in _module(name).OPS:
        raise BackendUnavailableError(f"backend {name!r} does not implement {op!r}")
    if not _runs_on(name, device):
        need = "CUDA tensors" if name == "cuda" else "CUDA tensors (or TRITON_INTERPRET=1)"
        raise BackendUnavailableError(
            f"backend {name!r} needs {need} for {op!r}, got tensors on {device}")


def why_unsupported(backend: str, call: Call) -> str | None:
    """Why the explicitly named `backend` would refuse `call`, or None when it runs it."""
    try:
        _explain_if_unable(_check_name(backend), call.op, call.device)
    except BackendUnavailableError as exc:
        return str(exc)
    return _module(backend).unsupported(call)


def resolve(call: Call, backend: str | None) -> Callable:
    """The function that runs `call` when `backend` (None: the default) is asked for."""
    name = _check_name(backend or get_default_backend())
    if name == "torch":  # every op, every call, on every device: nothing to ask
        return _module(name).OPS[call.op]
    if name == AUTO:
        for candidate in routing.candidates(call.op, call.device):
            function = _implementation(candidate, call)
            if function is not None:
                return function
        return _module("torch").OPS[call.op]
    if not _able(name, call.op, call.device):
        _explain_if_unable(name, call.op, call.device)
    reason = _module(name).unsupported(call)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run this {call.op} call: "
                                      f"{reason} (backend='auto' would run it on another "
                                      f"backend)")
    return _module(name).OPS[call.op]
