"""The `torch` backend: each op through PyTorch's own fused built-ins.

This is the CPU fallback and the baseline the other backends are measured against. It
implements every op of `kernels.specs` and supports every legal call (`unsupported` is
always None), so `auto` always has somewhere to go. It must agree with
`kernels.reference` (the conformance suite checks it), but it is written for speed:
`F.layer_norm`, `F.gelu`, `F.scaled_dot_product_attention` (which picks flash /
memory-efficient / math kernels itself; on the CPU, short bf16 sequences take the batched
matmuls of `kernels.cpu.attention` instead), `F.cross_entropy`, and the chunked linear +
cross-entropy of `kernels.chunked_linear_cross_entropy` (eager linear + cross-entropy when
the logits fit in one chunk). Attention dropout draws its masks from torch's generators
(SDPA's own, or `kernels.cpu.dropout`'s on the CPU path), except in a call that names its
mask by a dropout_seed: there the probabilities are materialized and dropped by the mask
`kernels.philox` defines for that seed, the one every backend applies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import chunked_linear_cross_entropy as chunked
from kernels import losses, philox, reference
from kernels.cpu import attention as cpu_attention
from kernels.reference import causal_mask
from kernels.specs import OPS as SPEC_OPS


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def layer_norm(x, weight, bias, eps):
    if x.dtype in _LOW_PRECISION and x.is_cpu:
        # PyTorch's CPU kernel reduces a 16-bit LayerNorm's weight and bias gradients in
        # 16 bits (~1e-2 relative error over a few thousand rows): compute in fp32, as
        # every other backend does, and round the output once.
        return layer_norm(x.float(), weight.float(), _float(bias), eps).to(x.dtype)
    if weight.dtype != x.dtype:  # the residual stream may be fp32 while weights are not
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _float(t):
    return None if t is None else t.float()


def add_layer_norm(x, residual, weight, bias, eps):
    summed = x + residual
    return summed, layer_norm(summed, weight, bias, eps)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate):
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate=approximate), w_proj, b_proj)


def causal_attention(q, k, v, scale, dropout_p, dropout_seed=None):
    if dropout_p > 0.0 and dropout_seed is not None:
        return _attention_with_seeded_dropout(q, k, v, scale, dropout_p, dropout_seed)
    q_shape, k_shape = q.shape, k.shape  # each attribute read once: ~0.1-0.3 us a read
    if 0 in q_shape or 0 in k_shape:
        # SDPA's cuDNN path returns an undefined tensor (None in Python) for an empty batch
        # in 16-bit (seen on an H200, torch 2.11); the reference's math is free when empty.
        return reference.causal_attention(q, k, v, scale, dropout_p)
    on_cpu, low_precision = q.is_cpu, q.dtype in _LOW_PRECISION
    if on_cpu and low_precision and cpu_attention.applies(q, k):
        return cpu_attention.causal_attention(q, k, v, scale, dropout_p)
    if scale is not None and scale <= 0.0:
        # SDPA returns NaN rows for a scale of 0 or below (its CPU kernels, torch 2.14:
        # the masked -inf times the scale); the reference's math is explicit and fp32.
        return reference.causal_attention(q, k, v, scale, dropout_p)
    if on_cpu and low_precision:
        # SDPA in fp32, for every 16-bit CPU call that reaches it: its 16-bit kernels round
        # what FlashAttention keeps in fp32 (on scores in the tens, bf16 gradients off by
        # more than their own size in some rows, where fp32 then rounded is exact to the
        # bf16 result), and for short sequences their backward is 3-4x slower than the fp32
        # one too (torch 2.14, 2-core EPYC, (12, 4, 64, 32) forward and backward: fp16 6.3
        # vs 1.6 ms, bf16 4.3 vs 1.3 ms); from ~512 positions the two cost the same, plus
        # the casts. Short bf16 training calls took `cpu_attention` above.
        return causal_attention(q.float(), k.float(), v.float(), scale, dropout_p).to(q.dtype)
    if q.is_cuda:
        q, k, v = _sdpa_aligned(q), _sdpa_aligned(k), _sdpa_aligned(v)
    t_q, t_k = q_shape[-2], k_shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              dropout_p=dropout_p)
    # Queries are the last t_q positions (decoding with a KV cache): bottom-right mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_q, t_k, q.device),
                                          scale=scale, dropout_p=dropout_p)


def _attention_with_seeded_dropout(q, k, v, scale, dropout_p, dropout_seed):
    """Attention whose dropout mask is dropout_seed's (`kernels.philox`), the one every
    backend applies for it: SDPA draws its own, so the (T_q, T_k) probabilities are
    materialized (as eager attention does), in fp32 for 16-bit inputs."""
    compute = torch.promote_types(q.dtype, torch.float32)
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    scores = scores.masked_fill(~causal_mask(t_q, t_k, q.device), float("-inf"))
    keep = philox.keep_mask(dropout_seed, dropout_p, *scores.shape, device=q.device)
    dropped = torch.softmax(scores, dim=-1) * keep
    return (torch.matmul(dropped, v.to(compute)) * (1.0 / (1.0 - dropout_p))).to(q.dtype)


# SDPA's fused CUDA kernels load 16-byte vectors: each tensor must start on a 16-byte
# boundary, with unit stride along the head dim and every other stride a whole number of
# 16-byte vectors. Torch 2.11 does not check all of this: on an H200 a view starting one
# element into its storage (fp32) raised "misaligned address", and rows padded to 35
# elements (fp16) returned wrong values. Such views are copied; the model's q, k and v
# (views into the qkv projection) pass through untouched when a head is a whole number
# of 16-byte vectors, as in every GPT-2 size (64 x 2 bytes).
_SDPA_ALIGNMENT_BYTES = 16


def is_sdpa_aligned(t) -> bool:
    """Whether SDPA's fused kernels can take `t` as it is laid out (any device)."""
    size = t.element_size()
    vector_strides = t.stride(-1) == 1 and all(s * size % _SDPA_ALIGNMENT_BYTES == 0
                                               for s in t.stride()[:-1])
    # A dense tensor passes whatever its head dim: SDPA pads odd head dims itself.
    return t.data_ptr() % _SDPA_ALIGNMENT_BYTES == 0 and (t.is_contiguous() or vector_strides)


