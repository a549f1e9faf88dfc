"""The conformance suite: every op x backend x dtype x case of `kernels.specs`, judged by
`kernels.testing` (fp64 reference, error against each tensor's own scale, allowance from
eager PyTorch in the same dtype), plus the proof that this judgement can fail.

On a machine without a GPU the `triton` backend runs under the Triton interpreter (set up
in conftest.py) and `cuda` is skipped; on a GPU every available backend runs on CUDA
tensors, and the `gpu`-marked sweep adds GPT-2-sized calls. The cases are the hard
classes as well as the easy ones: strided, offset and transposed views of every tensor
argument, 0 and 1 rows, odd sizes, the dtype mixes autocast makes, -inf runs longer than
any tile, large logits, ignore_index, out-of-range targets, fp16 at a GradScaler's scale.
"""
import pytest
import torch

import kernels
from kernels.specs import SPECS
from kernels.specs.inputs import Case, Inputs
from kernels.specs import inputs as make
from kernels.testing import MUTATIONS, autocast_for, evaluate_case, judge, mutate, run_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [b for b in kernels.BACKENDS if kernels.available_backends()[b].available]


def _refusal(op, case, backend, dtype):
    """Why `backend` refuses this case's call (None: it runs it)."""
    inputs = case.build(dtype, DEVICE, torch.Generator().manual_seed(0))
    with autocast_for(inputs, DEVICE, dtype):
        call = SPECS[op].canonicalize(*inputs.args)
    return kernels.backends.why_unsupported(backend, call)


def value_cases(ops=tuple(SPECS)):
    """(op, case name, dtype name) of every value case of `ops` (those that must run)."""
    for op in ops:
        for case in SPECS[op].cases:
            if case.raises is not None:
                continue
            for dtype_name, dtype in DTYPES.items():
                if case.applies_to(dtype):
                    yield pytest.param(op, case.name, dtype_name, id=f"{op}-{case.name}-{dtype_name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case_name, dtype_name", list(value_cases()))
def test_conformance(op, case_name, dtype_name, backend):
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    case = spec.case(case_name)
    reason = _refusal(op, case, backend, dtype)
    if reason is not None:  # then the refusal is the behaviour under test
        inputs = case.build(dtype, DEVICE, torch.Generator())
        with pytest.raises(kernels.BackendUnavailableError, match=f"backend {backend!r}"), \
                autocast_for(inputs, DEVICE, dtype):
            getattr(kernels.ops, op)(*inputs.args, backend=backend)
        pytest.skip(f"{backend} refuses this call, with a clear error: {reason}")
    check_case(op, case_name, dtype_name, backend)


def check_case(op, case_name, dtype_name, backend):
    """Every output and gradient of the case on `backend` passes; a call the backend
    refuses is skipped (test_conformance checks how it refuses)."""
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    case = spec.case(case_name)
    reason = _refusal(op, case, backend, dtype)
    if reason is not None:
        pytest.skip(f"{backend} refuses this call: {reason}")
    failed = [str(v) for v in run_case(spec, case, backend, dtype, DEVICE) if not v.passed]
    assert not failed, "; ".join(failed)


def _error_cases():
    for op, spec in SPECS.items():
        for case in spec.cases:
            if case.raises is not None:
                yield pytest.param(op, case.name, id=f"{op}-{case.name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case_name", list(_error_cases()))
def test_bad_calls_are_refused_on_every_backend(op, case_name, backend):
    """E.g. a target out of [0, V): F.cross_entropy raises, and so must every backend
    (on a GPU the check is a device-side assertion: see test_out_of_range_targets_on_gpu)."""
    case = SPECS[op].case(case_name)
    inputs = case.build(torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    with pytest.raises(case.raises, match=case.match):
        getattr(kernels.ops, op)(*inputs.args, backend=backend)


# ----------------------------------------------------------------------------- mutations

def _basic_cases():
    for op in SPECS:
        for dtype_name in DTYPES:
            yield pytest.param(op, dtype_name, id=f"{op}-{dtype_name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, dtype_name", list(_basic_cases()))
def test_wrong_results_are_rejected(op, dtype_name, backend):
    """A check never seen failing is not a check: each output and each gradient of the
    basic case, zeroed, halved or negated, must be rejected — in every dtype, however
    small the tensor's magnitudes (a mean-reduced loss's gradient is ~1/N)."""
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    reason = _refusal(op, spec.case("basic"), backend, dtype)
    if reason is not None:  # test_conformance checks the refusal itself
        pytest.skip(f"{backend} refuses this call: {reason}")
    actual, expected, eager = evaluate_case(spec, spec.case("basic"), backend, dtype, DEVICE)
    assert all(v.passed for v in judge(actual, expected, eager))
    for target, count in (("output", len(actual.outputs)), ("grad", len(actual.grads))):
        for index in range(count):
            for how in MUTATIONS:
                verdicts = judge(mutate(actual, target, index, how), expected, eager)
                name = f"{target} {index}"
                assert not next(v for v in verdicts if v.name == name).passed, \
                    f"{how} {name} of {op} ({backend}, {dtype_name}) was accepted"


# ----------------------------------------------------------------------------- dispatch

def test_every_case_builds_legal_inputs_for_every_dtype():
    """The cases are the suite's ground: each must pass the op's own checks (or, for the
    cases that describe bad calls, fail them) in every dtype it applies to."""
    for op, spec in SPECS.items():
        for case in spec.cases:
            for dtype in DTYPES.values():
                if not case.applies_to(dtype):
                    continue
                inputs = case.build(dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
                assert isinstance(inputs, Inputs)
                if case.raises is None and not inputs.autocast:
                    spec.canonicalize(*inputs.args)


def test_every_layout_is_what_it_claims():
    gen = torch.Generator().manual_seed(0)
    values = make.draw((4, 6), gen)
    for layout in make.LAYOUTS:
        t = make.place(values, torch.float32, "cpu", layout)
        assert torch.equal(t.detach(), values), layout
        assert t.is_contiguous() == (layout in ("contiguous", "offset")), layout
    assert make.place(values, torch.float32, "cpu", "offset").storage_offset() == 1
    assert make.place(values, torch.float32, "cpu", "strided").stride(-1) == 2
    with pytest.raises(ValueError, match="unknown layout"):
        make.place(values, torch.float32, "cpu", "diagonal")


# ----------------------------------------------------------------------------- GPU sweep

def _gpu_case(op):
    """A GPT-2-sized call of op (the bench's headline shape)."""
    from bench.kernels.problems import problem

    prob = problem(op)
    shape = next(s for s in prob.gpu_shapes if s.headline)

    def build(dtype, device, gen):
        return prob.make_inputs(shape.dims, dtype, device, torch.Generator(device).manual_seed(0))
    return Case(f"gpt2-{shape.label}", build)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("op", list(SPECS))
def test_gpt2_sized_calls_on_gpu(op, dtype_name, backend):
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    case = _gpu_case(op)
    if _refusal(op, case, backend, dtype) is not None:
        pytest.skip(f"{backend} does not run {op} in {dtype_name}")
    verdicts = run_case(spec, case, backend, dtype, DEVICE)
    failed = [str(v) for v in verdicts if not v.passed]
    assert not failed, "; ".join(failed)
