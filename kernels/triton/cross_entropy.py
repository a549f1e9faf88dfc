"""Cross-entropy in Triton: loss and gradient in one kernel, with an online softmax.

One program per row of V logits, read in their own dtype, all math in fp32:
  sweep 1, over the row in blocks of BLOCK_V: the running max m and the running sum
          d = sum_j exp(x_j - m), rescaled by exp(m_old - m_new) whenever the max grows,
          so the row is never held whole; then loss = log(d) + m - x[target].
  sweep 2: the gradient of the loss, (softmax - onehot(target)) = exp(x_j - m) / d - [j == t],
          times a per-row weight, written in the gradient buffer's dtype.
The second sweep re-reads the row right after the first, from L2 on a GPU (a 50257-wide
bf16 row is 100 KB), so the logits come from HBM about once. Rows whose target is
ignore_index get loss 0 and gradient 0.

The standalone op computes the gradient during the forward into a fresh buffer of the
logits' dtype (not fp32, and never into the logits, which autograd may still need), with
weight 1 per row. The upstream gradient is only known in the backward — a scalar for
mean/sum (already divided by the number of kept targets by autograd of the mean), one
per row for 'none' — so the backward scales the stored rows by it in one elementwise
pass (ignored rows stay 0), writing a new tensor rather than the saved one, so a second
backward through the same graph (retain_graph) still reads unscaled values. The fused linear + cross-entropy
instead runs the kernel in place on its private logits chunks with the final row weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.chunked_linear_cross_entropy import reduce_losses
from kernels.triton.aot import AotSpec

MAX_BLOCK_V = 4096     # logits per block of the sweeps: 16 per thread at 8 warps
SCALE_BLOCK = 4096     # gradient elements per program of the backward's scaling pass
NUM_WARPS = 8


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Grad, Targets, RowWeight, Losses,
    stride_logits, stride_grad, stride_row_weight,
    n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 at GPT-2 size
    logits = Logits + row * stride_logits
    target = tl.load(Targets + row)
    keep = target != ignore_index
    safe_target = tl.where(keep, target, 0)

    m = -float("inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # Read before sweep 2, which may overwrite the row when Grad is Logits.
    target_logit = tl.load(logits + safe_target).to(tl.float32)
    tl.store(Losses + row, tl.where(keep, tl.log(d) + m - target_logit, 0.0))

    if COMPUTE_GRAD:
        weight = tl.where(keep, tl.load(RowWeight + row * stride_row_weight), 0.0)
        scale = weight / d
        grad = Grad + row * stride_grad
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            x = tl.load(logits + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - m) * scale - tl.where(cols == safe_target, weight, 0.0)
            tl.store(grad + cols, g.to(Grad.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    Grad, RowScale, Targets, Out,
    stride_grad, stride_row_scale, stride_out, n_cols, ignore_index,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Ignored rows stay exactly 0: a mean over zero kept targets has an upstream gradient
    # of g / 0 = inf, and 0 * inf would be NaN.
    keep = tl.load(Targets + row) != ignore_index
    scale = tl.where(keep, tl.load(RowScale + row * stride_row_scale).to(tl.float32), 0.0)
    g = tl.load(Grad + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, (g * scale).to(Out.dtype.element_ty), mask=mask)


def block_v(n_cols: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(n_cols))


def launch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         losses: torch.Tensor, grad: torch.Tensor | None,
                         row_weight: torch.Tensor | None) -> None:
    """Per-row losses of logits (n, V) into losses (n,) fp32 and, when grad is given,
    row_weight[i] * d loss_i / d logits into grad (n, V), which may be logits itself.
    targets: (n,) int64. row_weight: (n,) fp32, any stride (0 for one shared weight)."""
    n_rows, n_cols = logits.shape
    if not n_rows:
        return
    _cross_entropy_fwd_kernel[(n_rows,)](
        logits, grad, targets, row_weight, losses,
        logits.stride(0), 0 if grad is None else grad.stride(0),
        0 if row_weight is None else row_weight.stride(0),
        n_cols, ignore_index,
        COMPUTE_GRAD=grad is not None, BLOCK_V=block_v(n_cols),
        num_warps=NUM_WARPS, num_stages=1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("gptk::triton_cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses (n,) fp32, d losses_i / d logits (n, V) in the logits' dtype, or an
    empty (0, V) tensor without compute_grad) for logits (n, V) and int64 targets (n,)."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = logits.new_empty((n_rows if compute_grad else 0, n_cols))
    ones = torch.ones(1, dtype=torch.float32, device=logits.device).expand(n_rows)
    launch_cross_entropy(logits, targets, ignore_index, losses,
                         grad if compute_grad else None, ones)
    return losses, grad


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, compute_grad):
    n_rows, n_cols = logits.shape
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty((n_rows if compute_grad else 0, n_cols)))


@torch.library.custom_op("gptk::triton_cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(grad: torch.Tensor, grad_losses: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """grad (n, V) with row i scaled by grad_losses[i] (fp32 math) and ignored rows zero,
    as a new tensor."""
    n_rows, n_cols = grad.shape
    out = torch.empty_like(grad)
    if n_rows:
        _scale_rows_kernel[(n_rows, triton.cdiv(n_cols, SCALE_BLOCK))](
            grad, grad_losses, targets, out,
            grad.stride(0), grad_losses.stride(0), out.stride(0), n_cols, ignore_index,
            BLOCK=SCALE_BLOCK, num_warps=NUM_WARPS, num_stages=1)
    return out


@cross_entropy_bwd.register_fake
def _(grad, grad_losses, targets, ignore_index):
    return torch.empty_like(grad)


def _setup(ctx, inputs, output):
    _logits, targets, ignore_index, _compute_grad = inputs
    _losses, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad, targets)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_losses, _grad_of_grad):
    grad, targets = ctx.saved_tensors
    if grad.shape[0] != grad_losses.shape[0]:
        raise RuntimeError("triton cross_entropy: the forward ran without compute_grad, so it "
                           "stored no gradient; call it with grad enabled and logits that "
                           "require grad")
    return cross_entropy_bwd(grad, grad_losses, targets, ctx.ignore_index), None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- public op

def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    flat_targets = targets.reshape(-1).to(torch.int64)
    losses, _grad = cross_entropy_fwd(_rows(logits), flat_targets, ignore_index, compute_grad)
    loss = reduce_losses(losses, flat_targets, ignore_index, reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- AOT specs

def _aot_specs() -> list[AotSpec]:
    specs = []
    for dtype in ("fp32", "bf16"):
        for compute_grad in (False, True):
            signature = {"Logits": f"*{dtype}", "Grad": f"*{dtype}", "Targets": "*i64",
                         "RowWeight": "*fp32", "Losses": "*fp32", "stride_logits": "i32",
                         "stride_grad": "i32", "stride_row_weight": "i32", "n_cols": "i32",
                         "ignore_index": "i32", "COMPUTE_GRAD": "constexpr",
                         "BLOCK_V": "constexpr"}
            specs.append(AotSpec(
                f"cross_entropy_fwd[{dtype},grad={compute_grad},BLOCK_V={MAX_BLOCK_V}]",
                _cross_entropy_fwd_kernel, signature,
                {"COMPUTE_GRAD": compute_grad, "BLOCK_V": MAX_BLOCK_V},
                num_warps=NUM_WARPS, num_stages=1))
        signature = {"Grad": f"*{dtype}", "RowScale": "*fp32", "Targets": "*i64",
                     "Out": f"*{dtype}", "stride_grad": "i32", "stride_row_scale": "i32",
                     "stride_out": "i32", "n_cols": "i32", "ignore_index": "i32",
                     "BLOCK": "constexpr"}
        specs.append(AotSpec(f"cross_entropy_scale_rows[{dtype},BLOCK={SCALE_BLOCK}]",
                             _scale_rows_kernel, signature, {"BLOCK": SCALE_BLOCK},
                             num_warps=NUM_WARPS, num_stages=1))
    return specs


AOT_SPECS = _aot_specs()
