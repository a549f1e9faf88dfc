"""The `cuda` backend: the hand-written CUDA kernels of csrc/, compiled into `kernels._C`.

This module loads the extension (the one `pip install` built, or a JIT build for kernel
development), says why it cannot run when it cannot (`unavailable_reason`), and wraps every
kernel launch in a `torch.library` custom op (`gptk::cuda_*`) with a fake implementation
(shapes only, for torch.compile) and, for the forward ops, a registered autograd formula
that calls the matching backward op. `OPS` maps each public op to its implementation here:

- layer_norm / add_layer_norm: one fused kernel each way (csrc/layer_norm.cu);
- mlp_gelu: the two matmuls on cuBLAS (torch), the bias + GELU between them fused, forward
  and backward (csrc/bias_gelu.cu);
- cross_entropy: per-row losses in one pass, gradient in one more (csrc/cross_entropy.cu);
- linear_cross_entropy: the lm_head and the loss chunk by chunk: each chunk's logits come from
  cuBLAS, one kernel turns them into losses and overwrites them with their gradient, and two
  more matmuls turn that into the gradients of x and the weight, so the (N, V) logits never
  exist whole;
- causal_attention: FlashAttention-2 forward and backward, on the tensor cores for bf16
  (csrc/attention*.cu).

The module imports without the extension and without a GPU; calling an op then raises
`BackendUnavailableError` with the reason.
"""
import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import backends
from kernels.backends import BackendUnavailableError

EXTENSION = "kernels._C"
PACKAGE_DIR = Path(__file__).resolve().parent
CSRC_DIR = PACKAGE_DIR.parent / "csrc"
# Written by setup.py when it skips the build (the name is csrc/build.py's SKIP_RECORD).
SKIP_RECORD = PACKAGE_DIR / "_C_build_skipped.txt"
JIT_ENV = "GPTK_CUDA_JIT"  # =1: compile csrc/ on first use instead of importing kernels._C
MIN_CAPABILITY = (8, 0)    # bf16 mma.sync.m16n8k16 needs sm_80 (Ampere) or newer

# ----------------------------------------------------------------------------- loading

_jit_module: Optional[ModuleType] = None


