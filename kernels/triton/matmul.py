"""Triton matmuls with a fused GELU epilogue: the two matmuls of the MLP that touch GELU.

    matmul_bias_gelu(a, b, bias):  H = a @ b + bias,      G = gelu(H)    -> (H, G)
    matmul_dgelu(a, b, h):         dH = (a @ b) * gelu'(h)               -> dH

a is [M, K] and b is [K, N], both with any strides (the MLP passes nn.Linear weights
transposed, W^T, as strided views, never copies). One program computes one
BLOCK_M x BLOCK_N output tile: it walks K in BLOCK_K steps accumulating tl.dot in fp32,
then applies the epilogue to the fp32 tile while it is still in registers, so the
elementwise GELU (forward) or GELU-gradient multiply (backward) costs no extra pass over
the [M, N] activations in global memory: without fusion each would read and write a
full [M, N] tensor once more.

Tile order ("grouped", GROUP_M): consecutive programs sweep GROUP_M row-tiles of one
column of tiles before moving right, so a group of programs in flight shares both its
rows of `a` and its columns of `b` in L2 instead of streaming all of `b` per row-tile.

Precision: the accumulator is fp32 and the epilogue math is fp32. 16-bit inputs use the
tensor cores. fp32 inputs follow PyTorch's own switch for fp32 matmuls,
`torch.backends.cuda.matmul.allow_tf32` (off by default; nanoGPT turns it on): TF32
tensor cores when allowed, exact IEEE fp32 products otherwise, so these matmuls round
exactly like the cuBLAS matmuls they are mixed with in the MLP backward. The interpreter
(CPU tests) always uses IEEE fp32.

GELU, in either flavour (the constexpr TANH picks it at compile time):
  GPT-2's tanh approximation, with u = sqrt(2/pi) (h + 0.044715 h^3):
    gelu(h)  = 0.5 h (1 + tanh(u)) = h * sigmoid(2u)       (as 0.5 (1 + tanh(u)) = sigmoid(2u))
    gelu'(h) = s + 2 h s (1 - s) du/dh,  s = sigmoid(2u),  du/dh = sqrt(2/pi) (1 + 3 * 0.044715 h^2)
  The sigmoid form needs one exp and no tanh, and the gradient reuses the forward's s.
  The exact form (nanoGPT's nn.GELU()), with Phi the normal CDF and phi its density:
    gelu(h)  = h Phi(h) = 0.5 h (1 + erf(h / sqrt(2)))
    gelu'(h) = Phi(h) + h phi(h),  phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from kernels.triton.aot import AotSpec
from kernels.triton.device import on_device_of
from kernels.triton.grid import cdiv, next_power_of_2
from kernels.triton.interpreter import INTERPRETED

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# Whether triton.jit built interpreter objects (TRITON_INTERPRET=1 when triton was imported):
# a compile-time constant, so the interpreter-only branch below never reaches a GPU build.
_INTERPRETED = tl.constexpr(INTERPRETED)

# Autotune candidates, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) x (num_warps, num_stages),
# for sm_80 and sm_90. Shared memory per program is num_stages * (BLOCK_M + BLOCK_N) *
# BLOCK_K * element size (the software pipeline keeps num_stages tiles of a and b in
# flight), at most 128 KiB here, under sm_80's 163 KiB. Registers bound the tile: the fp32
# accumulator takes BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread and the
# epilogue needs as many again for the pre-activation tile and the GELU math, so 128x128
# tiles use 8 warps (64 accumulator registers each); 128x256 tiles, or 128x128 on 4 warps,
# spill in the dGELU epilogue and are left out (none of these spills, checked with ptxas
# for sm_80 and sm_90). The 128-row tiles serve the GPT-2 training shapes (M = B*T in the
# thousands, N and K = C or 4C); the 64- and 32-row tiles give small M (decoding, short
# prompts) enough programs to fill the GPU.
CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# fp32 tiles take twice the shared memory per element (BLOCK_K = 32 keeps them <= 96 KiB),
# and exact IEEE products run on the FMA units with both operands in registers. A 128x128
# fp32 tile on 8 warps needs 255 registers in the dGELU epilogue and spills on sm_90 with
# the exact (erf) GELU: the largest fp32 tile is 128x64.
CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# The interpreter runs each program as numpy block operations: one small tile keeps the
# CPU tests fast and still exercises partial tiles on every edge (tl.dot needs >= 16).
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                                   num_warps=4, num_stages=1)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- tile helpers

@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of this program in grouped order (see the module docstring)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_tile_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(tiles_m - first_tile_m, GROUP_M)  # the last group may be shorter
    tile_m = first_tile_m + (pid % programs_per_group) % group_rows
    tile_n = (pid % programs_per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def _dot_accumulate(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if _INTERPRETED:
        # The interpreter (triton 3.8) multiplies bf16 tiles as their raw uint16 bits.
        # Widening to fp32 first is exact, and so is each product of two bf16 (or fp16)
        # values in fp32: this computes what the tensor cores compute on a GPU.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _matmul_tile(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, tile_m, tile_n,
                 ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] tile (tile_m, tile_n) of A @ B."""
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows of `a` are activations (M can be huge): 64-bit offsets. `b` is a weight.
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Out-of-range rows, columns and the K tail load zeros, which add nothing to the
        # dot. Masks (rather than wrapping indices) keep the compiler's contiguity
        # analysis exact, so in-range loads still vectorize.
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = _dot_accumulate(a, b, acc, ALLOW_TF32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _sigmoid_2u(h):
    """sigmoid(2u) = 0.5 (1 + tanh(u)) with u = sqrt(2/pi) (h + 0.044715 h^3). The exponent
    is capped at 80 (e^80 ~ 5.5e34, still finite in fp32) so that it never overflows: past
    the cap sigmoid is 0 to fp32 precision anyway, and the interpreter's numpy would warn."""
    u = _SQRT_2_OVER_PI * (h + _GELU_CUBIC * h * h * h)
    return 1.0 / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        return h * _sigmoid_2u(h)
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT_HALF))


