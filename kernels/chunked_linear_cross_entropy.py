"""Linear + cross-entropy (the lm_head and its loss) without materializing the logits.

The full logits of a GPT-2 batch, (B*T, V) = (8192, 50257), are 1.6 GB in fp32, and eager
cross-entropy keeps several tensors that size alive (logits, log-softmax, their grads).
Here the N rows are processed in chunks, and each chunk's gradients are finished before
the next chunk's logits exist:

    logits_c  = x_c @ W^T + b                     (chunk rows x V, x's dtype: cuBLAS / MKL)
    loss_c    = logsumexp(logits_c) - logits_c[target]
    dlogits_c = (softmax(logits_c) - onehot(target)) * row_weight   (written in place into
                                                   logits_c: a temporary no one else holds)
    dx_c      = dlogits_c @ W
    dW       += dlogits_c^T @ x_c,   db += sum_rows dlogits_c     (fp32 accumulators)

so only one chunk of logits is alive at a time. Chunk sizes (`chunk_rows`): small problems
(a tiny vocabulary, a short batch) run as one chunk, with no Python loop to pay for; larger
ones in at least MIN_CHUNKS chunks, so a chunk's working set (its logits and one fp32
temporary) stays under a quarter of one full logits tensor, while eager holds two or more;
and chunks of at most MAX_CHUNK_LOGITS, but no smaller than needed: every chunk reads and
writes all of the fp32 dW (V x C) once, so many thin chunks would turn the dW update into
the bottleneck (Liger's ceil(V / C) chunks of ~125 rows at GPT-2 size move 20 GB for it;
13 chunks of 631 rows move 4 GB).

Gradients in the forward: for reduction mean/sum the upstream gradient is one scalar g for
every row, so the forward computes the gradients with row weight 1/n_kept (mean) or 1
(sum) and the backward only scales dx, dW, db by g — no second pass over the vocabulary.
For reduction 'none' each row has its own upstream gradient g_i, which cannot be factored
out of dW = sum_i g_i dlogits_i^T x_i, so the forward computes only the losses and the
backward runs the chunk loop again with row weights g_i.

The chunk's cross-entropy step is pluggable: `torch_chunk_cross_entropy` here (the `torch`
backend, also the CPU fallback), a Triton kernel in `kernels.triton.linear_cross_entropy`.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

SINGLE_CHUNK_LOGITS = 1 << 22  # up to 16 MB of fp32 logits: one chunk does everything
MIN_CHUNKS = 8                 # beyond that, at least 8 chunks...
MAX_CHUNK_LOGITS = 1 << 25     # ...of at most 128 MB of fp32 logits each

# (logits chunk, targets chunk, ignore_index, row weights or None, compute_grad) -> losses
ChunkCrossEntropy = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None", bool],
                             torch.Tensor]


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk for (n_rows, vocab) logits, the rows split evenly (see the module doc)."""
    logits = n_rows * vocab
    if logits <= SINGLE_CHUNK_LOGITS:
        return max(n_rows, 1)
    n_chunks = min(n_rows, max(MIN_CHUNKS, -(-logits // MAX_CHUNK_LOGITS)))
    return -(-n_rows // n_chunks)


def reduce_losses(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  reduction: str) -> torch.Tensor:
    """Per-row losses reduced as F.cross_entropy does: mean over the kept targets (NaN when
    none is kept), sum, or none. No host sync: the count stays on the device."""
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


def torch_chunk_cross_entropy(logits, targets, ignore_index, row_weight, compute_grad):
    """Per-row losses (fp32) of a chunk of logits; with compute_grad, overwrites logits with
    row_weight * d loss / d logits. Math in fp32 whatever the logits' dtype."""
    logits_f = logits.float()  # logits itself when already fp32
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0).unsqueeze(1)
    lse = torch.logsumexp(logits_f, dim=1)
    losses = torch.where(keep, lse - logits_f.gather(1, safe_targets).squeeze(1), 0.0)
    if compute_grad:
        # softmax - onehot, scaled per row; ignored rows get weight 0 (also keeps a mean's
        # 1/0 weight from reaching them when every target is ignored).
        grad = logits_f.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, safe_targets, grad.new_full(safe_targets.shape, -1.0))
        grad.mul_(torch.where(keep, row_weight, 0.0).unsqueeze(1))
        if grad is not logits:
            logits.copy_(grad)
    return losses


def chunked_linear_cross_entropy(x, weight, targets, bias, ignore_index, row_weight,
                                 compute_grad, chunk_cross_entropy: ChunkCrossEntropy):
    """(losses (n,) fp32, dx, dweight, dbias) of rows x (n, C) against targets (n,) int64,
    the gradients being those of sum_i row_weight[i] * loss_i (None without compute_grad;
    dbias None without bias)."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    losses = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    dx = dweight = dbias = None
    if compute_grad:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        dbias = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=x.device)
    rows = chunk_rows(n_rows, vocab)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        x_c = x[start:end]
        logits = F.linear(x_c, weight, bias)
        losses[start:end] = chunk_cross_entropy(
            logits, targets[start:end], ignore_index,
            None if row_weight is None else row_weight[start:end], compute_grad)
        if not compute_grad:
            continue
        dlogits = logits  # overwritten in place by the chunk step
        torch.mm(dlogits, weight, out=dx[start:end])
        if dlogits.dtype == torch.float32:
            dweight.addmm_(dlogits.t(), x_c)
        else:  # 16-bit: the matmul accumulates in fp32 inside, the chunks add up in fp32
            dweight.add_(torch.mm(dlogits.t(), x_c))
        if dbias is not None:
            dbias.add_(dlogits.sum(0, dtype=torch.float32))
    if compute_grad:
        dweight = dweight.to(weight.dtype)
        dbias = None if dbias is None else dbias.to(bias.dtype)
    return losses, dx, dweight, dbias


def make_linear_cross_entropy(loop: Callable):
    """The public op (the signature of `kernels.ops.linear_cross_entropy`) around a chunk
    loop with the signature of `chunked_linear_cross_entropy` minus its last argument."""

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, targets, bias, ignore_index, reduction, compute_grad):
            ctx.ignore_index, ctx.reduction = ignore_index, reduction
            if reduction == "none":  # the backward recomputes with per-row weights
                losses, *_ = loop(x, weight, targets, bias, ignore_index, None, False)
                ctx.save_for_backward(x, weight, targets, bias)
                return losses
            n_rows = x.shape[0]
            n_kept = (targets != ignore_index).sum()
            row_weight = (1.0 / n_kept if reduction == "mean"
                          else torch.ones((), device=x.device)).float().expand(n_rows)
            losses, dx, dweight, dbias = loop(x, weight, targets, bias, ignore_index,
                                              row_weight, compute_grad)
            ctx.save_for_backward(dx, dweight, dbias)
            return reduce_losses(losses, targets, ignore_index, reduction)

        @staticmethod
        def backward(ctx, grad_loss):
            if ctx.reduction == "none":
                x, weight, targets, bias = ctx.saved_tensors
                _, dx, dweight, dbias = loop(x, weight, targets, bias, ctx.ignore_index,
                                             grad_loss, True)
            else:  # new tensors, not in-place: the saved ones serve a retain_graph backward
                dx, dweight, dbias = (None if g is None else g * grad_loss
                                      for g in ctx.saved_tensors)
            return dx, dweight, None, dbias, None, None, None

    def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100,
                             reduction="mean"):
        compute_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        flat_targets = targets.reshape(-1).to(torch.int64)
        loss = LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, flat_targets, bias,
                                        ignore_index, reduction, compute_grad)
        return loss.view(targets.shape) if reduction == "none" else loss

    return linear_cross_entropy


linear_cross_entropy = make_linear_cross_entropy(
    functools.partial(chunked_linear_cross_entropy, chunk_cross_entropy=torch_chunk_cross_entropy))
