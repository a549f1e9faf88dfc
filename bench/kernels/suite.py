"""Kernel benchmarks: every op x implementation x shape x dtype, checked then timed.

Implementations of an op are the registry's backends that run it here, plus baselines:
``torch.compile`` of the `torch` backend (at the headline shape and dtype only: each
compile takes seconds to minutes) and the problem's own extras (attention's eager math).
Under the Triton interpreter (a CPU without a GPU) the `triton` backend is checked for
correctness at a tiny shape and never timed: interpreted numpy is not a GPU kernel.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

import kernels.ops
from kernels.availability import BackendUnavailableError, triton_interpreter_enabled
from kernels.backends import BACKENDS, resolve_name, why_unsupported
from kernels.specs import Inputs
from kernels.testing import as_tensors

from bench.kernels import correctness
from bench.kernels.problems import DTYPE_NAMES, Problem, Shape, problem, rate, work
from bench.output.results import CHECK_ONLY, FAILED, OK
from bench.timing import Timing, gpu, peak_memory_mb, time_cpu
from bench.timing.peaks import Peak, percent_of_peak

COMPILE = "torch.compile"


@dataclass(frozen=True)
class Impl:
    name: str
    make: Callable[[], Callable]  # builds the callable (lazily: torch.compile resets state)
    timed: bool


@dataclass(frozen=True)
class Case:
    problem: Problem
    shape: Shape
    dtype: torch.dtype
    impls: tuple[Impl, ...]


def op_on(op: str, backend: str) -> Callable:
    """The public op pinned to one backend: what a user's call costs, checks included."""
    return functools.partial(getattr(kernels.ops, op), backend=backend)


def _compiled_torch_backend(op: str, device: torch.device) -> Callable:
    # A fresh dynamo state per case: the recompile limit (8 per function) would otherwise
    # silently fall back to eager after a few shapes and dtypes.
    torch._dynamo.reset()
    return torch.compile(op_on(op, "torch"), dynamic=False)


def backend_impls(op: str, backends: list[str], device: torch.device) -> list[Impl]:
    """The registry's backends that are available and implement `op` on `device`."""
    impls = []
    for name in backends:
        try:
            resolve_name(op, name, device)
        except BackendUnavailableError:
            continue
        fn = op_on(op, name)
        interpreted = name == "triton" and device.type != "cuda" and triton_interpreter_enabled()
        impls.append(Impl(name, lambda fn=fn: fn, timed=not interpreted))
    return impls


def plan(ops: list[str], backends: list[str], dtypes: list[torch.dtype], device: torch.device,
         use_compile: bool) -> list[Case]:
    """Every case to run. The first dtype is the headline one (torch.compile runs there)."""
    cases = []
    for op in ops:
        prob = problem(op)
        impls = backend_impls(op, backends, device)
        timed = [i for i in impls if i.timed]
        timed += [Impl(name, lambda fn=fn: fn, timed=True) for name, fn in prob.baselines.items()]
        interpreted = [i for i in impls if not i.timed]
        shapes = prob.gpu_shapes if device.type == "cuda" else prob.cpu_shapes
        for dtype in dtypes:
            for shape in shapes:
                extra = []
                if use_compile and shape.headline and dtype == dtypes[0]:
                    extra = [Impl(COMPILE, lambda op=op: _compiled_torch_backend(op, device),
                                  timed=True)]
                cases.append(Case(prob, shape, dtype, tuple(timed + extra)))
            if interpreted:
                cases.append(Case(prob, prob.interpreter_shape, dtype, tuple(interpreted)))
    return cases


def _row(case: Case, impl: Impl, status: str, check: correctness.CheckResult | None) -> dict:
    amount = work(case.problem, case.shape, case.dtype)
    return {
        "op": case.problem.op, "impl": impl.name, "dtype": DTYPE_NAMES[case.dtype],
        "shape": dict(case.shape.dims), "shape_label": case.shape.label,
        "bound": case.problem.bound, "unit": case.problem.unit,
        "work_fwd": amount.fwd, "work_fwd_bwd": amount.fwd_bwd,
        "status": status,
        "error": check.message if check else None,
        "max_error": check.max_error if check else None,
        "fwd": None, "fwd_bwd": None,
        "fwd_rate": None, "fwd_bwd_rate": None,
        "fwd_pct_peak": None, "fwd_bwd_pct_peak": None,
        "fwd_mem_mb": None, "fwd_bwd_mem_mb": None,
    }


def _peak_rate(case: Case, peak: Peak | None) -> float | None:
    """The device's peak in the row's unit (GB/s or TFLOP/s)."""
    if peak is None:
        return None
    if case.problem.bound == "memory":
        return peak.bandwidth / 1e9
    flops = peak.flops_for(DTYPE_NAMES[case.dtype])
    return None if flops is None else flops / 1e12


