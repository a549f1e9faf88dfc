"""Peak memory of one call."""
from __future__ import annotations

from typing import Callable

import torch


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """MiB the call allocates beyond what was allocated before it, at its peak (outputs,
    saved activations, workspace). None on the CPU: torch keeps no allocator statistics
    there, and we report "n/a" rather than guess."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20
