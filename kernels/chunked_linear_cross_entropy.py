"""Linear + cross-entropy (the lm_head and its loss) without materializing the logits: the
one chunk loop every backend runs, each with its own per-chunk cross-entropy step.

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

Gradients in the forward, scaled in the backward. For reduction mean/sum the upstream
gradient is one scalar g for every row, so the forward computes the gradients of the
*sum* of the losses (row weight 1) and the backward scales dx, dW, db by g / n_kept (mean)
or g (sum) — no second pass over the vocabulary. The scale is applied last on purpose:
in fp16, dlogits_c = softmax - onehot are stored in the logits' dtype, and folding 1/n
into them before the GradScaler's 2^16 arrives would flush every probability below
~6e-8 * n to zero (a ~20x larger dW error than eager fp16 at 8192 x 4096). Unscaled, they
are probabilities, well inside fp16's range; the scaling happens in fp32. For reduction
'none' each row has its own upstream gradient g_i, which cannot be factored out of
dW = sum_i g_i dlogits_i^T x_i, so the forward computes only the losses and the backward
runs the chunk loop again with row weights g_i.

The loss variants (label smoothing, z-loss, soft-capping: `kernels.losses`) change only
the chunk step's per-row loss and dlogits; each row's log-sum-exp comes back beside its
loss, for the z-loss value a call may return.

The chunk's cross-entropy step is pluggable (`ChunkCrossEntropy`): `torch_chunk_cross_entropy`
here (the `torch` backend), a Triton kernel (`kernels.triton.linear_cross_entropy`), a CUDA
kernel (`kernels.cuda.linear_cross_entropy`). `chunk_loop_op` wraps a loop into one
torch.library custom op, so torch.compile sees the whole loop as one node.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels.losses import LossVariant, finish
from kernels.once import once_differentiable

SINGLE_CHUNK_LOGITS = 1 << 22  # up to 16 MB of fp32 logits: one chunk does everything
MIN_CHUNKS = 8                 # beyond that, at least 8 chunks...
MAX_CHUNK_LOGITS = 1 << 25     # ...of at most 128 MB of fp32 logits each

# (logits chunk, targets chunk, ignore_index, row weights or None, compute_grad, variant)
# -> (losses, lse) per row; with compute_grad the logits are overwritten with
# row_weight * d loss / d logits.
ChunkCrossEntropy = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor], bool,
                              LossVariant], tuple[torch.Tensor, torch.Tensor]]


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk for (n_rows, vocab) logits, the rows split evenly (see the module doc)."""
    logits = n_rows * vocab
    if logits <= SINGLE_CHUNK_LOGITS:
        return max(n_rows, 1)
    n_chunks = min(n_rows, max(MIN_CHUNKS, -(-logits // MAX_CHUNK_LOGITS)))
    return -(-n_rows // n_chunks)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses and gradient sums are fp32 for 16-bit and fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def torch_chunk_cross_entropy(logits, targets, ignore_index, row_weight, compute_grad,
                              variant: LossVariant):
    """(losses, lse) per row of a chunk of logits; with compute_grad, overwrites logits with
    row_weight * d loss / d logits. Math in fp32 for 16-bit logits (fp64 for fp64)."""
    smoothing, z_coef, cap = variant
    logits_f = logits.to(accumulator_dtype(logits.dtype))  # logits itself when already so
    z = cap * torch.tanh(logits_f / cap) if cap else logits_f
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0).long().unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)
    losses = lse - z.gather(1, safe_targets).squeeze(1)
    if smoothing:
        losses = (1.0 - smoothing) * losses + smoothing * (lse - z.mean(dim=1))
    if z_coef:
        losses = losses + z_coef * lse.square()
    losses = torch.where(keep, losses, 0.0)
    if compute_grad:
        # (softmax * (1 + 2 c lse) - (1 - e) onehot - e / V) * tanh', weighted per row
        # (see kernels.losses).
        tanh_grad = None if not cap else 1.0 - (z / cap).square()
        grad = z.sub_(lse.unsqueeze(1)).exp_()  # z is ours (logits_f, or the capped copy)
        if z_coef:
            grad.mul_((1.0 + 2.0 * z_coef * lse).unsqueeze(1))
        grad.scatter_add_(1, safe_targets, grad.new_full(safe_targets.shape, smoothing - 1.0))
        if smoothing:
            grad.sub_(smoothing / grad.shape[1])
        if tanh_grad is not None:
            grad.mul_(tanh_grad)
        # An ignored row counts 0 with a zero gradient whatever its logits (a row of -inf
        # gives exp(-inf - -inf) = NaN above).
        grad.mul_(row_weight.unsqueeze(1)).masked_fill_(~keep.unsqueeze(1), 0.0)
        if grad is not logits:
            logits.copy_(grad)
    return losses, lse


def chunked_linear_cross_entropy(x, weight, targets, bias, ignore_index, row_weight,
                                 compute_grad, variant: LossVariant,
                                 chunk_cross_entropy: ChunkCrossEntropy):
    """(losses (n,), lse (n,), dx, dweight, dbias) of rows x (n, C) against targets (n,),
    the gradients being those of sum_i row_weight[i] * loss_i (None without compute_grad;
    dbias None without bias). losses and lse are in the accumulator dtype, dx in x's;
    dweight and dbias are in the accumulator dtype (the caller scales them, then casts)."""
    n_rows, vocab = x.shape[0], weight.shape[0]
    accumulator = accumulator_dtype(x.dtype)
    losses = torch.empty(n_rows, dtype=accumulator, device=x.device)
    lse = torch.empty(n_rows, dtype=accumulator, device=x.device)
    dx = dweight = dbias = None
    if compute_grad:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.zeros(weight.shape, dtype=accumulator, device=x.device)
        dbias = None if bias is None else torch.zeros(vocab, dtype=accumulator, device=x.device)
    rows = chunk_rows(n_rows, vocab)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        x_c = x[start:end]
        logits = F.linear(x_c, weight, bias)
        losses[start:end], lse[start:end] = chunk_cross_entropy(
            logits, targets[start:end], ignore_index,
            None if row_weight is None else row_weight[start:end], compute_grad, variant)
        if not compute_grad:
            continue
        dlogits = logits  # overwritten in place by the chunk step
        torch.mm(dlogits, weight, out=dx[start:end])
        if dlogits.dtype == accumulator:
            dweight.addmm_(dlogits.t(), x_c)
        else:  # 16-bit: the matmul accumulates in fp32 inside, the chunks add up in fp32
            dweight.add_(torch.mm(dlogits.t(), x_c))
        if dbias is not None:
            dbias.add_(dlogits.sum(0, dtype=accumulator))
    return losses, lse, dx, dweight, dbias


ChunkLoop = Callable[..., tuple]  # chunked_linear_cross_entropy minus its last argument


def chunk_loop_op(name: str, chunk_cross_entropy: ChunkCrossEntropy) -> ChunkLoop:
    """The chunk loop with `chunk_cross_entropy`, registered as the custom op `name`
    (e.g. "gptk::triton_linear_cross_entropy"): torch.compile then treats the whole loop
    as one node with known output shapes, instead of tracing into kernel launchers."""

    @torch.library.custom_op(name, mutates_args=())
    def loop_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor], ignore_index: int,
                row_weight: Optional[torch.Tensor], compute_grad: bool, label_smoothing: float,
                z_loss: float, softcap: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, lse, dx, dweight, dbias = chunked_linear_cross_entropy(
            x, weight, targets, bias, ignore_index, row_weight, compute_grad,
            LossVariant(label_smoothing, z_loss, softcap), chunk_cross_entropy)
        # A custom op returns tensors, never None, and its outputs may not alias each other.
        return (losses, lse, x.new_empty(0) if dx is None else dx,
                x.new_empty(0) if dweight is None else dweight,
                x.new_empty(0) if dbias is None else dbias)

    @loop_op.register_fake
    def _(x, weight, targets, bias, ignore_index, row_weight, compute_grad, label_smoothing,
          z_loss, softcap):
        accumulator = accumulator_dtype(x.dtype)
        losses = x.new_empty(x.shape[0], dtype=accumulator)
        lse = x.new_empty(x.shape[0], dtype=accumulator)
        if not compute_grad:
            return losses, lse, x.new_empty(0), x.new_empty(0), x.new_empty(0)
        return (losses, lse, x.new_empty(x.shape),
                weight.new_empty(weight.shape, dtype=accumulator),
                x.new_empty(0) if bias is None else bias.new_empty(bias.shape, dtype=accumulator))

    def loop(x, weight, targets, bias, ignore_index, row_weight, compute_grad, variant):
        losses, lse, dx, dweight, dbias = loop_op(x, weight, targets, bias, ignore_index,
                                                  row_weight, compute_grad, *variant)
        if not compute_grad:
            return losses, lse, None, None, None
        return losses, lse, dx, dweight, None if bias is None else dbias

    loop.op = loop_op
    return loop


