"""How the benchmarks measure.

    stats    a timing: median, quartiles, method; on a GPU the host's time per call and
             the profiler's cross-check, and whether the two GPU measurements disagree
    cpu      the host's clock around a synchronous call (the CPU)
    gpu      GPU time by CUDA-graph replays over input sets larger than L2, cross-checked
             against torch.profiler; host time per call beside it
    memory   peak memory of one call
    machine  what a run was on (device, versions, commit)
    peaks    the peak bandwidth and FLOP/s a rate is a fraction of
"""
from bench.timing.cpu import time_cpu
from bench.timing.memory import peak_memory_mb
from bench.timing.stats import DISAGREEMENT_LIMIT, Timing, summarize

__all__ = ["DISAGREEMENT_LIMIT", "Timing", "peak_memory_mb", "summarize", "time_cpu"]
