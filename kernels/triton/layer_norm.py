"""LayerNorm in Triton, plain and fused with the residual add before it (llm.c's fused
residual + layernorm), forward and backward.

Forward, per row of C values (statistics in fp32 whatever the input dtype):
    s    = x + residual                 (the fused variant only; stored, it is the new
                                         residual stream, rounded to its dtype first so
                                         that y normalizes exactly the s it returns)
    mean = sum(s) / C,  rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)
    y    = (s - mean) * rstd * w + b
  mean and rstd (fp32, one each per row) are saved for the backward.

Backward, with xhat = (s - mean) * rstd and g = w * dy:
    dW = sum_rows dy * xhat,  dB = sum_rows dy
    ds = rstd * (g - xhat * mean(xhat * g) - mean(g))    (+ the gradient flowing into the
                                                          returned s, in the fused variant)
  The two means come from differentiating through mean and rstd: every input of the row
  moves both statistics, so the row's gradient is projected off the directions of the
  constant vector and of xhat. In the fused variant dx = dresidual = ds.

Layout: rows are the flattened leading dims with a unit column stride (any row stride).
Each program works on tiles of BLOCK_M rows x BLOCK_N columns, BLOCK_N = next_pow2(C), so
narrow rows still give every thread several elements to load. dW/dB are reduced
deterministically: each backward program walks its own contiguous range of row tiles,
accumulates its partial sums in registers and writes them as one row of a (programs, C)
fp32 buffer, which one `sum(0)` reduces afterwards. No atomics: the same inputs always
give the same bits.

Registers decide the tiles (`launch_config`; the AOT compile checks every config the
launcher can pick, C = 1 ... MAX_CHANNELS, for spills). The forward holds one tile of s
and keeps ~4 fp32 values per element alive: 4096-element tiles, whole rows up to
MAX_CHANNELS = 16384 (84 registers at 16 warps).

The backward is memory-bound too: it reads x and dy and writes dx (6 bytes per element
in bf16), plus the partial sums, 2 x programs x C fp32 written and read again by the
final `sum(0)`. Its tiles hold 32 bytes of x and of dy per thread (16 bf16 or 8 fp32
elements: two 16-byte vectors each) on 8 warps: at GPT-2's C = 768 (padded to 1024), 4
bf16 rows or 2 fp32 rows, 12 KB of x and dy per tile. Each program walks its tiles with
the next tile's loads issued before the current one's arithmetic (two block-wide row
sums, each a barrier), so 2 tiles are in flight per program, not 1 now and then; at
C = 768 that takes 128 registers (bf16), and two programs per SM (BWD_PROGRAMS_PER_SM)
fit beside each other: 48 KB in flight per SM, against the ~20-30 KB an H100/H200 needs
to cover HBM latency. Two programs per SM, not four, halve the partial sums, which need
no zeroing either (at N = 8192, C = 768 on 132 SMs: 3.2 MB written and read, 9 % beside
the op's 38 MB; four per SM and their zeroing moved 9.7 MB). A row wider than
MAX_BWD_BLOCK_BYTES (4096 bf16 or 2048 fp32 columns) is split into column blocks, one per
program of a second grid axis (a whole 16384-wide row in registers spilled 1.1
KB/thread). Each column block's program first walks the whole row once for the two row
means (the other blocks' loads of the same rows are in flight at the same time, so the
re-reads come from L2), then computes dx and dW/dB for its own columns only.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.custom_ops import custom_op, differentiable
from kernels.triton.aot import AotSpec, launch_configs
from kernels.triton.device import on_device_of
from kernels.triton.grid import cdiv, next_power_of_2
from kernels.triton.interpreter import INTERPRETED

TILE_ELEMENTS = 4096      # forward: elements per tile, BLOCK_M = TILE_ELEMENTS // BLOCK_N rows
MAX_CHANNELS = 16384      # the forward keeps a whole row in registers; wider rows would spill
BWD_BYTES_PER_THREAD = 32  # backward: bytes of x (and of dy) per thread per tile
BWD_WARPS = 8
# backward: bytes of a tile's row; wider rows are split into column blocks this wide
# (4096 bf16 or 2048 fp32 columns)
MAX_BWD_BLOCK_BYTES = BWD_BYTES_PER_THREAD * 32 * BWD_WARPS
BWD_PROGRAMS_PER_SM = 2   # backward programs per SM: the partial-sum buffer's row count
INTERPRETER_BWD_PROGRAMS = 2


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, S, Y, W, B, Mean, Rstd,
    stride_x, stride_r, stride_s, stride_y,
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row * stride can pass 2**31 on big activations

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _xhat_and_g(X, DY, w, rows64, cols, mask, stride_x, stride_dy, mean, rstd):
    """xhat = (x - mean) * rstd and g = w * dy on one (rows, cols) tile (w: the weight at
    cols, fp32), zero outside the tile's valid elements; and dy itself."""
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, w[None, :] * dy, dy


