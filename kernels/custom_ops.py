"""Custom ops with a thin eager path, for the Triton and CUDA backends.

Every Triton and CUDA kernel is a `torch.library` custom op with a fake implementation and
an autograd formula: torch.compile(fullgraph=True) then traces a model as one graph, and
`torch.library.opcheck` checks each op. Called eagerly, though, such an op goes through
the dispatcher and torch.library's generated autograd wrapper, which cost ~10 us of host
time forward and ~50 us forward + backward on the 2-core CPU (torch 2.14), around a
kernel whose launch costs a few: an uncompiled GPT-2 step makes about a hundred such calls.

So the backends declare their ops with `custom_op` (torch.library.custom_op, keeping the
undecorated function) and call the differentiable ones through `differentiable`, which
registers the autograd formula on the op and returns the function the public path calls:

- under torch.compile, and for tensors without real storage here (meta tensors, fake or
  other tensor subclasses), the custom op itself, exactly as before;
- otherwise an `autograd.Function` with the same two functions (setup_context and
  backward) around the undecorated function: the same kernels, saved tensors and
  gradients, without the dispatcher. Its backward calls the backward custom ops as before.
"""
from __future__ import annotations

from typing import Callable

import torch

from kernels.once import once_differentiable

# A custom op -> the function it was made from (what its eager path calls directly).
_FUNCTIONS: dict[object, Callable] = {}


def custom_op(name: str, *, mutates_args=(), device_types=None):
    """torch.library.custom_op as a decorator that also records the undecorated function."""
    def register(function: Callable):
        op = torch.library.custom_op(name, function, mutates_args=mutates_args,
                                     device_types=device_types)
        _FUNCTIONS[op] = function
        return op
    return register


def differentiable(op, backward: Callable, setup_context: Callable) -> Callable:
    """Register backward / setup_context (register_autograd's signatures) as `op`'s autograd
    formula, and return the function that runs `op` with it: the op under torch.compile
    or for tensors without real storage, else an autograd.Function around the op's
    undecorated function (see the module docstring)."""
    op.register_autograd(backward, setup_context=setup_context)
    function = _FUNCTIONS[op]

    # forward takes ctx (no separate setup_context): Function.apply then skips binding the
    # arguments to forward's signature with `inspect` on every call (~5 us). Like the op's
    # own autograd (torch 2.14), such a Function refuses torch.func transforms, naming why.
    def forward(ctx, *args):
        output = function(*args)
        setup_context(ctx, args, output)
        return output

    # The backward runs kernels, not differentiable ops: a second derivative raises,
    # naming the op, instead of reaching the backward's own custom ops.
    @once_differentiable(f"the fused kernel {function.__name__} (a triton or cuda op; the "
                         f"torch backend differentiates twice where PyTorch does)")
    def first_derivatives_only(ctx, *grads):
        return backward(ctx, *grads)

    eager = type(f"{function.__name__}_eager", (torch.autograd.Function,),
                 {"forward": staticmethod(forward),
                  "backward": staticmethod(first_derivatives_only)})

    def call(*args):
        first = args[0]
        if torch.compiler.is_compiling() or type(first) is not torch.Tensor or first.is_meta:
            return op(*args)
        if not torch.is_grad_enabled():
            return function(*args)  # no graph to record: not even the Function (~3 us)
        return eager.apply(*args)
    call.__name__ = function.__name__
    call.__doc__ = function.__doc__
    return call

