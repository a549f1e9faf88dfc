"""Hand-written backward passes that are not themselves differentiable must say so.

A backward written with raw ATen calls computes first derivatives only; run under
`create_graph=True` it would hand autograd a graph of its internals, and a second
derivative taken through that graph is silently wrong. `once_differentiable` (PyTorch's,
with the op's name and the way around it in the message) makes the second backward raise.
"""
from __future__ import annotations

import functools

import torch
from torch._C import _functions


def once_differentiable(what: str):
    """Decorate an autograd.Function's backward: first derivatives as usual, and an error
    naming `what` (the op and how to avoid it) if anything differentiates through them."""
    message = (f"{what} has no second derivative (its backward is written by hand); "
               f"differentiating twice through it is not supported").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled() or not any(
                    isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
                return outputs
            # As torch.autograd.function.once_differentiable, the gradients are routed
            # through a node that raises when a second backward reaches it; unlike it, the
            # node also takes the incoming gradients, so it sits on every path from the
            # gradients back to the inputs: `autograd.grad(..., inputs)` reaches it and
            # raises too, instead of finding no path and answering None (allow_unused).
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            tensors = [o for o in outputs if isinstance(o, torch.Tensor)]
            upstream = [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
            delayed = _functions.DelayedError(message, len(tensors) + len(upstream))(
                *[t.detach() for t in tensors], *upstream)
            delayed = iter(delayed if isinstance(delayed, tuple) else (delayed,))
            return tuple(next(delayed) if isinstance(o, torch.Tensor) else o for o in outputs)
        return wrapper
    return decorate
