"""The conformance suite: every op x backend x dtype x case of `kernels.specs`, judged by
`kernels.testing` (fp64 reference; each row against its own scale, no systematic bias, the
promised dtype; allowance from eager PyTorch in the same dtype, or the fixed budget for
the `torch` backend, which is eager PyTorch), plus the proof that this judgement can fail,
subtle defects included.

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
from kernels import reference
from kernels.testing import (MUTATIONS, UNIT_ROUNDOFF, Results, as_tensors, autocast_for,
                             evaluate_case, gradients, high_precision_copy, mutate,
                             random_upstream, run_case)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [b for b in kernels.BACKENDS if kernels.available_backends()[b].available]


def _call(op, case, dtype):
    inputs = case.build(dtype, DEVICE, torch.Generator().manual_seed(0))
    with autocast_for(inputs, DEVICE, dtype):
        return SPECS[op].canonicalize(*inputs.args)


def _refusal(op, case, backend, dtype):
    """Why `backend` refuses this case's call (None: it runs it)."""
    return kernels.backends.why_unsupported(backend, _call(op, case, dtype))


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

MUTATION_CASES = ("basic", "many_rows")


def _mutation_cases():
    for op in SPECS:
        for case_name in MUTATION_CASES:
            for dtype_name in DTYPES:
                yield pytest.param(op, case_name, dtype_name, id=f"{op}-{case_name}-{dtype_name}")


def _evaluate(op, case_name, dtype_name, backend):
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    reason = _refusal(op, spec.case(case_name), backend, dtype)
    if reason is not None:  # test_conformance checks the refusal itself
        pytest.skip(f"{backend} refuses this call: {reason}")
    evaluation = evaluate_case(spec, spec.case(case_name), backend, dtype, DEVICE)
    assert all(v.passed for v in evaluation.verdicts())
    return evaluation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case_name, dtype_name", list(_mutation_cases()))
def test_wrong_results_are_rejected(op, case_name, dtype_name, backend):
    """A check never seen failing is not a check: each output and each gradient, zeroed,
    halved or negated, one resolved row 10 % off (`kernels.testing.resolved_row`), the
    whole tensor 0.2 % off where its rows resolve that (a bias tolerance under 0.1 %), or
    in another dtype than promised, must be rejected, in every dtype, whatever the
    tensor's magnitudes (a mean-reduced loss's gradient is ~1/N)."""
    evaluation = _evaluate(op, case_name, dtype_name, backend)
    for target, tensors, expected in (("output", evaluation.actual.outputs,
                                       evaluation.expected.outputs),
                                      ("grad", evaluation.actual.grads,
                                       evaluation.expected.grads)):
        for index, (tensor, reference_tensor) in enumerate(zip(tensors, expected)):
            if reference_tensor is None or not bool((reference_tensor != 0).any()):
                continue  # nothing to get wrong: an empty or all-zero result
            name = f"{target} {index}"
            for how in MUTATIONS:
                verdict = evaluation.verdict(mutate(evaluation, target, index, how), target,
                                             index)
                if how == "scale" and verdict.bias_tolerance > 1e-3 and \
                        verdict.tolerance > 2e-3:
                    continue  # too few rows to resolve a 0.2 % bias, too coarse a dtype
                assert not verdict.passed, \
                    f"{how} {name} of {op}/{case_name} ({backend}, {dtype_name}) was accepted"
            other = torch.float64 if tensor.dtype != torch.float64 else torch.float32
            results = Results(*[[t.to(other) if t is tensor else t for t in part]
                                for part in (evaluation.actual.outputs,
                                             evaluation.actual.grads)])
            assert not evaluation.verdict(results, target, index).passed, f"{name} in {other}"


