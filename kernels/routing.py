"""Which implementation `backend="auto"` tries first, per op and GPU architecture: the
fastest correct one in the committed GPU records, PyTorch's own included.

The table is one committed file, `kernels/routes.json`, derived from the records under
bench/results by `python -m bench routes` (bench/kernels/routes.py), each route naming
the record it came from. A route is an order of implementations; `auto` runs a call on the
first one that is available and supports that very call, and the `torch` backend (every
call, anywhere) ends every order. An implementation is a backend name, or the `torch`
backend with one of SDPA's kernels preferred ("torch:sdpa-cudnn", causal_attention only:
if cuDNN's attention is the fastest, `auto` uses it until ours wins).

Where the table has no route for an op on the device's architecture, DEFAULT_ORDER:
Triton first, because on the only GPU record (H200) the CUDA extension's default attention
ran at a third of Triton's speed and attention dominates a training step; then CUDA, then
PyTorch. On the CPU `auto` is always `torch` (the Triton interpreter is for tests).
`backend="torch" | "triton" | "cuda"` still forces one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ROUTES_PATH = Path(__file__).with_name("routes.json")
DEFAULT_ORDER = ("triton", "cuda", "torch")
CPU_ORDER = ("torch",)


def load(path: Path = ROUTES_PATH) -> dict[tuple[str, str], tuple[str, ...]]:
    """(op, arch) -> the order of implementations `auto` tries, from the routes file."""
    if not path.is_file():
        return {}
    return {(route["op"], route["arch"]): with_torch_last(route["order"])
            for route in json.loads(path.read_text())["routes"]}


def with_torch_last(order) -> tuple[str, ...]:
    """`order`, with the plain `torch` backend appended when it is not in it: the
    implementation that runs every call ends every route."""
    order = tuple(order)
    return order if "torch" in order else order + ("torch",)


_ROUTES = load()
_ARCHS: dict[int, str] = {}  # CUDA device index -> "sm_90", looked up once per device


def arch_of(device: torch.device) -> str:
    """The compute capability of a CUDA device as "sm_XY"."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCHS:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCHS[index] = f"sm_{major}{minor}"
    return _ARCHS[index]


def order(op: str, arch: str) -> tuple[str, ...]:
    """The implementations `auto` tries for `op` on a GPU of `arch`, in order."""
    return _ROUTES.get((op, arch), DEFAULT_ORDER)


def candidates(op: str, device: torch.device) -> tuple[str, ...]:
    """The implementations `auto` tries for `op` on tensors on `device`, in order."""
    if device.type != "cuda":
        return CPU_ORDER
    return order(op, arch_of(device))


def split(implementation: str) -> tuple[str, str | None]:
    """"torch:sdpa-cudnn" -> ("torch", "sdpa-cudnn"); "triton" -> ("triton", None)."""
    backend, _, variant = implementation.partition(":")
    return backend, variant or None
