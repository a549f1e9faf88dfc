"""Fused linear + cross-entropy on the CUDA extension: the chunk loop every backend shares
(`kernels.chunked_linear_cross_entropy`), each chunk's logits from cuBLAS, turned into
losses and overwritten with their gradient by one kernel (csrc/cross_entropy.cu), so the
(N, V) logits never exist whole. For torch.compile the loop is one custom op,
`gptk::cuda_linear_cross_entropy`."""
from __future__ import annotations

from kernels.chunked_linear_cross_entropy import chunk_loop_op, make_linear_cross_entropy
from kernels.cuda.cross_entropy import _cross_entropy_fwd, cross_entropy_fwd_bwd_


def cuda_chunk_cross_entropy(logits, targets, ignore_index, row_weight, compute_grad, variant):
    """(losses, lse) per row of a chunk of logits; with compute_grad, row_weight * dloss /
    dlogits written over the logits."""
    if not compute_grad:
        return _cross_entropy_fwd(logits, targets, ignore_index, *variant)
    return cross_entropy_fwd_bwd_(logits, targets, row_weight.float(), ignore_index, *variant)


chunk_loop = chunk_loop_op("gptk::cuda_linear_cross_entropy", cuda_chunk_cross_entropy)
linear_cross_entropy = make_linear_cross_entropy(chunk_loop)
