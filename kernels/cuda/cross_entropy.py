"""Cross-entropy on the CUDA extension (csrc/cross_entropy.cu): per-row losses in one pass
over the logits (online max and sum), the gradient recomputed from the saved log-sum-exp
in one more pass, the loss variants (`kernels.losses`) folded into both. Wrapped as
`gptk::cuda_cross_entropy_*` custom ops with autograd; the fused in-place pass the linear
+ cross-entropy chunk loop uses is here too."""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.cuda.extension import ext
from kernels.custom_ops import custom_op, differentiable
from kernels.losses import LossVariant, finish, flat_targets, reduce_losses


@custom_op("gptk::cuda_cross_entropy_fwd", mutates_args=(), device_types="cuda")
def _cross_entropy_fwd(logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float,
                       z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    losses, lse = ext().cross_entropy_forward(logits, targets, ignore_index, label_smoothing,
                                              z_loss, softcap)
    return losses, lse


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_cross_entropy_bwd", mutates_args=(), device_types="cuda")
def _cross_entropy_bwd(dlosses: Tensor, logits: Tensor, targets: Tensor, lse: Tensor,
                       ignore_index: int, label_smoothing: float, z_loss: float,
                       softcap: float) -> Tensor:
    return ext().cross_entropy_backward(dlosses, logits, targets, lse, ignore_index,
                                        label_smoothing, z_loss, softcap)


@_cross_entropy_bwd.register_fake
def _(dlosses, logits, targets, lse, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ignore_index, *variant = inputs
    _, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index, ctx.variant = ignore_index, variant
    ctx.mark_non_differentiable(lse)


def _cross_entropy_backward(ctx, dlosses, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return (_cross_entropy_bwd(dlosses.float().contiguous(), logits, targets, lse,
                               ctx.ignore_index, *ctx.variant), None, None, None, None, None)


_cross_entropy = differentiable(_cross_entropy_fwd, _cross_entropy_backward, _cross_entropy_setup)


@torch.library.custom_op("gptk::cuda_cross_entropy_fwd_bwd_", mutates_args=("logits",),
                         device_types="cuda")
def cross_entropy_fwd_bwd_(logits: Tensor, targets: Tensor, row_weight: Tensor,
                           ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float) -> tuple[Tensor, Tensor]:
    """(losses, lse) per row of logits (n, V); overwrites logits with
    row_weight * d loss / d logits."""
    losses, lse = ext().cross_entropy_forward_backward_(logits, targets, row_weight, ignore_index,
                                                        label_smoothing, z_loss, softcap)
    return losses, lse


@cross_entropy_fwd_bwd_.register_fake
def _(logits, targets, row_weight, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


def cross_entropy(logits, targets, ignore_index, reduction, label_smoothing=0.0, z_loss=0.0,
                  softcap=0.0, return_z_loss=False):
    variant = LossVariant(label_smoothing, z_loss, softcap)
    # (N, V) logits, the common case, as they are: a no-op reshape is still a dispatcher
    # round trip (~0.5 us).
    targets_1d = flat_targets(targets)
    rows = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    losses, lse = _cross_entropy(rows.contiguous(), targets_1d, ignore_index, *variant)
    loss = reduce_losses(losses, targets_1d, ignore_index, reduction)
    return finish(loss, lse, targets, ignore_index, reduction, variant, return_z_loss)
