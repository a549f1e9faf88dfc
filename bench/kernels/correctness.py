"""The check every implementation passes before it is timed: `kernels.testing`'s rule, the
one the conformance suite applies.

Outputs and gradients are compared with the reference computed in high precision (fp64
for fp32 inputs; fp32 for 16-bit inputs, whose own error is orders of magnitude larger and
whose fp64 reference would not fit a GPU at the big shapes), the error measured against
each tensor's own scale, and allowed what eager PyTorch in the same dtype gets wrong
(FlashAttention's rule; see `kernels.testing`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.specs import Inputs, OpSpec
from kernels.testing import Results, judge, reference_results, run


def describe_error(exc: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


@dataclass(frozen=True)
class Expected:
    reference: Results
    eager: Results
    upstream: list[torch.Tensor]  # the random output gradients everything was taken with


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def expected_result(spec: OpSpec, inputs: Inputs, dtype: torch.dtype,
                    generator: torch.Generator) -> Expected:
    reference, upstream = reference_results(spec, inputs, generator, reference_dtype(dtype))
    eager = run(spec.eager, inputs.args, inputs.grad_args, upstream)
    return Expected(reference, eager, upstream)


def forward_backward(fn: Callable, inputs: Inputs, upstream: list[torch.Tensor]) -> Results:
    """The outputs of fn(*args) and the gradients of sum(output * upstream) w.r.t. the
    differentiable inputs — what a training step asks of the op."""
    return run(fn, inputs.args, inputs.grad_args, upstream)


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    max_error: float | None   # the largest error over outputs and gradients
    message: str | None       # why it failed

    @classmethod
    def failure(cls, message: str, max_error: float | None = None) -> "CheckResult":
        return cls(False, max_error, message)


def check(fn: Callable, inputs: Inputs, expected: Expected) -> CheckResult:
    """Run fn forward and backward and judge everything against the reference."""
    try:
        actual = forward_backward(fn, inputs, expected.upstream)
    except Exception as exc:  # a crashing backend is a failing backend, reported as such
        return CheckResult.failure(describe_error(exc))
    verdicts = judge(actual, expected.reference, expected.eager)
    worst = max((v.error for v in verdicts), default=0.0)
    failed = [v for v in verdicts if not v.passed]
    if failed:
        return CheckResult.failure(str(failed[0]), worst)
    return CheckResult(True, worst, None)