def _wrong_math(op, case_name, dtype_name, wrong_reference):
    """What a kernel computing `wrong_reference` instead of the op's reference would return
    for the case: its outputs and gradients in fp64, under the case's upstream gradients,
    rounded to the dtypes the real results have."""
    spec, dtype = SPECS[op], DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(0)  # as evaluate_case draws them
    inputs = spec.case(case_name).build(dtype, DEVICE, generator)
    args = high_precision_copy(inputs.args, inputs.grad_args)
    right = as_tensors(spec.reference(*args))
    upstream = random_upstream(right, generator, inputs.loss_scale)
    wrong = as_tensors(wrong_reference(*args))
    grads = gradients(wrong, [args[i] for i in inputs.grad_args], upstream)
    return Results([o.detach() for o in wrong], grads)


def _other_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate):
    return reference.mlp_gelu(x, w_fc, b_fc, w_proj, b_proj,
                              "none" if approximate == "tanh" else "tanh")


def _mask_off_by_one(q, k, v, scale, dropout_p, dropout_seed=None):
    """Causal attention whose mask lets each query see one key of its future."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q + 1)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


WRONG_MATH = [
    # The other GELU flavour: ~1e-4 of an ordinary MLP's outputs, below bf16's rounding;
    # the gelu_tails cases make it visible in 16 bits, basic in fp32.
    *(("mlp_gelu", case, dtype, _other_gelu) for case in ("gelu_tails", "gelu_tails_exact")
      for dtype in ("bf16", "fp16")),
    ("mlp_gelu", "basic", "fp32", _other_gelu),
    *(("causal_attention", case, dtype, _mask_off_by_one) for case in ("basic", "many_rows")
      for dtype in DTYPES),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, case_name, dtype_name, wrong", WRONG_MATH,
                         ids=[f"{op}-{c}-{d}-{w.__name__.strip('_')}" for op, c, d, w in WRONG_MATH])
def test_wrong_math_is_rejected(op, case_name, dtype_name, wrong, backend):
    """Defects that move every value a little the same way: the wrong GELU flavour, a
    causal mask off by one. Rounded to the case's dtype, they must fail the call."""
    evaluation = _evaluate(op, case_name, dtype_name, backend)
    rounded = _wrong_math(op, case_name, dtype_name, wrong)
    rounded = Results([w.to(a.dtype) for w, a in zip(rounded.outputs, evaluation.actual.outputs)],
                      [None if w is None else w.to(a.dtype)
                       for w, a in zip(rounded.grads, evaluation.actual.grads)])
    assert not all(v.passed for v in evaluation.verdicts(rounded))


def _old_rule_accepts(actual, expected, eager):
    """The rule this suite used before: max |a - r| / max |r| over the whole tensor, within
    3x eager's or two units of roundoff (fp32: 2e-5), the dtype unchecked."""
    def error(a, r):
        return ((a.double() - r.double()).abs().max() / r.double().abs().max()).item()
    floor = 2e-5 if actual.dtype in (torch.float32, torch.float64) else \
        2 * UNIT_ROUNDOFF[actual.dtype]
    return error(actual, expected) <= max(3 * error(eager, expected), floor)


@pytest.mark.parametrize("op", list(SPECS))
def test_the_old_rule_misses_subtle_defects(op):
    """Why the rule changed: on bf16 calls, a 10 % error in one row or a 0.2 % bias slipped
    through the old whole-tensor comparison, which the new one rejects (above). Were the
    old rule restored, test_wrong_results_are_rejected would fail."""
    evaluation = evaluate_case(SPECS[op], SPECS[op].case("many_rows"), "triton"
                               if "triton" in BACKENDS else "torch", torch.bfloat16, DEVICE)
    if evaluation.eager is None:
        pytest.skip("needs eager's results (a backend other than torch)")
    missed = []
    for target in ("output", "grad"):
        parts = (evaluation.actual, evaluation.expected, evaluation.eager)
        tensors = zip(*(getattr(p, target + "s") for p in parts))
        for index, (actual, expected, eager) in enumerate(tensors):
            if expected is None:
                continue
            for how in ("small_row", "scale"):
                mutated = mutate(evaluation, target, index, how)
                wrong = getattr(mutated, target + "s")[index]
                if _old_rule_accepts(wrong, expected, eager):
                    missed.append(f"{how} {target} {index}")
    assert missed, f"the old rule caught every subtle defect of {op}"


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
