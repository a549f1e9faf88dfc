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
from kernels.availability import triton_interpreter_enabled
from kernels.chunked_linear_cross_entropy import reduce_losses
from kernels.custom_ops import custom_op, differentiable
from kernels.triton.aot import AotSpec
from kernels.triton.device import on_device_of
from kernels.triton.grid import cdiv, next_power_of_2

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
    if triton_interpreter_enabled():
        return min(block, INTERPRETER_MAX_BLOCK_V, max(16, next_power_of_2(n_cols)))
    return block


def bwd_block_v(n_cols: int, element_size: int) -> int:
    """Logits per program of version 3's backward; under the interpreter a quarter of the
    row, so that the CPU tests run several programs per row."""
    if triton_interpreter_enabled():
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
def _row_max_and_sum(logits, n_cols, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                     PREFETCH: tl.constexpr):
    """(m, d) of one row: the head and tail block, then the aligned body block by block.
    With PREFETCH (version 3) the loads of block k + 1 are issued before block k is
    reduced, so they are in flight while it is (the loop is not software-pipelined
    otherwise: each block's loads would wait for the previous block's reductions)."""
    head, body = _row_partition(logits, n_cols, VEC)
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
    edges = tl.load(logits + edge_cols, mask=edge_mask, other=-float("inf")).to(tl.float32)
    m, d = _online_softmax_step(-float("inf"), 0.0, edges)
    body_ptr = tl.multiple_of(logits + head, 16)
    if PREFETCH:
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + cols, mask=cols < body, other=-float("inf"))
        # cdiv(body, BLOCK_V) iterations; the last one's prefetch is wholly masked (no load).
        for start in range(BLOCK_V, body + BLOCK_V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x_next = tl.load(body_ptr + cols, mask=cols < body, other=-float("inf"))
            m, d = _online_softmax_step(m, d, x.to(tl.float32))
            x = x_next
    else:
        for start in range(0, body, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(body_ptr + cols, mask=cols < body, other=-float("inf")).to(tl.float32)
            m, d = _online_softmax_step(m, d, x)
    return m, d


@triton.jit
def _store_gradient(grad, x, cols, mask, shift, scale, weight, target):
    """Store exp(x - shift) * scale - weight * [cols == target] at the pointers `grad`, for
    loaded logits x; cols are the elements' columns in the row."""
    g = tl.exp(x.to(tl.float32) - shift) * scale - tl.where(cols == target, weight, 0.0)
    tl.store(grad, g.to(grad.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_block(logits, grad, cols, mask, shift, scale, weight, target):
    """_store_gradient of the logits at the pointers `logits`."""
    x = tl.load(logits, mask=mask, other=0.0)
    _store_gradient(grad, x, cols, mask, shift, scale, weight, target)


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
def _gradient_sweep(logits, grad, n_cols, shift, scale, weight, target,
                    GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """One pass over a row writing grad_j = exp(x_j - shift) * scale - weight * [j == target]
    (the softmax minus the one-hot, times the row's weight: scale = weight / d with shift
    = m). grad may be logits itself (block k + 1 is loaded before block k is stored, at
    other addresses). PREFETCH as in _row_max_and_sum."""
    head, body, body_ptr, grad_ptr = _body_pointers(logits, grad, n_cols, GRAD_ALIGNED, VEC)
    edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
    _gradient_block(logits + edge_cols, grad + edge_cols, edge_cols, edge_mask, shift, scale,
                    weight, target)
    if PREFETCH:
        cols = tl.arange(0, BLOCK_V)
        x = tl.load(body_ptr + cols, mask=cols < body, other=0.0)
        for start in range(BLOCK_V, body + BLOCK_V, BLOCK_V):
            next_cols = start + tl.arange(0, BLOCK_V)
            x_next = tl.load(body_ptr + next_cols, mask=next_cols < body, other=0.0)
            _store_gradient(grad_ptr + cols, x, head + cols, cols < body, shift, scale, weight,
                            target)
            x = x_next
            cols = next_cols
    else:
        for start in range(0, body, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            _gradient_block(body_ptr + cols, grad_ptr + cols, head + cols, cols < body, shift,
                            scale, weight, target)


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
def _sweep_coefficients(keep, weight, m, d):
    """(shift, scale) of a row's gradient sweep, grad_j = exp(x_j - shift) * scale -
    weight * [j == target], for a row of max m and sum d and its weight (0 if ignored).
    Ignored rows get exactly 0: scale 0 (their weight may come from inf or NaN, a mean over
    no kept target; d may be 0) and a finite shift, so exp(x - shift) stays finite (a row
    of -inf logits has m = -inf)."""
    scale = tl.where(keep, weight / d, 0.0)
    shift = tl.where(m == -float("inf"), 0.0, m)
    return shift, scale


@triton.jit
def _gradient_coefficients(Stats, Targets, GradLosses, stride_grad_losses, row, n_cols,
                           ignore_index):
    """(shift, scale, weight, target) of a row's gradient from the forward's saved (m, d)
    and the upstream gradient g = GradLosses[row]: g * (softmax - onehot)."""
    keep, _in_range, target = _target(Targets, row, n_cols, ignore_index)
    m = tl.load(Stats + 2 * row)
    d = tl.load(Stats + 2 * row + 1)
    weight = tl.where(keep, tl.load(GradLosses + row * stride_grad_losses), 0.0)
    shift, scale = _sweep_coefficients(keep, weight, m, d)
    return shift, scale, weight, target


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _cross_entropy_fwd_kernel(
    Logits, Grad, Targets, RowWeight, Losses, Stats,
    stride_logits, stride_grad, stride_row_weight,
    n_cols, ignore_index,
    COMPUTE_GRAD: tl.constexpr, GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program per row: the loss, and (m, d) into Stats[row]; with COMPUTE_GRAD also
    RowWeight[row] times the row's gradient, into Grad (which may be Logits: the fused
    linear + cross-entropy)."""
    VEC: tl.constexpr = 128 // Logits.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 at GPT-2 size
    logits = Logits + row * stride_logits
    keep, in_range, target = _target(Targets, row, n_cols, ignore_index)

    m, d = _row_max_and_sum(logits, n_cols, BLOCK_V, VEC, PREFETCH)
    # Read before the gradient sweep, which may overwrite the row when Grad is Logits.
    target_logit = tl.load(logits + target).to(tl.float32)
    loss = tl.where(in_range, tl.log(d) + (m - target_logit), float("nan"))
    tl.store(Losses + row, tl.where(keep, loss, 0.0))
    tl.store(Stats + 2 * row, m)
    tl.store(Stats + 2 * row + 1, d)

    if COMPUTE_GRAD:
        weight = tl.where(keep, tl.load(RowWeight + row * stride_row_weight), 0.0)
        shift, scale = _sweep_coefficients(keep, weight, m, d)
        _gradient_sweep(logits, Grad + row * stride_grad, n_cols, shift, scale, weight,
                        target, GRAD_ALIGNED, BLOCK_V, VEC, PREFETCH)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits, Stats, Targets, GradLosses, DLogits,
    stride_logits, stride_dlogits, stride_grad_losses,
    n_cols, ignore_index,
    GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Version 2's backward, one program per row: dlogits = g * (exp(x - m) / d - onehot)
    with g = GradLosses[row] and the saved (m, d): one read of the row, one write."""
    VEC: tl.constexpr = 128 // Logits.dtype.element_ty.primitive_bitwidth
    row = tl.program_id(0).to(tl.int64)
    shift, scale, weight, target = _gradient_coefficients(Stats, Targets, GradLosses,
                                                           stride_grad_losses, row, n_cols,
                                                           ignore_index)
    _gradient_sweep(Logits + row * stride_logits, DLogits + row * stride_dlogits, n_cols,
                    shift, scale, weight, target, GRAD_ALIGNED, BLOCK_V, VEC, False)


@triton.jit
def _cross_entropy_bwd_block_kernel(
    Logits, Stats, Targets, GradLosses, DLogits,
    stride_logits, stride_dlogits, stride_grad_losses,
    n_cols, ignore_index,
    GRAD_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr,
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
                                                          ignore_index)
    logits = Logits + row * stride_logits
    grad = DLogits + row * stride_dlogits
    head, body, body_ptr, grad_ptr = _body_pointers(logits, grad, n_cols, GRAD_ALIGNED, VEC)
    if block == 0:
        edge_cols, edge_mask = _edge_columns(head, body, n_cols, VEC)
        _gradient_block(logits + edge_cols, grad + edge_cols, edge_cols, edge_mask, shift,
                        scale, weight, target)
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    _gradient_block(body_ptr + cols, grad_ptr + cols, head + cols, cols < body, shift, scale,
                    weight, target)


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
                         row_weight: torch.Tensor | None,
                         stats: torch.Tensor | None = None, version: int | None = None) -> None:
    """Per-row losses of logits (n, V) into losses (n,) fp32 (and each row's max and sum
    of exponentials into stats (n, 2) fp32, when given) and, when grad is given,
    row_weight[i] * d loss_i / d logits into grad (n, V), which may be logits itself.
    targets: (n,) int64. row_weight: (n,) fp32, any stride (0 for one shared weight).
    version: the kernel version whose sweeps run (default: the one selected)."""
    n_rows, n_cols = logits.shape
    if not n_rows:
        return
    version = VERSIONS.current() if version is None else version
    stats = losses.new_empty((n_rows, 2)) if stats is None else stats
    with on_device_of(logits):
        _cross_entropy_fwd_kernel[(n_rows,)](
            logits, grad, targets, row_weight, losses, stats,
            logits.stride(0), 0 if grad is None else grad.stride(0),
            0 if row_weight is None else row_weight.stride(0),
            n_cols, ignore_index,
            COMPUTE_GRAD=grad is not None,
            GRAD_ALIGNED=grad is not None and shares_alignment(logits, grad),
            BLOCK_V=block_v(n_cols, logits.element_size()), PREFETCH=version >= 3,
            num_warps=NUM_WARPS, num_stages=1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


# ----------------------------------------------------------------------------- version 2, 3 ops
# The version is an argument, read once per forward call: the backward runs the forward's.

@custom_op("gptk::triton_cross_entropy_stats_fwd", mutates_args=())
def cross_entropy_stats_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            version: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses (n,) fp32, per-row (max, sum of exp(x - max)) (n, 2) fp32) of
    logits (n, V)."""
    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    stats = logits.new_empty((logits.shape[0], 2), dtype=torch.float32)
    launch_cross_entropy(logits, targets, ignore_index, losses, None, None, stats, version)
    return losses, stats


@cross_entropy_stats_fwd.register_fake
def _(logits, targets, ignore_index, version):
    n_rows = logits.shape[0]
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty((n_rows, 2), dtype=torch.float32))


@torch.library.custom_op("gptk::triton_cross_entropy_stats_bwd", mutates_args=())
def cross_entropy_stats_bwd(grad_losses: torch.Tensor, logits: torch.Tensor,
                            targets: torch.Tensor, stats: torch.Tensor, ignore_index: int,
                            version: int) -> torch.Tensor:
    """d (sum_i grad_losses[i] * loss_i) / d logits, a new (n, V) tensor in the logits'
    dtype (ignored rows zero), from the forward's stats."""
    n_rows, n_cols = logits.shape
    dlogits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if not n_rows:
        return dlogits
    args = (logits, stats, targets, grad_losses, dlogits,
            logits.stride(0), dlogits.stride(0), grad_losses.stride(0), n_cols, ignore_index)
    grad_aligned = shares_alignment(logits, dlogits)
    with on_device_of(logits):
        if version >= 3:
            block = bwd_block_v(n_cols, logits.element_size())
            _cross_entropy_bwd_block_kernel[(n_rows, cdiv(n_cols, block))](
                *args, GRAD_ALIGNED=grad_aligned, BLOCK_V=block,
                num_warps=BWD_NUM_WARPS, num_stages=1)
        else:
            _cross_entropy_bwd_kernel[(n_rows,)](
                *args, GRAD_ALIGNED=grad_aligned, BLOCK_V=block_v(n_cols, logits.element_size()),
                num_warps=NUM_WARPS, num_stages=1)
    return dlogits


@cross_entropy_stats_bwd.register_fake
def _(grad_losses, logits, targets, stats, ignore_index, version):
    return logits.new_empty(logits.shape)


def _stats_setup(ctx, inputs, output):
    logits, targets, ignore_index, version = inputs
    _losses, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, targets, stats)  # no (N, V) tensor of its own
    ctx.ignore_index = ignore_index
    ctx.version = version


def _stats_backward(ctx, grad_losses, _grad_stats):
    logits, targets, stats = ctx.saved_tensors
    grad_losses = grad_losses.to(torch.float32)  # any stride: 0 for a mean's expanded scalar
    return (cross_entropy_stats_bwd(grad_losses, logits, targets, stats, ctx.ignore_index,
                                    ctx.version), None, None, None)


_cross_entropy_stats = differentiable(cross_entropy_stats_fwd, _stats_backward, _stats_setup)


# ----------------------------------------------------------------------------- version 1 ops
# Kept selectable (GPTK_TRITON_CROSS_ENTROPY_VERSION=1, or versions.select) until a GPU
# record shows version 2 correct and faster; it runs the same forward kernel.

@custom_op("gptk::triton_cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row losses (n,) fp32, d losses_i / d logits (n, V) in the logits' dtype, or an
    empty (0, V) tensor without compute_grad) for logits (n, V) and int64 targets (n,)."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = logits.new_empty((n_rows if compute_grad else 0, n_cols))
    ones = torch.ones(1, dtype=torch.float32, device=logits.device).expand(n_rows)
    launch_cross_entropy(logits, targets, ignore_index, losses,
                         grad if compute_grad else None, ones, version=1)
    return losses, grad


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, compute_grad):
    n_rows, n_cols = logits.shape
    return (logits.new_empty(n_rows, dtype=torch.float32),
            logits.new_empty((n_rows if compute_grad else 0, n_cols)))


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
    _logits, targets, ignore_index, _compute_grad = inputs
    _losses, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad, targets)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_losses, _grad_of_grad):
    grad, targets = ctx.saved_tensors
    if grad.shape[0] != grad_losses.shape[0]:
        raise RuntimeError("triton cross_entropy: the forward ran without compute_grad, so it "
                           "stored no gradient; call it with grad enabled and logits that "
                           "require grad")
    return cross_entropy_bwd(grad, grad_losses, targets, ctx.ignore_index), None, None, None


_cross_entropy_v1 = differentiable(cross_entropy_fwd, _backward, _setup)


# ----------------------------------------------------------------------------- public op

def cross_entropy(logits, targets, ignore_index, reduction):
    flat_targets = targets.reshape(-1).to(torch.int64)
    rows = _rows(logits)
    version = VERSIONS.current()
    if version == 1:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        losses, _grad = _cross_entropy_v1(rows, flat_targets, ignore_index, compute_grad)
    else:
        losses, _stats = _cross_entropy_stats(rows, flat_targets, ignore_index, version)
    loss = reduce_losses(losses, flat_targets, ignore_index, reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------- AOT specs
# One BLOCK_V per dtype (block_v), so the configs are the kernels' flag combinations, each
# for a padded vocabulary (every row 16-byte aligned, as the JIT sees V = 50304) and for
# GPT-2's unpadded 50257 (strides and V without the divisibility hint: the row partition
# is what keeps those loads vectorised).

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
                   "n_cols": "i32", "ignore_index": "i32", "COMPUTE_GRAD": "constexpr",
                   "GRAD_ALIGNED": "constexpr", "BLOCK_V": "constexpr", "PREFETCH": "constexpr"}
        backward = {"Logits": f"*{dtype}", "Stats": "*fp32", "Targets": "*i64",
                    "GradLosses": "*fp32", "DLogits": f"*{dtype}", "stride_logits": "i32",
                    "stride_dlogits": "i32", "stride_grad_losses": "i32", "n_cols": "i32",
                    "ignore_index": "i32", "GRAD_ALIGNED": "constexpr", "BLOCK_V": "constexpr"}
        for padded in (True, False):
            # Losses only (versions 2 and 3's forward, and any forward without grad); with
            # the gradient in place or into a buffer laid out like the logits (the fused
            # linear + cross-entropy, version 1), or into one laid out otherwise; each with
            # version 3's prefetching sweeps and without.
            for compute_grad, grad_aligned in ((False, False), (True, True), (True, False)):
                for prefetch in (False, True):
                    specs.append(_spec("cross_entropy_fwd", _cross_entropy_fwd_kernel, dtype,
                                       forward,
                                       {"COMPUTE_GRAD": compute_grad, "GRAD_ALIGNED": grad_aligned,
                                        "BLOCK_V": block, "PREFETCH": prefetch}, padded,
                                       NUM_WARPS))
            for grad_aligned in (True, False):
                specs.append(_spec("cross_entropy_bwd", _cross_entropy_bwd_kernel, dtype,
                                   backward,
                                   {"GRAD_ALIGNED": grad_aligned, "BLOCK_V": block}, padded,
                                   NUM_WARPS))
                specs.append(_spec("cross_entropy_bwd_block", _cross_entropy_bwd_block_kernel,
                                   dtype, backward,
                                   {"GRAD_ALIGNED": grad_aligned,
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
