"""The one rule by which a kernel's result is judged: the tests and the benchmark's
correctness gate both compare through here.

A result a (an output, or the gradient of an input) is compared with r, the same quantity
computed by `kernels.reference` in fp64 from the same input values. Four checks, all of
which must pass:

1. dtype. a has the dtype the op's spec promises (`OpSpec.result_dtypes`: a loss is fp32
   whatever the logits' dtype, a LayerNorm returns its input's dtype, ...); a gradient
   has its input's dtype. A right value in the wrong dtype is a wrong answer.

2. Non-finite entries match exactly (a NaN where r has a NaN, the same infinity where it
   has one); any mismatch is an infinite error.

3. Every row, against its own scale. The tensor is read as rows along its last dim (one
   query's head vector, one token's logits gradient, one output channel's weight
   gradient; a 0-d or 1-D tensor is one row), and each row's error is

       err_i = max_j |a_ij - r_ij| / max_j |r_ij|

   so a row whose entries are all about 1e-4 is judged against 1e-4, and an error confined
   to one small row (the last key's dK, which few queries see) is as visible as one spread
   over the whole tensor (up to the absolute term of the tolerance, below). A row that is
   exactly zero in r (a query that sees only itself has dQ = 0) is judged against the
   tensor's largest entry.

4. No systematic bias. The least-squares scale of a onto r, s = <a, r> / <r, r>, must be
   1: rounding to nearest is unbiased, so a correct result's |s - 1| shrinks like
   u / sqrt(n) over n rows, while a kernel off by a constant factor (a wrong
   normalization, a wrong exp base), or by a smooth function of its input (the wrong GELU
   flavour), moves every entry the same way and shows here long before any single entry
   stands out of its rounding.

Tolerances. Rounding is part of a low-precision result. Each row may be off by

    tolerance_i = max(BUDGET[dtype], 2 * err_i(eager)) + ABSOLUTE[dtype] / (S_i / S)

where S_i is the row's scale and S the tensor's. BUDGET is a fixed rounding budget: 8 units
of roundoff in bf16 and fp16 (a result rounded a few times in 16 bits, e.g. a weight
gradient whose dY was rounded before its GEMM), 4e-5 in fp32 (the fast exp/erf
approximations GPU kernels use). Where eager PyTorch (the spec's `eager`: the op as a user
writes it, e.g. nanoGPT, computing in the inputs' dtype) is worse on the same inputs, a
kernel may be twice as far off as eager on that row (FlashAttention's rule). ABSOLUTE, about
one unit of roundoff of the tensor's largest entry, is the noise a row made by cancellation
carries whoever computes it (FlashAttention's dQ = dS K with dS rounded for the GEMM): it
makes the rule lenient only for rows far smaller than the tensor, so that a 10 % error is
caught in every row at least `resolved_row` of the largest. The bias may be

    |s - 1| <= max(BIAS_SLACK[dtype] / sqrt(n_eff), BIAS_FLOOR[dtype])

three units of roundoff over the square root of the number of rows (the entries of a 1-D
tensor) that weigh in it. The dtype judged is the coarser of the result's and the
precision the op computes in (`OpSpec.working_dtype`: an fp32 loss of a bf16 matmul carries
bf16 rounding). The `torch` backend *is* eager PyTorch in most calls, so it is never given
eager's error as an allowance (that would judge it against itself): the fixed budget alone.

`run_case` puts this together for one op call: the reference in fp64, eager and the
backend in the case's dtype, outputs and the gradients of every differentiable input
under the same random upstream gradients. `mutate` returns a result with one defect (one
output or gradient zeroed, halved or negated; one small row 10 % off; the whole tensor
0.2 % off; see MUTATIONS), for the tests that prove this comparison can fail.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import kernels.ops

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
EAGER_FACTOR = 2.0  # a kernel may be this many times less accurate than eager PyTorch
# The fixed budget every backend may use, relative to each row's scale: a result rounded
# a few times in 16 bits (a weight gradient whose dY was rounded before its GEMM) is
# within 8 units of roundoff of its row; fp32: fast exp/erf approximations.
BUDGET = {torch.float64: 1e-12, torch.float32: 4e-5,
          torch.bfloat16: 8 * 2.0 ** -8, torch.float16: 8 * 2.0 ** -11}
# ...plus, in absolute terms, this fraction of the tensor's largest entry: about one unit
# of roundoff of it in 16 bits, the noise a row made by cancellation carries whoever
# computes it (FlashAttention's dQ = dS K, with dS rounded to 16 bits for the GEMM).
ABSOLUTE = {torch.float64: 1e-12, torch.float32: 1e-5,
            torch.bfloat16: 2.0 ** -8, torch.float16: 4 * 2.0 ** -11}
# The bias allowance: BIAS_SLACK / sqrt(n_eff), several standard deviations of the scale of
# n_eff rows each rounded to nearest (u / sqrt(12) an entry), never below BIAS_FLOOR (fp32:
# the fast approximations' own bias).
BIAS_SLACK = {dtype: 3 * u for dtype, u in UNIT_ROUNDOFF.items()}
BIAS_FLOOR = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 0.0,
              torch.float16: 0.0}


@dataclass(frozen=True)
class Errors:
    """How far a result is from the reference: per row (see the module docstring) and in
    bias (s - 1, and the number of rows that effectively weigh in it)."""
    rows: torch.Tensor        # fp64 (R,): each row's error against its own scale
    scales: torch.Tensor      # fp64 (R,): each row's scale over the tensor's (<= 1)
    bias: float               # s - 1 (0 where the reference is zero)
    n_eff: float              # how many rows (entries of a 1-D tensor) weigh in the bias

    @property
    def worst(self) -> float:
        return self.rows.max().item() if self.rows.numel() else 0.0


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 and t.shape[-1] > 0 else t.reshape(1, -1)


def errors(actual: torch.Tensor, expected: torch.Tensor) -> Errors:
    """The row errors and the bias of `actual` against the high-precision `expected`."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(actual.shape)} differs from the expected "
                         f"{tuple(expected.shape)}")
    if expected.numel() == 0:
        none = torch.zeros(0, dtype=torch.float64)
        return Errors(none, none, 0.0, 0.0)
    a = _as_rows(actual.detach().to(torch.float64))
    e = _as_rows(expected.detach().to(torch.float64))
    finite = torch.isfinite(e)
    same_non_finite = torch.where(finite, torch.isfinite(a),
                                  (a == e) | (torch.isnan(a) & torch.isnan(e)))
    if not bool(same_non_finite.all()):
        inf = torch.full((a.shape[0],), math.inf, dtype=torch.float64)
        return Errors(inf, torch.ones_like(inf), math.inf, 0.0)
    a, e = a.where(finite, 0.0), e.where(finite, 0.0)
    row_diff = (a - e).abs().amax(dim=1)
    row_scale = e.abs().amax(dim=1)
    overall = row_scale.max()
    if overall > 0:  # a row that is zero in r is judged against the largest entry
        relative_scale = row_scale / overall
        denominator = torch.where(row_scale > 0, row_scale, overall)
    else:  # r is zero: absolute errors
        relative_scale, denominator = torch.ones_like(row_scale), torch.ones_like(row_scale)
    row_energy = (e * e).sum(dim=1)
    energy = row_energy.sum()
    if energy > 0:
        bias = ((a * e).sum() / energy - 1.0).item()
        # The rounding errors within a row of a matmul's result share their inputs'
        # roundings, so rows (entries of a 1-D tensor) are what average out.
        weights = row_energy if e.shape[0] > 1 else (e * e).flatten()
        n_eff = (energy * energy / (weights * weights).sum()).item()
    else:
        bias, n_eff = 0.0, 0.0
    return Errors(row_diff / denominator, relative_scale.where(row_scale > 0, 1.0), bias, n_eff)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The worst row's error (see the module docstring)."""
    return errors(actual, expected).worst