def make_linear_cross_entropy(loop: ChunkLoop):
    """The backend function for the op (canonical arguments: see `kernels.specs`) around a
    chunk loop with the signature of `chunked_linear_cross_entropy` minus its last
    argument."""

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, targets, bias, ignore_index, reduction, compute_grad,
                    variant):
            ctx.ignore_index, ctx.reduction, ctx.variant = ignore_index, reduction, variant
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
            if reduction == "none":  # the backward recomputes with per-row weights
                losses, lse, *_ = loop(x, weight, targets, bias, ignore_index, None, False,
                                       variant)
                ctx.save_for_backward(x, weight, targets, bias)
                ctx.mark_non_differentiable(lse)
                return losses, lse
            # The gradients of the sum of the losses; the backward scales them (see the
            # module docstring for why the scale is not applied here).
            ones = torch.ones((), dtype=torch.float32, device=x.device).expand(x.shape[0])
            losses, lse, dx, dweight, dbias = loop(x, weight, targets, bias, ignore_index,
                                                   ones if compute_grad else None,
                                                   compute_grad, variant)
            n_kept = (targets != ignore_index).sum()
            ctx.save_for_backward(dx, dweight, dbias, n_kept)
            ctx.mark_non_differentiable(lse)
            total = losses.sum()
            return (total if reduction == "sum" else total / n_kept), lse

        @staticmethod
        @once_differentiable("linear_cross_entropy's chunk loop (the gradients come from the "
                             "forward's kernels, not from differentiable ops): for a second "
                             "derivative use cross_entropy on the logits")
        def backward(ctx, grad_loss, _grad_lse):
            x_dtype, w_dtype, b_dtype = ctx.dtypes
            if ctx.reduction == "none":
                x, weight, targets, bias = ctx.saved_tensors
                _, _, dx, dweight, dbias = loop(x, weight, targets, bias, ctx.ignore_index,
                                                grad_loss.to(accumulator_dtype(grad_loss.dtype))
                                                .contiguous(), True, ctx.variant)
                scale = None
            else:
                dx, dweight, dbias, n_kept = ctx.saved_tensors
                scale = grad_loss.to(accumulator_dtype(grad_loss.dtype))
                if ctx.reduction == "mean":  # a mean over no kept target has no gradient
                    scale = torch.where(n_kept > 0, scale / n_kept, 0.0)
            # New tensors, never in place: the saved ones serve a retain_graph backward.
            return (_scaled(dx, scale, x_dtype), _scaled(dweight, scale, w_dtype), None,
                    _scaled(dbias, scale, b_dtype), None, None, None, None)

    def linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction,
                             label_smoothing=0.0, z_loss=0.0, softcap=0.0, return_z_loss=False):
        variant = LossVariant(label_smoothing, z_loss, softcap)
        compute_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        flat_targets = targets.reshape(-1)
        loss, lse = LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, flat_targets,
                                             bias, ignore_index, reduction, compute_grad,
                                             variant)
        return finish(loss, lse, targets, ignore_index, reduction, variant, return_z_loss)

    return linear_cross_entropy


def _scaled(grad, scale, dtype):
    """grad * scale in the scale's (fp32 or wider) dtype (scale None: grad as is), then in
    `dtype`; None stays None."""
    if grad is None:
        return None
    if scale is not None:
        grad = grad.to(scale.dtype) * scale
    return grad.to(dtype)


linear_cross_entropy = make_linear_cross_entropy(
    functools.partial(chunked_linear_cross_entropy, chunk_cross_entropy=torch_chunk_cross_entropy))