@triton.jit
def _row_sums_over_column_blocks(X, DY, W, rows64, row_mask, stride_x, stride_dy, mean, rstd,
                                 n_cols, BLOCK_N: tl.constexpr):
    """(sum(xhat * g), sum(g)) of each row, a BLOCK_N-wide column block at a time."""
    sum_xhat_g = tl.zeros_like(mean)
    sum_g = tl.zeros_like(mean)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        xhat, g, _dy = _xhat_and_g(X, DY, w, rows64, cols, row_mask[:, None] & col_mask[None, :],
                                   stride_x, stride_dy, mean, rstd)
        sum_xhat_g += tl.sum(xhat * g, axis=1)
        sum_g += tl.sum(g, axis=1)
    return sum_xhat_g, sum_g


@triton.jit
def _load_bwd_tile(X, DY, Mean, Rstd, rows, cols, row_mask, col_mask, stride_x, stride_dy):
    """A row tile's x and dy (as stored) and its rows' mean and rstd; rows outside
    row_mask load as zeros (and move no bytes)."""
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row * stride can pass 2**31 on big activations
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    return x, dy, mean, rstd


@triton.jit
def _store_dx(DS, DX, dx, rows, cols, mask, stride_ds, stride_dx, HAS_DS: tl.constexpr):
    """dx (+ the gradient reaching the fused variant's returned sum) into DX."""
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask,
                      other=0.0).to(tl.float32)
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS, X, W, Mean, Rstd, DX, PartialDW, PartialDB,
    stride_dy, stride_ds, stride_x, stride_dx,
    n_rows, n_cols, tiles_per_program,
    HAS_DS: tl.constexpr, SPLIT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (programs, column blocks): program (pid, block) owns the rows of tiles
    # [pid * tiles_per_program, (pid + 1) * tiles_per_program) and the columns of `block`
    # (one block, the whole row, unless SPLIT_ROWS).
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = pid * tiles_per_program * BLOCK_M
    if SPLIT_ROWS:
        for i in range(tiles_per_program):
            rows = first_row + i * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            # The row means need the whole row: one walk over it first.
            sum_xhat_g, sum_g = _row_sums_over_column_blocks(
                X, DY, W, rows64, row_mask, stride_x, stride_dy, mean, rstd, n_cols, BLOCK_N)
            xhat, g, dy = _xhat_and_g(X, DY, w, rows64, cols, mask, stride_x, stride_dy,
                                      mean, rstd)
            mean_xhat_g = sum_xhat_g / n_cols
            mean_g = sum_g / n_cols
            dx = (g - xhat * mean_xhat_g[:, None] - mean_g[:, None]) * rstd[:, None]
            _store_dx(DS, DX, dx, rows, cols, mask, stride_ds, stride_dx, HAS_DS)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
    else:
        # The tile is the whole row: sums in registers. The next tile's loads are issued
        # before this one's arithmetic, so they are in flight while it runs (each tile's
        # loads would otherwise wait for the previous tile's reductions); the prefetch past
        # the program's last tile is masked off (no bytes).
        rows = first_row + tl.arange(0, BLOCK_M)
        x, dy, mean, rstd = _load_bwd_tile(X, DY, Mean, Rstd, rows, cols, rows < n_rows,
                                           col_mask, stride_x, stride_dy)
        for i in range(tiles_per_program):
            next_rows = rows + BLOCK_M
            next_tile = _load_bwd_tile(X, DY, Mean, Rstd, next_rows, cols,
                                       (next_rows < n_rows) & (i + 1 < tiles_per_program),
                                       col_mask, stride_x, stride_dy)
            mask = (rows < n_rows)[:, None] & col_mask[None, :]
            xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dy = dy.to(tl.float32)
            g = w[None, :] * dy
            mean_xhat_g = tl.sum(xhat * g, axis=1) / n_cols
            mean_g = tl.sum(g, axis=1) / n_cols
            dx = (g - xhat * mean_xhat_g[:, None] - mean_g[:, None]) * rstd[:, None]
            _store_dx(DS, DX, dx, rows, cols, mask, stride_ds, stride_dx, HAS_DS)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
            rows = next_rows
            x, dy, mean, rstd = next_tile
    tl.store(PartialDW + pid * n_cols + cols, dw, mask=col_mask)
    tl.store(PartialDB + pid * n_cols + cols, db, mask=col_mask)


