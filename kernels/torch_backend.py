"""The `torch` backend: each op through PyTorch's own fused built-ins.

This is the CPU fallback and the baseline the other backends are measured against. It
implements every op of `kernels.specs` and supports every legal call (`unsupported` is
always None), so `auto` always has somewhere to go. It must agree with
`kernels.reference` (the conformance suite checks it), but it is written for speed:
`F.layer_norm`, `F.gelu`, `F.scaled_dot_product_attention` (which picks flash /
memory-efficient / math kernels itself), `F.cross_entropy`, and the chunked linear +
cross-entropy of `kernels.chunked_linear_cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.chunked_linear_cross_entropy import linear_cross_entropy
from kernels.reference import causal_mask
from kernels.specs import OPS as SPEC_OPS


def layer_norm(x, weight, bias, eps):
    if weight.dtype != x.dtype:  # the residual stream may be fp32 while weights are not
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps):
    summed = x + residual
    return summed, layer_norm(summed, weight, bias, eps)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate):
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate=approximate), w_proj, b_proj)


def causal_attention(q, k, v, scale, dropout_p):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              dropout_p=dropout_p)
    # Queries are the last t_q positions (decoding with a KV cache): bottom-right mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device),
                                          scale=scale, dropout_p=dropout_p)


def cross_entropy(logits, targets, ignore_index, reduction):
    losses = F.cross_entropy(_at_least_fp32(logits.reshape(-1, logits.shape[-1])),
                             targets.reshape(-1).long(), ignore_index=ignore_index,
                             reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses


def _at_least_fp32(t):
    """The loss math runs in fp32 for 16-bit inputs (and stays fp64 for fp64 ones)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# Every declared op, by name (a KeyError here: an op without a torch version).
OPS = {op: globals()[op] for op in SPEC_OPS}

__all__ = ["OPS", "add_layer_norm", "causal_attention", "cross_entropy", "layer_norm",
           "linear_cross_entropy", "mlp_gelu", "unsupported"]


def unsupported(call) -> None:
    """Every legal call runs here."""
    return None
