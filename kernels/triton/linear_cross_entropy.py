"""Fused linear + cross-entropy (the lm_head and its loss) with the Triton cross-entropy.

The algorithm is `kernels.chunked_linear_cross_entropy`'s, the one chunk loop every backend
shares: chunks of rows, each chunk's logits x_c @ W^T + b computed by cuBLAS in x's dtype,
its gradients finished before the next chunk. Here each chunk's loss and dlogits come from
the Triton cross-entropy kernel, one launch per chunk, writing dlogits in place over the
chunk's logits (a temporary the loop owns): the logits chunk is read about once and no
fp32 copy of it is ever made, and since loads and stores then share each row's 16-byte
partition, both are 128-bit for any vocabulary (see `kernels.triton.cross_entropy`). The matmuls dx_c = dlogits_c W, dW += dlogits_c^T x_c stay
on cuBLAS. For torch.compile the whole loop is one custom op,
`gptk::triton_linear_cross_entropy`.
"""
from __future__ import annotations

import torch

from kernels.chunked_linear_cross_entropy import chunk_loop_op, make_linear_cross_entropy
from kernels.triton.cross_entropy import launch_cross_entropy, row_lse


def triton_chunk_cross_entropy(logits, targets, ignore_index, row_weight, compute_grad,
                               variant):
    """(losses, lse) per row of a chunk of logits; with compute_grad, row_weight * dloss /
    dlogits written over the logits."""
    n_rows = logits.shape[0]
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    stats = logits.new_empty(n_rows, 2, dtype=torch.float32)
    launch_cross_entropy(logits, targets, ignore_index, losses,
                         logits if compute_grad else None, row_weight, stats, variant)
    return losses, row_lse(stats)


chunk_loop = chunk_loop_op("gptk::triton_linear_cross_entropy", triton_chunk_cross_entropy)
linear_cross_entropy = make_linear_cross_entropy(chunk_loop)

# The kernels this module launches are `kernels.triton.cross_entropy`'s, whose AOT_SPECS
# cover them (the in-place launch is the same kernel with Grad == Logits).
AOT_SPECS: list = []
