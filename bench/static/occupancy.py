"""Theoretical occupancy: how many blocks (and warps) of a kernel one SM can hold at once.

The rules are those of CUDA's occupancy calculator (cuda_occupancy.h) for sm_80/sm_90:
- registers are allocated per warp, rounded up to the allocation unit (256), inside each
  of the SM's 4 sub-partitions (a quarter of the register file each), so the warps that
  fit are 4 x (registers per sub-partition // registers per warp); a block whose warps,
  rounded up to a multiple of 4, need more than the register file cannot launch at all;
- shared memory is allocated per block, the kernel's bytes plus the 1 KiB the driver
  reserves, rounded up to 128 bytes, out of the SM's largest carveout; a block over the
  per-block opt-in limit cannot launch;
- threads (64 warps) and blocks (32) per SM cap the rest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kernels.gpus import ArchLimits

REGISTER_SUBPARTITIONS = 4


@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    limited_by: str          # "registers", "shared memory", "threads", "blocks", or why 0
    max_warps_per_sm: int

    @property
    def percent(self) -> float:
        return 100.0 * self.warps_per_sm / self.max_warps_per_sm

    def to_json(self) -> dict:
        return {**asdict(self), "percent": self.percent}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(limits: ArchLimits, warps_per_block: int, registers: int,
              shared_bytes: int) -> Occupancy:
    """Blocks and warps per SM of a kernel launched with `warps_per_block` warps, using
    `registers` per thread and `shared_bytes` of shared memory per block (its own, without
    the driver's reserve)."""
    def none(reason: str) -> Occupancy:
        return Occupancy(0, 0, reason, limits.max_warps_per_sm)

    if warps_per_block * 32 > limits.max_threads_per_block:
        return none(f"over {limits.max_threads_per_block} threads per block")
    if shared_bytes > limits.shared_per_block:
        return none(f"over {limits.shared_per_block} B of shared memory per block")
    registers_per_warp = _round_up(max(registers, 1) * 32, limits.register_alloc_unit)
    if registers_per_warp * _round_up(warps_per_block, REGISTER_SUBPARTITIONS) \
            > limits.registers_per_sm:
        return none("over the register file per block")

    per_subpartition = limits.registers_per_sm // REGISTER_SUBPARTITIONS
    warps_by_registers = REGISTER_SUBPARTITIONS * (per_subpartition // registers_per_warp)
    block_shared = _round_up(shared_bytes + limits.reserved_shared_per_block,
                             limits.shared_alloc_unit)
    limits_in_blocks = {
        "threads": limits.max_warps_per_sm // warps_per_block,
        "blocks": limits.max_blocks_per_sm,
        "registers": warps_by_registers // warps_per_block,
        "shared memory": limits.shared_per_sm // block_shared,
    }
    # The first binding limit in this order names the cause: a resource that allows exactly
    # the SM's own cap is not what limits the kernel.
    limited_by = min(limits_in_blocks, key=limits_in_blocks.get)
    blocks = limits_in_blocks[limited_by]
    return Occupancy(blocks, blocks * warps_per_block, limited_by, limits.max_warps_per_sm)
