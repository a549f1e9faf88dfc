"""causal_attention: softmax(q k^T * scale, causal) v on (B, H, T, D).

k and v may be longer than q (decoding with a KV cache: the mask is aligned to the
bottom-right), and there may be attention dropout: dropout_p with dropout_seed, the
(seed, offset) pair whose mask `kernels.philox` defines (None: a fresh random mask per
call). Every backend runs both. Matmul inputs: under torch.autocast q, k, v are cast to
the autocast dtype.
"""
from __future__ import annotations

import math

import torch

from kernels import philox, reference
from kernels.specs import inputs as make
from kernels.specs.checks import check_float, same_device
from kernels.specs.core import OpSpec
from kernels.specs.inputs import Case, Inputs
from kernels.specs.mlp import autocast

PARAMS = ("q", "k", "v", "scale", "dropout_p", "dropout_seed")


def canonicalize(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
    # Each tensor attribute is read once: every op call runs this, and each read costs
    # ~0.1-0.3 us of host time.
    check_float("q", q)
    check_float("k", k)
    check_float("v", v)
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        name, shape = next((n, s) for n, s in (("q", q_shape), ("k", k_shape), ("v", v_shape))
                           if len(s) != 4)
        raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), "
                         f"got shape {tuple(shape)}")
    b, h, t_q, d = q_shape
    if k_shape != v_shape or k_shape[0] != b or k_shape[1] != h or k_shape[3] != d:
        raise ValueError(f"k and v must have shape ({b}, {h}, T_k, {d}) matching q, "
                         f"got k {tuple(k_shape)} and v {tuple(v_shape)}")
    if k_shape[2] < t_q:
        raise ValueError(f"k/v sequence length {k_shape[2]} is shorter than q's {t_q}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None:
        dropout_seed = philox.check_seed(dropout_seed)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    device = same_device(q=q, k=k, v=v)
    q, k, v = autocast(device, q, k, v)
    scale = d ** -0.5 if scale is None else float(scale)
    return SPEC.call((q, k, v, scale, float(dropout_p), dropout_seed), device)


def eager(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
    """nanoGPT's attention without flash, in the inputs' dtype: the (T, T) scores are
    materialized, masked, softmaxed, dropped out (with dropout_seed's mask) and multiplied
    by V."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = reference.causal_mask(q.shape[-2], k.shape[-2], q.device)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    if dropout_p > 0.0:
        probs = reference.dropout(probs, dropout_p, dropout_seed)
    return probs @ v


# ----------------------------------------------------------------------------- inputs

def _qkv_views(b, h, t, d, dtype, device, gen, scale):
    """q, k, v as the model makes them: strided views of one (B, T, 3, H, D) projection."""
    qkv = make.tensor((b, t, 3, h, d), dtype, device, gen, scale=scale)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _cache_slices(b, h, t_k, d, capacity, dtype, device, gen, scale):
    """k, v as the model's KV cache hands them over: the first t_k positions of
    (B, H, capacity, D) buffers."""
    return (make.tensor((b, h, capacity, d), dtype, device, gen, scale=scale)[:, :, :t_k]
            for _ in range(2))


def _case(name, b, h, t, d, layout="contiguous", t_k=None, scale=None, value_scale=1.0,
          qkv_view=False, cache_capacity=None, autocast_inputs=False, dropout_p=0.0,
          dropout_seed=None, dtypes=None):
    def build(dtype, device, gen):
        stored = torch.float32 if autocast_inputs else dtype
        if qkv_view:
            q, k, v = _qkv_views(b, h, t, d, stored, device, gen, value_scale)
        else:
            q = make.tensor((b, h, t, d), stored, device, gen, layout, scale=value_scale)
            if cache_capacity:
                k, v = _cache_slices(b, h, t_k, d, cache_capacity, stored, device, gen,
                                     value_scale)
            else:
                k, v = (make.tensor((b, h, t_k or t, d), stored, device, gen, layout,
                                    scale=value_scale) for _ in range(2))
        return Inputs((q, k, v, scale, dropout_p, dropout_seed), (0, 1, 2),
                      autocast=autocast_inputs)
    return Case(name, build, dtypes=dtypes)


# Dropout cases draw their mask from a given (seed, offset): every backend applies the mask
# kernels.philox defines for it, and the reference rebuilds the same.
SEED = (0x5EED_0F_A77E_4710, 7)


CASES = (
    _case("basic", 2, 3, 40, 32),
    _case("one_token", 2, 2, 1, 64),
    _case("empty_batch", 0, 2, 8, 32),
    _case("odd_length", 1, 2, 67, 64),
    _case("odd_head_dim", 1, 2, 33, 20),
    _case("head_dim_128", 1, 1, 35, 128),
    _case("qkv_views", 2, 3, 37, 16, qkv_view=True),
    _case("offset", 1, 2, 24, 32, layout="offset"),
    _case("row_padded", 1, 2, 24, 32, layout="row_padded"),
    _case("strided", 1, 2, 17, 16, layout="strided"),
    _case("custom_scale", 1, 2, 30, 32, scale=0.37),
    # Legal scales a kernel may mishandle: 0 (uniform attention over the allowed keys; a
    # masked -inf times 0 is NaN) and negative (the mask must not flip with the sign).
    _case("zero_scale", 1, 2, 21, 16, scale=0.0),
    _case("negative_scale", 1, 2, 21, 16, scale=-0.3),
    # Scores of +-100s: softmax rows that are one-hot to fp32 precision.
    _case("peaked", 1, 2, 40, 32, value_scale=6.0),
    _case("kv_cache", 1, 2, 5, 32, t_k=19),
    # Decoding: one new query against the cache (slices of its buffers), and a prompt
    # appended to a cache whose length is no multiple of any tile.
    _case("kv_cache_one_query", 2, 2, 1, 32, t_k=37, cache_capacity=64),
    _case("kv_cache_long", 1, 2, 20, 64, t_k=83, cache_capacity=96),
    _case("kv_cache_odd_head_dim", 1, 1, 9, 24, t_k=40),
    _case("autocast", 2, 2, 33, 32, autocast_inputs=True,
          dtypes=(torch.bfloat16, torch.float16)),
    _case("many_rows", 4, 4, 64, 16),  # 1024 query rows: a 0.2 % bias resolves
    _case("dropout", 2, 3, 40, 32, dropout_p=0.1, dropout_seed=SEED),
    _case("dropout_half", 1, 2, 67, 64, dropout_p=0.5, dropout_seed=(1, 0)),
    _case("dropout_qkv_views", 2, 3, 37, 16, qkv_view=True, dropout_p=0.2, dropout_seed=SEED),
    _case("dropout_odd_head_dim", 1, 2, 33, 20, dropout_p=0.3, dropout_seed=SEED),
    _case("dropout_head_dim_128", 1, 1, 35, 128, dropout_p=0.1, dropout_seed=SEED),
    _case("dropout_kv_cache", 1, 2, 9, 32, t_k=40, dropout_p=0.2, dropout_seed=SEED),
    # A seed with its top bit set and the largest offset: the words' full 32 bits.
    _case("dropout_extreme_seed", 1, 2, 24, 32, dropout_p=0.15,
          dropout_seed=(2 ** 64 - 12345, 2 ** 32 - 1)),
    _case("dropout_autocast", 2, 2, 33, 32, autocast_inputs=True, dropout_p=0.1,
          dropout_seed=SEED, dtypes=(torch.bfloat16, torch.float16)),
)


def _bench_inputs(dims, dtype, device, gen):
    shape = (dims["B"], dims["H"], dims["T"], dims["D"])
    q, k, v = (make.tensor(shape, dtype, device, gen) for _ in range(3))
    return Inputs((q, k, v, None, 0.0, None), (0, 1, 2))


# FlashAttention-2's dropout at nanoGPT's usual rate (its Shakespeare config uses 0.2).
BENCH_VARIANTS = (("dropout 0.1", (("dropout_p", 0.1),)),)

SPEC = OpSpec("causal_attention", PARAMS, canonicalize, reference.causal_attention, eager,
              _bench_inputs, CASES,
              result_dtypes=lambda call: (call["q"].dtype,),  # autocast's, under autocast
              bench_variants=BENCH_VARIANTS)
