"""The public ops: one function per hot path of a GPT, dispatching to a backend.

Every op validates its inputs here, once for all backends, so bad input gets an error
that names the problem instead of a crash inside a kernel. Then it applies autocast
(matmul ops run in the autocast dtype, as `F.linear` would) and calls the backend
chosen by `kernels.backends.resolve` — ``backend=None`` means the process default.
The math of each op is specified in `kernels.reference`.
"""
from __future__ import annotations

import warnings

import torch

from kernels.backends import resolve, resolve_name

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- checks

def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is None:
        return
    _check_float(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return first


def _autocast(device: torch.device, *tensors: torch.Tensor | None):
    """Cast floating tensors to the autocast dtype when autocast is on for `device`."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_targets(targets: torch.Tensor, leading: tuple[int, ...], vocab: int,
                   ignore_index: int, reduction: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 or int32 tensor of class indices, got {got}")
    if tuple(targets.shape) != tuple(leading):
        raise ValueError(f"targets must have shape {tuple(leading)} (the logits' leading dims), "
                         f"got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # On the CPU the range check costs no device sync; a compiled graph cannot branch on data.
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise ValueError(f"targets out of range [0, {vocab}): "
                             f"{targets[bad].flatten()[:5].tolist()} (ignore_index={ignore_index})")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


# ----------------------------------------------------------------------------- ops

def layer_norm(x, weight, bias=None, eps=1e-5, *, backend=None):
    """LayerNorm over the last dim of x[..., C] with weight[C] and optional bias[C]."""
    _check_float("x", x)
    _check_shape("weight", weight, (x.shape[-1],))
    _check_shape("bias", bias, (x.shape[-1],))
    _check_eps(eps)
    device = _check_same_device(x=x, weight=weight, bias=bias)
    return resolve("layer_norm", backend, device)(x, weight, bias, eps)


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5, *, backend=None):
    """The residual add fused with the next LayerNorm: returns (x + residual, LN(x + residual))."""
    _check_float("x", x)
    _check_shape("residual", residual, tuple(x.shape))
    _check_shape("weight", weight, (x.shape[-1],))
    _check_shape("bias", bias, (x.shape[-1],))
    _check_eps(eps)
    device = _check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    return resolve("add_layer_norm", backend, device)(x, residual, weight, bias, eps)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, *, backend=None):
    """GPT-2's MLP: c_proj(gelu_tanh(c_fc(x))), weights in nn.Linear layout (out, in)."""
    _check_float("x", x)
    _check_float("w_fc", w_fc)
    if w_fc.dim() != 2 or w_fc.shape[1] != x.shape[-1]:
        raise ValueError(f"w_fc must have shape (hidden, {x.shape[-1]}), got {tuple(w_fc.shape)}")
    hidden, channels = w_fc.shape
    _check_shape("b_fc", b_fc, (hidden,))
    _check_shape("w_proj", w_proj, (channels, hidden))
    _check_shape("b_proj", b_proj, (channels,))
    device = _check_same_device(x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj)
    args = _autocast(device, x, w_fc, b_fc, w_proj, b_proj)
    return resolve("mlp_gelu", backend, device)(*args)


_warned_attention_fallback: set[str] = set()


def causal_attention(q, k, v, scale=None, dropout_p=0.0, *, backend=None):
    """Causal softmax(q k^T * scale) v on (B, H, T, D); scale defaults to D**-0.5.

    k and v may be longer than q (decoding with a KV cache): the mask is then aligned to
    the bottom-right. Such calls, and calls with attention dropout, run on the `torch`
    backend: the fused kernels implement neither (a warning says so once).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
    b, h, t_q, d = q.shape
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != d:
        raise ValueError(f"k and v must have shape ({b}, {h}, T_k, {d}) matching q, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] < t_q:
        raise ValueError(f"k/v sequence length {k.shape[2]} is shorter than q's {t_q}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    device = _check_same_device(q=q, k=k, v=v)
    q, k, v = _autocast(device, q, k, v)
    name = resolve_name("causal_attention", backend, device)
    if name != "torch" and (dropout_p > 0.0 or k.shape[2] != t_q):
        why = "attention dropout" if dropout_p > 0.0 else "queries shorter than keys (KV cache)"
        if why not in _warned_attention_fallback:
            _warned_attention_fallback.add(why)
            warnings.warn(f"causal_attention: backend {name!r} does not implement {why}; "
                          f"running the 'torch' backend for such calls", stacklevel=2)
        name = "torch"
    return resolve("causal_attention", name, device)(q, k, v, scale, dropout_p)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", *, backend=None):
    """Cross-entropy of logits[..., V] against class indices targets[...], as F.cross_entropy
    (mean over the targets that are not ignore_index). The loss is fp32 whatever the logits'
    dtype."""
    _check_float("logits", logits)
    _check_targets(targets, tuple(logits.shape[:-1]), logits.shape[-1], ignore_index, reduction)
    device = _check_same_device(logits=logits, targets=targets)
    return resolve("cross_entropy", backend, device)(logits, targets, ignore_index, reduction)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean", *,
                         backend=None):
    """cross_entropy(x @ weight.T + bias, targets) without materializing all the logits at
    once where the backend can (the lm_head fused with the loss)."""
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, {x.shape[-1]}), got {tuple(weight.shape)}")
    _check_shape("bias", bias, (weight.shape[0],))
    _check_targets(targets, tuple(x.shape[:-1]), weight.shape[0], ignore_index, reduction)
    device = _check_same_device(x=x, weight=weight, targets=targets, bias=bias)
    x, weight, bias = _autocast(device, x, weight, bias)
    return resolve("linear_cross_entropy", backend, device)(x, weight, targets, bias,
                                                            ignore_index, reduction)


OPS = ("layer_norm", "add_layer_norm", "mlp_gelu", "causal_attention", "cross_entropy",
       "linear_cross_entropy")
