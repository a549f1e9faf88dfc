"""The kernel benchmarks under pytest-benchmark, for its statistics, history and comparisons:

    pytest bench/ --benchmark-only                       # this device's suite
    pytest bench/ --benchmark-only --benchmark-autosave  # then --benchmark-compare

Not part of the default test run (pyproject's testpaths is `tests`). Each case is checked
against `kernels.reference` first and fails, untimed, if it disagrees. Only backends that
really run here are timed (never the Triton interpreter). On a GPU every round is
synchronized, so pytest-benchmark's wall clock measures the kernels, not their launch.
"""
import pytest
import torch

from kernels import OPS
from kernels.backends import BACKENDS

from bench.kernels import correctness, suite as kernel_suite
from bench.kernels.problems import DTYPE_NAMES, problem, work

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.bfloat16, torch.float32) if DEVICE.type == "cuda" else (torch.float32,)


def _cases():
    for op in OPS:
        prob = problem(op)
        impls = [i for i in kernel_suite.backend_impls(op, list(BACKENDS), DEVICE) if i.timed]
        shapes = prob.gpu_shapes if DEVICE.type == "cuda" else prob.cpu_shapes
        for dtype in DTYPES:
            for shape in shapes:
                for impl in impls:
                    for fwd_only in (True, False):
                        label = f"{op}-{impl.name}-{DTYPE_NAMES[dtype]}-{shape.label}-" \
                                f"{'fwd' if fwd_only else 'fwd_bwd'}"
                        yield pytest.param(prob, shape, dtype, impl, fwd_only,
                                           id=label.replace(" ", ","))


@pytest.mark.parametrize("prob, shape, dtype, impl, fwd_only", list(_cases()))
def test_kernel(benchmark, prob, shape, dtype, impl, fwd_only):
    generator = torch.Generator(DEVICE).manual_seed(0)
    inputs = prob.make_inputs(shape.dims, dtype, DEVICE, generator)
    expected = correctness.expected_result(prob.spec, inputs, dtype, generator)
    fn = impl.make()
    check = correctness.check(fn, inputs, expected)
    if not check.passed:
        pytest.fail(f"{impl.name} disagrees with kernels.reference: {check.message}")

    def call():
        if fwd_only:
            with torch.no_grad():
                fn(*inputs.args)
        else:
            correctness.forward_backward(fn, inputs, expected.upstream)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    amount = work(prob, shape, dtype)
    passes = "fwd" if fwd_only else "fwd+bwd"
    benchmark.group = f"{prob.op} {DTYPE_NAMES[dtype]} {shape.label} {passes}"
    benchmark.extra_info.update(unit=prob.unit, work=amount.fwd if fwd_only else amount.fwd_bwd,
                                max_error=check.max_error)
    benchmark.pedantic(call, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=2,
                       iterations=1)
