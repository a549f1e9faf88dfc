"""The one rule by which a kernel's result is judged: the tests and the benchmark's
correctness gate both compare through here.

Error. A result a is compared with r, the same quantity computed by `kernels.reference`
in fp64 from the same input values, as

    err(a, r) = max |a - r| / max |r|        (over the finite entries)

that is, relative to the reference tensor's own scale, with no floor: a gradient whose
entries are all about 1e-4 is judged against 1e-4, so returning zeros is an error of 1
whatever the magnitudes involved. Non-finite entries must match exactly (a NaN where the
reference has a NaN, the same infinity where it has one); any mismatch is an infinite
error. A reference that is exactly zero everywhere (the gradient of a query that sees only
itself, say) leaves no scale: then err = max |a|, in absolute terms.

Tolerance (FlashAttention's rule). Rounding is part of a low-precision result, so the
error is held to what PyTorch itself achieves in the same dtype: the spec's `eager`
implementation (plain PyTorch, as a user would write the op, e.g. nanoGPT) is run on the
same inputs in the same dtype and compared with the same reference, and

    err(kernel) <= max(EAGER_FACTOR * err(eager), SLACK[dtype of the result])

The slack is a floor for results that eager happens to compute (almost) exactly while a
kernel rounds: in bf16 and fp16 two units of roundoff (one rounding of the stored result,
and one more), in fp32 2e-5, the error of the fast exp/erf approximations GPU kernels and
PyTorch's own CPU flash attention use. It lets no real defect through: a zeroed, halved
or negated result is off by 1, 0.5 or 2; a mistake of 1e-4 (the wrong GELU flavour)
fails in fp32; fp16 gradients that lose their small probabilities fail against eager
fp16, which keeps them.

`run_case` puts this together for one op call: the reference in fp64, eager and the
backend in the case's dtype, outputs and the gradients of every differentiable input
under the same random upstream gradients. `mutate` zeroes, halves or negates one output
or gradient of a result, for the tests that prove this comparison can fail.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import kernels.ops

EAGER_FACTOR = 3.0  # a kernel may be this many times less accurate than eager PyTorch...
SLACK = {torch.float64: 1e-12, torch.float32: 2e-5,   # ...or this much (see the docstring)
         torch.bfloat16: 2 * 2.0 ** -8, torch.float16: 2 * 2.0 ** -11}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (see the module docstring)."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(actual.shape)} differs from the expected "
                         f"{tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    finite = torch.isfinite(e)
    same_non_finite = torch.where(finite, torch.isfinite(a),
                                  (a == e) | (torch.isnan(a) & torch.isnan(e)))
    if not bool(same_non_finite.all()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    diff = (a - e).abs()[finite].max().item()
    scale = e.abs()[finite].max().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype: torch.dtype, eager_error: float | None) -> float:
    """The largest error allowed for a result stored in `dtype`, given eager PyTorch's
    error on the same inputs (None: no eager baseline, only the slack)."""
    if eager_error is None or not math.isfinite(eager_error):
        return SLACK[dtype]
    return max(EAGER_FACTOR * eager_error, SLACK[dtype])


@dataclass(frozen=True)
class Comparison:
    """One output or gradient of one call, judged."""
    name: str
    error: float
    eager_error: float | None
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # False for NaN

    def __str__(self) -> str:
        eager = "n/a" if self.eager_error is None else f"{self.eager_error:.2e}"
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: error {self.error:.2e} (eager {eager}, tolerance "
                f"{self.tolerance:.2e}) {verdict}")


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor,
            eager: torch.Tensor | None = None) -> Comparison:
    """Judge `actual` against the high-precision `expected`, allowing what `eager` (the
    same quantity from plain PyTorch in the same dtype) gets wrong."""
    eager_error = None if eager is None else relative_error(eager, expected)
    if actual.dtype not in SLACK:
        raise TypeError(f"{name}: cannot judge a {actual.dtype} result")
    return Comparison(name, relative_error(actual, expected), eager_error,
                      tolerance(actual.dtype, eager_error))


def assert_close(actual: torch.Tensor, expected: torch.Tensor,
                 eager: torch.Tensor | None = None, name: str = "result") -> Comparison:
    """`compare`, raising AssertionError with the numbers when it fails."""
    verdict = compare(name, actual, expected, eager)
    if not verdict.passed:
        raise AssertionError(str(verdict))
    return verdict


# ----------------------------------------------------------------------------- one call

@dataclass(frozen=True)
class Results:
    """What one implementation returned for one call: its outputs and the gradients of
    its differentiable inputs (None for an input that got no gradient)."""
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor | None]


def as_tensors(result) -> list[torch.Tensor]:
    """An op's return value as a list of tensors (add_layer_norm returns a pair)."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


def run(fn: Callable, args: Sequence, grad_args: Sequence[int],
        upstream: Sequence[torch.Tensor] | None) -> Results:
    """fn(*args) and, with upstream gradients (one per output), the gradients of
    sum(output * upstream) with respect to args[i] for i in grad_args."""
    outputs = as_tensors(fn(*args))
    grads = [] if upstream is None else gradients(outputs, [args[i] for i in grad_args], upstream)
    return Results([o.detach() for o in outputs], grads)


