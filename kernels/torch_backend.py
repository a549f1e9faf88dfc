"""The `torch` backend: each op through PyTorch's own fused built-ins.

This is the CPU fallback and the baseline the other backends are measured against. It
must agree with `kernels.reference` (the tests check it), but it is written for speed:
`F.layer_norm`, `F.gelu(approximate="tanh")`, `F.scaled_dot_product_attention` (which
picks flash / memory-efficient / math kernels itself) and `F.cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.chunked_linear_cross_entropy import linear_cross_entropy
from kernels.reference import causal_mask


def layer_norm(x, weight, bias=None, eps=1e-5):
    if weight.dtype != x.dtype:  # the residual stream may be fp32 while weights are not
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5):
    summed = x + residual
    return summed, layer_norm(summed, weight, bias, eps)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj):
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh"), w_proj, b_proj)


def causal_attention(q, k, v, scale=None, dropout_p=0.0):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              dropout_p=dropout_p)
    # Queries are the last t_q positions (decoding with a KV cache): bottom-right mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device),
                                          scale=scale, dropout_p=dropout_p)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=ignore_index, reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses


OPS = {
    "layer_norm": layer_norm,
    "add_layer_norm": add_layer_norm,
    "mlp_gelu": mlp_gelu,
    "causal_attention": causal_attention,
    "cross_entropy": cross_entropy,
    "linear_cross_entropy": linear_cross_entropy,
}
