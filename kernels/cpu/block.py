"""A whole GPT-2 block as one autograd node: how `gpt.model.Block` trains on the CPU in bf16
when every op of the block would run on the torch backend and the block is exactly the
model's own (`gpt.model.Block.runs_as_written`: its own module types, forwards and no
module hooks; `GPTConfig.cpu_fused_block=False` turns it off).

Why: at the CPU seed run's sizes (12 x 64 tokens, 128 channels) an iteration spends about a
fifth of its time on fixed per-op costs rather than arithmetic (on the module path, the
same step at 1 x 8 tokens still took 5.9 of ~26 ms). Eager autograd records ~40 nodes per
block (the dtype casts autocast inserts, views, transposes, the residual adds, each
Linear's addmm) and runs each through the engine. Here the forward calls the ATen ops the
module path calls, in the same order, and the backward calls their backward ops directly:
one node per block, the same numbers bit for bit (tests/test_cpu_block.py compares the
two), each LayerNorm with its own eps. The seed run's training step is 4-7 % faster (2-core EPYC, torch 2.14; 400 steps
interleaved with the module path's in one process, 5 of 6 runs; the sixth, on a quiet
machine, showed none).

Forward, per block; x is the fp32 residual stream, every matmul runs in bf16 (weights
cast as autocast would), LayerNorm in fp32 (as autocast runs it):
    h1 = LN1(x)            qkv = h1 Wa^T + ba           y = attention(q, k, v)
    a = dropout(y Wp^T + bp)                             r = x + a
    h2 = LN2(r)            f = h2 Wfc^T + bfc           g = GELU(f)
    m = dropout(g Wfp^T + bfp)                           out = r + m
Backward, given dout (dW = dY^T X and db = sum(dY) for each Linear Y = X W^T + b, whose
input gradient is dX = dY W; the residual adds pass their gradient to both inputs):
    dm = dropout(dout)      dg = dm Wfp      df = GELU'(f) * dg      dh2 = df Wfc
    dr = LN2'(dh2) + dout   da = dropout(dr) dy = da Wp      (dq, dk, dv) = attention'(dy)
    dh1 = dqkv Wa           dx = LN1'(dh1) + dr
The dropout masks are drawn in the module path's order (attention, then the two residual
branches, each with its own module's probability), so a seeded run draws the same ones
whichever path it takes. The backward computes only what autograd asks for
(`ctx.needs_input_grad`: a frozen layer costs no weight gradients, a block with nothing
trainable below a stage stops there), and it is not itself differentiable: a second
derivative through it raises (`kernels.once`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kernels.backends import resolve_name
from kernels.cpu import attention
from kernels.cpu.dropout import keep_mask
from kernels.once import once_differentiable

aten = torch.ops.aten
DTYPE = torch.bfloat16
# The ops a block is made of: the path stands in for them only where each would run on
# the torch backend anyway.
BLOCK_OPS = ("layer_norm", "add_layer_norm", "mlp_gelu", "causal_attention")
# The order of a block's parameters here, and their positions among its 12.
PARAMS = ("ln1_w", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b",
          "ln2_w", "ln2_b", "fc_w", "fc_b", "fc_proj_w", "fc_proj_b")
LN1, ATTN, PROJ, LN2, FC, FC_PROJ = 0, 2, 4, 6, 8, 10  # each stage's first parameter


def applies(x: torch.Tensor, params: list[torch.Tensor], backend: str) -> bool:
    """Whether a block's training forward can take this path numerically: CPU, grad
    enabled, bf16 autocast over fp32 parameters and residual stream, a sequence
    `attention` takes, the torch backend for every op of the block, and not under
    torch.compile (which fuses the module path itself)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3
            and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == DTYPE
            and 0 < x.shape[1] <= attention.MAX_SEQ and x.shape[0] > 0
            and not torch.compiler.is_compiling()
            and all(p is None or p.dtype == torch.float32 for p in params)
            and all(resolve_name(op, backend, x.device) == "torch" for op in BLOCK_OPS))


