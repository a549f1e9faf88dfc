"""The device's peak memory bandwidth and matmul throughput, the denominators of "% of peak".

GPUs come from `kernels.gpus`, the project's one table of datasheet figures (dense, no
sparsity; fp32 is the non-tensor-core rate, torch's default matmul precision). A CPU has
no datasheet we can trust across machines, so its peaks are measured at the start of a run:
bandwidth with a STREAM-like copy, FLOP/s with a large matmul per dtype ("measured matmul
peak" — what a good BLAS reaches here, an upper bound for any kernel we write; the
training CLI's MFU uses the same measurement, gpt/peak.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from gpt.peak import measure_matmul_flops, native_bf16_matmul
from kernels import gpus


@dataclass(frozen=True)
class Peak:
    device: str
    bandwidth: float                 # bytes/s
    flops: dict[str, float]          # dtype name ("fp32", "bf16", "fp16") -> FLOP/s
    source: str                      # where the numbers come from

    def flops_for(self, dtype: str) -> float | None:
        return self.flops.get(dtype)

    def to_json(self) -> dict:
        return asdict(self)


def gpu_peak(device_name: str) -> Peak | None:
    """The datasheet peak of a GPU by its name, or None when it is not in the table."""
    gpu = gpus.gpu_by_name(device_name)
    return None if gpu is None else Peak(gpu.name, gpu.bandwidth, dict(gpu.flops), gpu.source)


def measure_cpu_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """STREAM "copy": bytes read + written per second for dst[:] = src, best of `repeats`
    (best, not median, as STREAM reports: the peak is what the memory system can do)."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: fault the pages in outside the timed region
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def cpu_peak(cpu_name: str) -> Peak:
    """Measured peaks of this CPU (a second or two). bf16/fp16 rows: the measured bf16 rate
    where the CPU multiplies bf16 natively (AVX512-BF16, AMX), else the fp32 rate (such
    CPUs run 16-bit matmuls no faster than fp32)."""
    fp32 = measure_matmul_flops(torch.float32)
    low = measure_matmul_flops(torch.bfloat16) if native_bf16_matmul() else fp32
    return Peak(cpu_name, measure_cpu_bandwidth(), {"fp32": fp32, "bf16": low, "fp16": low},
                "measured: STREAM-like copy, fp32 and bf16 matmul peaks")


def best_of(first: Peak, second: Peak) -> Peak:
    """The higher of two measurements of the same device, number by number."""
    flops = {k: max(first.flops[k], second.flops.get(k, 0.0)) for k in first.flops}
    return Peak(first.device, max(first.bandwidth, second.bandwidth), flops, first.source)


def device_peak(device: torch.device, cpu_name: str) -> Peak | None:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return cpu_peak(cpu_name)


def percent_of_peak(rate: float | None, peak: float | None) -> float | None:
    """rate / peak in percent; None when either is unknown (never a made-up number)."""
    if rate is None or not peak:
        return None
    return 100.0 * rate / peak
