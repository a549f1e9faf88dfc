"""Fused linear + cross-entropy (the lm_head and its loss) with the Triton cross-entropy.

The algorithm is `kernels.chunked_linear_cross_entropy`'s: chunks of rows, each chunk's
logits x_c @ W^T + b computed by cuBLAS in x's dtype, its gradients finished before the
next chunk. Here each chunk's loss and dlogits come from the Triton cross-entropy kernel,
one launch per chunk, writing dlogits in place over the chunk's logits (a temporary this
loop owns): the logits chunk is read about once and no fp32 copy of it is ever made. The
matmuls dx_c = dlogits_c W, dW += dlogits_c^T x_c stay on cuBLAS.

For torch.compile the whole chunk loop is one custom op, `gptk::triton_linear_cross_entropy`,
whose outputs are the losses and the gradients; the autograd logic around it (scaling by
the upstream gradient, or rerunning the loop for reduction 'none') is shared with the
`torch` backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.chunked_linear_cross_entropy import (chunked_linear_cross_entropy,
                                                  make_linear_cross_entropy)
from kernels.triton.cross_entropy import launch_cross_entropy


def triton_chunk_cross_entropy(logits, targets, ignore_index, row_weight, compute_grad):
    """Per-row losses of a chunk of logits; with compute_grad, row_weight * dloss/dlogits
    written over the logits."""
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    launch_cross_entropy(logits, targets, ignore_index, losses,
                         logits if compute_grad else None, row_weight)
    return losses


@torch.library.custom_op("gptk::triton_linear_cross_entropy", mutates_args=())
def linear_cross_entropy_chunks(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                bias: Optional[torch.Tensor], ignore_index: int,
                                row_weight: Optional[torch.Tensor], compute_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, dx, dweight, dbias) of the chunk loop; gradients not computed (no
    compute_grad, or no bias) come back as empty tensors, as a custom op returns tensors."""
    losses, dx, dweight, dbias = chunked_linear_cross_entropy(
        x, weight, targets, bias, ignore_index, row_weight, compute_grad,
        chunk_cross_entropy=triton_chunk_cross_entropy)
    return (losses, x.new_empty(0) if dx is None else dx,
            x.new_empty(0) if dweight is None else dweight,
            x.new_empty(0) if dbias is None else dbias)  # outputs may not alias each other


@linear_cross_entropy_chunks.register_fake
def _(x, weight, targets, bias, ignore_index, row_weight, compute_grad):
    losses = x.new_empty(x.shape[0], dtype=torch.float32)
    if not compute_grad:
        return losses, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return (losses, x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _chunk_loop(x, weight, targets, bias, ignore_index, row_weight, compute_grad):
    losses, dx, dweight, dbias = linear_cross_entropy_chunks(
        x, weight, targets, bias, ignore_index, row_weight, compute_grad)
    if not compute_grad:
        return losses, None, None, None
    return losses, dx, dweight, None if bias is None else dbias


linear_cross_entropy = make_linear_cross_entropy(_chunk_loop)

# The kernels this module launches are `kernels.triton.cross_entropy`'s, whose AOT_SPECS
# cover them (the in-place launch is the same kernel with Grad == Logits).
AOT_SPECS: list = []