def fused_block(x, params: list, *, n_head: int, dropout: tuple[float, float, float],
                gelu_approximate: str, eps: tuple[float, float], backend: str,
                as_written: Callable[[], bool]):
    """The block's output for x (B, T, C) in fp32 as one autograd node, or None where this
    path does not apply and the caller runs its modules instead.

    params: the 12 parameters in `PARAMS` order (biases may be None: bias=False);
    dropout: the attention's, the attention branch's and the MLP branch's probability (0
    where one is off); eps: ln_1's and ln_2's; as_written(): whether the block's modules
    compute exactly the ops this path stands in for (asked last, only where `applies`, so
    that GPU and inference calls never pay for the walk over the modules)."""
    if not applies(x, params, backend) or not as_written():
        return None
    return _TransformerBlock.apply(x, (n_head, dropout, gelu_approximate, eps), *params)


class _TransformerBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, settings, ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b,
                ln2_w, ln2_b, fc_w, fc_b, fc_proj_w, fc_proj_b):
        n_head, (attn_p, proj_p, mlp_p), gelu_approximate, (eps1, eps2) = settings
        B, T, C = x.shape
        H, D = n_head, C // n_head
        scale = D ** -0.5
        with torch.autocast("cpu", enabled=False):
            wa, ba, wp, bp, wfc, bfc, wfp, bfp = (
                None if t is None else t.to(DTYPE)
                for t in (attn_w, attn_b, proj_w, proj_b, fc_w, fc_b, fc_proj_w, fc_proj_b))
            x2 = x.reshape(B * T, C)
            h1, mean1, rstd1 = aten.native_layer_norm(x2, [C], ln1_w, ln1_b, eps1)
            h1 = h1.to(DTYPE)
            # q, k, v as dense (B*H, T, D) heads: one copy out of the projection's layout.
            qkv = _linear(h1, wa, ba)
            q3, k3, v3 = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4) \
                .reshape(3, B * H, T, D).unbind(0)
            keep = keep_mask((B * H, T, T), attn_p) if attn_p > 0.0 else None
            heads, probs = attention.forward(q3, k3, v3, scale, keep, attn_p)
            y = heads.view(B, H, T, D).transpose(1, 2).reshape(B * T, C)
            attn_drop = _dropout_scale((B * T, C), proj_p)
            r = x2 + _apply(_linear(y, wp, bp), attn_drop)
            h2, mean2, rstd2 = aten.native_layer_norm(r, [C], ln2_w, ln2_b, eps2)
            h2 = h2.to(DTYPE)
            f = _linear(h2, wfc, bfc)
            g = F.gelu(f, approximate=gelu_approximate)
            mlp_drop = _dropout_scale((B * T, C), mlp_p)
            out = r + _apply(_linear(g, wfp, bfp), mlp_drop)
        ctx.save_for_backward(x2, mean1, rstd1, h1, q3, k3, v3, probs, keep, y, attn_drop,
                              r, mean2, rstd2, h2, f, g, mlp_drop,
                              ln1_w, ln1_b, ln2_w, ln2_b, wa, wp, wfc, wfp)
        ctx.shape, ctx.n_head, ctx.scale = (B, T, C), H, scale
        ctx.attn_p, ctx.gelu_approximate = attn_p, gelu_approximate
        return out.view(B, T, C)

    @staticmethod
    @once_differentiable("kernels.cpu.fused_block (the CPU one-node transformer block; "
                         "GPTConfig.cpu_fused_block=False trains through the modules)")
    def backward(ctx, dout):
        with torch.autocast("cpu", enabled=False):  # a backward run inside autocast, too
            return _TransformerBlock._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        (x2, mean1, rstd1, h1, q3, k3, v3, probs, keep, y, attn_drop, r, mean2, rstd2, h2, f, g,
         mlp_drop, ln1_w, ln1_b, ln2_w, ln2_b, wa, wp, wfc, wfp) = ctx.saved_tensors
        (B, T, C), H = ctx.shape, ctx.n_head
        D = C // H
        need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grads = [None] * len(PARAMS)

        def below(stage: int) -> bool:
            """Whether anything the stage starting at parameter `stage` reads from needs
            a gradient: the stages before it, or x. Once false, the backward is done."""
            return need_x or any(need[:stage])

        def done(dx=None):
            # Stopping early means x needs no gradient either. The parameters' gradients
            # are returned in their own dtype (fp32), as autocast's casts return them.
            return (dx if dx is None else dx.view(B, T, C), None,
                    *(None if t is None else t.float() for t in grads))

        dout = dout.reshape(B * T, C)
        # MLP branch: out = r + dropout(g Wfp^T + bfp).
        dm = _apply(dout.to(DTYPE), mlp_drop)
        grads[FC_PROJ], grads[FC_PROJ + 1], dg = _linear_backward(dm, g, wfp, need[FC_PROJ:],
                                                                  below(FC_PROJ))
        if dg is None:
            return done()
        df = aten.gelu_backward(dg, f, approximate=ctx.gelu_approximate)
        grads[FC], grads[FC + 1], dh2 = _linear_backward(df, h2, wfc, need[FC:], below(FC))
        if dh2 is None:
            return done()
        dr, grads[LN2], grads[LN2 + 1] = aten.native_layer_norm_backward(
            dh2.float(), r, [C], mean2, rstd2, ln2_w, ln2_b,
            [below(LN2), need[LN2], need[LN2 + 1]])
        if dr is None:
            return done()
        dr += dout
        # Attention branch: r = x + dropout(y Wp^T + bp).
        da = _apply(dr.to(DTYPE), attn_drop)
        grads[PROJ], grads[PROJ + 1], dy = _linear_backward(da, y, wp, need[PROJ:], below(PROJ))
        if dy is None:
            return done()
        dheads = dy.view(B, T, H, D).transpose(1, 2).reshape(B * H, T, D)
        dq, dk, dv = attention.backward(dheads, q3, k3, v3, probs, keep, ctx.attn_p,
                                        ctx.scale)
        dqkv = pack_heads(*(t.view(B, H, T, D) for t in (dq, dk, dv)))
        grads[ATTN], grads[ATTN + 1], dh1 = _linear_backward(
            dqkv.view(B * T, 3 * C), h1, wa, need[ATTN:], below(ATTN))
        if dh1 is None:
            return done()
        dx, grads[LN1], grads[LN1 + 1] = aten.native_layer_norm_backward(
            dh1.float(), x2, [C], mean1, rstd1, ln1_w, ln1_b, [need_x, need[LN1], need[LN1 + 1]])
        return done(None if dx is None else dx.add_(dr))