# ----------------------------------------------------------------------------- launch configs

def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16


def launch_config(n_cols: int, element_size: int
                  ) -> tuple[tuple[int, int, int], tuple[int, int, int, bool]]:
    """The tiles for rows of n_cols of element_size bytes (see the module docstring): the
    forward's (BLOCK_M, BLOCK_N, num_warps) and the backward's (BLOCK_M, BLOCK_N,
    num_warps, SPLIT_ROWS). Raises ValueError past MAX_CHANNELS. Not cached (a lookup
    would save ~0.5 us a call): a cache would keep tiles chosen under the module's limits
    after someone tuning them changes them."""
    if n_cols > MAX_CHANNELS:
        raise ValueError(f"the Triton layer_norm keeps a row in registers and supports up to "
                         f"{MAX_CHANNELS} channels, got {n_cols}; use the 'torch' backend")
    block_n = next_power_of_2(n_cols)
    forward = (max(1, TILE_ELEMENTS // block_n), block_n, _num_warps(block_n))
    bwd_block_n = min(block_n, MAX_BWD_BLOCK_BYTES // element_size)
    bwd_block_m = MAX_BWD_BLOCK_BYTES // element_size // bwd_block_n
    return forward, (bwd_block_m, bwd_block_n, BWD_WARPS, block_n > bwd_block_n)


@functools.lru_cache(maxsize=None)
def _bwd_max_programs(device: torch.device) -> int:
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_BWD_PROGRAMS  # each program is a Python loop: keep them few
    return torch.cuda.get_device_properties(device).multi_processor_count * BWD_PROGRAMS_PER_SM


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, C) with a unit column stride, copying only when no such view exists.
    A 2-D t is not reshaped: a no-op reshape is still a dispatcher round trip (~0.5 us)."""
    t2d = t if t.dim() == 2 else t.reshape(t.numel() // max(t.shape[-1], 1), t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


# ----------------------------------------------------------------------------- launchers

def _forward(x, residual, weight, bias, eps, summed_dtype):
    n_rows, n_cols = x.shape
    (block_m, block_n, num_warps), _ = launch_config(max(n_cols, 1), x.element_size())
    # new_empty with int sizes: the cheapest allocation to parse (~1 us; torch.empty with
    # a shape tuple and a device costs ~0.7 us more, a torch.Size ~1 us more).
    summed = x.new_empty(n_rows, n_cols, dtype=summed_dtype) if residual is not None else None
    y = x.new_empty(n_rows, n_cols, dtype=summed_dtype)
    mean = x.new_empty(n_rows, dtype=torch.float32)
    rstd = x.new_empty(n_rows, dtype=torch.float32)
    if not n_rows or not n_cols:  # nothing to normalize (the sum of no channels too)
        return summed, y, mean, rstd
    with on_device_of(x):
        _layer_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
            x, residual, summed, y, weight, bias, mean, rstd,
            x.stride(0), 0 if residual is None else residual.stride(0),
            0 if summed is None else summed.stride(0), y.stride(0),
            n_rows, n_cols, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=1)
    return summed, y, mean, rstd


@custom_op("gptk::triton_layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd) for rows x (n_rows, C) with a unit column stride."""
    _, y, mean, rstd = _forward(x, None, weight, bias, eps, x.dtype)
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    n_rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(n_rows, dtype=torch.float32),
            x.new_empty(n_rows, dtype=torch.float32))


@custom_op("gptk::triton_add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s = x + residual, y = layer_norm(s), mean, rstd) for rows x, residual (n_rows, C);
    s and y in the dtype torch gives x + residual."""
    return _forward(x, residual, weight, bias, eps, torch.promote_types(x.dtype, residual.dtype))


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    n_rows = x.shape[0]
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(n_rows, dtype=torch.float32), x.new_empty(n_rows, dtype=torch.float32))


@torch.library.custom_op("gptk::triton_layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, dsummed: Optional[torch.Tensor], x: torch.Tensor,
                   weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of layer_norm at rows x given dy, plus dsummed added into dx
    (the gradient reaching the fused variant's returned sum). dbias is in weight's dtype."""
    n_rows, n_cols = x.shape
    dy, dsummed = _rows(dy), None if dsummed is None else _rows(dsummed)
    _, (block_m, block_n, num_warps, split_rows) = launch_config(max(n_cols, 1),
                                                                 x.element_size())
    dx = x.new_empty(n_rows, n_cols)
    if not n_rows or not n_cols:  # no program runs: the weight gradients of no rows are zero
        return dx, weight.new_zeros(n_cols), weight.new_zeros(n_cols)
    n_tiles = cdiv(n_rows, block_m)
    tiles_per_program = cdiv(n_tiles, _bwd_max_programs(x.device))
    n_programs = cdiv(n_tiles, tiles_per_program)
    # Every program owns at least one tile and stores its whole row of both: no zeroing.
    partial_dw = x.new_empty(n_programs, n_cols, dtype=torch.float32)
    partial_db = x.new_empty(n_programs, n_cols, dtype=torch.float32)
    with on_device_of(x):
        _layer_norm_bwd_kernel[(n_programs, cdiv(n_cols, block_n))](
            dy, dsummed, x, weight, mean, rstd, dx, partial_dw, partial_db,
            dy.stride(0), 0 if dsummed is None else dsummed.stride(0), x.stride(0),
            dx.stride(0), n_rows, n_cols, tiles_per_program,
            HAS_DS=dsummed is not None, SPLIT_ROWS=split_rows, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=num_warps, num_stages=1)
    return dx, partial_dw.sum(0).to(weight.dtype), partial_db.sum(0).to(weight.dtype)


@layer_norm_bwd.register_fake
def _(dy, dsummed, x, weight, mean, rstd):
    n_cols = x.shape[1]
    return x.new_empty(x.shape), weight.new_empty(n_cols), weight.new_empty(n_cols)


# ----------------------------------------------------------------------------- autograd

def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_bwd(dy, None, x, weight, mean, rstd)
    return dx, dweight, None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype), None


_layer_norm = differentiable(layer_norm_fwd, _layer_norm_backward, _layer_norm_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps = inputs
    summed, _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.input_dtypes = (x.dtype, residual.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _add_layer_norm_backward(ctx, dsummed, dy, _dmean, _drstd):
    summed, weight, mean, rstd = ctx.saved_tensors
    # Autograd materializes the gradient of an unused output as zeros, so both are tensors.
    dsum, dweight, dbias = layer_norm_bwd(dy, dsummed, summed, weight, mean, rstd)
    x_dtype, residual_dtype = ctx.input_dtypes
    # d(x + residual)/dx = d(x + residual)/dresidual = identity: both get dsum.
    return (dsum.to(x_dtype), dsum.to(residual_dtype), dweight,
            None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype), None)


_add_layer_norm = differentiable(add_layer_norm_fwd, _add_layer_norm_backward,
                                 _add_layer_norm_setup)


# ----------------------------------------------------------------------------- public ops

def layer_norm(x, weight, bias=None, eps=1e-5):
    y, _mean, _rstd = _layer_norm(_rows(x), weight, bias, eps)
    return y if x.dim() == 2 else y.view(x.shape)


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5):
    summed, y, _mean, _rstd = _add_layer_norm(_rows(x), _rows(residual), weight, bias, eps)
    if x.dim() == 2:
        return summed, y
    return summed.view(x.shape), y.view(x.shape)


# ----------------------------------------------------------------------------- AOT specs

# (x, residual, summed/y, weight) dtypes: fp32 training, a bf16 model, and autocast (bf16
# branch output added to the fp32 residual stream, fp32 LayerNorm weights).
_DTYPE_COMBOS = (("fp32", "fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16", "bf16"),
                 ("bf16", "fp32", "fp32", "fp32"))


def _forward_specs(x_dtype: str, block_m: int, block_n: int, num_warps: int
                   ) -> list[AotSpec]:
    """The forward at one tile, for every dtype combination whose x is in x_dtype."""
    specs = []
    for x_t, r_t, s_t, w_t in _DTYPE_COMBOS:
        if x_t != x_dtype:
            continue
        for has_residual in (False, True):
            if not has_residual and x_t != s_t:
                continue  # without a residual, x is what gets normalized
            signature = {"X": f"*{x_t}", "R": f"*{r_t}", "S": f"*{s_t}", "Y": f"*{s_t}",
                         "W": f"*{w_t}", "B": f"*{w_t}", "Mean": "*fp32", "Rstd": "*fp32",
                         "stride_x": "i32", "stride_r": "i32", "stride_s": "i32",
                         "stride_y": "i32", "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
                         "HAS_RESIDUAL": "constexpr", "HAS_BIAS": "constexpr",
                         "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            specs.append(AotSpec(
                f"layer_norm_fwd[x={x_t},r={r_t},w={w_t},residual={has_residual},"
                f"BLOCK_M={block_m},BLOCK_N={block_n}]", _layer_norm_fwd_kernel, signature,
                {"HAS_RESIDUAL": has_residual, "HAS_BIAS": True, "BLOCK_M": block_m,
                 "BLOCK_N": block_n}, num_warps=num_warps, num_stages=1))
    return specs


