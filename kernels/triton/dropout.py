"""Attention dropout's mask in Triton: `kernels.philox`'s definition, computed for a tile.

A tile of the mask is BLOCK_M query rows of one 16-aligned query block by BLOCK_N keys of
one 16-aligned key block. One Philox4x32-10 call decides the 8 elements (i, i + 8) x
(j, j + 1, j + 8, j + 9) (16 bits each), so the tile's Philox runs on a (BLOCK_M / 2,
BLOCK_N / 4) grid of counters, and its 8 numbers are placed into (BLOCK_M, BLOCK_N) with
joins, one permute and a reshape: no redundant Philox call. That placement puts the two
rows of a counter next to each other and its four keys next to each other, so tile row p
holds query row_order(p) and tile column q key key_order(q) of the blocks:

    row_order(p) = 16 (p div 16) + 8 (p mod 2) + (p div 2) mod 8
    key_order(q) = 16 (q div 16) + 8 ((q mod 4) div 2) + 2 ((q div 4) mod 4) + q mod 2

A kernel with dropout reads (and writes) its query rows and its K and V rows in those
orders (any row order is as good for a matmul, and loads and stores go through row
pointers), and so gets the mask's elements where its score tile has them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import philox
from kernels.triton.aot import AotSpec
from kernels.triton.device import on_device_of

PHILOX_ROUND_A = tl.constexpr(philox.ROUND_MULTIPLIERS[0])
PHILOX_ROUND_B = tl.constexpr(philox.ROUND_MULTIPLIERS[1])
PHILOX_KEY_A = tl.constexpr(philox.KEY_INCREMENTS[0])
PHILOX_KEY_B = tl.constexpr(philox.KEY_INCREMENTS[1])
PHILOX_ROUNDS = tl.constexpr(philox.ROUNDS)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123's round and key schedule) of uint32 counters under the
    uint32 key (k0, k1)."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_ROUND_A)
        hi1 = tl.umulhi(c2, PHILOX_ROUND_B)
        lo0 = c0 * PHILOX_ROUND_A
        lo1 = c2 * PHILOX_ROUND_B
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def row_order(offs, row_start):
    """The query rows a dropout tile's rows hold: row_start + row_order(offs) (see the
    module docstring); row_start is a multiple of 16."""
    return row_start + (offs // 16) * 16 + (offs % 2) * 8 + (offs // 2) % 8


@triton.jit
def key_order(offs, key_start):
    """The keys a dropout tile's columns hold: key_start + key_order(offs) (see the module
    docstring); key_start is a multiple of 16."""
    return (key_start + (offs // 16) * 16 + ((offs % 4) // 2) * 8 + ((offs // 4) % 4) * 2
            + offs % 2)


@triton.jit
def keep_tile(seed_lo, seed_hi, offset, threshold, bh, row_start, key_start,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) keep mask of head bh for the query rows
    row_order(arange(BLOCK_M), row_start) and the keys key_order(arange(BLOCK_N),
    key_start), both starts multiples of 16. seed_lo, seed_hi, offset, threshold: the
    call's (seed, offset) and round(p * 2^16) as int32 bit patterns."""
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    # Counters of the tile: query rows without bit 3, keys without bits 0 and 3.
    c0 = (row_start // 2 + tl.arange(0, BLOCK_M // 2)).to(tl.uint32)[:, None]
    c1 = (key_start // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)[None, :]
    zeros = tl.zeros_like(c0 + c1)
    w0, w1, w2, w3 = _philox4x32(c0 + zeros, c1 + zeros, zeros + bh.to(tl.uint32),
                                 zeros + offset.to(tl.uint32, bitcast=True), k0, k1)
    bound = threshold.to(tl.uint32, bitcast=True)
    # Word (row bit) * 2 + (key bit 3), number (key bit 0): keep bits per (counter row a,
    # counter column b), joined as [a, b, key bit 3, key bit 0] for each row bit...
    low, high = tl.join(w0, w1), tl.join(w2, w3)  # [a, b, key bit 3]
    rows0 = tl.join(low & 0xFFFF, low >> 16) >= bound
    rows8 = tl.join(high & 0xFFFF, high >> 16) >= bound
    # ...then [a, b, key bits, row bit] -> [a, row bit, b, key bits] -> (BLOCK_M, BLOCK_N).
    keep = tl.join(tl.reshape(rows0, (BLOCK_M // 2, BLOCK_N)),
                   tl.reshape(rows8, (BLOCK_M // 2, BLOCK_N)))
    return tl.reshape(tl.permute(keep, (0, 2, 1)), (BLOCK_M, BLOCK_N))


# ----------------------------------------------------------------------------- the mask

@triton.jit
def _keep_mask_kernel(Out, seed_lo, seed_hi, offset, threshold, T_Q, T_K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out (B * H, T_Q, T_K) int8: 1 where the attention kernels keep the element. Grid
    (B * H, query blocks, key blocks)."""
    bh = tl.program_id(0)
    row_start, key_start = tl.program_id(1) * BLOCK_M, tl.program_id(2) * BLOCK_N
    rows = row_order(tl.arange(0, BLOCK_M), row_start)
    keys = key_order(tl.arange(0, BLOCK_N), key_start)
    keep = keep_tile(seed_lo, seed_hi, offset, threshold, bh, row_start, key_start, BLOCK_M,
                     BLOCK_N)
    out = Out + bh.to(tl.int64) * T_Q * T_K + rows[:, None] * T_K + keys[None, :]
    tl.store(out, keep.to(tl.int8), mask=(rows[:, None] < T_Q) & (keys[None, :] < T_K))


MASK_BLOCK_M, MASK_BLOCK_N = 32, 64


def keep_mask(dropout_seed: tuple[int, int], p: float, batch: int, heads: int, t_q: int,
              t_k: int, device) -> torch.Tensor:
    """The (batch, heads, t_q, t_k) bool mask the Triton attention kernels apply for this
    (seed, offset) and p: `kernels.philox.keep_mask`, computed by this module's tiles."""
    out = torch.empty((batch * heads, t_q, t_k), dtype=torch.int8, device=device)
    if out.numel():
        words = philox.kernel_words(philox.seed_tensor(philox.check_seed(dropout_seed)), p)
        grid = (batch * heads, triton.cdiv(t_q, MASK_BLOCK_M), triton.cdiv(t_k, MASK_BLOCK_N))
        with on_device_of(out):
            _keep_mask_kernel[grid](out, *words, t_q, t_k, BLOCK_M=MASK_BLOCK_M,
                                    BLOCK_N=MASK_BLOCK_N)
    return out.view(batch, heads, t_q, t_k).bool()


AOT_SPECS = [AotSpec(f"keep_mask[BLOCK_M={MASK_BLOCK_M},BLOCK_N={MASK_BLOCK_N}]",
                     _keep_mask_kernel,
                     {"Out": "*i8", "seed_lo": "i32", "seed_hi": "i32", "offset": "i32",
                      "threshold": "i32", "T_Q": "i32", "T_K": "i32", "BLOCK_M": "constexpr",
                      "BLOCK_N": "constexpr"},
                     {"BLOCK_M": MASK_BLOCK_M, "BLOCK_N": MASK_BLOCK_N}, num_warps=4,
                     num_stages=1)]
