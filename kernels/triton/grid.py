"""The launchers' host-side arithmetic (grid sizes, power-of-two tiles) in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are `constexpr_function`s since Triton 3.5:
callable from the host too, but through a wrapper that unwraps constexpr arguments on
every call, ~3 us each on the 2-core CPU, a few of them per launch. Kernels keep using
Triton's (`tl.cdiv`); the launchers use these, which compute the same values.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, as triton.cdiv."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 computes it."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1