def _sdpa_aligned(t):
    # Under torch.compile, Inductor's SDPA lowering imposes its own alignment (and
    # data_ptr() is not traceable).
    if torch.compiler.is_compiling() or is_sdpa_aligned(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def cross_entropy(logits, targets, ignore_index, reduction, label_smoothing=0.0, z_loss=0.0,
                  softcap=0.0, return_z_loss=False):
    # (N, V) logits and (N,) int64 targets, the common case, go to F.cross_entropy as they
    # are: a no-op reshape is a dispatcher round trip (~0.5 us).
    flat_targets = losses.flat_int64_targets(targets)
    rows = logits if logits.dim() == 2 else \
        logits.reshape(flat_targets.numel(), logits.shape[-1])
    rows = _at_least_fp32(rows)
    if _may_ignore_rows(flat_targets, ignore_index):
        # An ignored row is ignored whatever its logits: F.cross_entropy would give a row
        # of -inf a NaN gradient (softmax 0/0) even though it does not count.
        rows = torch.where((flat_targets != ignore_index).unsqueeze(1), rows, 0.0)
    if softcap:
        rows = softcap * torch.tanh(rows / softcap)
    plain = not (z_loss or return_z_loss)
    loss = F.cross_entropy(rows, flat_targets, ignore_index=ignore_index,
                           reduction=reduction if plain else "none",
                           label_smoothing=label_smoothing)
    if plain:
        return loss.view(targets.shape) if reduction == "none" else loss
    # The z-loss needs each row's log-sum-exp: F.cross_entropy keeps its own to itself.
    lse = torch.logsumexp(rows, dim=-1)
    if z_loss:
        loss = loss + torch.where(flat_targets != ignore_index, z_loss * lse.square(), 0.0)
    loss = losses.reduce_losses(loss, flat_targets, ignore_index, reduction)
    return losses.finish(loss, lse, targets, ignore_index, reduction,
                         losses.LossVariant(label_smoothing, z_loss, softcap), return_z_loss)


def _may_ignore_rows(targets, ignore_index: int) -> bool:
    """Whether some target may be ignore_index (targets already range-checked: each is a
    class or ignore_index). On the CPU, reading the answer costs no device sync, and the
    usual call (ignore_index < 0, every target a class) is told in one reduction, ~1 us,
    where masking the logits costs ~5 us and a copy of them. On a GPU, and in a compiled
    graph, the masking is queued instead of waiting for an answer."""
    if not targets.is_cpu or torch.compiler.is_compiling() or not targets.numel():
        return True
    return ignore_index >= 0 or targets.min().item() < 0


def linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, label_smoothing=0.0,
                         z_loss=0.0, softcap=0.0, return_z_loss=False):
    rows = x.numel() // max(1, x.shape[-1])
    variant = (label_smoothing, z_loss, softcap, return_z_loss)
    if rows * weight.shape[0] <= chunked.SINGLE_CHUNK_LOGITS and \
            x.dtype in (torch.float32, torch.float64):
        # Logits no larger than one chunk: eager's linear and cross-entropy hold no more
        # memory than the chunk loop would, without its Python (at the CPU seed run's
        # 768 x 65 logits, 0.4 ms of a 0.8 ms forward and backward). Not in 16 bits:
        # eager's backward rounds the loss's gradient (upstream / N) to 16 bits with
        # every entry of dlogits, so every gradient carries that one rounding, a bias of
        # up to 0.2 % in bf16; the chunk loop applies the scale in fp32 after its GEMMs.
        return cross_entropy(F.linear(x, weight, bias), targets, ignore_index, reduction,
                             *variant)
    return chunked.linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction,
                                        *variant)


def _at_least_fp32(t):
    """The loss math runs in fp32 for 16-bit inputs (and stays fp64 for fp64 ones)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# Every declared op, by name (a KeyError here: an op without a torch version).
OPS = {op: globals()[op] for op in SPEC_OPS}


# SDPA's kernels, by the name `auto`'s routes (`kernels.routing`) and the benchmarks give
# them: SDPA tries the preferred one first, then its usual order, so every call still runs.
SDPA_KERNELS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def causal_attention_preferring(kernel: str):
    """causal_attention with SDPA trying `kernel` (a key of SDPA_KERNELS) first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = list(dict.fromkeys(getattr(SDPBackend, name) for name in
                               (SDPA_KERNELS[kernel], *SDPA_KERNELS.values())))

    def attention(q, k, v, scale, dropout_p, dropout_seed=None):
        with sdpa_kernel(order, set_priority=True):
            return causal_attention(q, k, v, scale, dropout_p, dropout_seed)
    attention.__name__ = f"causal_attention_preferring_{kernel.replace('-', '_')}"
    return attention


# Implementations of an op besides OPS[op] that a route may name ("torch:<variant>").
VARIANTS = {"causal_attention": {name: causal_attention_preferring(name)
                                 for name in SDPA_KERNELS}}

__all__ = ["OPS", "SDPA_KERNELS", "VARIANTS", "add_layer_norm", "causal_attention",
           "causal_attention_preferring", "cross_entropy", "layer_norm",
           "linear_cross_entropy", "mlp_gelu", "unsupported"]


def unsupported(call) -> None:
    """Every legal call runs here."""
    return None
