"""Whether a backend can run here, and the error raised when it cannot.

Kept apart from `kernels.backends` (the registry) so that backend packages can raise
`BackendUnavailableError` without importing the registry that imports them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here, or cannot run this op on these inputs;
    the message names the limit."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on when it is available

    def __str__(self) -> str:
        return f"{self.name:6s} {'yes' if self.available else 'no ':3s}  {self.reason}"


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU under Triton's interpreter (it
    must be set before triton is imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