def coarser(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of least precision: a result stored in fp32 but computed from bf16
    values (a loss from bf16 logits, an fp32 weight's gradient under autocast) carries
    the bf16 rounding."""
    return max(dtypes, key=lambda dtype: UNIT_ROUNDOFF[dtype])


def bias_tolerance(dtype: torch.dtype, n_eff: float) -> float:
    noise = BIAS_SLACK[dtype] / math.sqrt(n_eff) if n_eff > 0 else math.inf
    return max(noise, BIAS_FLOOR[dtype])


@dataclass(frozen=True)
class Comparison:
    """One output or gradient of one call, judged: its worst row (the one furthest over, or
    closest to, its tolerance), its bias, and its dtype."""
    name: str
    error: float               # the worst row's error
    eager_error: float | None  # eager's error on that row (None: the fixed budget)
    tolerance: float           # that row's tolerance
    bias: float = 0.0
    bias_tolerance: float = math.inf
    dtype_problem: str | None = None
    row: int = 0

    @property
    def passed(self) -> bool:
        return (self.dtype_problem is None and self.error <= self.tolerance  # False for NaN
                and abs(self.bias) <= self.bias_tolerance)

    def __str__(self) -> str:
        if self.dtype_problem is not None:
            return f"{self.name}: {self.dtype_problem} FAILED"
        eager = "fixed budget" if self.eager_error is None else f"eager {self.eager_error:.2e}"
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: row {self.row} error {self.error:.2e} ({eager}, tolerance "
                f"{self.tolerance:.2e}), bias {self.bias:+.2e} (tolerance "
                f"{self.bias_tolerance:.2e}) {verdict}")


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor,
            eager: torch.Tensor | None = None, dtype: torch.dtype | None = None,
            precision: torch.dtype | None = None) -> Comparison:
    """Judge `actual` against the high-precision `expected`, allowing what `eager` (the
    same quantity from plain PyTorch in the same dtype) gets wrong, or, without eager, the
    fixed budget. `dtype`: the dtype actual must have (None: any); `precision`: the dtype
    the call computed in, when coarser than actual's (bf16 logits, an fp32 loss)."""
    if dtype is not None and actual.dtype != dtype:
        return Comparison(name, math.inf, None, 0.0,
                          dtype_problem=f"dtype {actual.dtype}, promised {dtype}")
    if actual.dtype not in UNIT_ROUNDOFF:
        raise TypeError(f"{name}: cannot judge a {actual.dtype} result")
    working = coarser(actual.dtype, precision or actual.dtype)
    found = errors(actual, expected)
    budget = torch.full_like(found.rows, BUDGET[working])
    if eager is None:
        eager_rows, allowance = None, budget
    else:
        eager_rows = errors(eager, expected).rows
        # A non-finite eager error (eager overflowed) allows nothing beyond the budget.
        allowance = torch.maximum(
            budget, torch.where(torch.isfinite(eager_rows), EAGER_FACTOR * eager_rows, 0.0))
    tolerances = allowance + ABSOLUTE[working] / found.scales
    bias_tol = bias_tolerance(working, found.n_eff)
    if found.rows.numel() == 0:
        return Comparison(name, 0.0, None if eager is None else 0.0, BUDGET[working], 0.0,
                          bias_tol)
    margin = found.rows - tolerances
    row = int(torch.nan_to_num(margin, nan=math.inf).argmax())
    return Comparison(name, found.rows[row].item(),
                      None if eager_rows is None else eager_rows[row].item(),
                      tolerances[row].item(), found.bias, bias_tol, row=row)


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


def judge(actual: Results, expected: Results, eager: Results | None,
          promised: Sequence[torch.dtype] | None = None,
          precision: torch.dtype | None = None) -> list[Comparison]:
    """Every output and gradient of `actual` against `expected`, with `eager`'s error as
    the allowance (None: the fixed budget; see the module docstring), `promised` the
    dtypes the outputs, then the gradients, must have (None: not checked) and `precision`
    the dtype the call computed in (None: the coarsest dtype among its results, so that an
    fp32 loss of bf16 logits is judged as the bf16 computation it is)."""
    if len(actual.outputs) != len(expected.outputs):
        return [Comparison(f"{len(actual.outputs)} outputs, expected {len(expected.outputs)}",
                           math.inf, None, 0.0)]
    if precision is None:
        precision = coarser(*(t.dtype for t in (*actual.outputs, *actual.grads)
                              if t is not None and t.dtype in UNIT_ROUNDOFF))
    promised = list(promised) if promised is not None else \
        [None] * (len(actual.outputs) + len(actual.grads))
    pairs = [(f"output {i}", a, e, None if eager is None else eager.outputs[i])
             for i, (a, e) in enumerate(zip(actual.outputs, expected.outputs))]
    pairs += [(f"grad {i}", a, e, None if eager is None else eager.grads[i])
              for i, (a, e) in enumerate(zip(actual.grads, expected.grads))]
    verdicts = []
    for (name, a, e, g), dtype in zip(pairs, promised):
        if e is None:
            continue  # the reference gives this input no gradient either
        if a is None:
            verdicts.append(Comparison(f"{name}: no gradient", math.inf, None, 0.0))
            continue
        verdicts.append(compare(name, a, e, g, dtype, precision))
    return verdicts


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


@dataclass(frozen=True)
class Evaluation:
    """One case of one op on one backend: what it returned, the fp64 reference, eager
    PyTorch's results (None for the `torch` backend, judged by the fixed budget), and the
    dtypes its outputs and gradients must have."""
    actual: Results
    expected: Results
    eager: Results | None
    promised: list[torch.dtype]
    precision: torch.dtype  # what the op computes in

    def verdicts(self, actual: Results | None = None) -> list[Comparison]:
        """The judgement of `actual` (default: what the backend returned)."""
        return judge(self.actual if actual is None else actual, self.expected, self.eager,
                     self.promised, self.precision)

    def verdict(self, actual: Results, target: str, index: int) -> Comparison:
        """The judgement of one output (target="output") or gradient ("grad") of `actual`."""
        part = target + "s"
        offset = 0 if target == "output" else len(self.actual.outputs)
        eager = None if self.eager is None else getattr(self.eager, part)[index]
        return compare(f"{target} {index}", getattr(actual, part)[index],
                       getattr(self.expected, part)[index], eager, self.promised[offset + index],
                       self.precision)


def promises(spec, inputs, device, dtype: torch.dtype) -> tuple[list[torch.dtype], torch.dtype]:
    """What the op promises for this call: the dtypes of its outputs (its spec's
    `result_dtypes`), then of the gradients (each its input's dtype); and the precision
    it computes in (`OpSpec.working_dtype`)."""
    with autocast_for(inputs, device, dtype):
        call = spec.canonicalize(*inputs.args)
    return ([*spec.result_dtypes(call), *(t.dtype for t in inputs.differentiable())],
            spec.working_dtype(call))


def evaluate_case(spec, case, backend: str, dtype: torch.dtype, device,
                  seed: int = 0) -> Evaluation:
    """The op on `backend` on `case` of op `spec`, built in `dtype` on `device`, with the
    fp64 reference and eager PyTorch, all under the same upstream gradients."""
    generator = torch.Generator().manual_seed(seed)
    inputs = case.build(dtype, torch.device(device), generator)
    expected, upstream = reference_results(spec, inputs, generator)
    op = getattr(kernels.ops, spec.name)
    with autocast_for(inputs, device, dtype):
        eager = None if backend == "torch" else \
            run(spec.eager, inputs.args, inputs.grad_args, upstream)
        actual = run(lambda *args: op(*args, backend=backend), inputs.args, inputs.grad_args,
                     upstream)
    return Evaluation(actual, expected, eager, *promises(spec, inputs, device, dtype))


def run_case(spec, case, backend: str, dtype: torch.dtype, device,
             seed: int = 0) -> list[Comparison]:
    """Judge the op on `backend` on one case (see `evaluate_case`): one Comparison per
    output and gradient, all of which must pass."""
    return evaluate_case(spec, case, backend, dtype, device, seed).verdicts()


def resolved_row(precision: torch.dtype) -> float:
    """The smallest row scale, as a fraction of the tensor's largest entry, at which a 10 %
    error of that row alone is always caught: where the absolute term of the tolerance is
    at most a quarter of it (bf16 0.16, fp16 0.08, fp32 4e-4)."""
    return min(1.0, 40 * ABSOLUTE[precision])


def _small_row(actual: torch.Tensor, expected: torch.Tensor,
               precision: torch.dtype) -> torch.Tensor:
    """actual with its smallest resolved row (see `resolved_row`) 10 % too large."""
    rows = _as_rows(expected.detach().to(torch.float64))
    scale = rows.abs().amax(dim=1).where(rows.isfinite().all(dim=1), 0.0)
    floor = resolved_row(coarser(actual.dtype, precision)) * scale.max()
    scale = scale.where(scale >= floor, math.inf)
    mutated = _as_rows(actual.detach().clone())
    row = int(scale.argmin())
    mutated[row] = (mutated[row].to(torch.float64) * 1.1).to(actual.dtype)
    return mutated.view(actual.shape)


# What a wrong kernel could return, given its result, the reference and the precision the
# op computes in: zeroed, halved or negated; one row 10 % off, the smallest whose 10 % the
# rule resolves; the whole tensor 0.2 % off before its final rounding (an otherwise exact
# kernel with a wrong constant).
MUTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]] = {
    "zero": lambda a, r, p: torch.zeros_like(a),
    "half": lambda a, r, p: a * 0.5,
    "negate": lambda a, r, p: -a,
    "small_row": _small_row,
    "scale": lambda a, r, p: (r.detach().to(torch.float64) * 1.002).to(a.dtype),
}


def mutate(evaluation: Evaluation, target: str, index: int, how: str) -> Results:
    """What the backend returned in `evaluation`, with output `index` (target="output") or
    gradient `index` ("grad") changed as MUTATIONS[how] says."""
    if how not in MUTATIONS:
        raise ValueError(f"how must be one of {tuple(MUTATIONS)}, got {how!r}")
    outputs, grads = list(evaluation.actual.outputs), list(evaluation.actual.grads)
    chosen, reference = (outputs, evaluation.expected.outputs) if target == "output" else \
        (grads, evaluation.expected.grads)
    chosen[index] = MUTATIONS[how](chosen[index], reference[index], evaluation.precision)
    return Results(outputs, grads)
