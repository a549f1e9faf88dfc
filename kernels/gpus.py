"""The project's one table of GPU facts: datasheet peaks per product and per-SM limits per
architecture. Everything that needs a peak or a limit reads it from here — the benchmark
suite's "% of peak", the training loop's MFU, the static performance report's occupancy
and roofline — so that no two places can disagree.

Peaks are NVIDIA's datasheet figures for dense math (the datasheets print tensor-core
rates with 2:4 sparsity; dense is half of that). "fp32" is the plain FMA rate, the one a
matmul gets at torch's default precision ("highest", no TF32); "tf32" is the tensor-core
rate with TF32 allowed.

Per-SM limits are the CUDA programming guide's "technical specifications per compute
capability" and the occupancy calculator's allocation rules for sm_80 and sm_90.
"""
from __future__ import annotations

from dataclasses import dataclass

TB = 1e12
KIB = 1024


@dataclass(frozen=True)
class ArchLimits:
    """What one SM of a compute capability offers a kernel, and how it hands it out."""
    arch: int                       # 80, 90: compute capability x 10
    registers_per_sm: int
    max_registers_per_thread: int
    register_alloc_unit: int        # registers are handed out per warp, in units of this
    max_warps_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    max_threads_per_block: int
    shared_per_sm: int              # bytes, at the largest shared-memory carveout
    shared_per_block: int           # bytes a kernel may use per block, opting in past 48 KiB
    reserved_shared_per_block: int  # bytes the driver keeps per block (on top of the kernel's)
    shared_alloc_unit: int          # shared memory is handed out per block in units of this

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


SM80 = ArchLimits(arch=80, registers_per_sm=65536, max_registers_per_thread=255,
                  register_alloc_unit=256, max_warps_per_sm=64, max_threads_per_sm=2048,
                  max_blocks_per_sm=32, max_threads_per_block=1024,
                  shared_per_sm=164 * KIB, shared_per_block=163 * KIB,
                  reserved_shared_per_block=1 * KIB, shared_alloc_unit=128)
SM90 = ArchLimits(arch=90, registers_per_sm=65536, max_registers_per_thread=255,
                  register_alloc_unit=256, max_warps_per_sm=64, max_threads_per_sm=2048,
                  max_blocks_per_sm=32, max_threads_per_block=1024,
                  shared_per_sm=228 * KIB, shared_per_block=227 * KIB,
                  reserved_shared_per_block=1 * KIB, shared_alloc_unit=128)
ARCHS: dict[int, ArchLimits] = {limits.arch: limits for limits in (SM80, SM90)}


@dataclass(frozen=True)
class Gpu:
    key: str                   # short unique name, e.g. "H100 SXM"
    name: str                  # the product, for tables
    matches: str               # substring of torch.cuda.get_device_name() that identifies it
    arch: ArchLimits
    sm_count: int
    bandwidth: float           # HBM bytes/s
    flops: dict[str, float]    # "fp32", "tf32", "bf16", "fp16" -> dense FLOP/s
    source: str = "NVIDIA datasheet (dense)"


def _a100(key, name, matches, bandwidth_tb):
    return Gpu(key, name, matches, SM80, 108, bandwidth_tb * TB,
               {"fp32": 19.5 * TB, "tf32": 156.0 * TB, "bf16": 312.0 * TB, "fp16": 312.0 * TB})


def _hopper(key, name, matches, sm_count, bandwidth_tb, fp32, tf32, bf16):
    return Gpu(key, name, matches, SM90, sm_count, bandwidth_tb * TB,
               {"fp32": fp32 * TB, "tf32": tf32 * TB, "bf16": bf16 * TB, "fp16": bf16 * TB})


# Most specific match first: "H100 PCIe" and "H100 NVL" before the plain "H100" (the SXM
# part reports itself as e.g. "NVIDIA H100 80GB HBM3").
GPUS: tuple[Gpu, ...] = (
    _hopper("H200 NVL", "NVIDIA H200 NVL", "H200 NVL", 132, 4.8, 60.0, 417.5, 835.0),
    _hopper("H200", "NVIDIA H200 SXM", "H200", 132, 4.8, 66.9, 494.7, 989.4),
    _hopper("H100 PCIe", "NVIDIA H100 PCIe", "H100 PCIe", 114, 2.0, 51.2, 378.0, 756.0),
    _hopper("H100 NVL", "NVIDIA H100 NVL", "H100 NVL", 132, 3.9, 60.0, 417.5, 835.0),
    _hopper("H100 SXM", "NVIDIA H100 SXM", "H100", 132, 3.35, 66.9, 494.7, 989.4),
    _a100("A100 SXM 40GB", "NVIDIA A100 SXM 40GB", "A100-SXM4-40GB", 1.555),
    _a100("A100 PCIe 40GB", "NVIDIA A100 PCIe 40GB", "A100-PCIE-40GB", 1.555),
    _a100("A100 PCIe 80GB", "NVIDIA A100 PCIe 80GB", "A100 80GB PCIe", 1.935),
    _a100("A100 SXM 80GB", "NVIDIA A100 SXM 80GB", "A100", 2.039),
)
_BY_KEY = {gpu.key: gpu for gpu in GPUS}

# The GPUs the static performance report predicts for: one per architecture it compiles for.
ROOFLINE_GPUS: tuple[Gpu, ...] = (_BY_KEY["H100 SXM"], _BY_KEY["A100 SXM 80GB"])


def gpu(key: str) -> Gpu:
    """A GPU by its key ("H100 SXM", "A100 SXM 80GB", ...)."""
    if key not in _BY_KEY:
        raise KeyError(f"no GPU {key!r} in kernels.gpus; known: {sorted(_BY_KEY)}")
    return _BY_KEY[key]


def gpu_by_name(device_name: str) -> Gpu | None:
    """The GPU whose entry matches torch.cuda.get_device_name(), or None if not in the table."""
    for entry in GPUS:
        if entry.matches in device_name:
            return entry
    return None
