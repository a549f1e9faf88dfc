"""GPT-2's MLP on the CUDA extension: the two matmuls on cuBLAS (through torch), the bias +
GELU between them fused in one elementwise kernel each way (csrc/bias_gelu.cu), in either
GELU flavour. Wrapped as `gptk::cuda_bias_gelu_*` custom ops with autograd.

Two versions (`VERSIONS`; GPTK_CUDA_MLP_VERSION=1|2, or
`kernels.versions.select("cuda_mlp", n)`):

version 1: c_fc's matmul writes the pre-activation, the bias + GELU kernel reads it and
  writes the activation; the backward recomputes gelu'(pre + bias) in the fused dGELU
  kernel (d pre = d out * gelu'(pre + bias)) from the saved pre-activation.
version 2: where no gradient will be asked of c_fc (inference: evaluation, sampling), with
  the tanh GELU in bf16, c_fc + bias + GELU is one cuBLASLt matmul whose epilogue
  (CUBLASLT_EPILOGUE_GELU_BIAS) applies the bias and the GELU to the fp32 accumulators
  before the single store: `torch._addmm_activation(b_fc, x, w_fc.T, use_gelu=True)`. The
  (rows, 4C) pre-activation is never written nor read back. Every other call runs
  version 1, because:
  - that epilogue is GPT-2's tanh GELU (and so is torch's fallback when cuBLASLt declines a
    shape, e.g. a single row: the plain matmul, then gelu(approximate="tanh")), so
    approximate="none" cannot use it;
  - it returns only the activation: torch exposes neither cuBLASLt's GELU_AUX epilogue
    (which also stores the pre-activation) nor its DGELU epilogue, and
    torch._addmm_activation has no autograd formula. A backward needs gelu'(pre + bias):
    recomputing the pre-activation is one more (rows, C) x (C, 4C) matmul, which costs
    more than the pass it would save, so differentiated calls keep version 1's saved
    pre-activation and its fused dGELU kernel;
  - the accuracy of cuBLASLt's GELU evaluation is not documented; bf16 rounding (2^-8)
    dwarfs any fast tanh, fp32 results are held to 2e-5 by the tests, so fp32 stays on
    version 1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import versions
from kernels.cuda.extension import ext
from kernels.custom_ops import custom_op, differentiable

VERSIONS = versions.declare("cuda_mlp", {
    1: "c_fc matmul (cuBLAS), then the fused bias+GELU kernel; fused dGELU kernel backward",
    2: "inference with the tanh GELU in bf16: c_fc + bias + GELU in one cuBLASLt matmul "
       "(epilogue, torch._addmm_activation); other calls as version 1",
}, default=2)


@custom_op("gptk::cuda_bias_gelu_fwd", mutates_args=(), device_types="cuda")
def _bias_gelu_fwd(pre: Tensor, bias: Optional[Tensor], approximate_tanh: bool) -> Tensor:
    return ext().bias_gelu_forward(pre, bias, approximate_tanh)


@_bias_gelu_fwd.register_fake
def _(pre, bias, approximate_tanh):
    return torch.empty_like(pre)


@torch.library.custom_op("gptk::cuda_bias_gelu_bwd", mutates_args=(), device_types="cuda")
def _bias_gelu_bwd(dout: Tensor, pre: Tensor, bias: Optional[Tensor],
                   approximate_tanh: bool) -> Tensor:
    return ext().bias_gelu_backward(dout, pre, bias, approximate_tanh)


@_bias_gelu_bwd.register_fake
def _(dout, pre, bias, approximate_tanh):
    return torch.empty_like(pre)


def _bias_gelu_setup(ctx, inputs, output):
    pre, bias, approximate_tanh = inputs
    ctx.save_for_backward(pre, bias)
    ctx.approximate_tanh = approximate_tanh


def _bias_gelu_backward(ctx, dout):
    pre, bias = ctx.saved_tensors
    dpre = _bias_gelu_bwd(dout.contiguous(), pre, bias, ctx.approximate_tanh)
    if bias is None:
        return dpre, None, None
    dbias = dpre.reshape(-1, pre.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
    return dpre, dbias, None


_bias_gelu = differentiable(_bias_gelu_fwd, _bias_gelu_backward, _bias_gelu_setup)


def uses_gelu_epilogue(x, w_fc, b_fc, approximate) -> bool:
    """Whether this call runs c_fc + bias + GELU as one cuBLASLt matmul (version 2's case,
    see the module docstring)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_fc, b_fc))
    return (VERSIONS.current() == 2 and approximate == "tanh" and b_fc is not None
            and x.dtype == torch.bfloat16 and not needs_grad)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate):
    if uses_gelu_epilogue(x, w_fc, b_fc, approximate):
        hidden = torch._addmm_activation(b_fc, x.reshape(-1, x.shape[-1]), w_fc.t(),
                                         use_gelu=True)
        return F.linear(hidden.view(*x.shape[:-1], w_fc.shape[0]), w_proj, b_proj)
    pre = torch.matmul(x, w_fc.t())  # cuBLAS; the bias is added by the GELU kernel
    b_fc = None if b_fc is None else b_fc.contiguous()
    return F.linear(_bias_gelu(pre, b_fc, approximate == "tanh"), w_proj, b_proj)
