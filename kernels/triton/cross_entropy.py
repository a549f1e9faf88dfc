"""Cross-entropy in Triton: per-row losses with an online softmax, and the gradient
recomputed in one pass from each row's saved max and sum of exponentials.

Math, per row of V logits x with target t (all in fp32, whatever the logits' dtype):
    m = max_j x_j,  d = sum_j exp(x_j - m),  loss = log(d) + (m - x_t)   (= lse - x_t)
    d loss / d x_j = exp(x_j - m) / d - [j == t]         (softmax minus the one-hot)
The forward sweeps the row once in blocks of BLOCK_V with the online softmax: the running
max m and sum d, d rescaled by exp(m_old - m_new) whenever the max grows, so a row is
never held whole. Rows whose target is ignore_index get loss 0 and gradient 0.

The standalone op (versions 2 and 3) saves only each row's m and d (8 bytes per row) and
the logits autograd already holds; its backward is one kernel that reads each row once
and writes dlogits_ij = g_i * (exp(x_ij - m_i) / d_i - [j == t_i]) straight into
the gradient autograd returns, g_i being the upstream gradient of loss i (1/n_kept for a
mean). Every (N, V) tensor it touches is one the graph needs anyway: the logits, then
their gradient. (Not lse alone: at logits ~1000, lse rounded to fp32 is off by up to
6e-5 absolute, hence every exp(x - lse) by 6e-5 relative; x - m is exact there, and
log(d) is small.)
Version 1 computed the gradient during the forward into a second (N, V) buffer and
scaled it by g in the backward into a third: at GPT-2 size (8192 x 50257, bf16) 0.8 GB
more at the peak, and one more write and read of it. Writing dlogits over the logits
(Liger's trick) would save the last (N, V) too, but the logits belong to the caller: the
model may return them, another loss may read them, a retain_graph backward reads them
again, so an op cannot know they are dead, and a silent in-place write would corrupt
them. The place where that is safe is the fused linear + cross-entropy, whose logits
chunks are temporaries it owns: `launch_cross_entropy` with grad=logits does it there.

The loss variants (`kernels.losses`) ride along the same passes: with SOFTCAP every logit
is replaced by z = softcap * tanh(x / softcap) where it is loaded (in both passes; tanh as
1 - 2 / (exp(2y) + 1), which saturates to +-1 without overflow); with SMOOTHING the sweep
also sums z for the label-smoothing term; the z-loss needs only each row's lse. The
gradient generalises to
    g * ((exp(z - m) / d) (1 + 2 c lse) - (1 - e) [j == t] - e / V) * (1 - (z / softcap)^2)
written by the same gradient passes (version 3's loop-free blocks included). Both flags
are constexpr, so without them the passes over the logits are the plain loss's but for
one subtraction per gradient element (the smoothing's uniform term, 0 without it); the
z-loss and the smoothing's per-row terms are a few scalar operations per row, paid by
every call.

Vectorised for any V. A row's 16-byte vectors start wherever the row does: with V =
50257 (GPT-2's vocabulary unpadded) row i of bf16 logits starts 2 * 50257 * i bytes in,
8-byte aligned at best, so a plain `x[cols]` load cannot be proven aligned and compiles to
scalar 2-byte loads. Each row is therefore split at its own 16-byte boundaries
(`_row_partition`): a `head` of fewer than VEC elements before the first boundary, an
aligned `body` of whole vectors (its pointer hinted 16-byte aligned with tl.multiple_of,
its length a multiple of VEC, so its masked loads are 16-byte vector loads), and a tail
of fewer than VEC elements; head and tail are read together as one small masked block of
2 * VEC lanes. VEC = 16 / element size: 8 for bf16/fp16, 4 for fp32. A store goes
through the same partition, vectorised when its row starts at the same address modulo
16 as the logits' (GRAD_ALIGNED: in place, or a contiguous gradient of contiguous logits).

Loads in flight (memory-bound: H100 3.35 TB/s, H200 4.8 TB/s). To cover HBM latency each
SM needs bandwidth x latency / SMs in flight at all times: ~20 KB on an H100, ~30 KB on an
H200 (~700 ns). A block is BLOCK_BYTES = 16 KB (8192 bf16 or 4096 fp32 logits) over 8
warps: four 16-byte loads per thread, 48-80 registers (AOT), 3-5 programs per SM. In
version 2 a program's loop issues a block's loads, waits for them, then reduces the block
(two block-wide reductions, each a barrier) before the next block's loads leave: each
program has loads in flight only part of the time, and the H200 record measured the
forward at 42 % of HBM bandwidth (bench/results/nvidia-h200-2026-11-27). num_stages does
not help here (Triton pipelines these loads only into a dot). Version 3 (the default):
- the sweeps prefetch: block k + 1's loads are issued before block k is reduced (or
  stored), in registers (16 more per thread in bf16), so each program keeps a block in
  flight while it computes: about twice the bytes in flight per SM;
- the backward is loop-free: one program per (row, 8 KB block of the row) on a 2-D grid
  of 4-warp programs (13 per GPT-2 row), which loads its block, the row's saved (m, d)
  and target, and stores its gradient block, with nothing to wait for in between; the
  SM keeps as many blocks in flight as it holds programs (10 on sm_90 at 48 registers:
  80 KB).
Version 2 stays selectable (GPTK_TRITON_CROSS_ENTROPY_VERSION=2) until a GPU record
compares them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import versions
from kernels.custom_ops import custom_op, differentiable
from kernels.losses import PLAIN, LossVariant, finish, flat_int64_targets, reduce_losses
from kernels.triton.aot import AotSpec
from kernels.triton.device import on_device_of
from kernels.triton.grid import cdiv, next_power_of_2
from kernels.triton.interpreter import INTERPRETED

VERSIONS = versions.declare("triton_cross_entropy", {
    1: "gradient computed in the forward into a second (N, V) buffer, scaled into a third "
       "by the backward (kept selectable until a GPU record compares it with 2)",
    2: "forward saves each row's max and sum of exponentials, the backward recomputes the "
       "gradient in one pass into the returned tensor; rows vectorised for any V",
    3: "version 2 with more loads in flight: each sweep prefetches a row's next block while "
       "it works on the current one, and the backward is loop-free (one program per block of "
       "a row, on a 2-D grid)",
}, default=3)

BLOCK_BYTES = 16384    # bytes of logits per block of a sweep (see the module docstring)
NUM_WARPS = 8
BWD_BLOCK_BYTES = 8192  # version 3's backward: bytes of logits per program
BWD_NUM_WARPS = 4
SCALE_BLOCK = 4096     # version 1's scaling pass: gradient elements per program
# Under the interpreter (CPU tests) a block wider than the row only costs time.
INTERPRETER_MAX_BLOCK_V = 4096


def block_v(n_cols: int, element_size: int) -> int:
    """Logits per block of a sweep: BLOCK_BYTES on a GPU, whatever V (one compiled config
    per dtype); under the interpreter no wider than the row."""
    block = BLOCK_BYTES // element_size
    if INTERPRETED:
        return min(block, INTERPRETER_MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))
    return block


def bwd_block_v(n_cols: int, element_size: int) -> int:
    """Logits per program of version 3's backward; under the interpreter a quarter of the
    row, so that the CPU tests run several programs per row."""
    if INTERPRETED:
        return max(16, next_power_of_2(n_cols) // 4)
    return BWD_BLOCK_BYTES // element_size


# ----------------------------------------------------------------------------- row layout

@triton.jit
def _row_partition(row, n_cols, VEC: tl.constexpr):
    """(head, body): row[0:head] lies before the first 16-byte boundary, row[head:head+body]
    is whole 16-byte vectors, row[head+body:n_cols] is the tail (< VEC elements).

    The hints must sit on the ops that compute the values (tl.multiple_of annotates the
    op that produced its argument, which a function parameter or a returned value is
    not): body is hinted here, and each caller hints its own `row + head` as 16-byte
    aligned (on a pointer the hint counts bytes)."""
    element_bytes: tl.constexpr = 16 // VEC
    misaligned = (row.to(tl.int64) // element_bytes) % VEC  # elements past a boundary
    head = tl.minimum((VEC - misaligned) % VEC, n_cols).to(tl.int32)
    body = tl.multiple_of((n_cols - head) // VEC * VEC, VEC)
    return head, body


@triton.jit
def _edge_columns(head, body, n_cols, VEC: tl.constexpr):
    """The head's and the tail's columns as one block of 2 * VEC lanes (lane i < VEC: column
    i of the head; lane VEC + i: column head + body + i of the tail), and its mask."""
    lanes = tl.arange(0, 2 * VEC)
    in_head = lanes < VEC
    cols = tl.where(in_head, lanes, head + body + lanes - VEC)
    mask = tl.where(in_head, lanes < head, cols < n_cols)
    return cols, mask


# ----------------------------------------------------------------------------- sweeps

@triton.jit
def _soft_cap(x, cap):
    """cap * tanh(x / cap) as cap - 2 cap / (exp(2 x / cap) + 1): +-inf give +-cap, and a
    large x saturates (exp overflows to inf) instead of producing inf / inf."""
    return cap - 2.0 * cap / (tl.exp(2.0 * x / cap) + 1.0)


@triton.jit
def _z(x, mask, softcap, SOFTCAP: tl.constexpr):
    """Loaded logits x (-inf where masked) as fp32 z, soft-capped with SOFTCAP (the masked
    lanes stay -inf)."""
    z = x.to(tl.float32)
    if SOFTCAP:
        z = tl.where(mask, _soft_cap(z, softcap), -float("inf"))
    return z


@triton.jit
def _online_softmax_step(m, d, x):
    """Fold a block of logits x (fp32, -inf where masked) into the running max m and the
    running sum d = sum exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every logit so far is -inf, m stays -inf and exp(m - m_new) would be
    # exp(-inf + inf) = NaN: measure from 0 instead (every term is then exp(-inf) = 0).
    m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
    return m_new, d


