"""The check every implementation passes before it is timed: its outputs and gradients
against `kernels.reference` on the same inputs, with tolerances scaled by dtype.

The error is measured as max|actual - expected| / max(max|expected|, 1): a bf16 value
carries ~3 significant digits of its own magnitude, so an error is judged against the
size of the numbers, not element by element (a gradient entry that cancels to ~0 from
terms of size ~5 legitimately carries a bf16 error of ~0.02).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bench.problems import Inputs

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def describe_error(exc: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def as_tensors(result) -> list[torch.Tensor]:
    """An op's result as a list of tensors (add_layer_norm returns a pair)."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


def forward_backward(fn: Callable, inputs: Inputs, upstream: list[torch.Tensor]):
    """The outputs of fn(*args) and the gradients of sum(output * upstream) w.r.t. the
    differentiable inputs — what a training step asks of the op."""
    outputs = as_tensors(fn(*inputs.args))
    grads = torch.autograd.grad(outputs, inputs.differentiable(), upstream)
    return outputs, list(grads)


@dataclass(frozen=True)
class Expected:
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor]
    upstream: list[torch.Tensor]  # the random output gradients the grads were taken with


def reference_result(reference: Callable, inputs: Inputs, generator: torch.Generator) -> Expected:
    outputs = as_tensors(reference(*inputs.args))
    upstream = [torch.randn(o.shape, generator=generator, device=o.device).to(o.dtype)
                for o in outputs]
    grads = torch.autograd.grad(outputs, inputs.differentiable(), upstream)
    return Expected([o.detach() for o in outputs], list(grads), upstream)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    diff = (actual.float() - expected.float()).abs().max()
    return (diff / expected.float().abs().max().clamp(min=1.0)).item()


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    max_error: float | None   # the largest relative error over outputs and gradients
    message: str | None       # why it failed

    @classmethod
    def failure(cls, message: str, max_error: float | None = None) -> "CheckResult":
        return cls(False, max_error, message)


def check(fn: Callable, inputs: Inputs, expected: Expected, dtype: torch.dtype) -> CheckResult:
    """Run fn forward and backward and compare everything with the reference."""
    tolerance = TOLERANCE[dtype]
    try:
        outputs, grads = forward_backward(fn, inputs, expected.upstream)
    except Exception as exc:  # a crashing backend is a failing backend, reported as such
        return CheckResult.failure(describe_error(exc))
    if len(outputs) != len(expected.outputs):
        return CheckResult.failure(f"returned {len(outputs)} outputs, expected "
                                   f"{len(expected.outputs)}")
    worst = 0.0
    named = [(f"output {i}", a, e) for i, (a, e) in enumerate(zip(outputs, expected.outputs))] + \
            [(f"grad {i}", a, e) for i, (a, e) in enumerate(zip(grads, expected.grads))]
    for name, actual, wanted in named:
        try:
            error = relative_error(actual.detach(), wanted)
        except ValueError as exc:
            return CheckResult.failure(f"{name}: {exc}")
        if not error <= tolerance:  # `not <=` so that NaN fails
            return CheckResult.failure(f"{name} off by {error:.2e} (tolerance {tolerance:.0e})",
                                       error)
        worst = max(worst, error)
    return CheckResult(True, worst, None)
