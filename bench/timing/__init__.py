"""How the benchmarks measure: time per call (`clock`), peak memory, the machine a run was
on (`machine`) and the peaks its rates are a fraction of (`peaks`)."""
from bench.timing.clock import Timing, peak_memory_mb, summarize, time_call, time_cpu, time_cuda

__all__ = ["Timing", "peak_memory_mb", "summarize", "time_call", "time_cpu", "time_cuda"]