def pack_heads(q, k, v, dtype=None):
    """Three (B, H, T, D) tensors -> (B, T, 3*H*D) in a qkv projection's layout (the
    (B, T, 3, H, D) order): one strided pass per tensor."""
    B, H, T, D = q.shape
    packed = q.new_empty((B, T, 3, H, D), dtype=dtype)
    for i, t in enumerate((q, k, v)):
        packed[:, :, i].copy_(t.transpose(1, 2))
    return packed.view(B, T, 3 * H * D)


def _linear(x, w, b):
    """x W^T + b, as F.linear computes it for a 2-D x."""
    return x.mm(w.t()) if b is None else torch.addmm(b, x, w.t())


def _linear_backward(dy, x, w, need: tuple[bool, ...], need_input: bool):
    """(dW, db, dX) of Y = x W^T + b, each None where it is not needed (`need`: whether
    W's and b's gradients are; a missing bias never is)."""
    return (dy.t().mm(x) if need[0] else None, dy.sum(0) if need[1] else None,
            dy.mm(w) if need_input else None)


def _dropout_scale(shape, p: float):
    """The residual branch's dropout as nn.Dropout on the CPU applies it (gpt.model.Dropout):
    a bf16 tensor of 0 and 1 / (1 - p), or None without dropout."""
    if p == 0.0:
        return None
    return keep_mask(shape, p).to(DTYPE).mul_(1.0 / (1.0 - p))


def _apply(t, scale):
    return t if scale is None else t * scale
