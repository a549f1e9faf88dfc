"""Timing one call: warm-up, repeats, median and inter-quartile range; and its peak memory.

On a GPU each repeat is bracketed by CUDA events (device time, no host round trip per
repeat) and preceded by a write to a 256 MB buffer, larger than any L2 cache (H100: 50 MB),
so that every repeat starts with a cold cache as it would inside a model rather than
re-reading inputs the previous repeat left in L2. On the CPU, time.perf_counter.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q1_ms: float      # 25th percentile
    q3_ms: float      # 75th percentile
    repeats: int

    def to_json(self) -> dict:
        return asdict(self)


def summarize(samples_ms: list[float]) -> Timing:
    if not samples_ms:
        raise ValueError("cannot summarize zero timing samples")
    if len(samples_ms) == 1:
        only = samples_ms[0]
        return Timing(only, only, only, 1)
    q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(median, q1, q3, len(samples_ms))


def _repeats_for(estimate_s: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    return max(min_repeats, min(max_repeats, int(budget_s / max(estimate_s, 1e-9))))


def time_cpu(fn: Callable[[], object], warmup: int = 2, budget_s: float = 0.5,
             min_repeats: int = 3, max_repeats: int = 50) -> Timing:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    repeats = _repeats_for(time.perf_counter() - start, budget_s, min_repeats, max_repeats)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return summarize(samples)


def time_cuda(fn: Callable[[], object], warmup: int = 5, budget_s: float = 0.2,
              min_repeats: int = 10, max_repeats: int = 200) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    repeats = _repeats_for(time.perf_counter() - start, budget_s, min_repeats, max_repeats)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for begin, end in events:
        flush.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # once, after all repeats: no host sync inside the timed loop
    return summarize([begin.elapsed_time(end) for begin, end in events])


def time_call(fn: Callable[[], object], device: torch.device, quick: bool = False) -> Timing:
    """Median time of fn() on `device`; `quick` trades precision for run time (CPU suite)."""
    if device.type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn, warmup=1, budget_s=0.2, min_repeats=3, max_repeats=10) if quick \
        else time_cpu(fn)


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
