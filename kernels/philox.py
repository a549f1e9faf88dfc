"""Attention dropout's mask, defined once: which (query, key) pairs of which head a call
keeps, as a pure function of a (seed, offset) pair. The Triton and CUDA kernels compute
exactly this in their forward and regenerate it in their backward (nothing is stored);
`kernels.reference` and the `torch` backend rebuild it with `keep_mask`.

The generator is Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
3", SC'11; the constants of Random123 and of cuRAND): from a 128-bit counter and a 64-bit
key it gives four 32-bit words, with no state, so any element's bits can be recomputed
anywhere. One call decides 8 elements, by 16 bits each. For head bh = batch * H + head,
query row i (0 <= i < T_q, the call's queries in order) and key j (0 <= j < T_k):

    key     = (seed mod 2^32, seed div 2^32)
    counter = (i without its bit 3, j without its bits 0 and 3, bh, offset)
            = (i div 16 * 8 + i mod 8,  j div 16 * 4 + (j mod 8) div 2,  bh,  offset)
    number  = 16-bit half (j mod 2) of word (i div 8 mod 2) * 2 + (j div 8 mod 2)
    kept   <=> number >= threshold(p) = round(p * 2^16)

so a call decides the 2 x 4 elements (i, i + 8) x (j, j + 1, j + 8, j + 9) for i mod 16 < 8
and j mod 16 = 2c < 8. Why that group: a lane of a tensor-core (mma.sync / wgmma)
accumulator holds exactly these 8 elements of a 16 x 16 tile (rows g, g + 8; columns
2c, 2c + 1, 8 + 2c, 9 + 2c), so the CUDA forward uses every number of one call per lane and
tile, and the backward, whose tiles are transposed (keys as rows), 4 of each call's 8.
A kept element is scaled by 1 / (1 - p), a dropped one is 0; an element is kept with
probability 1 - threshold / 2^16, 1 - p to within 2^-17 (FlashAttention-2 decides 16
elements per call by 8 bits each, 1 - p to within 2^-9).

`draw_seed` picks a fresh (seed, offset) from torch's default (CPU) generator for each
call that does not give one, so masks are reproducible under torch.manual_seed and a
training run seeded per iteration resumes exactly; an explicit (seed, offset) picks one
mask, which is how the conformance suite judges every backend against the reference with
the same mask. Calls with different keys or offsets are independent streams.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Random123's PHILOX_M4x32_0, _1
KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)     # PHILOX_W32_0, _1 (golden ratio, sqrt(3) - 1)
ROUNDS = 10
BITS = 16  # per decision: 8 decisions per call


def threshold(p: float) -> int:
    """The 16-bit bound below which an element is dropped: round(p * 2^16), at most
    2^16 - 1 (so that an element can always be kept when p < 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(round(p * 2.0 ** BITS), 2 ** BITS - 1)


def check_seed(dropout_seed) -> tuple[int, int] | None:
    """An explicit (seed, offset) as two ints: seed in [0, 2^64), offset in [0, 2^32)."""
    if dropout_seed is None:
        return None
    if not (isinstance(dropout_seed, (tuple, list)) and len(dropout_seed) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in dropout_seed)):
        raise TypeError(f"dropout_seed must be None or a pair of ints (seed, offset), got "
                        f"{dropout_seed!r}")
    seed, offset = dropout_seed
    if not (0 <= seed < 2 ** 64 and 0 <= offset < 2 ** 32):
        raise ValueError(f"dropout_seed must be (seed, offset) with 0 <= seed < 2^64 and "
                         f"0 <= offset < 2^32, got {dropout_seed!r}")
    return seed, offset


def draw_seed() -> torch.Tensor:
    """A fresh (seed, offset) from torch's default CPU generator, as a CPU int64 tensor
    [seed, offset] (seed < 2^62, offset < 2^32). A tensor rather than ints: reading it
    costs no device sync, and torch.compile traces the draw instead of breaking the graph
    on it (the kernels' custom ops read it inside)."""
    drawn = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64)
    drawn[1] &= MASK32
    return drawn


def seed_tensor(dropout_seed: tuple[int, int] | None) -> torch.Tensor:
    """The (seed, offset) a kernel call uses as a CPU int64 tensor: the given pair (the seed
    stored as its two's-complement int64), or a fresh draw."""
    if dropout_seed is None:
        return draw_seed()
    seed, offset = dropout_seed
    return torch.tensor([seed - 2 ** 64 if seed >= 2 ** 63 else seed, offset],
                        dtype=torch.int64)


def kernel_words(rng: torch.Tensor, p: float) -> tuple[int, int, int, int]:
    """(seed_lo, seed_hi, offset, threshold) as signed 32-bit ints, for a kernel launch: a
    scalar argument keeps one int32 type whatever its value (Triton types each int
    argument by its range, and a new type is a new compilation); kernels bitcast them to
    uint32."""
    seed, offset = (v & (2 ** 64 - 1) for v in rng.tolist())
    return tuple(_signed32(v) for v in (seed & MASK32, seed >> 32, offset & MASK32,
                                        threshold(p)))


def _signed32(v: int) -> int:
    return v - 2 ** 32 if v >= 2 ** 31 else v


# ----------------------------------------------------------------------------- reference

def _mulhilo(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of multiplier * x for x < 2^32 in int64, without overflow:
    x is split into 16-bit halves so that no partial product reaches 2^63."""
    low = multiplier * (x & 0xFFFF)            # < 2^48
    high = multiplier * (x >> 16)              # < 2^48
    mid = low + ((high & 0xFFFF) << 16)        # < 2^49
    return (high >> 16) + (mid >> 32), mid & MASK32


def philox4x32(counter: tuple, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors or ints, each < 2^32,
    broadcast together) under key (k0, k1): four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(ROUND_MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(ROUND_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + KEY_INCREMENTS[0]) & MASK32, (k1 + KEY_INCREMENTS[1]) & MASK32
    return c0, c1, c2, c3


def counter_rows(i):
    """The counter's first word for query rows i: i without its bit 3."""
    return i // 16 * 8 + i % 8


def counter_columns(j):
    """The counter's second word for keys j: j without its bits 0 and 3."""
    return j // 16 * 4 + j % 8 // 2


def keep_mask(dropout_seed: tuple[int, int], p: float, batch: int, heads: int, t_q: int,
              t_k: int, device=None) -> torch.Tensor:
    """The (batch, heads, t_q, t_k) bool mask of kept elements that every backend applies
    for this (seed, offset) and p (see the module docstring)."""
    seed, offset = check_seed(dropout_seed)
    dev = torch.device("cpu") if device is None else torch.device(device)
    i = torch.arange(t_q, device=dev).view(1, -1, 1)
    j = torch.arange(t_k, device=dev).view(1, 1, -1)
    bh = torch.arange(batch * heads, device=dev).view(-1, 1, 1)
    # One call per counter of the 16 x 16 blocks covering the grid, then each element
    # picks its number.
    rows = torch.arange(-(-t_q // 16) * 8, device=dev).view(1, -1, 1)
    cols = torch.arange(-(-t_k // 16) * 4, device=dev).view(1, 1, -1)
    words = torch.stack(torch.broadcast_tensors(
        *philox4x32((rows, cols, bh, offset), (seed & MASK32, seed >> 32))), dim=-1)
    word = (i // 8 % 2) * 2 + j // 8 % 2
    picked = words[:, counter_rows(i), counter_columns(j), word]
    number = (picked >> (BITS * (j % 2))) & (2 ** BITS - 1)
    return (number >= threshold(p)).view(batch, heads, t_q, t_k)
