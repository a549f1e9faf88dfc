"""Fused causal attention in Triton: the FlashAttention-2 forward and backward.

Shapes: q and o are (B, H, T, D), k and v (B, H, T_K, D) with T_K >= T, with any strides
on B, H, T and a unit stride on D (the model passes strided views of its (B, T, 3, H, D)
qkv projection, read in place). T_K > T is decoding with a KV cache: query i sits at
position i + T_K - T and sees keys j <= i + kv_offset, so every causal split below is
shifted by kv_offset = T_K - T (0 in training). The attention matrix is never stored, in
either direction.

Dropout (FlashAttention-2's): the softmax statistics (m, l, lse) see every probability,
the products only the kept ones, P Z with Z = keep / (1 - p):
    o = (P Z) V;   dV = (P Z)^T dO;   dS = P * (Z dP - Delta)
(Delta = rowsum(dO * O) still equals sum_j P_ij (Z dP)_ij). The mask is not stored: each
kernel regenerates its tile from the call's (seed, offset) (`kernels.triton.dropout`,
`kernels.philox`), reading its query rows and keys in the mask tile's order. Dropout
calls run their own instances of the kernels (DROPOUT=True), with tile lists that fit the
mask's registers, and never the TMA loads of version 3.

Forward (one program per block of BLOCK_M queries of one (batch, head)):
    for each block of BLOCK_N keys at or below the diagonal, with s = q k^T * scale:
        m_new = max(m, rowmax(s));  p = exp(s - m_new)
        l = l * exp(m - m_new) + rowsum(p);  acc = acc * exp(m - m_new) + p v
    o = acc / l,  lse = m + log(l)   (saved: the backward recomputes p = exp(s - lse))
  Everything runs in base 2: exp(x) = exp2(x * log2(e)), so log2(e) is folded into the
  scale once and the inner loop uses the cheaper exp2. Key blocks entirely below the
  diagonal need no mask and run in their own loop; only the diagonal block is masked,
  and blocks above it are never visited.

Backward, with P = exp(S - lse), dP = dO V^T:
    dV = P^T dO
    dS = P * (dP - Delta),  Delta_i = rowsum(dO_i * O_i) - dlse_i
    dQ = scale * dS K,  dK = scale * dS^T Q
  Delta_i = sum_j P_ij dP_ij is the softmax Jacobian's correction term; FlashAttention-2
  gets it from O and dO alone (one pass, `_attn_bwd_preprocess_kernel`) instead of from
  P. A gradient of the log-sum-exp itself enters through the same term: d lse_i / d s_ij
  = P_ij, so it simply subtracts from Delta_i. Then P is recomputed tile by tile, two ways
  (`VERSIONS`, GPTK_TRITON_ATTENTION_VERSION=1|2|3):
  version 2 (default), FlashAttention-2's single pass: one program per key block keeps
    its K, V tiles and its dK, dV accumulators in registers and walks the query blocks at
    or below it; per (query, key) tile it computes S^T, dV += P^T dO, dP^T, dK += dS^T Q
    and dQ += dS K: 5 GEMM-equivalents, the minimum. dQ rows are shared by every key
    block, so they are accumulated with fp32 atomic adds into a zeroed fp32 buffer (cast
    to the inputs' dtype afterwards; fp32 inputs accumulate into dQ itself). Atomics
    make dQ's last bits depend on the order the key blocks arrive in: not deterministic.
  version 1, deterministic: the same dK/dV kernel without the dQ product, then one
    program per query block recomputes S and dP over the key blocks at or below it and
    accumulates dQ in registers: every output tile has a single owner, no atomics, the
    same bits on every run, for 7 GEMM-equivalents (S and dP computed twice). Kept
    selectable until a GPU record shows version 2 correct and faster, and after that as
    the deterministic mode: under torch.use_deterministic_algorithms(True) every version
    runs this backward.
  Neither stores a T x T buffer.

TMA (version 3, opt-in until a GPU record): version 2's forward and single-pass kernels
with USE_TMA, on sm_90+. Each program makes a tensor descriptor (tl.make_tensor_descriptor)
over its (batch, head)'s (T, D) slice of Q, K, V, dO, and loads tiles through it: the
Tensor Memory Accelerator copies a whole box into shared memory asynchronously, with no
per-thread address arithmetic or masks (it zero-fills rows past T and columns past D),
and the pipeliner overlaps those copies with the wgmma of the previous tile. Stores and
the dQ atomics stay pointer-based. TMA needs each slice 16-byte aligned with rows 16
bytes apart (`_tma_rules_hold`; the model's qkv views meet that for D % 8 == 0 in
16-bit), a triton with device-side descriptors (3.6 and 3.8 have them), and a global
scratch allocator for the descriptors (`_ensure_scratch_allocator`). Anywhere else
version 3 runs version 2 unchanged (its AOT specs compile for sm_90 only, the one arch
that runs them); the interpreter emulates descriptors, so the CPU tests check the TMA
indexing.

Autotuning: each kernel picks its tile per GPU, dtype, head dim and T_BUCKET =
next_power_of_2(T), a parameter only the autotuner's key reads (excluded from
specialization, as kernels/triton/matmul.py does for M_BUCKET): a new sequence length in
a known bucket reuses the tuned tile instead of benchmarking again (generation without a
KV cache grows T by one at every step). The candidates depend on the arch
(`tiles_for`): on sm_90 the single pass takes tiles of 64-row multiples, so that all five
of its products run on wgmma (`HOPPER_TILES`); sm_80 keeps the register-bound
`AUTOTUNE_TILES`.

Masking: `_visible` (which key a query sees, the KV offset included) and `_probabilities`
(P recomputed from the scores and lse, masked) are the only places the causal rule lives,
in either tile orientation.

All matmuls accumulate in fp32 and the softmax statistics are fp32. 16-bit inputs feed
the tensor cores; fp32 inputs use exact IEEE fp32 products (not TF32), so the fp32 path
is the accurate one and matches an fp64 reference closely.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels import philox, versions
from kernels.custom_ops import custom_op, differentiable
from kernels.triton.aot import TARGET_ARCHS, AotSpec
from kernels.triton.device import on_device_of
from kernels.triton.dropout import keep_tile, key_order, row_order
from kernels.triton.grid import cdiv, next_power_of_2
from kernels.triton.interpreter import INTERPRETED

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):   log(x) == log2(x) * LN2
MAX_HEAD_DIM = 128
# Blocks of the sequence go on grid axis 1 (at most 65535 programs) and the smallest
# block any tile list uses is 16 rows.
MAX_SEQ_LEN = 65535 * 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VERSIONS = versions.declare("triton_attention", {
    1: "backward in 3 kernels (Delta, dK/dV, dQ): 7 GEMM-equivalents, deterministic",
    2: "FlashAttention-2 single-pass backward (Delta, then dK/dV/dQ): 5 GEMM-equivalents, "
       "dQ accumulated with fp32 atomics",
    3: "version 2 with TMA tensor-descriptor loads of Q, K, V, dO on sm_90+ (where the "
       "installed triton has tl.make_tensor_descriptor and the tensors meet TMA's 16-byte "
       "rules; otherwise exactly version 2)",
}, default=2)


# ----------------------------------------------------------------------------- tile helpers

# The Triton interpreter (3.6-3.8) stores bf16 as raw uint16 bits and its tl.dot multiplies
# those bits as integers. Under it, bf16 operands are widened to fp32 first: the same
# products (bf16 x bf16 is exact in fp32) that the tensor cores accumulate in fp32.
_INTERPRETED_BF16_DOT_FIX = tl.constexpr(INTERPRETED)


@triton.jit
def _dot(a, b):
    """a @ b accumulated in fp32: tensor cores for 16-bit inputs, exact IEEE fp32 for fp32
    inputs (tl.dot would otherwise round fp32 operands to TF32, ~1e-3 relative error)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    elif _INTERPRETED_BF16_DOT_FIX and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_mask(rows, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Valid elements of a (rows, BLOCK_D) tile: rows below T, columns below HEAD_DIM (the
    tile is padded to the power of two BLOCK_D >= 16 that tl.arange and tl.dot need)."""
    mask = rows[:, None] < T
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_tile(base, rows, stride_t, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows `rows` of a (T, HEAD_DIM) matrix with row stride stride_t and unit column
    stride, zero-filled outside it. CHECK_ROWS=False promises every row is below T, which
    lets the loads in the bulk of the causal loops go unmasked."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if CHECK_ROWS:
        return tl.load(ptrs, mask=_tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _row_source(base, stride_t, T, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """What a kernel reads tiles of BLOCK_ROWS rows of a (T, HEAD_DIM) matrix from: a TMA
    tensor descriptor over it (USE_TMA: version 3 on sm_90), or its base pointer."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        return base


@triton.jit
def _load_rows(source, start, rows, stride_t, offs_d, T, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows rows = start + arange of `source` (see _row_source), zero outside the matrix.
    A TMA load copies the whole box to shared memory asynchronously, with no address
    arithmetic in registers, and zero-fills rows >= T and columns >= HEAD_DIM itself."""
    if USE_TMA:
        return source.load([start, 0])
    else:
        return _load_tile(source, rows, stride_t, offs_d, T, HEAD_DIM, BLOCK_D, CHECK_ROWS)


@triton.jit
def _store_tile(base, tile, rows, stride_t, offs_d, T, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty),
             mask=_tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D))


@triton.jit
def _head_offset(stride_b, stride_h, batch, head):
    """Offset of one (batch, head) slice, in int64: B * H * T * D can exceed 2**31."""
    return batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


# ----------------------------------------------------------------------------- the mask
# Every kernel asks these two helpers which scores exist and what their probabilities are,
# in either orientation of a tile; a mask other than the causal one changes them and
# nothing else.

@triton.jit
def _visible(query, key, kv_offset):
    """Whether query `query` attends to key `key`, elementwise over broadcast tiles:
    causal with the queries kv_offset = T_K - T positions along (a KV cache; 0 in
    training), key <= query + kv_offset (which also keeps keys below T_K for queries
    below T)."""
    return key <= query + kv_offset


@triton.jit
def _probabilities(scores_log2, lse_log2, query, key, kv_offset, DIAGONAL: tl.constexpr):
    """P = exp(S - lse) from the log2-domain scores of a tile, 0 where the key is hidden;
    lse_log2, query and key broadcast against the tile in whatever orientation it has
    (queries x keys, or keys x queries for the transposed tiles of dK/dV). Off the
    diagonal every key is visible: no mask."""
    p = tl.math.exp2(scores_log2 - lse_log2)
    if DIAGONAL:
        p = tl.where(_visible(query, key, kv_offset), p, 0.0)
    return p


# ----------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows, offs_n, offs_d,
                    key_lo, key_hi, T_K, kv_offset, qk_scale_log2, bh, row_start, seed_lo,
                    seed_hi, drop_offset, drop_threshold, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DIAGONAL: tl.constexpr, USE_TMA: tl.constexpr, DROPOUT: tl.constexpr):
    """Fold keys [key_lo, key_hi) into the running (acc, m_i, l_i) of the online softmax.
    Off the diagonal every key precedes every query row and lies below T_K: no masks.
    With DROPOUT the softmax statistics see every probability and acc only the kept ones
    (the 1 / (1 - p) scale is applied to the output once); query rows (`rows`) and K, V
    rows are in the mask tile's orders (kernels.triton.dropout)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        if DROPOUT:
            cols = key_order(offs_n, start_n)
        else:
            cols = start_n + offs_n
        k = _load_rows(k_src, start_n, cols, stride_kt, offs_d, T_K, HEAD_DIM, BLOCK_D, DIAGONAL,
                       USE_TMA)
        v = _load_rows(v_src, start_n, cols, stride_vt, offs_d, T_K, HEAD_DIM, BLOCK_D, DIAGONAL,
                       USE_TMA)
        s = _dot(q, tl.trans(k)) * qk_scale_log2          # log2-domain scores, fp32
        if DIAGONAL:
            s = tl.where(_visible(rows[:, None], cols[None, :], kv_offset), s, float("-inf"))
        # Every row sees key 0 of its first block, so m_new is finite and no -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)                 # rescales the old partial sums
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = keep_tile(seed_lo, seed_hi, drop_offset, drop_threshold, bh, row_start,
                             start_n, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["T_BUCKET", "seed_lo", "seed_hi", "drop_offset",
                                "drop_threshold"])
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     H, T, T_K, T_BUCKET, qk_scale_log2,
                     seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                     DROPOUT: tl.constexpr):
    # Grid (B * H, query blocks): B * H on axis 0, whose limit is 2^31 - 1 (axis 1 allows
    # only 65535). Programs start in order of axis 0 first, so every head's last query
    # block, the one that visits the most keys, goes first and the short ones fill the
    # tail of the wave. T queries, T_K >= T keys: query i is at position i + T_K - T.
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    batch, head = bh // H, bh % H
    kv_offset = T_K - T
    q_src = _row_source(Q + _head_offset(stride_qb, stride_qh, batch, head), stride_qt, T,
                        HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    k_src = _row_source(K + _head_offset(stride_kb, stride_kh, batch, head), stride_kt, T_K,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _row_source(V + _head_offset(stride_vb, stride_vh, batch, head), stride_vt, T_K,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    row_start = start_m * BLOCK_M
    if DROPOUT:  # the mask tile's row order (kernels.triton.dropout)
        rows = row_order(tl.arange(0, BLOCK_M), row_start)
    else:
        rows = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_src, row_start, rows, stride_qt, offs_d, T, HEAD_DIM, BLOCK_D, True,
                   USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below diag_lo are visible to every row of the block (for T_K == T, BLOCK_N
    # divides BLOCK_M and diag_lo is the block's first row); the rest up to the last row's
    # position are masked.
    diag_lo = (start_m * BLOCK_M + kv_offset) // BLOCK_N * BLOCK_N
    diag_hi = tl.minimum(start_m * BLOCK_M + BLOCK_M + kv_offset, T_K)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                    offs_n, offs_d, 0, diag_lo, T_K, kv_offset, qk_scale_log2,
                                    bh, row_start, seed_lo, seed_hi, drop_offset, drop_threshold,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, USE_TMA, DROPOUT)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                    offs_n, offs_d, diag_lo, diag_hi, T_K, kv_offset,
                                    qk_scale_log2, bh, row_start, seed_lo, seed_hi, drop_offset,
                                    drop_threshold, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
                                    USE_TMA, DROPOUT)

    o_base = O + _head_offset(stride_ob, stride_oh, batch, head)
    o = acc / l_i[:, None]
    if DROPOUT:
        o = o * drop_scale
    _store_tile(o_base, o, rows, stride_ot, offs_d, T, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # natural log, as torch.logsumexp
    tl.store(LSE + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DLSE, DELTA,
                                stride_ob, stride_oh, stride_ot, stride_dob, stride_doh,
                                stride_dot, H, T,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr):
    """Delta_i = rowsum(dO_i * O_i) - dlse_i, in fp32 (see the module docstring)."""
    bh = tl.program_id(0)
    batch, head = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _head_offset(stride_ob, stride_oh, batch, head), rows, stride_ot, offs_d,
                   T, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + _head_offset(stride_dob, stride_doh, batch, head), rows, stride_dot,
                    offs_d, T, HEAD_DIM, BLOCK_D, True)
    row_offset = bh.to(tl.int64) * T + rows
    dlse = tl.load(DLSE + row_offset, mask=rows < T, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + row_offset, delta, mask=rows < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, dq_base, lse_base, delta_base,
                         stride_qt, stride_dot, stride_dqt, cols, offs_m, offs_d, query_lo,
                         query_hi, T, kv_offset, qk_scale_log2, scale, bh, key_start, seed_lo,
                         seed_hi, drop_offset, drop_threshold, drop_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                         ACCUMULATE_DQ: tl.constexpr, USE_TMA: tl.constexpr,
                         DROPOUT: tl.constexpr):
    """Accumulate into one key block's dK, dV the query rows [query_lo, query_hi), working
    on transposed tiles (keys x queries) so P^T and dS^T come out ready for the dots; with
    ACCUMULATE_DQ, also add each query tile's share of dQ, scale * dS K, to the fp32 dQ
    buffer (the 5th GEMM of version 2). With DROPOUT, Z = keep / (1 - p) regenerated from
    the forward's mask: dV += (P Z)^T dO (Z's scale applied at the store), dS = P (Z dP -
    Delta)."""
    for start_m in range(query_lo, query_hi, BLOCK_M):
        if DROPOUT:  # the mask tile's row order (kernels.triton.dropout)
            rows = row_order(offs_m, start_m)
        else:
            rows = start_m + offs_m
        # Rows past T load q = dO = 0 and lse = +inf, so their p = 0: they add nothing.
        q = _load_rows(q_src, start_m, rows, stride_qt, offs_d, T, HEAD_DIM, BLOCK_D, True,
                       USE_TMA)
        do = _load_rows(do_src, start_m, rows, stride_dot, offs_d, T, HEAD_DIM, BLOCK_D, True,
                        USE_TMA)
        lse_log2 = tl.load(lse_base + rows, mask=rows < T, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        p_t = _probabilities(_dot(k, tl.trans(q)) * qk_scale_log2, lse_log2[None, :],
                             rows[None, :], cols[:, None], kv_offset, DIAGONAL)
        dp_t = _dot(v, tl.trans(do))
        if DROPOUT:
            keep_t = tl.trans(keep_tile(seed_lo, seed_hi, drop_offset, drop_threshold, bh,
                                        start_m, key_start, BLOCK_M, BLOCK_N))
            dv += _dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv += _dot(p_t.to(do.dtype), do)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q)
        if ACCUMULATE_DQ:
            # Every key block adds into these rows: fp32 atomics, relaxed (a sum needs no
            # ordering); rows past T hold p = 0 and are masked off anyway.
            dq = _dot(tl.trans(ds_t.to(k.dtype)), k) * scale
            dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=_tile_mask(rows, offs_d, T, HEAD_DIM, BLOCK_D),
                          sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["T_BUCKET", "seed_lo", "seed_hi", "drop_offset",
                                "drop_threshold"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ_ACCUM, LSE, DELTA,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          stride_dqb, stride_dqh, stride_dqt,
                          H, T, T_K, T_BUCKET, qk_scale_log2, scale,
                          seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACCUMULATE_DQ: tl.constexpr, USE_TMA: tl.constexpr,
                          DROPOUT: tl.constexpr):
    # Grid (B * H, key blocks); key block 0 is seen by every query: the heaviest go first.
    # DQ_ACCUM (fp32, zeroed) is read only with ACCUMULATE_DQ (version 2).
    bh = tl.program_id(0)
    start_n = tl.program_id(1)
    batch, head = bh // H, bh % H
    kv_offset = T_K - T
    q_src = _row_source(Q + _head_offset(stride_qb, stride_qh, batch, head), stride_qt, T,
                        HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    do_src = _row_source(DO + _head_offset(stride_dob, stride_doh, batch, head), stride_dot, T,
                         HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
    dq_base = DQ_ACCUM + _head_offset(stride_dqb, stride_dqh, batch, head)
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T

    key_start = start_n * BLOCK_N
    if DROPOUT:  # the mask tile's key order (kernels.triton.dropout)
        cols = key_order(tl.arange(0, BLOCK_N), key_start)
    else:
        cols = key_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_src = _row_source(K + _head_offset(stride_kb, stride_kh, batch, head), stride_kt, T_K,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    v_src = _row_source(V + _head_offset(stride_vb, stride_vh, batch, head), stride_vt, T_K,
                        HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
    k = _load_rows(k_src, key_start, cols, stride_kt, offs_d, T_K, HEAD_DIM, BLOCK_D, True,
                   USE_TMA)
    v = _load_rows(v_src, key_start, cols, stride_vt, offs_d, T_K, HEAD_DIM, BLOCK_D, True,
                   USE_TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries from query_lo (aligned down to BLOCK_M) see part of this key block, those
    # from diag_hi on (query_lo plus whole query blocks) all of it. For T_K == T these are
    # the block's own rows (BLOCK_M divides BLOCK_N) and every later query.
    query_lo = tl.maximum(key_start - kv_offset, 0) // BLOCK_M * BLOCK_M
    diagonal_queries = tl.maximum(key_start + BLOCK_N - kv_offset - query_lo, 0)
    diag_hi = tl.minimum(query_lo + tl.cdiv(diagonal_queries, BLOCK_M) * BLOCK_M, T)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, dq_base, lse_base, delta_base,
                                  stride_qt, stride_dot, stride_dqt, cols, offs_m, offs_d,
                                  query_lo, diag_hi, T, kv_offset, qk_scale_log2, scale, bh,
                                  key_start, seed_lo, seed_hi, drop_offset, drop_threshold,
                                  drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
                                  ACCUMULATE_DQ, USE_TMA, DROPOUT)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, dq_base, lse_base, delta_base,
                                  stride_qt, stride_dot, stride_dqt, cols, offs_m, offs_d,
                                  diag_hi, T, T, kv_offset, qk_scale_log2, scale, bh, key_start,
                                  seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, ACCUMULATE_DQ,
                                  USE_TMA, DROPOUT)

    if DROPOUT:
        dv = dv * drop_scale
    _store_tile(DK + _head_offset(stride_dkb, stride_dkh, batch, head), dk * scale, cols,
                stride_dkt, offs_d, T_K, HEAD_DIM, BLOCK_D)
    _store_tile(DV + _head_offset(stride_dvb, stride_dvh, batch, head), dv, cols, stride_dvt,
                offs_d, T_K, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, rows,
                       offs_n, offs_d, key_lo, key_hi, T_K, kv_offset, qk_scale_log2, bh,
                       row_start, seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, DROPOUT: tl.constexpr):
    """Accumulate into one query block's dQ the keys [key_lo, key_hi)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        if DROPOUT:
            cols = key_order(offs_n, start_n)
        else:
            cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kt, offs_d, T_K, HEAD_DIM, BLOCK_D, DIAGONAL)
        v = _load_tile(v_base, cols, stride_vt, offs_d, T_K, HEAD_DIM, BLOCK_D, DIAGONAL)
        p = _probabilities(_dot(q, tl.trans(k)) * qk_scale_log2, lse_log2[:, None],
                           rows[:, None], cols[None, :], kv_offset, DIAGONAL)
        dp = _dot(do, tl.trans(v))
        if DROPOUT:
            keep = keep_tile(seed_lo, seed_hi, drop_offset, drop_threshold, bh, row_start,
                             start_n, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=["T_BUCKET", "seed_lo", "seed_hi", "drop_offset",
                                "drop_threshold"])
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        H, T, T_K, T_BUCKET, qk_scale_log2, scale,
                        seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr):
    # Version 1 only (see the module docstring).
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest query blocks first
    batch, head = bh // H, bh % H
    kv_offset = T_K - T
    k_base = K + _head_offset(stride_kb, stride_kh, batch, head)
    v_base = V + _head_offset(stride_vb, stride_vh, batch, head)

    row_start = start_m * BLOCK_M
    if DROPOUT:  # the mask tile's row order (kernels.triton.dropout)
        rows = row_order(tl.arange(0, BLOCK_M), row_start)
    else:
        rows = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + _head_offset(stride_qb, stride_qh, batch, head), rows, stride_qt, offs_d,
                   T, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + _head_offset(stride_dob, stride_doh, batch, head), rows, stride_dot,
                    offs_d, T, HEAD_DIM, BLOCK_D, True)
    row_offset = bh.to(tl.int64) * T + rows
    # Rows past T get lse = +inf, hence p = 0 (they are not stored either).
    lse_log2 = tl.load(LSE + row_offset, mask=rows < T, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_offset, mask=rows < T, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag_lo = (start_m * BLOCK_M + kv_offset) // BLOCK_N * BLOCK_N  # as in the forward
    diag_hi = tl.minimum(start_m * BLOCK_M + BLOCK_M + kv_offset, T_K)
    dq = _attn_bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt,
                            rows, offs_n, offs_d, 0, diag_lo, T_K, kv_offset, qk_scale_log2, bh,
                            row_start, seed_lo, seed_hi, drop_offset, drop_threshold, drop_scale,
                            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, DROPOUT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt,
                            rows, offs_n, offs_d, diag_lo, diag_hi, T_K, kv_offset,
                            qk_scale_log2, bh, row_start, seed_lo, seed_hi, drop_offset,
                            drop_threshold, drop_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
                            DROPOUT)
    _store_tile(DQ + _head_offset(stride_dqb, stride_dqh, batch, head), dq * scale, rows,
                stride_dqt, offs_d, T, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- tiles

# Autotune candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, per operand
# width and per padded head dim (16 uses the 32 list). BLOCK_M counts queries and
# BLOCK_N keys in every kernel; the causal split needs BLOCK_N | BLOCK_M in the forward
# and dQ kernels and BLOCK_M | BLOCK_N in the dK/dV kernels ("dkdv": version 1, "dkdv_dq":
# version 2's single pass, the same kernel with ACCUMULATE_DQ). Every candidate compiles
# without register spills for each arch that can pick it (checked by the AOT compile of
# AOT_SPECS), and the autotuner picks per GPU, sequence-length bucket, head dim and
# dtype. The 16-bit tiles follow FlashAttention-2: wide query tiles for the forward and
# dQ, wide key tiles for dK/dV (each program keeps its own K/V or Q/dO tile in registers
# and streams the other), 3-4 pipeline stages to hide the loads behind the tensor cores,
# 8 warps where a 128-row fp32 accumulator would not fit 4 warps' registers. fp32 runs
# exact IEEE products on the FMA units, whose operand layout needs many registers: one
# small tile each, 1 stage.
AUTOTUNE_TILES = {
    "fwd": {
        ("16bit", 32): [(128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
        ("16bit", 64): [(128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
        ("16bit", 128): [(128, 32, 8, 3), (64, 64, 4, 3)],
        ("fp32", 32): [(64, 32, 8, 1)],
        ("fp32", 64): [(64, 32, 8, 1)],
        # (32, 32, 8, 1) spills 64 B/thread on sm_90 since the KV offset entered the
        # causal split.
        ("fp32", 128): [(32, 16, 8, 1)],
    },
    "dkdv": {
        ("16bit", 32): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
        # (64, 64, 8, 3) spills on sm_80 with triton 3.6's ptxas: left out.
        ("16bit", 64): [(32, 128, 8, 3), (32, 64, 4, 3)],
        ("16bit", 128): [(32, 64, 8, 3), (32, 64, 4, 2)],
        ("fp32", 32): [(32, 32, 8, 1)],
        ("fp32", 64): [(32, 32, 8, 1)],
        ("fp32", 128): [(16, 16, 4, 1)],
    },
    # The dQ product and its atomics need registers of their own: (32, 64, 4, 2) spills at
    # D = 128, and at D = 64 4-warp tiles wider than 16 queries reach 255 on sm_80.
    "dkdv_dq": {
        ("16bit", 32): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
        ("16bit", 64): [(32, 128, 8, 3), (32, 64, 8, 3), (16, 64, 4, 3)],
        ("16bit", 128): [(32, 64, 8, 3), (16, 32, 4, 3)],
        ("fp32", 32): [(32, 32, 8, 1)],
        ("fp32", 64): [(32, 32, 8, 1)],
        ("fp32", 128): [(16, 16, 4, 1)],
    },
    "dq": {
        # (128, 64, 8, 3) spills 8 B/thread on sm_80 since the KV offset entered the split.
        ("16bit", 32): [(128, 32, 8, 3), (64, 32, 4, 3)],
        ("16bit", 64): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
        ("16bit", 128): [(128, 32, 8, 3), (64, 64, 8, 3)],
        ("fp32", 32): [(32, 32, 4, 1)],  # (64, 32, 8, 1) spills on sm_90 with triton 3.6
        ("fp32", 64): [(64, 32, 8, 1)],
        ("fp32", 128): [(32, 16, 4, 1)],
    },
}
# sm_90 multiplies 16-bit tiles with wgmma (SASS HGMMA) only where the product has a
# multiple of 64 rows (wgmma's m64, per warpgroup of 4 warps); Triton lowers any other
# product to sm_80's mma.sync (HMMA), at a fraction of wgmma's rate. The single pass has
# products of both orientations: S^T, dP^T, dV and dK have one row per key (BLOCK_N),
# dQ = dS K one per query (BLOCK_M). sm_80's tiles keep BLOCK_M at 16-32 (its registers
# are the limit there), which on sm_90 put dQ on mma.sync: at D = 64 the 32 x 128 tile
# mixed 24 HGMMA with 32 HMMA at 12.5 % occupancy. So on sm_90 the single pass takes its
# own candidates, every dimension a multiple of 64: all five products on wgmma (asserted
# from the SASS by tests/test_triton_attention.py), 64 x 128 on two warpgroups (dQ's 64
# rows split the columns between them) or 64 x 64 on one. At D = 128 only 8 warps over
# 64 x 64 fit the registers (4 warps spill 280-310 B/thread, 64 x 128 spills 108), and
# since the KV offset entered the causal split only with 3 stages (2 spill 4 B/thread, 1
# spills 88: ptxas keeps fewer registers live around the deeper pipeline's loads).
# The other kernels' tiles above are wgmma-shaped on sm_90 already.
HOPPER_TILES = {
    "dkdv_dq": {
        ("16bit", 32): [(64, 128, 8, 3), (64, 64, 4, 3)],
        ("16bit", 64): [(64, 128, 8, 3), (64, 64, 4, 3)],
        ("16bit", 128): [(64, 64, 8, 3)],
    },
}
# Version 3's TMA kernels run on sm_90+ only, for 16-bit operands (fp32, the accurate
# path, stays on pointer loads: with descriptors its FMA-unit tiles spill, 384 B/thread
# in the single pass): the forward's tiles and the single pass's sm_90 ones.
HOPPER_TILES["fwd_tma"] = {group: tiles for group, tiles in AUTOTUNE_TILES["fwd"].items()
                           if group[0] == "16bit"}
HOPPER_TILES["dkdv_dq_tma"] = dict(HOPPER_TILES["dkdv_dq"])
HOPPER_ARCH = 90
# With dropout each kernel also holds its keep tile and the Philox rounds that make it:
# each list keeps the tiles that still compile without spills for sm_80 and sm_90 (the AOT
# check), and where none does, a narrower one replaces them ((128, 128, 8, 3) spills
# 312 B/thread in the D = 64 forward on sm_80, the D = 64 dK/dV tiles 16-20 B).
AUTOTUNE_TILES["fwd_dropout"] = {
    **AUTOTUNE_TILES["fwd"],
    ("16bit", 64): [(128, 64, 8, 4)],
    ("16bit", 128): [(64, 32, 8, 3), (64, 16, 4, 3)],
}
AUTOTUNE_TILES["dkdv_dropout"] = {
    **AUTOTUNE_TILES["dkdv"],
    ("16bit", 64): [(16, 128, 8, 3), (16, 64, 4, 3)],
    ("16bit", 128): [(32, 64, 8, 3)],
}
AUTOTUNE_TILES["dkdv_dq_dropout"] = {
    **AUTOTUNE_TILES["dkdv_dq"],
    ("16bit", 32): [(32, 128, 8, 3), (32, 64, 4, 3)],
    ("16bit", 64): [(32, 128, 8, 3), (16, 64, 4, 3)],
    ("16bit", 128): [(32, 64, 8, 3)],
    ("fp32", 64): [(32, 32, 4, 1)],
}
# On sm_90 the dropout single pass takes wgmma-shaped tiles too where one compiles
# without spills: at D = 128 none does (64 x 64 on 8 warps spills 52-68 B/thread at any
# stage count, 16 warps ~770, 64 x 128 380), so there it keeps the shared tile above and
# its dQ product stays on mma.sync (the static report lists it).
HOPPER_TILES["dkdv_dq_dropout"] = {
    ("16bit", 32): [(64, 128, 8, 3), (64, 64, 4, 3)],
    ("16bit", 64): [(64, 64, 8, 3)],   # (64, 128, 8, 3) spills 36 B, 4 warps 100
}
AUTOTUNE_TILES["dq_dropout"] = {
    **AUTOTUNE_TILES["dq"],
    ("16bit", 32): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    ("16bit", 64): [(128, 32, 8, 3), (64, 32, 4, 3)],
    ("16bit", 128): [(64, 64, 8, 3)],
    ("fp32", 32): [(32, 32, 8, 1)],
    ("fp32", 128): [(32, 16, 8, 1)],
}
# Delta is a memory-bound row reduction: one fixed tile.
PREPROCESS_BLOCK_M, PREPROCESS_WARPS = 64, 4
# Under the Triton interpreter (CPU tests): one small tile per kernel, BLOCK_M != BLOCK_N
# so the diagonal split over several sub-blocks is exercised too.
INTERPRETER_TILES = {"fwd": (32, 16), "fwd_tma": (32, 16), "fwd_dropout": (32, 16),
                     "dkdv": (16, 32), "dkdv_dq": (16, 32), "dkdv_dq_tma": (16, 32),
                     "dkdv_dropout": (16, 32), "dkdv_dq_dropout": (16, 32), "dq": (32, 16),
                     "dq_dropout": (32, 16)}
# Each tile list's kernel, the constexpr flags it is launched with, and the arguments its
# autotuner must zero before each trial (atomics add into them; the final run gets a
# zeroed buffer too).
_KERNELS = {"fwd": _attn_fwd_kernel, "fwd_tma": _attn_fwd_kernel,
            "fwd_dropout": _attn_fwd_kernel,
            "dkdv": _attn_bwd_dkdv_kernel, "dkdv_dq": _attn_bwd_dkdv_kernel,
            "dkdv_dq_tma": _attn_bwd_dkdv_kernel, "dkdv_dropout": _attn_bwd_dkdv_kernel,
            "dkdv_dq_dropout": _attn_bwd_dkdv_kernel,
            "dq": _attn_bwd_dq_kernel, "dq_dropout": _attn_bwd_dq_kernel}
_FLAGS = {"fwd": {"USE_TMA": False, "DROPOUT": False},
          "fwd_tma": {"USE_TMA": True, "DROPOUT": False},
          "fwd_dropout": {"USE_TMA": False, "DROPOUT": True},
          "dkdv": {"ACCUMULATE_DQ": False, "USE_TMA": False, "DROPOUT": False},
          "dkdv_dq": {"ACCUMULATE_DQ": True, "USE_TMA": False, "DROPOUT": False},
          "dkdv_dq_tma": {"ACCUMULATE_DQ": True, "USE_TMA": True, "DROPOUT": False},
          "dkdv_dropout": {"ACCUMULATE_DQ": False, "USE_TMA": False, "DROPOUT": True},
          "dkdv_dq_dropout": {"ACCUMULATE_DQ": True, "USE_TMA": False, "DROPOUT": True},
          "dq": {"DROPOUT": False}, "dq_dropout": {"DROPOUT": True}}
_ZEROED = {"dkdv_dq": ["DQ_ACCUM"], "dkdv_dq_tma": ["DQ_ACCUM"], "dkdv_dq_dropout": ["DQ_ACCUM"]}


def tiles_for(kernel: str, group: tuple[str, int], arch: int) -> list[tuple[int, int, int, int]]:
    """The autotune candidates of `kernel` for a dtype/head-dim group on sm_`arch`: the
    sm_90 list where the kernel has one for the group, else the list every arch shares."""
    if arch >= HOPPER_ARCH and group in HOPPER_TILES.get(kernel, {}):
        return HOPPER_TILES[kernel][group]
    return AUTOTUNE_TILES.get(kernel, {}).get(group, [])


def _block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two >= 16 (tl.arange and tl.dot need both)."""
    return max(16, next_power_of_2(head_dim))


def _tile_group(dtype: torch.dtype, block_d: int) -> tuple[str, int]:
    return ("fp32" if dtype == torch.float32 else "16bit", max(32, block_d))


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> int:
    """sm_XY as the integer XY, once per device (the tile lists differ by arch)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _config(block_m, block_n, num_warps, num_stages) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str, group: tuple[str, int], arch: int):
    """The kernel wrapped in an autotuner over its candidates for this dtype/head-dim group
    on this arch, tuned once per sequence-length bucket (the key; dtypes are always part
    of triton's)."""
    configs = [_config(*tile) for tile in tiles_for(kernel, group, arch)]
    return triton.autotune(configs=configs, key=["T_BUCKET", "HEAD_DIM"],
                           reset_to_zero=_ZEROED.get(kernel))(_KERNELS[kernel])


def _launch(kernel: str, tiled_dim: str, T: int, num_heads_total: int, dtype: torch.dtype,
            block_d: int, device: torch.device, *args, **constexprs) -> None:
    """Run `kernel` on a grid of (B * H, T / tile[tiled_dim]) programs: autotuned on a
    GPU, with the fixed interpreter tile on the CPU (no timing to tune on there)."""
    flags = _FLAGS[kernel]
    if INTERPRETED:
        block_m, block_n = INTERPRETER_TILES[kernel]
        grid = (num_heads_total, cdiv(T, block_m if tiled_dim == "BLOCK_M" else block_n))
        _KERNELS[kernel][grid](*args, **constexprs, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                               num_warps=4, num_stages=1)
        return
    grid = lambda meta: (num_heads_total, cdiv(T, meta[tiled_dim]))  # noqa: E731
    tuner = _autotuned(kernel, _tile_group(dtype, block_d), _arch(device))
    tuner[grid](*args, **constexprs, **flags)


# ----------------------------------------------------------------------------- TMA (version 3)

def _tma_rules_hold(*tensors: torch.Tensor) -> bool:
    """TMA's rules for a (T, D) slice of each (B, H, T, D) tensor: a 16-byte aligned start
    (so the base and the batch and head strides too) and rows 16 bytes apart."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(stride * size % 16 for stride in t.stride()[:3]):
            return False
    return True


def _use_tma(version: int, *tensors: torch.Tensor) -> bool:
    """Whether version 3's TMA loads run for these tensors: 16-bit ones, on an sm_90+ GPU
    (or under the interpreter, which emulates descriptors: the CPU tests check the
    indexing), with a triton that has device-side tensor descriptors."""
    if (version < 3 or not hasattr(tl, "make_tensor_descriptor")
            or tensors[0].dtype == torch.float32):
        return False
    on_hopper = (not INTERPRETED and tensors[0].is_cuda
                 and _arch(tensors[0].device) >= HOPPER_ARCH)
    return (on_hopper or INTERPRETED) and _tma_rules_hold(*tensors)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory Triton asks for at launch, where each program builds its descriptors
    (from PyTorch's caching allocator, on the current device and stream)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Device-side descriptors need triton.set_allocator: set ours unless the caller set
    one. In triton 3.8 the setting is per thread (a ContextVar, and autograd runs the
    backward on a thread of its own), so this runs before every TMA launch; the check
    reads triton's private module, whose shape has changed between releases."""
    if INTERPRETED:
        return  # the interpreter emulates descriptors in host memory
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:
        triton.set_allocator(_scratch)
        return
    current = _allocator.get() if hasattr(_allocator, "get") else _allocator
    if isinstance(current, NullAllocator):
        triton.set_allocator(_scratch)


# ----------------------------------------------------------------------------- launchers

def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    """The kernels read (B, H, T) through strides but need consecutive elements along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_bhtd(like: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) tensor stored as (B, T, H, D): the model's transpose(1, 2).reshape
    back to (B, T, C) after attention is then a free view, not a copy."""
    b, h, t, d = like.shape
    return like.new_empty(b, t, h, d).transpose(1, 2)  # int sizes: the cheapest to parse


def _bht_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]  # one call, not three (~0.2 us each)


class _Dropout(NamedTuple):
    """A call's dropout as its kernels take it: the (seed, offset) words, the 32-bit
    threshold (`kernels.philox`), the 1 / (1 - p) scale, and the DROPOUT flag."""
    seed_lo: int = 0
    seed_hi: int = 0
    offset: int = 0
    threshold: int = 0
    scale: float = 1.0

    @classmethod
    def of(cls, dropout_p: float, rng: torch.Tensor | None) -> "_Dropout":
        if dropout_p == 0.0:
            return cls()
        return cls(*philox.kernel_words(rng, dropout_p), 1.0 / (1.0 - dropout_p))

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0


def _forward(q, k, v, scale: float, version: int, dropout_p: float = 0.0,
             rng: torch.Tensor | None = None):
    q, k, v = _unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v)  # no generator: ~0.3 us
    b, h, t, d = q.shape
    t_k = k.shape[2]
    o = _empty_bhtd(q)
    lse = q.new_empty(b, h, t, dtype=torch.float32)
    if not o.numel():
        return o, lse  # no program to launch (an empty grid is not a valid launch)
    block_d = _block_d(d)
    dropout = _Dropout.of(dropout_p, rng)
    # A dropout tile reads its keys in the mask's order, which a TMA box cannot.
    use_tma = not dropout.enabled and _use_tma(version, q, k, v)
    with on_device_of(q):
        if use_tma:
            _ensure_scratch_allocator()
        kernel = "fwd_tma" if use_tma else "fwd_dropout" if dropout.enabled else "fwd"
        _launch(kernel, "BLOCK_M", t, b * h, q.dtype, block_d, q.device,
                q, k, v, o, lse, *_bht_strides(q), *_bht_strides(k), *_bht_strides(v),
                *_bht_strides(o), h, t, t_k, next_power_of_2(t_k), scale * LOG2E.value,
                *dropout, HEAD_DIM=d, BLOCK_D=block_d)
    return o, lse


def _backward(do, q, k, v, o, lse, dlse, scale: float, version: int, dropout_p: float = 0.0,
              rng: torch.Tensor | None = None):
    do, q, k, v, o = (_unit_stride_d(t) for t in (do, q, k, v, o))
    b, h, t, d = q.shape
    t_k = k.shape[2]
    # Atomics make dQ's last bits vary between runs: deterministic mode takes version 1's
    # single-owner dQ kernel, whatever the version (as the cuda backend does).
    single_pass = version >= 2 and not torch.are_deterministic_algorithms_enabled()
    dk, dv = _empty_bhtd(k), _empty_bhtd(v)
    if single_pass:  # dQ accumulates in fp32: dQ itself for fp32, else a buffer cast after
        dq_accum = _empty_bhtd(q.new_empty(q.shape, dtype=torch.float32)).zero_()
        dq = dq_accum if q.dtype == torch.float32 else None
    else:
        dq = _empty_bhtd(q)
    if not q.numel():
        return (dq_accum.to(q.dtype) if single_pass else dq), dk.zero_(), dv.zero_()
    block_d = _block_d(d)
    t_bucket = next_power_of_2(t_k)
    delta = torch.empty_like(lse)
    dlse = dlse.to(torch.float32).contiguous()  # often an expanded zero: make it addressable
    dropout = _Dropout.of(dropout_p, rng)
    use_tma = single_pass and not dropout.enabled and _use_tma(version, q, k, v, do)
    dkdv_kernel = "dkdv_dq_tma" if use_tma else "dkdv_dq" if single_pass else "dkdv"
    if dropout.enabled:
        dkdv_kernel += "_dropout"
    with on_device_of(q):
        if use_tma:
            _ensure_scratch_allocator()
        grid = (b * h, cdiv(t, PREPROCESS_BLOCK_M))
        _attn_bwd_preprocess_kernel[grid](o, do, dlse, delta, *_bht_strides(o),
                                          *_bht_strides(do), h, t, HEAD_DIM=d, BLOCK_D=block_d,
                                          BLOCK_M=PREPROCESS_BLOCK_M,
                                          num_warps=PREPROCESS_WARPS, num_stages=1)
        # Version 1 passes lse as DQ_ACCUM: an fp32 pointer the kernel never touches.
        dq_target = dq_accum if single_pass else lse
        dq_strides = _bht_strides(dq_accum) if single_pass else (0, 0, 0)
        _launch(dkdv_kernel, "BLOCK_N", t_k, b * h, q.dtype, block_d, q.device,
                q, k, v, do, dk, dv, dq_target, lse, delta, *_bht_strides(q), *_bht_strides(k),
                *_bht_strides(v), *_bht_strides(do), *_bht_strides(dk), *_bht_strides(dv),
                *dq_strides, h, t, t_k, t_bucket, scale * LOG2E.value, scale, *dropout,
                HEAD_DIM=d, BLOCK_D=block_d)
        if not single_pass:
            _launch("dq_dropout" if dropout.enabled else "dq", "BLOCK_M", t, b * h, q.dtype,
                    block_d, q.device, q, k, v, do, dq, lse, delta, *_bht_strides(q),
                    *_bht_strides(k), *_bht_strides(v), *_bht_strides(do), *_bht_strides(dq),
                    h, t, t_k, t_bucket,
                    scale * LOG2E.value, scale, *dropout, HEAD_DIM=d, BLOCK_D=block_d)
    if dq is None:
        dq = dq_accum.to(q.dtype)  # keeps the (B, T, H, D) layout
    return dq, dk, dv


# ----------------------------------------------------------------------------- torch ops
# Custom ops, so torch.compile treats each launch as one opaque node (with the fake impls
# giving it output shapes and strides) instead of tracing into Triton's Python launcher.
# The kernel version is an argument, read once per forward call: its backward runs the
# same version whatever is selected by then, and a traced graph keeps the version in use
# when it was traced (as the cuda backend does). rng: the dropout's (seed, offset), a CPU
# int64 tensor (`kernels.philox`), None without.

@custom_op("gptk::triton_attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      version: int, dropout_p: float,
                      rng: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, version, dropout_p, rng)


@_attention_fwd_op.register_fake
def _(q, k, v, scale, version, dropout_p, rng):
    b, h, t, _ = q.shape
    return _empty_bhtd(q), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("gptk::triton_attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor, scale: float,
                      version: int, dropout_p: float, rng: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, dlse, scale, version, dropout_p, rng)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, scale, version, dropout_p, rng):
    return _empty_bhtd(q), _empty_bhtd(k), _empty_bhtd(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, version, dropout_p, rng = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)  # O(T) memory: no probabilities, no mask
    ctx.scale, ctx.version, ctx.dropout_p, ctx.rng = scale, version, dropout_p, rng


def _attention_fwd_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, dlse, ctx.scale, ctx.version,
                                   ctx.dropout_p, ctx.rng)
    return dq, dk, dv, None, None, None, None


_attention = differentiable(_attention_fwd_op, _attention_fwd_backward, _setup_context)


# ----------------------------------------------------------------------------- entry points

def _check_inputs(q, k, v) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton causal_attention supports {SUPPORTED_DTYPES}, got {q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3] or k.shape[2] < q.shape[2]:
        raise ValueError(f"q must have shape (B, H, T, D) and k, v one shape (B, H, T_K, D) "
                         f"with T_K >= T, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"triton causal_attention supports head dims up to {MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}")


def attention_forward(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
    """Causal attention on (B, H, T, D) queries and (B, H, T_K, D) keys and values (T_K >= T:
    the mask aligned to the bottom-right) returning (o, lse): o as `causal_attention`, lse
    the fp32 (B, H, T) natural log-sum-exp of each query's scaled scores before dropout
    (differentiable)."""
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    rng = philox.seed_tensor(philox.check_seed(dropout_seed)) if dropout_p > 0.0 else None
    return _attention(q, k, v, scale, VERSIONS.current(), dropout_p, rng)


def causal_attention(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
    """Checked causal attention, for a direct call: queries at most as many as keys (KV
    cache), attention dropout with the mask of dropout_seed = (seed, offset), or a fresh
    one."""
    return attention_forward(q, k, v, scale, dropout_p, dropout_seed)[0]


def canonical_causal_attention(q, k, v, scale, dropout_p, dropout_seed=None):
    """The backend's entry point (`OPS`): a call `kernels.specs` has checked and put in
    canonical form (a float scale, a checked seed) and `unsupported` has accepted, so
    nothing is checked twice (~2.5 us of host time a call)."""
    rng = philox.seed_tensor(dropout_seed) if dropout_p > 0.0 else None
    return _attention(q, k, v, scale, VERSIONS.current(), dropout_p, rng)[0]


# ----------------------------------------------------------------------------- AOT specs

AOT_HEAD_DIMS = (32, 64, 128)
_AOT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_FP32_POINTERS = ("LSE", "DELTA", "DLSE", "DQ_ACCUM")  # fp32 whatever the operands' dtype
_SCALARS = {"H": "i32", "T": "i32", "T_K": "i32", "T_BUCKET": "i32", "qk_scale_log2": "fp32",
            "scale": "fp32", "seed_lo": "i32", "seed_hi": "i32", "drop_offset": "i32",
            "drop_threshold": "i32", "drop_scale": "fp32"}


def _aot_signature(fn, data_type: str, constexprs: dict) -> dict[str, str]:
    def type_of(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in _FP32_POINTERS:
            return "*fp32"
        if name.startswith("stride_"):
            return "i32"
        if name in _SCALARS:
            return _SCALARS[name]
        return f"*{data_type}"  # Q, K, V, O and their gradients
    return {name: type_of(name) for name in fn.arg_names}


def _tile_archs(kernel: str, group: tuple[str, int]) -> dict[tuple, tuple[int, ...] | None]:
    """Each candidate tile of `kernel` for `group` and the archs that can pick it (None:
    every arch)."""
    archs: dict[tuple, set[int]] = {}
    for arch in TARGET_ARCHS:
        for tile in tiles_for(kernel, group, arch):
            archs.setdefault(tile, set()).add(arch)
    return {tile: None if on == set(TARGET_ARCHS) else tuple(sorted(on))
            for tile, on in archs.items()}


def _aot_specs() -> list[AotSpec]:
    """Every (kernel, tile, dtype, head dim) the launchers can run at GPT-2 shapes, for the
    archs whose tile lists hold it."""
    specs = []
    for dtype, type_name in _AOT_DTYPES.items():
        for head_dim in AOT_HEAD_DIMS:
            dims = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim)}
            group = _tile_group(dtype, dims["BLOCK_D"])
            for kernel, fn in _KERNELS.items():
                for (block_m, block_n, warps, stages), archs in _tile_archs(kernel, group).items():
                    constexprs = {**dims, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                  **_FLAGS[kernel]}
                    specs.append(AotSpec(
                        f"attention_{kernel}[{type_name},D={head_dim},BLOCK_M={block_m},"
                        f"BLOCK_N={block_n},warps={warps},stages={stages}]",
                        fn, _aot_signature(fn, type_name, constexprs), constexprs, warps, stages,
                        archs=archs))
            constexprs = {**dims, "BLOCK_M": PREPROCESS_BLOCK_M}
            specs.append(AotSpec(
                f"attention_bwd_preprocess[{type_name},D={head_dim},BLOCK_M={PREPROCESS_BLOCK_M}]",
                _attn_bwd_preprocess_kernel,
                _aot_signature(_attn_bwd_preprocess_kernel, type_name, constexprs), constexprs,
                PREPROCESS_WARPS, 1))
    return specs


AOT_SPECS = _aot_specs()