@triton.jit
def _gelu_grad(h, TANH: tl.constexpr):
    if TANH:
        s = _sigmoid_2u(h)
        du_dh = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * h * h)
        return s + 2.0 * h * s * (1.0 - s) * du_dh
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT_HALF))
        return cdf + h * _INV_SQRT_2PI * tl.exp(-0.5 * h * h)


# ----------------------------------------------------------------------------- kernels
# M_BUCKET (M rounded up to a power of two) is read only by the autotuner's key: a new
# batch size in the same bucket reuses the tuned config instead of benchmarking again
# (generation without a KV cache changes M at every step).

@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_bias_gelu_kernel(
        A, B, BIAS, PREACT, ACT, M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        HAS_BIAS: tl.constexpr, TANH: tl.constexpr, ALLOW_TF32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    tile_m, tile_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, tile_m, tile_n,
                       ALLOW_TF32, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # The pre-activation is rounded to the storage dtype before GELU, exactly as when the
    # linear's output is a tensor: the backward's gelu'(H) then sees the same H the
    # forward's gelu(H) did.
    preact = acc.to(PREACT.dtype.element_ty)
    offsets = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(PREACT + offsets, preact, mask=mask)
    tl.store(ACT + offsets, _gelu(preact.to(tl.float32), TANH).to(ACT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _matmul_dgelu_kernel(
        A, B, PREACT, DPREACT, M, N, K, M_BUCKET,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        TANH: tl.constexpr, ALLOW_TF32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    tile_m, tile_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dact = _matmul_tile(A, B, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, tile_m, tile_n,
                        ALLOW_TF32, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    preact = tl.load(PREACT + offsets, mask=mask, other=0.0).to(tl.float32)
    # Chain rule through G = gelu(H), applied to the fp32 tile of dG = a @ b.
    dpreact = dact * _gelu_grad(preact, TANH)
    tl.store(DPREACT + offsets, dpreact.to(DPREACT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def matmul_bias_gelu(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     approximate: str = "tanh"):
    """(H, G) with H = a @ b + bias and G = gelu(H) (approximate: "tanh" | "none"), both
    [M, N] contiguous.

    a [M, K], b [K, N] and bias [N] (or None) share one dtype; fp32 accumulation.
    """
    m, n = _check_operands(a, b)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape {(n,)}, got {tuple(bias.shape)}")
    preact = a.new_empty(m, n)
    act = a.new_empty(m, n)
    has_bias = bias is not None
    # Without a bias the kernel never reads BIAS; any pointer of the right dtype will do.
    _launch(_matmul_bias_gelu_kernel, a, b, bias if has_bias else act, preact, act,
            stride_c=preact.stride(), HAS_BIAS=has_bias, TANH=_is_tanh(approximate))
    return preact, act


def matmul_dgelu(a: torch.Tensor, b: torch.Tensor, preact: torch.Tensor,
                 approximate: str = "tanh") -> torch.Tensor:
    """dH = (a @ b) * gelu'(preact): the gradient reaching the pre-activation H when
    a @ b is the gradient of G = gelu(H). Returns [M, N] contiguous."""
    m, n = _check_operands(a, b)
    if tuple(preact.shape) != (m, n):
        raise ValueError(f"preact must have shape {(m, n)}, got {tuple(preact.shape)}")
    preact = preact.contiguous()  # shares its strides with the output
    dpreact = torch.empty_like(preact)
    _launch(_matmul_dgelu_kernel, a, b, preact, dpreact, stride_c=dpreact.stride(),
            TANH=_is_tanh(approximate))
    return dpreact


def _is_tanh(approximate: str) -> bool:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return approximate == "tanh"


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"expected a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in SUPPORTED_DTYPES or a.dtype != b.dtype:
        raise TypeError(f"a and b must share one of {SUPPORTED_DTYPES}, got {a.dtype} and {b.dtype}")
    return a.shape[0], b.shape[1]


def _launch(kernel, a, b, *outputs, stride_c, **flags):
    """Run `kernel` over the [M, N] output of a @ b with the autotuned config (on a GPU)
    or the fixed interpreter config (on the CPU)."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return  # an empty output: nothing to compute, and a grid of 0 programs is invalid
    args = (a, b, *outputs, m, n, k, next_power_of_2(m), *a.stride(), *b.stride(), *stride_c)
    allow_tf32 = (a.dtype == torch.float32 and not INTERPRETED
                  and torch.backends.cuda.matmul.allow_tf32)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

    with on_device_of(a):
        if INTERPRETED:
            cfg = INTERPRETER_CONFIG
            kernel[grid(cfg.kwargs)](*args, **flags, ALLOW_TF32=allow_tf32, **cfg.kwargs,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            _autotuned(kernel, a.element_size())[grid](*args, **flags, ALLOW_TF32=allow_tf32)


@functools.cache
def _autotuned(kernel, element_size: int):
    """`kernel` autotuned over the configs for its input width, keyed on the problem size
    (the autotuner adds the tensors' dtypes to the key itself)."""
    configs = CONFIGS_FP32 if element_size == 4 else CONFIGS_16BIT
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"])(kernel)


# ----------------------------------------------------------------------------- AOT specs

def _aot_specs() -> list[AotSpec]:
    """Every (kernel, config, dtype) the launchers can pick at GPT-2 shapes: fp32 (TF32 on
    and off) and bf16 pointers. The forward is listed with a bias (GPT-2 has one; without,
    it only drops one vector load). The strides that are 1 in the MLP are constexprs, as
    Triton's launcher specializes an integer argument equal to 1: the forward reads x and
    W_fc^T (a transposed view, unit stride along K), the backward dy and W_proj (unit
    stride along N), and both write contiguous outputs."""
    variants = [("bf16", CONFIGS_16BIT, False), ("fp32", CONFIGS_FP32, False),
                ("fp32", CONFIGS_FP32, True)]
    kernels = [
        ("matmul_bias_gelu", _matmul_bias_gelu_kernel, ("A", "B", "BIAS", "PREACT", "ACT"),
         {"HAS_BIAS": True, "stride_ak": 1, "stride_bk": 1, "stride_cn": 1}),
        ("matmul_dgelu", _matmul_dgelu_kernel, ("A", "B", "PREACT", "DPREACT"),
         {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1}),
    ]
    specs = []
    for (name, fn, pointers, flags), tanh in itertools.product(kernels, (True, False)):
        flags = {**flags, "TANH": tanh}
        gelu = "" if tanh else ",exact"
        for dtype, configs, tf32 in variants:
            for cfg in configs:
                constexprs = {**flags, "ALLOW_TF32": tf32, **cfg.kwargs}
                # In parameter order; every parameter that is neither a pointer nor a
                # constexpr is a size or a stride.
                signature = {p: f"*{dtype}" if p in pointers else
                             "constexpr" if p in constexprs else "i32" for p in fn.arg_names}
                tile = "x".join(str(cfg.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                precision = ",tf32" if tf32 else ""
                specs.append(AotSpec(
                    f"{name}[{dtype}{precision}{gelu},{tile},w{cfg.num_warps},s{cfg.num_stages}]",
                    fn, signature, constexprs, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages))
    return specs


AOT_SPECS = _aot_specs()