@triton.jit
def _row_stats(logits, n_cols, softcap, SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
               BLOCK_V: tl.constexpr, VEC: tl.constexpr, PREFETCH: tl.constexpr):
    """(m, d, sum of z) of one row (the sum only with SMOOTHING, else 0): the head and tail
    block, then the aligned body block by block. With PREFETCH (version 3) the loads of
    block k + 1 are issued before block k is reduced, so they are in flight while it is
    (the loop is not software-pipelined otherwise: each block's loads would wait for the
    previous block's reductions)."""
    head, body = _row_partition(logits, n_cols, VEC)
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
    edges = _z(tl.load(logits + edge_cols, mask=edge_mask, other=-float("inf")), edge_mask,
               softcap, SOFTCAP)
    m, d = _online_softmax_step(-float("inf"), 0.0, edges)
    z_sum = 0.0
    if SMOOTHING:
        z_sum = tl.sum(tl.where(edge_mask, edges, 0.0), axis=0)
    body_ptr = tl.multiple_of(logits + head, 16)
    if PREFETCH:
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + cols, mask=cols < body, other=-float("inf"))
        # cdiv(body, BLOCK_V) iterations; the last one's prefetch is wholly masked (no load).
        for start in range(BLOCK_V, body + BLOCK_V, BLOCK_V):
            next_cols = start + tl.arange(0, BLOCK_V)
            x_next = tl.load(body_ptr + next_cols, mask=next_cols < body, other=-float("inf"))
            cols = start - BLOCK_V + tl.arange(0, BLOCK_V)  # x's columns
            z = _z(x, cols < body, softcap, SOFTCAP)
            m, d = _online_softmax_step(m, d, z)
            if SMOOTHING:
                z_sum += tl.sum(tl.where(cols < body, z, 0.0), axis=0)
            x = x_next
    else:
        for start in range(0, body, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = _z(tl.load(body_ptr + cols, mask=cols < body, other=-float("inf")),
                   cols < body, softcap, SOFTCAP)
            m, d = _online_softmax_step(m, d, z)
            if SMOOTHING:
                z_sum += tl.sum(tl.where(cols < body, z, 0.0), axis=0)
    return m, d, z_sum


@triton.jit
def _row_loss(m, d, z_sum, target_z, n_cols, smoothing, z_loss, SMOOTHING: tl.constexpr):
    """(loss, lse) of a row from its stats and its target's z (see `kernels.losses`). The
    nll is log(d) + (m - z_t), not lse - z_t: at logits ~1000 lse rounded to fp32 is off
    by up to 6e-5, while m - z_t is exact there."""
    log_d = tl.log(d)
    loss = log_d + (m - target_z)
    if SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (log_d + (m - z_sum / n_cols))
    lse = m + log_d
    return loss + z_loss * lse * lse, lse


@triton.jit
def _store_gradient(grad, x, cols, mask, shift, scale, target_weight, uniform, target,
                    softcap, SOFTCAP: tl.constexpr):
    """Store (exp(z - shift) * scale - target_weight * [cols == target] - uniform) * tanh'
    at the pointers `grad`, for loaded logits x (z: x soft-capped with SOFTCAP, whose
    derivative tanh' = 1 - (z / softcap)^2 multiplies the rest); cols are the elements'
    columns in the row."""
    z = x.to(tl.float32)
    if SOFTCAP:
        z = _soft_cap(z, softcap)
    g = tl.exp(z - shift) * scale - tl.where(cols == target, target_weight, 0.0) - uniform
    if SOFTCAP:
        capped = z / softcap
        g = g * (1.0 - capped * capped)
    tl.store(grad, g.to(grad.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_block(logits, grad, cols, mask, shift, scale, target_weight, uniform, target,
                    softcap, SOFTCAP: tl.constexpr):
    """_store_gradient of the logits at the pointers `logits`."""
    x = tl.load(logits, mask=mask, other=0.0)
    _store_gradient(grad, x, cols, mask, shift, scale, target_weight, uniform, target, softcap,
                    SOFTCAP)


@triton.jit
def _body_pointers(logits, grad, n_cols, GRAD_ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """(head, body, the body's logits, the body's gradient): see _row_partition; the body's
    logits are 16-byte aligned, its gradient too when GRAD_ALIGNED."""
    head, body = _row_partition(logits, n_cols, VEC)
    body_ptr = tl.multiple_of(logits + head, 16)
    if GRAD_ALIGNED:
        grad_ptr = tl.multiple_of(grad + head, 16)
    else:
        grad_ptr = grad + head
    return head, body, body_ptr, grad_ptr


@triton.jit
def _gradient_sweep(logits, grad, n_cols, shift, scale, weight, target, smoothing, softcap,
                    SOFTCAP: tl.constexpr, GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr,
                    VEC: tl.constexpr, PREFETCH: tl.constexpr):
    """One pass over a row writing its gradient times the row's weight: grad_j = (exp(z_j -
    shift) * scale - weight (1 - smoothing) [j == target] - weight smoothing / V) * tanh'_j
    (for the plain loss the softmax minus the one-hot: scale = weight / d with shift = m).
    grad may be logits itself (block k + 1 is loaded before block k is stored, at other
    addresses). PREFETCH as in _row_stats."""
    head, body, body_ptr, grad_ptr = _body_pointers(logits, grad, n_cols, GRAD_ALIGNED, VEC)
    target_weight = weight * (1.0 - smoothing)
    uniform = weight * smoothing / n_cols
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
    _gradient_block(logits + edge_cols, grad + edge_cols, edge_cols, edge_mask, shift, scale,
                    target_weight, uniform, target, softcap, SOFTCAP)
    if PREFETCH:
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + cols, mask=cols < body, other=0.0)
        for start in range(BLOCK_V, body + BLOCK_V, BLOCK_V):
            next_cols = start + tl.arange(0, BLOCK_V)
            x_next = tl.load(body_ptr + next_cols, mask=next_cols < body, other=0.0)
            _store_gradient(grad_ptr + cols, x, head + cols, cols < body, shift, scale,
                            target_weight, uniform, target, softcap, SOFTCAP)
            x = x_next
            cols = next_cols
    else:
        for start in range(0, body, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            _gradient_block(body_ptr + cols, grad_ptr + cols, head + cols, cols < body, shift,
                            scale, target_weight, uniform, target, softcap, SOFTCAP)


@triton.jit
def _target(Targets, row, n_cols, ignore_index):
    """(keep, in_range, safe target) of a row. An out-of-range target (rejected before the
    launch, or by a device-side assert on the GPU) must still not make the kernel read
    outside the row: it reads column 0 and gets a NaN loss."""
    target = tl.load(Targets + row)
    keep = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    return keep, in_range, tl.where(keep & in_range, target, 0).to(tl.int32)


@triton.jit
def _sweep_coefficients(keep, weight, m, d, lse, z_loss):
    """(shift, scale) of a row's gradient sweep (see _gradient_sweep), for a row of max m,
    sum d and log-sum-exp lse and its weight (0 if ignored): the z-loss's 2 z_loss lse
    scales the softmax. Ignored rows get exactly 0: scale 0 (their weight may come from inf
    or NaN, a mean over no kept target; d may be 0) and a finite shift, so exp(x - shift)
    stays finite (a row of -inf logits has m = -inf)."""
    scale = tl.where(keep, weight * (1.0 + 2.0 * z_loss * lse) / d, 0.0)
    shift = tl.where(m == -float("inf"), 0.0, m)
    return shift, scale


@triton.jit
def _gradient_coefficients(Stats, Targets, GradLosses, stride_grad_losses, row, n_cols,
                           ignore_index, z_loss):
    """(shift, scale, weight, target) of a row's gradient from the forward's saved (m, d)
    and the upstream gradient g = GradLosses[row]: g * d loss / d logits."""
    keep, _in_range, target = _target(Targets, row, n_cols, ignore_index)
    m = tl.load(Stats + 2 * row)
    d = tl.load(Stats + 2 * row + 1)
    weight = tl.where(keep, tl.load(GradLosses + row * stride_grad_losses), 0.0)
    shift, scale = _sweep_coefficients(keep, weight, m, d, m + tl.log(d), z_loss)
    return shift, scale, weight, target


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Grad, Targets, RowWeight, Losses, Stats,
    stride_logits, stride_grad, stride_row_weight,
    n_cols, ignore_index, smoothing, z_loss, softcap,
    COMPUTE_GRAD: tl.constexpr, GRAD_ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr,
    SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr,
):
    """One program per row: the loss, and (m, d) into Stats[row]; with COMPUTE_GRAD also
    RowWeight[row] times the row's gradient, into Grad (which may be Logits: the fused
    linear + cross-entropy writes it in place)."""
    VEC: tl.constexpr = 128 // Logits.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_logits
    keep, in_range, target = _target(Targets, row, n_cols, ignore_index)

    m, d, z_sum = _row_stats(logits, n_cols, softcap, SOFTCAP, SMOOTHING, BLOCK_V, VEC,
                             PREFETCH)
    # Read before the gradient sweep, which may overwrite the row when Grad is Logits.
    target_z = tl.load(logits + target).to(tl.float32)
    if SOFTCAP:
        target_z = _soft_cap(target_z, softcap)
    loss, lse = _row_loss(m, d, z_sum, target_z, n_cols, smoothing, z_loss, SMOOTHING)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(Losses + row, tl.where(keep, loss, 0.0))
    tl.store(Stats + 2 * row, m)
    tl.store(Stats + 2 * row + 1, d)

    if COMPUTE_GRAD:
        weight = tl.where(keep, tl.load(RowWeight + row * stride_row_weight), 0.0)
        shift, scale = _sweep_coefficients(keep, weight, m, d, lse, z_loss)
        _gradient_sweep(logits, Grad + row * stride_grad, n_cols, shift, scale, weight,
                        target, smoothing, softcap, SOFTCAP, GRAD_ALIGNED, BLOCK_V, VEC,
                        PREFETCH)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits, Stats, Targets, GradLosses, DLogits,
    stride_logits, stride_dlogits, stride_grad_losses,
    n_cols, ignore_index, smoothing, z_loss, softcap,
    GRAD_ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Version 2's backward, one program per row: dlogits = g * d loss / d logits with
    g = GradLosses[row], recomputed from the saved (m, d): one read of the row, one write."""
    VEC: tl.constexpr = 128 // Logits.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    shift, scale, weight, target = _gradient_coefficients(Stats, Targets, GradLosses,
                                                          stride_grad_losses, row, n_cols,
                                                          ignore_index, z_loss)
    _gradient_sweep(Logits + row * stride_logits, DLogits + row * stride_dlogits, n_cols,
                    shift, scale, weight, target, smoothing, softcap, SOFTCAP, GRAD_ALIGNED,
                    BLOCK_V, VEC, False)


@triton.jit
def _cross_entropy_bwd_block_kernel(
    Logits, Stats, Targets, GradLosses, DLogits,
    stride_logits, stride_dlogits, stride_grad_losses,
    n_cols, ignore_index, smoothing, z_loss, softcap,
    GRAD_ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Version 3's backward, loop-free: program (row, j) writes block j of the row's aligned
    body (program (row, 0) the head and tail too), the same values as version 2's sweep.
    Every load of a program is issued at once and nothing waits on a previous block: the
    GPU keeps as many blocks in flight as it holds programs."""
    VEC: tl.constexpr = 128 // Logits.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    shift, scale, weight, target = _gradient_coefficients(Stats, Targets, GradLosses,
                                                          stride_grad_losses, row, n_cols,
                                                          ignore_index, z_loss)
    target_weight = weight * (1.0 - smoothing)
    uniform = weight * smoothing / n_cols
    logits = Logits + row * stride_logits
    grad = DLogits + row * stride_dlogits
    head, body, body_ptr, grad_ptr = _body_pointers(logits, grad, n_cols, GRAD_ALIGNED, VEC)
    if block == 0:
        edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
        _gradient_block(logits + edge_cols, grad + edge_cols, edge_cols, edge_mask, shift,
                        scale, target_weight, uniform, target, softcap, SOFTCAP)
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    _gradient_block(body_ptr + cols, grad_ptr + cols, head + cols, cols < body, shift, scale,
                    target_weight, uniform, target, softcap, SOFTCAP)


@triton.jit
def _scale_rows_kernel(
    Grad, RowScale, Targets, Out,
    stride_grad, stride_row_scale, stride_out, n_cols, ignore_index,
    BLOCK: tl.constexpr,
):
    """Version 1's backward: Out = Grad with row i scaled by RowScale[i]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Ignored rows stay exactly 0: a mean over zero kept targets has an upstream gradient
    # of g / 0 = inf, and 0 * inf would be NaN.
    keep = tl.load(Targets + row) != ignore_index
    scale = tl.where(keep, tl.load(RowScale + row * stride_row_scale).to(tl.float32), 0.0)
    g = tl.load(Grad + row * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, (g * scale).to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def shares_alignment(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether every row of the 2-D tensors a and b starts at the same address modulo 16
    (then one row partition aligns both: GRAD_ALIGNED)."""
    vec = 16 // a.element_size()
    same_rows = a.shape[0] <= 1 or (a.stride(0) - b.stride(0)) % vec == 0
    return a.element_size() == b.element_size() and same_rows and \
        a.data_ptr() % 16 == b.data_ptr() % 16


def launch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         losses: torch.Tensor, grad: torch.Tensor | None,
                         row_weight: torch.Tensor | None, stats: torch.Tensor,
                         variant: LossVariant = PLAIN, version: int | None = None) -> None:
    """Per-row losses of logits (n, V) into losses (n,) fp32, each row's max and sum of
    exponentials into stats (n, 2) fp32 and, when grad is given,
    row_weight[i] * d loss_i / d logits into grad (n, V), which may be logits itself.
    targets: (n,) int64. row_weight: (n,) fp32, any stride (0 for one shared weight).
    version: the kernel version whose sweeps run (default: the one selected)."""
    n_rows, n_cols = logits.shape
    if not n_rows:
        return
    version = VERSIONS.current() if version is None else version
    softcap, smoothing = bool(variant.softcap), bool(variant.label_smoothing)
    with on_device_of(logits):
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits, grad, targets, row_weight, losses, stats,
            logits.stride(0), 0 if grad is None else grad.stride(0),
            0 if row_weight is None else row_weight.stride(0),
            n_cols, ignore_index, *variant,
            COMPUTE_GRAD=grad is not None,
            GRAD_ALIGNED=grad is not None and shares_alignment(logits, grad),
            SOFTCAP=softcap, SMOOTHING=smoothing,
            BLOCK_V=block_v(n_cols, logits.element_size()),
            PREFETCH=prefetches(version, grad is not None, softcap or smoothing),
            num_warps=NUM_WARPS, num_stages=1)


