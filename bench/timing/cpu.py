"""Timing a call on the CPU: warm-up, then as many repeats of the host's clock around the
(synchronous) call as a time budget allows; median and inter-quartile range."""
from __future__ import annotations

import time
from typing import Callable

from bench.timing.stats import Timing, summarize


def repeats_for(estimate_s: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many repeats of a call taking `estimate_s` fit `budget_s`, within the bounds."""
    return max(min_repeats, min(max_repeats, int(budget_s / max(estimate_s, 1e-9))))


def time_cpu(fn: Callable[[], object], warmup: int = 2, budget_s: float = 0.5,
             min_repeats: int = 3, max_repeats: int = 50) -> Timing:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    repeats = repeats_for(time.perf_counter() - start, budget_s, min_repeats, max_repeats)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - start))
    return summarize(samples)