def load_build_config() -> ModuleType:
    """csrc/build.py (sources, flags, toolkit discovery), loaded by path: it exists only in
    a source checkout, which is also the only place the extension can be compiled from."""
    path = CSRC_DIR / "build.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: compiling the CUDA kernels needs a source "
                                f"checkout of the project")
    spec = importlib.util.spec_from_file_location("gptk_csrc_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_jit(build_directory: Optional[str], verbose: bool) -> ModuleType:
    build = load_build_config()
    reason = build.skip_reason()
    if reason is not None:
        raise RuntimeError(f"cannot compile the CUDA extension: {reason}")
    build.use_toolkit(build.find_cuda_home())
    from torch.utils.cpp_extension import load

    return load(name="gptk_C_jit", sources=build.source_paths(), extra_cflags=build.CXX_FLAGS,
                extra_cuda_cflags=build.nvcc_flags(), build_directory=build_directory,
                verbose=verbose)


def build_jit(build_directory: Optional[str] = None, verbose: bool = False) -> ModuleType:
    """Compile csrc/ now with torch.utils.cpp_extension.load (ninja; rebuilt only when a
    source changed) and make it this backend's extension: the kernel-development loop is
    edit a .cu file, call this (or run with GPTK_CUDA_JIT=1), rerun the tests."""
    global _jit_module
    _jit_module = _compile_jit(build_directory, verbose)
    _load.cache_clear()
    backends.forget_status("cuda")  # probe the backend again, now with the extension
    return _jit_module


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(the extension module, None) or (None, why it is missing)."""
    if _jit_module is not None:
        return _jit_module, None
    if os.environ.get(JIT_ENV) == "1":
        try:
            return _compile_jit(None, verbose=False), None
        except Exception as exc:  # any build failure becomes the backend's reason
            return None, f"the JIT build of the CUDA extension ({JIT_ENV}=1) failed: {exc}"
    try:
        return importlib.import_module(EXTENSION), None
    except ImportError as exc:
        if extension_path() is not None:
            return None, f"the CUDA extension {EXTENSION} is built but does not load: {exc}"
        if SKIP_RECORD.is_file():
            why = f"setup.py skipped it: {SKIP_RECORD.read_text().strip()}"
        else:
            why = ("install with `pip install --no-build-isolation -e .` where nvcc and a CUDA "
                   f"build of torch are present, or set {JIT_ENV}=1 to compile it on first use")
        return None, f"the CUDA extension {EXTENSION} is not built ({why})"


def extension_path() -> Optional[Path]:
    """The compiled extension's shared library (e.g. for `cuobjdump --dump-resource-usage`),
    found without importing it; None when it is not built."""
    if _jit_module is not None:
        return Path(_jit_module.__file__)
    spec = importlib.util.find_spec(EXTENSION)
    return Path(spec.origin) if spec is not None and spec.origin else None


def unavailable_reason() -> Optional[str]:
    """Why the `cuda` backend cannot run here, or None when it can."""
    module, why = _load()
    if module is None:
        return why
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (f"the kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                f"newer (bf16 tensor cores); {torch.cuda.get_device_name()} is "
                f"{capability[0]}.{capability[1]}")
    return None


def _ext() -> ModuleType:
    module, why = _load()
    if module is None:
        raise BackendUnavailableError(f"backend 'cuda' is not available: {why}")
    return module


# ----------------------------------------------------------------------------- layer norm

@torch.library.custom_op("gptk::cuda_layer_norm_fwd", mutates_args=(), device_types="cuda")
def _layer_norm_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = _ext().layer_norm_forward(x, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), \
        x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_add_layer_norm_fwd", mutates_args=(), device_types="cuda")
def _add_layer_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor],
                        eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    summed, y, mean, rstd = _ext().add_layer_norm_forward(x, residual, weight, bias, eps)
    return summed, y, mean, rstd


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), \
        x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_layer_norm_bwd", mutates_args=(), device_types="cuda")
def _layer_norm_bwd(dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Tensor, mean: Tensor,
                    rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _ext().layer_norm_backward(dy, ds, x, weight, mean, rstd)
    return dx, dweight, dbias


@_layer_norm_bwd.register_fake
def _(dy, ds, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy.contiguous(), None, x, weight, mean, rstd)
    return dx, dweight, dbias if ctx.has_bias else None, None


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    summed, _, mean, rstd = output
    ctx.save_for_backward(summed, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_backward(ctx, dsummed, dy, _dmean, _drstd):
    # s = x + residual feeds both the output s and the LayerNorm, so its gradient is
    # dsummed + LayerNorm'(dy), and x and residual both receive exactly that.
    summed, weight, mean, rstd = ctx.saved_tensors
    ds, dweight, dbias = _layer_norm_bwd(dy.contiguous(), dsummed.contiguous(), summed, weight,
                                         mean, rstd)
    return ds, ds, dweight, dbias if ctx.has_bias else None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
_add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def _optional_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def layer_norm(x, weight, bias=None, eps=1e-5):
    y, _, _ = _layer_norm_fwd(x.contiguous(), weight.contiguous(), _optional_contiguous(bias),
                              float(eps))
    return y


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5):
    summed, y, _, _ = _add_layer_norm_fwd(x.contiguous(), residual.contiguous(),
                                          weight.contiguous(), _optional_contiguous(bias),
                                          float(eps))
    return summed, y


# ----------------------------------------------------------------------------- MLP

@torch.library.custom_op("gptk::cuda_bias_gelu_fwd", mutates_args=(), device_types="cuda")
def _bias_gelu_fwd(pre: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ext().bias_gelu_forward(pre, bias)


@_bias_gelu_fwd.register_fake
def _(pre, bias):
    return torch.empty_like(pre)


@torch.library.custom_op("gptk::cuda_bias_gelu_bwd", mutates_args=(), device_types="cuda")
def _bias_gelu_bwd(dout: Tensor, pre: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ext().bias_gelu_backward(dout, pre, bias)


@_bias_gelu_bwd.register_fake
def _(dout, pre, bias):
    return torch.empty_like(pre)


def _bias_gelu_setup(ctx, inputs, output):
    pre, bias = inputs
    ctx.save_for_backward(pre, bias)


def _bias_gelu_backward(ctx, dout):
    pre, bias = ctx.saved_tensors
    dpre = _bias_gelu_bwd(dout.contiguous(), pre, bias)
    if bias is None:
        return dpre, None
    return dpre, dpre.reshape(-1, pre.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


_bias_gelu_fwd.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def _check_one_dtype(op: str, *tensors: Optional[Tensor]) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{op} on the cuda backend needs x and the weights in one dtype, got "
                        f"{sorted(map(str, dtypes))} (run under torch.autocast for mixed precision)")


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj):
    _check_one_dtype("mlp_gelu", x, w_fc, b_fc, w_proj, b_proj)
    pre = torch.matmul(x, w_fc.t())  # cuBLAS; the bias is added by the GELU kernel
    return F.linear(_bias_gelu_fwd(pre, _optional_contiguous(b_fc)), w_proj, b_proj)


# ----------------------------------------------------------------------------- cross-entropy

@torch.library.custom_op("gptk::cuda_cross_entropy_fwd", mutates_args=(), device_types="cuda")
def _cross_entropy_fwd(logits: Tensor, targets: Tensor,
                       ignore_index: int) -> tuple[Tensor, Tensor]:
    losses, lse = _ext().cross_entropy_forward(logits, targets, ignore_index)
    return losses, lse


@_cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_cross_entropy_bwd", mutates_args=(), device_types="cuda")
def _cross_entropy_bwd(dlosses: Tensor, logits: Tensor, targets: Tensor, lse: Tensor,
                       ignore_index: int) -> Tensor:
    return _ext().cross_entropy_backward(dlosses, logits, targets, lse, ignore_index)


@_cross_entropy_bwd.register_fake
def _(dlosses, logits, targets, lse, ignore_index):
    return torch.empty_like(logits)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse)


def _cross_entropy_backward(ctx, dlosses, _dlse):
    logits, targets, lse = ctx.saved_tensors
    return _cross_entropy_bwd(dlosses.contiguous(), logits, targets, lse, ctx.ignore_index), \
        None, None


_cross_entropy_fwd.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


@torch.library.custom_op("gptk::cuda_cross_entropy_fwd_bwd_", mutates_args=("logits",),
                         device_types="cuda")
def _cross_entropy_fwd_bwd_(logits: Tensor, targets: Tensor, grad_scale: Tensor,
                            ignore_index: int) -> Tensor:
    return _ext().cross_entropy_forward_backward_(logits, targets, grad_scale, ignore_index)


@_cross_entropy_fwd_bwd_.register_fake
def _(logits, targets, grad_scale, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _reduce(losses: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()  # NaN when all are ignored, as torch


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    vocab = logits.shape[-1]
    losses, _ = _cross_entropy_fwd(logits.reshape(-1, vocab).contiguous(),
                                   targets.reshape(-1).contiguous(), int(ignore_index))
    return _reduce(losses, targets, ignore_index, reduction)


# ----------------------------------------------------------------------------- linear + CE

LOGITS_CHUNK_BYTES = 256 * 2**20  # the largest logits chunk held at once


def _chunk_rows(rows: int, vocab: int, element_size: int) -> int:
    return max(1, min(rows, LOGITS_CHUNK_BYTES // (vocab * element_size)))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum or mean over rows of cross_entropy(x @ weight.T + bias), with the gradients
    computed during the forward, chunk by chunk, and only scaled by the loss's gradient in
    the backward. For a chunk of rows with logits Z = X W^T + b and G = d loss / d Z:
        dX = G W,   dW += G^T X,   db += column sums of G
    G overwrites Z in place (the kernel reads each logit before writing its gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, mean):
        rows, vocab = x.shape[0], weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        valid = (targets != ignore_index).sum()
        # d loss / d loss_row: 1 / (number of counted rows) for a mean (inf when there are
        # none: every row is then ignored and gets a zero gradient anyway), 1 for a sum.
        grad_scale = (1.0 / valid.float() if mean else valid.new_ones((), dtype=torch.float32))
        grad_scale = grad_scale.reshape(1)
        losses = x.new_empty(rows, dtype=torch.float32)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = weight.new_zeros(weight.shape, dtype=torch.float32) if need_w else None
        grad_b = bias.new_zeros(bias.shape, dtype=torch.float32) if need_b else None
        step = _chunk_rows(rows, vocab, x.element_size())
        for start in range(0, rows, step):
            end = min(start + step, rows)
            x_chunk = x[start:end]
            logits = (torch.addmm(bias, x_chunk, weight.t()) if bias is not None
                      else torch.mm(x_chunk, weight.t()))
            if not (need_x or need_w or need_b):
                losses[start:end] = _cross_entropy_fwd(logits, targets[start:end], ignore_index)[0]
                continue
            losses[start:end] = _cross_entropy_fwd_bwd_(logits, targets[start:end], grad_scale,
                                                         ignore_index)
            if need_x:
                torch.mm(logits, weight, out=grad_x[start:end])
            if need_w:
                if logits.dtype == torch.float32:
                    grad_w.addmm_(logits.t(), x_chunk)
                else:  # a 16-bit product straight into fp32: one rounding per chunk
                    grad_w.add_(torch.mm(logits.t(), x_chunk, out_dtype=torch.float32))
            if need_b:
                grad_b.add_(logits.sum(0, dtype=torch.float32))
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return losses.sum() * grad_scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        scaled = [None if g is None else (g * grad_loss).to(dtype)
                  for g, dtype in ((grad_x, x_dtype), (grad_w, w_dtype), (grad_b, b_dtype))]
        return *scaled, None, None, None


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    _check_one_dtype("linear_cross_entropy", x, weight, bias)
    if reduction == "none":
        # Per-row gradients are not known in the forward, so the weight gradient cannot be
        # accumulated ahead: materialize the logits and differentiate through them.
        return cross_entropy(F.linear(x, weight, bias), targets, ignore_index, reduction)
    channels = x.shape[-1]
    return _LinearCrossEntropy.apply(x.reshape(-1, channels), weight, bias,
                                     targets.reshape(-1).contiguous(), int(ignore_index),
                                     reduction == "mean")


# ----------------------------------------------------------------------------- attention

@torch.library.custom_op("gptk::cuda_attention_fwd", mutates_args=(), device_types="cuda")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _ext().attention_forward(q, k, v, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale):
    b, h, t, d = q.shape
    # Stored (B, T, H, D), returned as a (B, H, T, D) view: see csrc/attention.cu.
    return q.new_empty(b, t, h, d).permute(0, 2, 1, 3), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("gptk::cuda_attention_bwd", mutates_args=(), device_types="cuda")
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _ext().attention_backward(dout, q, k, v, out, lse, scale)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def causal_attention(q, k, v, scale=None, dropout_p=0.0):
    if dropout_p > 0.0 or k.shape[-2] != q.shape[-2]:
        raise ValueError("the cuda attention kernel has no dropout and needs as many keys as "
                         "queries (kernels.causal_attention sends other calls to 'torch')")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _attention_fwd(q, k, v, scale)
    return out


OPS = {
    "layer_norm": layer_norm,
    "add_layer_norm": add_layer_norm,
    "mlp_gelu": mlp_gelu,
    "causal_attention": causal_attention,
    "cross_entropy": cross_entropy,
    "linear_cross_entropy": linear_cross_entropy,
}