def prefetches(version: int, compute_grad: bool, variant: bool) -> bool:
    """Whether the forward's sweeps prefetch (version 3), except for the forward that
    also writes the gradient under a loss variant: holding a prefetched block beside the
    variant's terms, its fp32 instance spills on sm_80 (8 B/thread at 64 registers, the
    AOT check); it sweeps as version 2 does."""
    return version >= 3 and not (compute_grad and variant)


def row_lse(stats: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp from its saved (max, sum of exponentials)."""
    return stats[:, 0] + stats[:, 1].log()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, V) with a unit column stride, copying only when no such view exists."""
    t2d = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


# ----------------------------------------------------------------------------- version 2, 3 ops
# The version is an argument, read once per forward call: the backward runs the forward's.
# label_smoothing, z_loss, softcap: the loss variant (`kernels.losses`; 0 for none).

@custom_op("gptk::triton_cross_entropy_stats_fwd", mutates_args=())
def cross_entropy_stats_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            version: int, label_smoothing: float, z_loss: float,
                            softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses (n,) fp32, per-row (max, sum of exp(z - max)) (n, 2) fp32) of
    logits (n, V) (z: the logits, soft-capped with softcap > 0)."""
    n_rows = logits.shape[0]
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    stats = logits.new_empty(n_rows, 2, dtype=torch.float32)  # int sizes: cheapest to parse
    launch_cross_entropy(logits, targets, ignore_index, losses, None, None, stats,
                         LossVariant(label_smoothing, z_loss, softcap), version)
    return losses, stats


@cross_entropy_stats_fwd.register_fake
def _(logits, targets, ignore_index, version, label_smoothing, z_loss, softcap):
    n_rows = logits.shape[0]
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty((n_rows, 2), dtype=torch.float32))


@torch.library.custom_op("gptk::triton_cross_entropy_stats_bwd", mutates_args=())
def cross_entropy_stats_bwd(grad_losses: torch.Tensor, logits: torch.Tensor,
                            targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                            version: int, label_smoothing: float, z_loss: float,
                            softcap: float) -> torch.Tensor:
    """d (sum_i grad_losses[i] * loss_i) / d logits, a new (n, V) tensor in the logits'
    dtype (ignored rows zero), from the forward's stats."""
    n_rows, n_cols = logits.shape
    dlogits = logits.new_empty(n_rows, n_cols)
    if not n_rows:
        return dlogits
    args = (logits, stats, targets, grad_losses, dlogits,
            logits.stride(0), dlogits.stride(0), grad_losses.stride(0), n_cols, ignore_index,
            label_smoothing, z_loss, softcap)
    flags = {"GRAD_ALIGNED": shares_alignment(logits, dlogits), "SOFTCAP": bool(softcap)}
    with on_device_of(logits):
        if version >= 3:
            block = bwd_block_v(n_cols, logits.element_size())
            _cross_entropy_bwd_block_kernel[(n_rows, cdiv(n_cols, block))](
                *args, **flags, BLOCK_V=block, num_warps=BWD_NUM_WARPS, num_stages=1)
        else:
            _cross_entropy_bwd_kernel[(n_rows,)](
                *args, **flags, BLOCK_V=block_v(n_cols, logits.element_size()),
                num_warps=NUM_WARPS, num_stages=1)
    return dlogits


