"""Input checks shared by the op specs: each raises an error that names the argument and
what is wrong with it, before any backend sees the call."""
from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_shape(name: str, t, shape: tuple[int, ...]) -> None:
    """t (unless None) is a floating tensor of exactly `shape`."""
    if t is None:
        return
    check_float(name, t)
    if t.shape != shape:  # torch.Size is a tuple: compared as one, without a copy
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def same_device(**tensors) -> torch.device:
    """The one device of every given tensor (None entries are skipped). Every op call runs
    this: one pass, and the listing for the error only when there is one."""
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
            raise ValueError(f"all tensors must be on the same device, got {listing}")
    return first


def check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def check_one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_targets(targets, leading: tuple[int, ...], vocab: int, ignore_index: int,
                  reduction: str) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 or int32 tensor of class indices, got {got}")
    if targets.shape != leading:  # torch.Size is a tuple: compared as one, without a copy
        raise ValueError(f"targets must have shape {tuple(leading)} (the logits' leading dims), "
                         f"got {tuple(targets.shape)}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_one_of("reduction", reduction, REDUCTIONS)


def check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is ignore_index or in [0, vocab), as F.cross_entropy requires.

    On the CPU this raises at once (reading the result costs no device sync). On a GPU a
    host-side check would stall the stream on every call, so the check is queued as a
    device-side assertion instead, as PyTorch's own CUDA cross-entropy does: the launch
    returns at once, and a bad target fails the stream ("device-side assert triggered")
    at the next synchronization. The kernels never read outside the logits either way.
    A compiled graph cannot raise on data, so there only the device-side form is used."""
    if not targets.numel():
        return
    on_host = targets.is_cpu and not torch.compiler.is_compiling()
    if on_host:  # one pass for the common case, every target in range (~6x cheaper)
        low, high = torch.aminmax(targets)
        if low.item() >= 0 and high.item() < vocab:  # Python numbers: no tensor ops
            return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    message = f"targets out of range [0, {vocab}) (ignore_index={ignore_index})"
    if on_host:
        if bad.any():
            raise ValueError(f"{message}: {targets[bad].flatten()[:5].tolist()}")
    elif targets.device.type == "cuda":
        torch._assert_async(~bad.any(), message)


def contiguous_param(t):
    """A 1-D parameter (a bias, a LayerNorm gain) with a unit stride (any stride when it
    has one element). They are tiny: a strided one is copied here rather than handled by
    every kernel, and autograd routes the gradient back to the view. `contiguous()`
    returns an already contiguous tensor itself, and costs less than reading stride(0)."""
    return None if t is None else t.contiguous()
