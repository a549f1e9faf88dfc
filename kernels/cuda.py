"""The `cuda` backend: loader and autograd wrappers of the compiled C++/CUDA extension."""
from __future__ import annotations

OPS: dict = {}


def unavailable_reason() -> str | None:
    """Why the extension cannot run here, or None when it can."""
    return "the C++/CUDA extension is not implemented yet"
