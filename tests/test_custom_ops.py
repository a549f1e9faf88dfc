"""The thin eager path of the backends' custom ops (kernels/custom_ops.py): eagerly an
autograd.Function around the op's own function, with the op's own autograd formula; under
torch.compile, for meta tensors and for tensor subclasses the custom op, as before."""
import pytest
import torch

import kernels
from kernels.custom_ops import custom_op, differentiable

calls = []


@custom_op("gptk_test::scale_shift", mutates_args=())
def _scale_shift(x: torch.Tensor, w: torch.Tensor, shift: float) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(x * w + shift, x * w): the second output saved for the backward."""
    calls.append("function")
    scaled = x * w
    return scaled + shift, scaled


@_scale_shift.register_fake
def _(x, w, shift):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, w, _shift = inputs
    ctx.save_for_backward(x, w)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dscaled):
    x, w = ctx.saved_tensors
    return dy * w, (dy * x).sum(0), None


scale_shift = differentiable(_scale_shift, _backward, _setup)


def _inputs():
    return torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)


def test_eagerly_the_function_runs_without_the_dispatcher_with_the_same_gradients():
    x, w = _inputs()
    y, _ = scale_shift(x, w, 1.5)
    assert type(y.grad_fn).__name__ == "_scale_shift_eagerBackward"
    (dx, dw) = torch.autograd.grad(y.sum(), (x, w))
    (rx, rw) = torch.autograd.grad((x * w + 1.5).sum(), (x, w))
    torch.testing.assert_close((dx, dw), (rx, rw))
    # the op itself, through the dispatcher, agrees
    op_y, _ = _scale_shift(x, w, 1.5)
    assert type(op_y.grad_fn).__name__ != type(y.grad_fn).__name__
    torch.testing.assert_close(torch.autograd.grad(op_y.sum(), (x, w)), (rx, rw))


def test_meta_tensors_and_subclasses_take_the_op():
    x, w = (t.detach().to("meta").requires_grad_() for t in _inputs())
    calls.clear()
    y, scaled = scale_shift(x, w, 0.0)
    assert y.is_meta and y.shape == (3, 4) and calls == []  # the fake, not the function

    class Tagged(torch.Tensor):
        pass
    x, w = _inputs()
    y, _ = scale_shift(x.detach().as_subclass(Tagged).requires_grad_(), w, 0.0)
    assert type(y.grad_fn).__name__ != "_scale_shift_eagerBackward"


def test_torch_compile_traces_the_op_in_one_graph():
    x, w = _inputs()
    compiled = torch.compile(lambda x, w: scale_shift(x, w, 2.0)[0].square().sum(),
                             backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad((x * w + 2.0).square().sum(), (x, w))
    torch.testing.assert_close(got, want)


def test_torch_func_transforms_are_refused_as_the_op_refuses_them():
    x, w = (t.detach() for t in _inputs())
    messages = []
    for function in (scale_shift, _scale_shift):
        with pytest.raises(RuntimeError, match="setup_context") as caught:
            torch.func.grad(lambda x: function(x, w, 0.5)[0].sum())(x)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


def test_opcheck_still_checks_the_op_and_its_autograd():
    x, w = _inputs()
    torch.library.opcheck(_scale_shift, (x, w, 0.25))


@pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                    reason="the triton backend is not available here")
def test_the_triton_backend_takes_the_thin_path():
    w = torch.ones(16, requires_grad=True)
    y = kernels.layer_norm(torch.randn(3, 16, requires_grad=True), w, None, backend="triton")
    assert type(y.grad_fn).__name__ == "layer_norm_fwd_eagerBackward"  # 2-D: the op's output
    y = kernels.layer_norm(torch.randn(2, 3, 16, requires_grad=True), w, None, backend="triton")
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "layer_norm_fwd_eagerBackward"
