"""Differentiating twice through an op (a gradient penalty, a Hessian-vector product):
every backend either gives the reference's second derivative or raises. A hand-written
backward run under `create_graph=True` hands autograd a graph of its own internals, and
a second derivative taken through it is silently wrong (the fused lm_head + loss gave
49 % off before its backward was marked once-differentiable)."""
import pytest
import torch

import kernels
from kernels import reference

BACKENDS_HERE = [b for b in ("torch", "triton", "cuda") if kernels.available_backends()[b].available]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(op: str, dtype: torch.dtype):
    """(differentiable inputs, the op's other arguments) of a small call."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    targets = torch.randint(0, 24, (6,), generator=g).to(DEVICE)
    targets[2] = -100  # an ignored row
    return {
        "layer_norm": ((rand(6, 16), rand(16), rand(16)), ()),
        "add_layer_norm": ((rand(6, 16), rand(6, 16), rand(16), rand(16)), ()),
        "mlp_gelu": ((rand(6, 16), rand(32, 16), rand(32), rand(16, 32), rand(16)), ()),
        "causal_attention": ((rand(1, 2, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)), ()),
        "cross_entropy": ((rand(6, 24),), (targets,)),
        "linear_cross_entropy": ((rand(6, 16), rand(24, 16)), (targets,)),
    }[op]


def _call(function, op, tensors, others):
    if op == "cross_entropy":
        return function(tensors[0], *others)
    if op == "linear_cross_entropy":
        return function(tensors[0], tensors[1], *others)
    out = function(*tensors)
    return out[1] if op == "add_layer_norm" else out


def _second_derivative(function, op, tensors, others):
    """d/dinputs of |d(sum out^2)/dinputs|^2: a gradient penalty's gradient."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = _call(function, op, leaves, others)
    grads = torch.autograd.grad(out.float().square().sum(), leaves, create_graph=True)
    penalty = sum(gr.float().square().sum() for gr in grads)
    return torch.autograd.grad(penalty, leaves)


CASES = [(op, dtype) for op in kernels.OPS for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("op,dtype", CASES, ids=[f"{op}-{str(d)[6:]}" for op, d in CASES])
def test_a_second_derivative_is_right_or_refused(backend, op, dtype):
    tensors, others = _inputs(op, dtype)
    function = getattr(kernels, op)
    ours = lambda *args: function(*args, backend=backend)  # noqa: E731
    try:
        got = _second_derivative(ours, op, tensors, others)
    except kernels.BackendUnavailableError:  # a RuntimeError too: caught first
        pytest.skip(f"{backend} does not run this {op} call")
    except RuntimeError as error:  # refused: by our kernels, or by PyTorch's own op
        assert "second derivative" in str(error) or "not implemented" in str(error), error
        return
    expected = _second_derivative(getattr(reference, op), op,
                                  [t.double() for t in tensors], others)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name, a, e in zip("abcde", got, expected):
        error = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        assert error < tolerance, f"input {name}: relative error {error:.2e}"
