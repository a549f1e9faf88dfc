"""Reference implementation of every op: the specification the kernels are tested against.

Each function writes its op's math out with elementary tensor operations (no fused
PyTorch built-ins), so that it reads as the definition, is differentiable by autograd
(and `gradcheck`-able in fp64), and is independent of the `torch` backend, which uses
PyTorch's fused built-ins. Statistics and reductions run in fp32 whatever the input
dtype; outputs come back in the input dtype (losses in fp32).

Shapes (C = channels, V = vocabulary, D = head dim):
- layer_norm(x[..., C], weight[C] | None, bias[C] | None)               -> [..., C]
- add_layer_norm(x[..., C], residual[..., C], weight, bias)             -> (x + residual, its layer_norm)
- mlp_gelu(x[..., C], w_fc[H, C], b_fc[H], w_proj[C, H], b_proj[C], approximate) -> [..., C]
  (nn.Linear weight layout; GELU between the two linears: GPT-2's tanh approximation,
   approximate="tanh", or the exact erf form, approximate="none", as nanoGPT's nn.GELU())
- causal_attention(q[B, h, Tq, D], k[B, h, Tk, D], v[B, h, Tk, D])      -> [B, h, Tq, D]
  (Tk >= Tq; the causal mask is aligned to the bottom-right corner, so query i
   sees keys 0 .. i + Tk - Tq, which is what decoding with a KV cache needs)
  With dropout_p > 0 the probabilities are dropped by the mask `kernels.philox.keep_mask`
  builds from dropout_seed = (seed, offset) and the kept ones scaled by 1 / (1 - p)
  (without a dropout_seed, by a random mask: such a call has no single right answer).
- cross_entropy(logits[..., V], targets[...])                           -> scalar or [...]
  with the loss variants: logits soft-capped to softcap * tanh(logits / softcap) first
  (Gemma 2), label smoothing as F.cross_entropy's, and the z-loss z_loss * lse^2 added
  per row (PaLM); with return_z_loss the reduced z-loss term comes back too, detached
  (a value to log: its gradient is already in the loss's).
- linear_cross_entropy(x[..., C], weight[V, C], targets[...], bias[V])  -> cross_entropy(x @ weight.T + bias)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import philox


def _wide(t):
    """t in fp32, or fp64 if it already is (so fp64 gradcheck stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm(x, weight, bias=None, eps=1e-5):
    xf = _wide(x)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)  # biased, as nn.LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:  # None: no gain, as F.layer_norm takes it
        y = y * _wide(weight)
    if bias is not None:
        y = y + _wide(bias)
    return y.to(x.dtype)


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5):
    summed = x + residual
    return summed, layer_norm(summed, weight, bias, eps)


def gelu_tanh(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def gelu_exact(x):
    """The exact GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + torch.erf(x * math.sqrt(0.5)))


def gelu(x, approximate="tanh"):
    return gelu_tanh(x) if approximate == "tanh" else gelu_exact(x)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate="tanh"):
    hidden = F.linear(x, w_fc, b_fc)
    return F.linear(gelu(_wide(hidden), approximate).to(hidden.dtype), w_proj, b_proj)


def causal_mask(t_q, t_k, device):
    """True where query i may attend key j: j <= i + (t_k - t_q) (bottom-right aligned)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def causal_attention(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (_wide(q) @ _wide(k).transpose(-2, -1)) * scale
    scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = dropout(probs, dropout_p, dropout_seed)
    return (probs @ _wide(v)).to(q.dtype)


def dropout(probs, p, dropout_seed=None):
    """Attention dropout of (B, H, T_q, T_k) probabilities: the mask of dropout_seed
    (`kernels.philox`), kept elements scaled by 1 / (1 - p); a random mask without one."""
    if dropout_seed is None:
        return F.dropout(probs, p=p)
    keep = philox.keep_mask(dropout_seed, p, *probs.shape, device=probs.device)
    return probs * keep / (1.0 - p)


def soft_cap(logits, cap):
    """cap * tanh(logits / cap) (Gemma 2's logit soft-capping); cap None or 0: logits."""
    return logits if not cap else cap * torch.tanh(logits / cap)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, return_z_loss=False):
    """Per row with target t, on z = soft_cap(logits, softcap) and lse = logsumexp(z):
        (1 - label_smoothing) (lse - z_t) + label_smoothing * mean_j (lse - z_j)
        + z_loss * lse^2.
    A row whose target is ignore_index is ignored whatever its logits (all -inf, say): it
    counts 0, its gradient is exactly 0, and the mean leaves it out."""
    flat_targets = targets.reshape(-1).long()
    keep = flat_targets != ignore_index
    logits = _wide(logits.reshape(flat_targets.numel(), logits.shape[-1]))
    z = soft_cap(torch.where(keep.unsqueeze(1), logits, 0.0), softcap)
    if z.shape[1]:
        picked = z.gather(1, torch.where(keep, flat_targets, 0).unsqueeze(1)).squeeze(1)
    else:  # no classes: every target is ignored (the op's checks see to it)
        picked = z.sum(dim=1)
    lse = torch.logsumexp(z, dim=-1)
    losses = lse - picked
    if label_smoothing:  # (a -inf logit makes this term +inf, as in F.cross_entropy)
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (lse - z.mean(dim=-1))
    z_terms = z_loss * lse.square() if z_loss else torch.zeros_like(lse)
    losses = losses + z_terms
    loss = _reduce(torch.where(keep, losses, 0.0), keep, targets.shape, reduction)
    if not return_z_loss:
        return loss
    return loss, _reduce(torch.where(keep, z_terms, 0.0), keep, targets.shape, reduction).detach()


def _reduce(losses, keep, shape, reduction):
    if reduction == "none":
        return losses.view(shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum()  # NaN when every target is ignored, as in torch


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None,
                         return_z_loss=False):
    return cross_entropy(F.linear(x, weight, bias), targets, ignore_index, reduction,
                         label_smoothing, z_loss, softcap, return_z_loss)
