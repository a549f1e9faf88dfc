"""Causal attention on the CUDA extension (csrc/attention*.cu): FlashAttention-2 forward
and backward, on the tensor cores (mma.sync) for bf16 and on the CUDA cores for fp32, with
keys that may outnumber queries (a KV cache) and attention dropout by `kernels.philox`'s
mask (csrc/philox.cuh), regenerated in the backward. Wrapped as `gptk::cuda_attention_*`
custom ops with autograd; the dropout's (seed, offset) travels as a CPU int64 tensor, read
on the host. The kernels read q, k, v in place through their strides and return the
output stored as (B, T, H, D) behind a (B, H, T, D) view, so the model's merge of heads is
free.

The bf16 kernels have two versions (`VERSIONS`; GPTK_CUDA_ATTENTION_VERSION=1|2, or
`kernels.versions.select("cuda_attention", n)`), passed to the extension as an int.
Version 2 (csrc/attention_bf16_v2.cu) is the default: the H200 record
(bench/results/nvidia-h200-2026-11-27) ran every conformance case and long sequence on
both versions and they passed, and the static report says version 2 does less and waits
less for the same result: 5 GEMM-equivalents in the backward against version 1's 7,
fragments by ldmatrix (LDSM) where version 1 issues four 32-bit shared loads each, and a
cp.async (LDGSTS) pipeline where version 1 copies global -> registers -> shared
synchronously (version 1 measured 76-88 TFLOP/s fwd+bwd on the H200; version 2 is not
timed yet: the headline benchmark has a row for each version, `cuda v1` and `cuda v2`).
Version 1 stays selectable until a GPU record compares them. Version 2's backward adds dQ
with fp32 atomics, whose order varies between runs; under
torch.use_deterministic_algorithms(True) its dQ comes from version 1's single-owner dQ
kernel instead. fp32 has one version, deterministic, which every version number
selects."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels import philox, versions
from kernels.cuda.extension import ext
from kernels.custom_ops import custom_op, differentiable

# Limits the kernels check too (csrc/attention.cu); `kernels.cuda.unsupported` reports them
# before a call is made, so that `auto` can go elsewhere.
HEAD_DIM_MULTIPLE = 8   # rows move in 16-byte chunks of bf16
MAX_HEAD_DIM = 128
MAX_SEQ_LEN = 65535 * 8

VERSIONS = versions.declare("cuda_attention", {
    1: "bf16: 64x64 tiles on 4 warps, synchronous global->register->shared loads, fragments "
       "by 32-bit shared loads; backward in 3 kernels (Delta, dK/dV, dQ): 7 GEMM-equivalents, "
       "deterministic",
    2: "bf16: ldmatrix fragments, 2-stage cp.async pipeline, XOR-swizzled shared tiles, "
       "128-query forward blocks; FlashAttention-2 single-pass backward (5 GEMM-equivalents, "
       "dQ by fp32 atomics; version 1's dQ kernel under torch's deterministic mode; head "
       "dims <= 64, D = 128 runs version 1's backward)",
}, default=2)


def _check(q, k, v, version):
    """What csrc/attention.cu's attention_forward / attention_backward check (but the CUDA
    device: the fake impls also serve meta tensors)."""
    torch._check(version in VERSIONS.versions,
                 lambda: f"the cuda attention kernel has versions 1 and 2, got {version}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check(t.dtype in (torch.float32, torch.bfloat16),
                     lambda: f"{name} must be float32 or bfloat16, got {t.dtype}")
        torch._check(t.dim() == 4, lambda: f"{name} must be 4-D (batch, heads, seq, head_dim), "
                                           f"got shape {tuple(t.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype,
                 lambda: f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(k.shape == v.shape and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3]
                 and k.shape[2] >= q.shape[2],
                 lambda: f"the cuda attention kernel needs q of shape (B, H, T, D) and k, v of "
                         f"one shape (B, H, T_K, D) with T_K >= T, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    head_dim = q.shape[3]
    torch._check(0 < head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0,
                 lambda: f"the cuda attention kernel needs a head_dim that is a multiple of "
                         f"{HEAD_DIM_MULTIPLE} and at most {MAX_HEAD_DIM}, got {head_dim}")
    torch._check(q.shape[0] * q.shape[1] < 2 ** 31,
                 lambda: f"batch * heads must be below 2^31, got {q.shape[0] * q.shape[1]}")
    torch._check(k.shape[2] <= MAX_SEQ_LEN,
                 lambda: f"the cuda attention kernel supports sequences up to {MAX_SEQ_LEN}, "
                         f"got {k.shape[2]}")


def _dropout_args(dropout_p: float, rng: Optional[Tensor]) -> tuple[float, int, int]:
    """(p, seed, offset) as the extension takes them (seed: its 64 bits as an int64)."""
    if dropout_p == 0.0:
        return 0.0, 0, 0
    seed, offset = rng.tolist()  # a CPU tensor: no device sync
    return dropout_p, seed, offset


@custom_op("gptk::cuda_attention_fwd", mutates_args=(), device_types="cuda")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, version: int, dropout_p: float,
                   rng: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, lse = ext().attention_forward(q, k, v, scale, version, *_dropout_args(dropout_p, rng))
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, version, dropout_p, rng):
    _check(q, k, v, version)
    b, h, t, d = q.shape
    # Stored (B, T, H, D), returned as a (B, H, T, D) view: see csrc/attention.cu.
    return q.new_empty(b, t, h, d).permute(0, 2, 1, 3), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_attention_bwd", mutates_args=(), device_types="cuda")
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float, version: int, deterministic: bool, dropout_p: float,
                   rng: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = ext().attention_backward(dout, q, k, v, out, lse, scale, version, deterministic,
                                          *_dropout_args(dropout_p, rng))
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, version, deterministic, dropout_p, rng):
    _check(q, k, v, version)
    for name, t in (("dout", dout), ("out", out)):
        torch._check(t.shape == q.shape and t.dtype == q.dtype,
                     lambda: f"{name} must match q ({q.dtype} {tuple(q.shape)}), got "
                             f"{t.dtype} {tuple(t.shape)}")
    torch._check(lse.dtype == torch.float32 and lse.is_contiguous()
                 and lse.shape == q.shape[:3],
                 lambda: f"lse must be the forward's contiguous float32 (B, H, T) tensor, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, version, dropout_p, rng = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # no mask: the backward regenerates it
    ctx.scale, ctx.version, ctx.dropout_p, ctx.rng = scale, version, dropout_p, rng
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.version,
                                torch.are_deterministic_algorithms_enabled(), ctx.dropout_p,
                                ctx.rng)
    return dq, dk, dv, None, None, None, None


_attention = differentiable(_attention_fwd, _attention_backward, _attention_setup)


def causal_attention(q, k, v, scale, dropout_p, dropout_seed=None):
    """The backend's entry point: T_K >= T keys (a KV cache), dropout by dropout_seed's mask
    or a fresh (seed, offset). The kernel version is read per call (a traced graph keeps
    the one in use when it was traced)."""
    rng = philox.seed_tensor(dropout_seed) if dropout_p > 0.0 else None
    out, _ = _attention(q, k, v, scale, VERSIONS.current(), dropout_p, rng)
    return out