def gradients(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              upstream: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """d sum(output * upstream) / d input for each input (None: no path to it)."""
    pairs = [(o, u.to(o.dtype)) for o, u in zip(outputs, upstream) if o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], list(inputs),
                                    [u for _, u in pairs], allow_unused=True))


def high_precision_copy(args: Sequence, grad_args: Sequence[int],
                        dtype: torch.dtype = torch.float64) -> tuple:
    """args with every floating tensor replaced by a leaf of `dtype` holding the same values
    (the reference's inputs); integer tensors and non-tensors pass through."""
    copies = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).requires_grad_(i in grad_args)
        copies.append(a)
    return tuple(copies)


def random_upstream(outputs: Sequence[torch.Tensor], generator: torch.Generator,
                    scale: float = 1.0) -> list[torch.Tensor]:
    """One fp64 upstream gradient per output, drawn from `generator` (on its own device,
    CPU or GPU) and moved to the output's device. A scalar output (a reduced loss) gets
    `scale` times a positive number, as a GradScaler's loss scale reaches it; others get
    scale * N(0, 1)."""
    upstream = []
    for o in outputs:
        if o.dim() == 0:
            u = torch.rand((), generator=generator, dtype=torch.float64,
                           device=generator.device) + 0.5
        else:
            u = torch.randn(o.shape, generator=generator, dtype=torch.float64,
                            device=generator.device)
        upstream.append((u * scale).to(o.device))
    return upstream


def judge(actual: Results, expected: Results, eager: Results | None) -> list[Comparison]:
    """Every output and gradient of `actual` against `expected`, with `eager`'s error as
    the allowance (see the module docstring)."""
    verdicts = []
    pairs = [(f"output {i}", a, e, None if eager is None else eager.outputs[i])
             for i, (a, e) in enumerate(zip(actual.outputs, expected.outputs))]
    pairs += [(f"grad {i}", a, e, None if eager is None else eager.grads[i])
              for i, (a, e) in enumerate(zip(actual.grads, expected.grads))]
    if len(actual.outputs) != len(expected.outputs):
        return [Comparison(f"{len(actual.outputs)} outputs, expected {len(expected.outputs)}",
                           math.inf, None, 0.0)]
    for name, a, e, g in pairs:
        if e is None:
            continue  # the reference gives this input no gradient either
        if a is None:
            verdicts.append(Comparison(f"{name}: no gradient", math.inf, None, 0.0))
            continue
        verdicts.append(compare(name, a, e, g))
    return verdicts


MUTATIONS = {"zero": torch.zeros_like, "half": lambda t: t * 0.5, "negate": torch.neg}


# ----------------------------------------------------------------------------- one case

def reference_results(spec, inputs, generator: torch.Generator,
                      dtype: torch.dtype = torch.float64) -> tuple[Results, list[torch.Tensor]]:
    """The reference's outputs and gradients on `inputs` computed in `dtype` (fp64 by
    default), and the random upstream gradients they were taken with (drawn from
    `generator`, scaled by the inputs' loss scale)."""
    args = high_precision_copy(inputs.args, inputs.grad_args, dtype)
    outputs = as_tensors(spec.reference(*args))
    upstream = random_upstream(outputs, generator, inputs.loss_scale)
    grads = gradients(outputs, [args[i] for i in inputs.grad_args], upstream)
    return Results([o.detach() for o in outputs], grads), upstream


def autocast_for(inputs, device, dtype: torch.dtype):
    """The autocast region an Inputs asks for (a no-op context otherwise)."""
    if not inputs.autocast:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def evaluate_case(spec, case, backend: str, dtype: torch.dtype, device,
                  seed: int = 0) -> tuple[Results, Results, Results]:
    """(the op on `backend`, the fp64 reference, eager PyTorch) on `case` of op `spec`,
    built in `dtype` on `device`, all under the same upstream gradients."""
    generator = torch.Generator().manual_seed(seed)
    inputs = case.build(dtype, torch.device(device), generator)
    expected, upstream = reference_results(spec, inputs, generator)
    op = getattr(kernels.ops, spec.name)
    with autocast_for(inputs, device, dtype):
        eager = run(spec.eager, inputs.args, inputs.grad_args, upstream)
        actual = run(lambda *args: op(*args, backend=backend), inputs.args, inputs.grad_args,
                     upstream)
    return actual, expected, eager


def run_case(spec, case, backend: str, dtype: torch.dtype, device,
             seed: int = 0) -> list[Comparison]:
    """Judge the op on `backend` on one case (see `evaluate_case`): one Comparison per
    output and gradient, all of which must pass."""
    actual, expected, eager = evaluate_case(spec, case, backend, dtype, device, seed)
    return judge(actual, expected, eager)


def mutate(results: Results, target: str, index: int, how: str) -> Results:
    """`results` with output `index` (target="output") or gradient `index` ("grad")
    zeroed, halved or negated (`how`): what a wrong kernel could return."""
    if how not in MUTATIONS:
        raise ValueError(f"how must be one of {tuple(MUTATIONS)}, got {how!r}")
    outputs, grads = list(results.outputs), list(results.grads)
    chosen = outputs if target == "output" else grads
    chosen[index] = MUTATIONS[how](chosen[index])
    return Results(outputs, grads)