@cross_entropy_stats_bwd.register_fake
def _(grad_losses, logits, targets, stats, ignore_index, version, label_smoothing, z_loss,
      softcap):
    return logits.new_empty(logits.shape)


def _stats_setup(ctx, inputs, output):
    logits, targets, ignore_index, version, *variant = inputs
    _losses, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, targets, stats)  # no (N, V) tensor of its own
    ctx.ignore_index, ctx.version, ctx.variant = ignore_index, version, variant


def _stats_backward(ctx, grad_losses, _grad_stats):
    logits, targets, stats = ctx.saved_tensors
    grad_losses = grad_losses.to(torch.float32)  # any stride: 0 for a mean's expanded scalar
    return (cross_entropy_stats_bwd(grad_losses, logits, targets, stats, ctx.ignore_index,
                                    ctx.version, *ctx.variant),
            None, None, None, None, None, None)


_cross_entropy_stats = differentiable(cross_entropy_stats_fwd, _stats_backward, _stats_setup)


# ----------------------------------------------------------------------------- version 1 ops
# Kept selectable (GPTK_TRITON_CROSS_ENTROPY_VERSION=1, or versions.select) until a GPU
# record shows version 2 correct and faster; it runs the same forward kernel.

@custom_op("gptk::triton_cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      compute_grad: bool, label_smoothing: float, z_loss: float,
                      softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses (n,) fp32, d losses_i / d logits (n, V) in the logits' dtype, or an
    empty (0, V) tensor without compute_grad, per-row stats (n, 2)) for logits (n, V) and
    int64 targets (n,)."""
    n_rows, n_cols = logits.shape
    losses = logits.new_empty(n_rows, dtype=torch.float32)
    stats = logits.new_empty(n_rows, 2, dtype=torch.float32)
    grad = logits.new_empty(n_rows if compute_grad else 0, n_cols)
    ones = torch.ones(1, dtype=torch.float32, device=logits.device).expand(n_rows)
    launch_cross_entropy(logits, targets, ignore_index, losses,
                         grad if compute_grad else None, ones, stats,
                         LossVariant(label_smoothing, z_loss, softcap), version=1)
    return losses, grad, stats


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, compute_grad, label_smoothing, z_loss, softcap):
    n_rows, n_cols = logits.shape
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty((n_rows if compute_grad else 0, n_cols)),
            logits.new_empty((n_rows, 2), dtype=torch.float32))


@torch.library.custom_op("gptk::triton_cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(grad: torch.Tensor, grad_losses: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int) -> torch.Tensor:
    """grad (n, V) with row i scaled by grad_losses[i] (fp32 math) and ignored rows zero,
    as a new tensor (the saved one serves a retain_graph backward)."""
    n_rows, n_cols = grad.shape
    out = torch.empty_like(grad)
    if n_rows:
        with on_device_of(grad):
            _scale_rows_kernel[(n_rows, cdiv(n_cols, SCALE_BLOCK))](
                grad, grad_losses, targets, out,
                grad.stride(0), grad_losses.stride(0), out.stride(0), n_cols, ignore_index,
                BLOCK=SCALE_BLOCK, num_warps=NUM_WARPS, num_stages=1)
    return out


@cross_entropy_bwd.register_fake
def _(grad, grad_losses, targets, ignore_index):
    return torch.empty_like(grad)


def _setup(ctx, inputs, output):
    _logits, targets, ignore_index, *_ = inputs
    _losses, grad, stats = output
    ctx.mark_non_differentiable(grad, stats)
    ctx.save_for_backward(grad, targets)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_losses, _grad_of_grad, _grad_stats):
    grad, targets = ctx.saved_tensors
    if grad.shape[0] != grad_losses.shape[0]:
        raise RuntimeError("triton cross_entropy: the forward ran without compute_grad, so it "
                           "stored no gradient; call it with grad enabled and logits that "
                           "require grad")
    return (cross_entropy_bwd(grad, grad_losses, targets, ctx.ignore_index),
            None, None, None, None, None, None)


_cross_entropy_v1 = differentiable(cross_entropy_fwd, _backward, _setup)


# ----------------------------------------------------------------------------- public op

def cross_entropy(logits, targets, ignore_index, reduction, label_smoothing=0.0, z_loss=0.0,
                  softcap=0.0, return_z_loss=False):
    variant = LossVariant(label_smoothing, z_loss, softcap)
    flat_targets = flat_int64_targets(targets)
    rows = _rows(logits)
    version = VERSIONS.current()
    if version == 1:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        losses, _grad, stats = _cross_entropy_v1(rows, flat_targets, ignore_index,
                                                 compute_grad, *variant)
    else:
        losses, stats = _cross_entropy_stats(rows, flat_targets, ignore_index, version,
                                             *variant)
    loss = reduce_losses(losses, flat_targets, ignore_index, reduction)
    return finish(loss, row_lse(stats) if return_z_loss else None, targets, ignore_index,
                  reduction, variant, return_z_loss)


# ----------------------------------------------------------------------------- AOT specs
# One BLOCK_V per dtype (block_v), so the configs are the kernels' flag combinations, each
# for a padded vocabulary (every row 16-byte aligned, as the JIT sees V = 50304) and for
# GPT-2's unpadded 50257 (strides and V without the divisibility hint: the row partition
# is what keeps those loads vectorised); each plain and with every loss variant on (the
# soft cap and the smoothing sum, the flags that add code; the variants' intermediate
# combinations compile a subset of it).

_ROW_SIZES = ("stride_logits", "stride_grad", "stride_dlogits", "n_cols")


def _spec(name: str, fn, dtype: str, signature: dict, constexprs: dict, padded: bool,
          num_warps: int) -> AotSpec:
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
    unaligned = () if padded else tuple(p for p in _ROW_SIZES if p in signature)
    return AotSpec(f"{name}[{dtype},{flags},V={50304 if padded else 50257}]", fn, signature,
                   constexprs, num_warps=num_warps, num_stages=1, unaligned=unaligned)


def _aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        block = BLOCK_BYTES // size
        forward = {"Logits": f"*{dtype}", "Grad": f"*{dtype}", "Targets": "*i64",
                   "RowWeight": "*fp32", "Losses": "*fp32", "Stats": "*fp32",
                   "stride_logits": "i32", "stride_grad": "i32", "stride_row_weight": "i32",
                   "n_cols": "i32", "ignore_index": "i32", "smoothing": "fp32",
                   "z_loss": "fp32", "softcap": "fp32", "COMPUTE_GRAD": "constexpr",
                   "GRAD_ALIGNED": "constexpr", "SOFTCAP": "constexpr",
                   "SMOOTHING": "constexpr", "BLOCK_V": "constexpr", "PREFETCH": "constexpr"}
        backward = {"Logits": f"*{dtype}", "Stats": "*fp32", "Targets": "*i64",
                    "GradLosses": "*fp32", "DLogits": f"*{dtype}", "stride_logits": "i32",
                    "stride_dlogits": "i32", "stride_grad_losses": "i32", "n_cols": "i32",
                    "ignore_index": "i32", "smoothing": "fp32", "z_loss": "fp32",
                    "softcap": "fp32", "GRAD_ALIGNED": "constexpr", "SOFTCAP": "constexpr",
                    "BLOCK_V": "constexpr"}
        for padded, variants in ((True, False), (False, False), (True, True), (False, True)):
            # Losses only (versions 2 and 3's forward, and any forward without grad); with
            # the gradient in place or into a buffer laid out like the logits (the fused
            # linear + cross-entropy, version 1), or into one laid out otherwise; each with
            # version 3's prefetching sweeps and without.
            for compute_grad, grad_aligned in ((False, False), (True, True), (True, False)):
                for prefetch in sorted({prefetches(version, compute_grad, variants)
                                        for version in VERSIONS.versions}):
                    specs.append(_spec("cross_entropy_fwd", _cross_entropy_fwd_kernel, dtype,
                                       forward,
                                       {"COMPUTE_GRAD": compute_grad, "GRAD_ALIGNED": grad_aligned,
                                        "SOFTCAP": variants, "SMOOTHING": variants,
                                        "BLOCK_V": block, "PREFETCH": prefetch}, padded,
                                       NUM_WARPS))
            for grad_aligned in (True, False):
                specs.append(_spec("cross_entropy_bwd", _cross_entropy_bwd_kernel, dtype,
                                   backward,
                                   {"GRAD_ALIGNED": grad_aligned, "SOFTCAP": variants,
                                    "BLOCK_V": block}, padded, NUM_WARPS))
                specs.append(_spec("cross_entropy_bwd_block", _cross_entropy_bwd_block_kernel,
                                   dtype, backward,
                                   {"GRAD_ALIGNED": grad_aligned, "SOFTCAP": variants,
                                    "BLOCK_V": BWD_BLOCK_BYTES // size}, padded, BWD_NUM_WARPS))
        signature = {"Grad": f"*{dtype}", "RowScale": "*fp32", "Targets": "*i64",
                     "Out": f"*{dtype}", "stride_grad": "i32", "stride_row_scale": "i32",
                     "stride_out": "i32", "n_cols": "i32", "ignore_index": "i32",
                     "BLOCK": "constexpr"}
        specs.append(AotSpec(f"cross_entropy_scale_rows[{dtype},BLOCK={SCALE_BLOCK}]",
                             _scale_rows_kernel, signature, {"BLOCK": SCALE_BLOCK},
                             num_warps=NUM_WARPS, num_stages=1))
    return specs


AOT_SPECS = _aot_specs()
