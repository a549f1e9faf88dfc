"""Dtype-scaled comparison shared by the kernel tests.

Low-precision results are compared with an absolute tolerance scaled by the expected
tensor's largest magnitude: a bf16 value carries ~3 significant digits, so an error is
judged against the size of the numbers it was computed from, not element by element
(a gradient entry that sums to ~0 from terms of size ~5 has a bf16 error of ~0.02)."""
import torch

RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype=None, factor=1.0):
    """actual ≈ expected within the tolerance of `dtype` (default: actual's dtype)."""
    tol = RTOL[dtype or actual.dtype] * factor
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale)
