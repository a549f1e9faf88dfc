"""Making the Triton interpreter round like the GPU (CPU test runs only).

Under TRITON_INTERPRET=1 (tests on a machine without a GPU), triton 3.6-3.8 convert fp32
to bf16 by truncating the mantissa, while every GPU conversion `.to(tl.bfloat16)` compiles
to cvt.rn.bf16.f32, round to nearest even. Truncation is biased and up to twice as far
off, so bf16 results under the interpreter would be less accurate than the same kernel
on a GPU, and an accuracy test would judge the interpreter, not the kernel. `install()`
replaces the interpreter's fp32 -> bf16 conversion with the GPU's rounding (the usual
integer trick: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits, which
carries into the exponent exactly as rounding up should); every other conversion is
left to the interpreter. Nothing changes outside the interpreter.
"""
from __future__ import annotations

import numpy as np

from kernels.availability import triton_interpreter_enabled

# Whether this process's kernels run under the interpreter: `triton.jit` decides when it
# decorates them, at import, so it is read once here. The launchers branch on this
# constant rather than on the environment (a lookup of ~1 us, several per call).
INTERPRETED = triton_interpreter_enabled()


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 values, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if np.any(nan):
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def install() -> None:
    """Patch the interpreter's float conversion (idempotent; a no-op if this triton's
    interpreter has no such function)."""
    from triton.runtime import interpreter
    import triton.language as tl

    original = getattr(interpreter, "_convert_float", None)
    if original is None or getattr(original, "rounds_like_the_gpu", False):
        return

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            return _fp32_to_bf16_bits(input).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert_float.rounds_like_the_gpu = True
    interpreter._convert_float = convert_float