_ELEMENT_SIZES = {"fp32": 4, "bf16": 2}


def _backward_specs(s_t: str, w_t: str, block_m: int, block_n: int, num_warps: int,
                    split_rows: bool) -> list[AotSpec]:
    """The backward at one tile for the normalized tensor s in s_t (what the backward sees)
    and the weight in w_t."""
    specs = []
    for has_ds in (False, True):
        signature = {"DY": f"*{s_t}", "DS": f"*{s_t}", "X": f"*{s_t}", "W": f"*{w_t}",
                     "Mean": "*fp32", "Rstd": "*fp32", "DX": f"*{s_t}",
                     "PartialDW": "*fp32", "PartialDB": "*fp32",
                     "stride_dy": "i32", "stride_ds": "i32", "stride_x": "i32",
                     "stride_dx": "i32", "n_rows": "i32", "n_cols": "i32",
                     "tiles_per_program": "i32", "HAS_DS": "constexpr",
                     "SPLIT_ROWS": "constexpr", "BLOCK_M": "constexpr",
                     "BLOCK_N": "constexpr"}
        split = ",split" if split_rows else ""
        specs.append(AotSpec(
            f"layer_norm_bwd[x={s_t},w={w_t},ds={has_ds},BLOCK_M={block_m},"
            f"BLOCK_N={block_n}{split}]", _layer_norm_bwd_kernel, signature,
            {"HAS_DS": has_ds, "SPLIT_ROWS": split_rows, "BLOCK_M": block_m,
             "BLOCK_N": block_n}, num_warps=num_warps, num_stages=1))
    return specs


def _aot_specs() -> list[AotSpec]:
    """Every tile the launchers pick at any C they accept (1 ... MAX_CHANNELS, one C per
    distinct config, from launch_config itself), in every dtype combination."""
    specs = []
    for x_t in sorted({x_t for x_t, _, _, _ in _DTYPE_COMBOS}):
        configs = launch_configs(functools.partial(launch_config,
                                                   element_size=_ELEMENT_SIZES[x_t]))
        specs += [spec for tile in sorted({fwd for fwd, _ in configs})
                  for spec in _forward_specs(x_t, *tile)]
    for s_t, w_t in sorted({(s_t, w_t) for _, _, s_t, w_t in _DTYPE_COMBOS}):
        configs = launch_configs(functools.partial(launch_config,
                                                   element_size=_ELEMENT_SIZES[s_t]))
        specs += [spec for tile in sorted({bwd for _, bwd in configs})
                  for spec in _backward_specs(s_t, w_t, *tile)]
    return specs


AOT_SPECS = _aot_specs()