class InputSets:
    """A case's inputs and, for timing on a GPU, more sets of the same shape drawn on
    demand (and kept for the next implementation)."""

    def __init__(self, case: Case, device: torch.device, generator: torch.Generator):
        self.case, self.device, self.generator = case, device, generator
        self.sets = [self._draw()]

    def _draw(self) -> Inputs:
        return self.case.problem.make_inputs(self.case.shape.dims, self.case.dtype, self.device,
                                             self.generator)

    @property
    def first(self) -> Inputs:
        return self.sets[0]

    def __call__(self, count: int) -> list[Inputs]:
        while len(self.sets) < count:
            self.sets.append(self._draw())
        return self.sets[:count]


def time_call(call: Callable[[Inputs], object], inputs: InputSets, device: torch.device,
              quick: bool) -> Timing:
    """call(inputs): GPU time over rotating input sets on a GPU (`bench.timing.gpu`), the
    host's clock on the CPU; `quick` trades precision for run time (the CPU suite)."""
    if device.type == "cuda":
        return gpu.time_rotating(call, inputs, gpu.tensor_bytes(inputs.first.args), device)
    first = inputs.first
    if quick:
        return time_cpu(lambda: call(first), warmup=1, budget_s=0.2, min_repeats=3,
                        max_repeats=10)
    return time_cpu(lambda: call(first))


def _time_into(row: dict, case: Case, fn: Callable, inputs: InputSets, expected,
               device: torch.device, peak: Peak | None, quick: bool) -> None:
    def forward(args: Inputs):
        with torch.no_grad():
            return fn(*args.args)

    # The upstream gradients in the outputs' dtypes once, not cast inside every timed call.
    outputs = as_tensors(forward(inputs.first))
    upstream = [u.to(o.dtype) for u, o in zip(expected.upstream, outputs)]

    def forward_backward(args: Inputs):
        return correctness.forward_backward(fn, args, upstream)

    peak_rate = _peak_rate(case, peak)
    for key, call, amount in (("fwd", forward, row["work_fwd"]),
                              ("fwd_bwd", forward_backward, row["work_fwd_bwd"])):
        measured = time_call(call, inputs, device, quick)
        row[key] = measured.to_json()
        row[f"{key}_rate"] = rate(case.problem, amount, measured.median_ms)
        row[f"{key}_pct_peak"] = percent_of_peak(row[f"{key}_rate"], peak_rate)
        row[f"{key}_mem_mb"] = peak_memory_mb(lambda: call(inputs.first), device)


def run_case(case: Case, device: torch.device, peak: Peak | None, quick: bool) -> list[dict]:
    """Check then time every implementation of one (op, shape, dtype)."""
    generator = torch.Generator(device).manual_seed(0)
    input_sets = InputSets(case, device, generator)
    inputs = input_sets.first
    expected = correctness.expected_result(case.problem.spec, inputs, case.dtype, generator)
    rows = []
    call = case.problem.spec.canonicalize(*inputs.args)
    for impl in case.impls:
        if impl.name in BACKENDS and why_unsupported(impl.name, call) is not None:
            continue  # e.g. the cuda kernels at fp16: `auto` runs such calls elsewhere
        try:
            fn = impl.make()
        except Exception as exc:  # e.g. torch.compile unusable here
            row = _row(case, impl, FAILED, correctness.CheckResult.failure(
                correctness.describe_error(exc)))
            rows.append(row)
            continue
        check = correctness.check(fn, inputs, expected)
        if not check.passed:
            rows.append(_row(case, impl, FAILED, check))
            continue
        if not impl.timed:
            rows.append(_row(case, impl, CHECK_ONLY, check))
            continue
        row = _row(case, impl, OK, check)
        try:
            _time_into(row, case, fn, input_sets, expected, device, peak, quick)
        except Exception as exc:  # e.g. out of memory at a large shape: report, carry on
            row = _row(case, impl, FAILED, correctness.CheckResult.failure(
                "while timing: " + correctness.describe_error(exc)))
        rows.append(row)
    return rows


def run(ops: list[str], backends: list[str], dtypes: list[torch.dtype], device: torch.device,
        peak: Peak | None, use_compile: bool, quick: bool) -> list[dict]:
    cases = plan(ops, backends, dtypes, device, use_compile)
    rows = []
    with tqdm(cases, desc="kernels", unit="case") as progress:
        for case in progress:
            progress.set_postfix_str(f"{case.problem.op} {case.shape.label} "
                                     f"{DTYPE_NAMES[case.dtype]}")
            rows += run_case(case, device, peak, quick)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next case's reference may need the memory
    return rows

