"""GPT-2's MLP, y = c_proj(gelu(c_fc(x))), with GELU fused into the Triton matmuls.

Forward, on x2d = x viewed as [M, C] (M = B*T), W_fc [4C, C], W_proj [C, 4C]:
    H = x2d W_fc^T + b_fc,  G = gelu(H)      one Triton kernel: bias + GELU in the epilogue
    y = G W_proj^T + b_proj                  cuBLAS (addmm)
Backward, from dy [M, C]:
    dH = (dy W_proj) * gelu'(H)              one Triton kernel: dGELU in the epilogue
    dW_proj = dy^T G,   db_proj = sum_rows dy
    dx = dH W_fc,  dW_fc = dH^T x2d,  db_fc = sum_rows dH      cuBLAS / torch reductions

Both GELU passes ride on a matmul's epilogue, so neither G's nor dH's elementwise step
costs a round trip of the [M, 4C] activations through memory. The matmuls without an
elementwise partner run on cuBLAS, as Liger-Kernel does: a Triton kernel could at best
tie cuBLAS on a plain matmul, and cuBLASLt already fuses c_proj's bias add.

Saved for the backward: H and G, both [M, 4C] in the input dtype: the same two tensors
eager PyTorch keeps (G is c_proj's input, H is GELU's). The forward kernel writes H next to
G at the cost of one extra store (also under no_grad, where it goes unused: one kernel
variant less); recomputing either instead would cost the backward a matmul (H) or an
extra elementwise pass over [M, 4C] (G).

torch.compile: the forward is the custom op `gptk::triton_mlp_gelu_fwd` with a fake (meta)
implementation and its backward registered through `register_autograd`; the backward's
Triton launch is the custom op `gptk::triton_matmul_dgelu`, so AOTAutograd traces the
backward as that op plus aten matmuls.
"""
from __future__ import annotations

import torch

from kernels.custom_ops import custom_op, differentiable
from kernels.triton.matmul import matmul_bias_gelu, matmul_dgelu

Tensor = torch.Tensor


@custom_op("gptk::triton_mlp_gelu_fwd", mutates_args=())
def mlp_gelu_fwd(x2d: Tensor, w_fc: Tensor, b_fc: Tensor | None, w_proj: Tensor,
                 b_proj: Tensor | None, approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, H, G) for x2d [M, C]; H and G are returned for the backward to save."""
    preact, act = matmul_bias_gelu(x2d, w_fc.t(), b_fc, approximate)
    if b_proj is None:
        y = act @ w_proj.t()
    else:
        y = torch.addmm(b_proj, act, w_proj.t())
    return y, preact, act


@mlp_gelu_fwd.register_fake
def _(x2d, w_fc, b_fc, w_proj, b_proj, approximate):
    m, hidden = x2d.shape[0], w_fc.shape[0]
    return x2d.new_empty(m, w_proj.shape[0]), x2d.new_empty(m, hidden), x2d.new_empty(m, hidden)


@torch.library.custom_op("gptk::triton_matmul_dgelu", mutates_args=())
def matmul_dgelu_op(dy: Tensor, w_proj: Tensor, preact: Tensor, approximate: str) -> Tensor:
    """dH = (dy @ W_proj) * gelu'(H) for dy [M, C], W_proj [C, 4C], H [M, 4C]."""
    return matmul_dgelu(dy, w_proj, preact, approximate)


@matmul_dgelu_op.register_fake
def _(dy, w_proj, preact, approximate):
    return preact.new_empty(dy.shape[0], w_proj.shape[1])


def _setup_context(ctx, inputs, output):
    x2d, w_fc, b_fc, w_proj, b_proj, approximate = inputs
    _, preact, act = output
    ctx.save_for_backward(x2d, w_fc, w_proj, preact, act)
    ctx.approximate = approximate
    # H and G are outputs only so that they can be saved; they take no gradient, and
    # without materialized grads autograd does not allocate two [M, 4C] zero tensors for
    # them. The backward therefore runs only when y receives a gradient.
    ctx.mark_non_differentiable(preact, act)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dpreact, _dact):
    x2d, w_fc, w_proj, preact, act = ctx.saved_tensors
    need_x, need_w_fc, need_b_fc, need_w_proj, need_b_proj, _ = ctx.needs_input_grad
    dx = dw_fc = db_fc = dw_proj = db_proj = None
    if need_w_proj:
        dw_proj = dy.t() @ act
    if need_b_proj:
        db_proj = dy.sum(0, dtype=torch.float32).to(dy.dtype)  # fp32 accumulation
    if need_x or need_w_fc or need_b_fc:
        dpreact = torch.ops.gptk.triton_matmul_dgelu(dy, w_proj, preact, ctx.approximate)
        if need_x:
            dx = dpreact @ w_fc
        if need_w_fc:
            dw_fc = dpreact.t() @ x2d
        if need_b_fc:
            db_fc = dpreact.sum(0, dtype=torch.float32).to(dpreact.dtype)
    return dx, dw_fc, db_fc, dw_proj, db_proj, None


_mlp_gelu = differentiable(mlp_gelu_fwd, _backward, _setup_context)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate):
    """The `triton` backend's `mlp_gelu` (see `kernels.ops.mlp_gelu`): x [..., C], every
    tensor in one dtype (the op's canonical form guarantees it)."""
    y, _, _ = _mlp_gelu(x.reshape(-1, x.shape[-1]), w_fc, b_fc, w_proj, b_proj, approximate)
    return y.view(*x.shape[:-1], w_proj.shape[0])
