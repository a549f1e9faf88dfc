"""Causal attention for short sequences on the CPU: three batched matmuls and a softmax,
with a hand-written backward. The `torch` backend's CPU path for bf16 training.

Why not SDPA: PyTorch's CPU flash attention walks each (batch, head) in 32-query blocks
and calls a small GEMM per block, so at the CPU seed run's (12, 4, 64, 32) it spends its
time in per-call overhead: 1.3-1.7 ms forward and backward in fp32, 3x more in bf16,
whose backward converts every block. Here all B*H heads go through one `bmm` per product:
0.9-1.2 ms in bf16 (torch 2.14, 2-core EPYC), and no casts to and from fp32 around it.
It makes the seed run's whole training step 3-6 % faster (18 % with dropout 0.1), measured
side by side in one process.
The price is the (B*H, T, T) probabilities, held for the backward as eager attention
holds them; `MAX_SEQ` bounds it, and longer sequences go to SDPA.

Forward, per head (S: scores, P: probabilities, M: -inf above the diagonal):
    S = scale * Q K^T + M        P = softmax(S)        O = dropout(P) V
Backward, given dO (dropout reuses the forward's mask Z, scaled by 1 / (1 - p)):
    dV = dropout(P)^T dO
    dP = dropout(dO V^T) = (dO V^T) * Z
    dS = P * (dP - rowsum(dP * P))          (softmax's Jacobian: `_softmax_backward_data`)
    dQ = scale * dS K        dK = scale * dS^T Q
The numerics are FlashAttention's: S, the softmax, dP and dS are fp32 (from bf16
operands), and only what enters a bf16 product is rounded to bf16: P for P V and dV, dS
for dQ and dK. Eager bf16 attention (nanoGPT's non-flash path) rounds S too, which with
scores in the tens loses the probabilities: one bf16 ulp of a score of 64 is 0.25, a 28 %
change of its probability.
"""
from __future__ import annotations

import functools

import torch

from kernels.cpu.dropout import keep_mask
from kernels.once import once_differentiable

# Longest sequence this path takes. Its (B*H, T, T) probabilities stay alive for the
# backward, as in eager attention: 128 KiB per head in bf16 at T = 256, where it runs
# within 10% of SDPA (fp32, forward and backward: (12, 4, 256, 32) 15.1 vs 13.7 ms,
# (64, 6, 256, 64) 204 vs 227 ms); at T = 512 SDPA is 12% faster.
MAX_SEQ = 256


def applies(q, k) -> bool:
    """Whether a causal_attention call takes this path: bf16 on the CPU, a square causal
    mask (no KV cache), and a sequence no longer than MAX_SEQ; not under torch.compile,
    which cannot trace the numpy-drawn dropout masks and lowers SDPA itself."""
    return (q.dtype == torch.bfloat16 and q.is_cpu
            and q.shape[-2] == k.shape[-2] <= MAX_SEQ and not torch.compiler.is_compiling())


def causal_attention(q, k, v, scale: float, dropout_p: float = 0.0):
    """dropout(softmax(scale * q k^T, causal)) v for (B, H, T, D) tensors of any strides."""
    return _BatchedCausalAttention.apply(q, k, v, scale, dropout_p)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B*H, T, D): a view when the heads are dense, else one copy."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


@functools.lru_cache(maxsize=8)
def _causal_bias(t: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above; broadcast over the heads. Cached:
    read-only, and made once per sequence length instead of once per layer and step (an
    ordinary tensor even when first made under inference_mode, so training can use it)."""
    with torch.inference_mode(False):
        return torch.full((t, t), float("-inf"), dtype=dtype).triu_(1)


class _BatchedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, dropout_p):
        b, h, t, d = q.shape
        q3, k3, v3 = _heads(q), _heads(k), _heads(v)
        keep = keep_mask(q3.shape[:1] + (t, t), dropout_p) if dropout_p > 0.0 else None
        with torch.autocast("cpu", enabled=False):  # the dtype is chosen by the caller
            out, probs = forward(q3, k3, v3, scale, keep, dropout_p)
        ctx.save_for_backward(q3, k3, v3, probs, keep)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        return out.view(b, h, t, d)

    @staticmethod
    @once_differentiable("the torch backend's CPU causal attention (kernels.cpu.attention, "
                         "bf16 on the CPU; fp32 takes PyTorch's own)")
    def backward(ctx, grad_out):
        q3, k3, v3, probs, keep = ctx.saved_tensors
        shape = grad_out.shape
        grads = backward(_heads(grad_out), q3, k3, v3, probs, keep, ctx.dropout_p, ctx.scale,
                         ctx.needs_input_grad[:3])
        return (*(None if g is None else g.view(shape) for g in grads), None, None)


def forward(q3, k3, v3, scale: float, keep, dropout_p: float):
    """(out, probs) for dense (B*H, T, D) heads; `keep`: the dropout mask or None; probs
    are the fp32 probabilities (the backward's), out is in q's dtype."""
    t = q3.shape[1]
    scores = torch.baddbmm(_causal_bias(t, torch.float32), q3.float(),
                           k3.float().transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(_dropout(probs, keep, dropout_p).to(v3.dtype), v3), probs


def backward(do3, q3, k3, v3, probs, keep, dropout_p: float, scale: float,
             needed=(True, True, True)):
    """(dq, dk, dv) as (B*H, T, D) given dO and what `forward` saw and returned; None for
    those not `needed`."""
    with torch.autocast("cpu", enabled=False):  # a backward run inside autocast, too
        return _backward(do3, q3, k3, v3, probs, keep, dropout_p, scale, needed)


def _backward(do3, q3, k3, v3, probs, keep, dropout_p, scale, needed):
    need_q, need_k, need_v = needed
    dtype = q3.dtype
    dv = torch.bmm(_dropout(probs, keep, dropout_p).to(dtype).transpose(1, 2), do3) \
        if need_v else None
    if not (need_q or need_k):
        return None, None, dv
    # Dropout's backward is dropout with the forward's mask. dP in fp32: dS = P (dP -
    # rowsum(dP P)) cancels, and a bf16 dP would leave it a few bits.
    dp = _dropout(torch.bmm(do3.float(), v3.float().transpose(1, 2)), keep, dropout_p)
    ds = torch._softmax_backward_data(dp, probs, -1, torch.float32).mul_(scale).to(dtype)
    return (torch.bmm(ds, k3) if need_q else None,
            torch.bmm(ds.transpose(1, 2), q3) if need_k else None, dv)


def _dropout(t, keep, p):
    """t with the dropped elements zeroed and the kept ones scaled by 1 / (1 - p) (as a
    float: a 16-bit scale would be rounded, biasing every kept element the same way)."""
    return t if keep is None else (t * keep).mul_(1.0 / (1.0 - p))
