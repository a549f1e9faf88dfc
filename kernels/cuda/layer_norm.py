"""LayerNorm and the residual-fused LayerNorm on the CUDA extension (csrc/layer_norm.cu):
one kernel each way, wrapped as `gptk::cuda_*` custom ops with autograd.

The kernels take contiguous rows, activations of one dtype, and parameters in the
activations' dtype or fp32 (bias in the weight's dtype). This module puts every legal
call in that form: the add's two inputs are promoted to the dtype of their sum (a bf16
branch output onto an fp32 residual stream, as under autocast), parameters of any other
dtype become fp32. Autograd carries each gradient back through those casts, so every
input gets its gradient in its own dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels.cuda.extension import ext
from kernels.custom_ops import custom_op, differentiable


@custom_op("gptk::cuda_layer_norm_fwd", mutates_args=(), device_types="cuda")
def _layer_norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = ext().layer_norm_forward(x, weight, bias, eps)
    return y, mean, rstd


def _check_params(x, weight, bias) -> None:
    """What csrc/layer_norm.cu checks of the parameters' dtypes (the weight x's or fp32,
    the bias the weight's), so that tracing (and meta tensors) catch it too."""
    torch._check(weight.dtype in (x.dtype, torch.float32),
                 lambda: f"weight must have x's dtype {x.dtype} or fp32, got {weight.dtype}")
    torch._check(bias is None or bias.dtype == weight.dtype,
                 lambda: f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    _check_params(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), \
        x.new_empty(rows, dtype=torch.float32)


@custom_op("gptk::cuda_add_layer_norm_fwd", mutates_args=(), device_types="cuda")
def _add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    summed, y, mean, rstd = ext().add_layer_norm_forward(x, residual, weight, bias, eps)
    return summed, y, mean, rstd


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    # What csrc/layer_norm.cu checks, so that tracing (and meta tensors) catch it too.
    torch._check(residual.dtype == x.dtype,
                 lambda: f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    _check_params(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), \
        x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_layer_norm_bwd", mutates_args=(), device_types="cuda")
def _layer_norm_bwd(dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Tensor, mean: Tensor,
                    rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = ext().layer_norm_backward(dy, ds, x, weight, mean, rstd)
    return dx, dweight, dbias


@_layer_norm_bwd.register_fake
def _(dy, ds, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy.contiguous(), None, x, weight, mean, rstd)
    return dx, dweight, dbias if ctx.has_bias else None, None


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    summed, _, mean, rstd = output
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dsummed, dy, _dmean, _drstd):
    # s = x + residual feeds both the output s and the LayerNorm, so its gradient is
    # dsummed + LayerNorm'(dy), and x and residual both receive exactly that.
    summed, weight, mean, rstd = ctx.saved_tensors
    ds, dweight, dbias = _layer_norm_bwd(dy.contiguous(), dsummed.contiguous(), summed, weight,
                                         mean, rstd)
    return ds, ds, dweight, dbias if ctx.has_bias else None, None


_layer_norm = differentiable(_layer_norm_fwd, _layer_norm_backward, _layer_norm_setup)
_add_layer_norm = differentiable(_add_layer_norm_fwd, _add_layer_norm_backward, _add_layer_norm_setup)


def _kernel_params(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """weight and bias (contiguous: the canonical form) in a dtype the kernels take: x's
    or fp32, the bias the weight's. Each cast only where a dtype differs: a `.to` that
    changes nothing is still a dispatcher round trip (~0.5 us of host time)."""
    dtype = weight.dtype
    if dtype != x.dtype and dtype != torch.float32:
        dtype = torch.float32
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


def layer_norm(x, weight, bias, eps):
    weight, bias = _kernel_params(x, weight, bias)
    y, _, _ = _layer_norm(x.contiguous(), weight, bias, eps)
    return y


def add_layer_norm(x, residual, weight, bias, eps):
    if x.dtype != residual.dtype:  # both to the sum's dtype (a bf16 branch, fp32 stream)
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    x, residual = x.contiguous(), residual.contiguous()
    weight, bias = _kernel_params(x, weight, bias)
    summed, y, _, _ = _add_layer_norm(x, residual, weight, bias, eps)
    return summed, y
