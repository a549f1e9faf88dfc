"""The peak FLOP/s that MFU is a fraction of, on any device.

A GPU's is its datasheet dense peak (`kernels.gpus`). A CPU has no datasheet figure that
holds across machines, so its peak is measured: the FLOP/s of a large matmul in the run's
dtype with the run's thread count ("measured matmul peak": what a good BLAS reaches here,
an upper bound for the model's matmuls). Measuring takes about a second, so the result is
cached per (CPU, threads, dtype, torch version) in `cache_file()`; delete the file (or
pass --peak_flops) after the machine changed. The benchmark suite measures its own.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

MATMUL_SIZE = 2048  # 2 * 2048^3 = 17 GFLOP per matmul: ~0.1 s on two cores, beyond caches
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 matmuls
    run at twice the fp32 rate or more, elsewhere at best at the fp32 one."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = MATMUL_SIZE,
                         repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul on the CPU (2 n^3 FLOPs), best of `repeats` (the
    peak is what the machine can do, not what a busy moment lets it do)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: the BLAS thread pool and its packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "gpt-kernels" / "cpu_peak_flops.json"


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or damaged: measure again
        return {}
    return cached if isinstance(cached, dict) else {}


def cpu_peak_flops(dtype: torch.dtype, path: Path | None = None) -> tuple[float, str]:
    """(FLOP/s, a description for the log) of this CPU's matmul peak in `dtype` at the
    current torch thread count, from the cache or measured now and cached."""
    path = path or cache_file()
    threads = torch.get_num_threads()
    key = f"{cpu_name()} | {threads} threads | {DTYPE_NAMES[dtype]} | torch {torch.__version__}"
    cached = _read_cache(path)
    entry = cached.get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float))
            and entry["flops"] > 0):
        entry = {"flops": measure_matmul_flops(dtype),
                 "date": datetime.date.today().isoformat()}
        cached[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1) + "\n")
        except OSError:
            pass  # a read-only home: measure again next time
    text = (f"{entry['flops'] / 1e12:.3g} TFLOP/s, the {DTYPE_NAMES[dtype]} matmul peak of "
            f"this CPU with {threads} threads (measured {entry['date']}; cached in {path})")
    return entry["flops"], text
