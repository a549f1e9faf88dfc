"""The `triton` backend: Triton kernels, their launchers and autograd wiring.

One module per op; `OPS` maps each implemented op name to its entry point, which takes
the op's canonical arguments (see `kernels.specs`), and `unsupported(call)` names the
limit a call exceeds. Kernels run on a CUDA GPU, or on the CPU under the Triton
interpreter when TRITON_INTERPRET=1 is set before triton is imported. Every launch runs
under a guard for the tensors' own device, so tensors on cuda:1 are computed on cuda:1
whatever the current device is.
"""
from __future__ import annotations

import torch

from kernels.triton import (attention, cross_entropy, interpreter, layer_norm,
                            linear_cross_entropy, mlp)

if interpreter.INTERPRETED:
    interpreter.install()  # bf16 rounding as on the GPU (see kernels.triton.interpreter)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)

OPS: dict = {
    "layer_norm": layer_norm.layer_norm,
    "add_layer_norm": layer_norm.add_layer_norm,
    "cross_entropy": cross_entropy.cross_entropy,
    "linear_cross_entropy": linear_cross_entropy.linear_cross_entropy,
    "causal_attention": attention.canonical_causal_attention,
    "mlp_gelu": mlp.mlp_gelu,
}


def unsupported(call) -> str | None:
    """None when the Triton kernels run `call`, else the limit it exceeds."""
    dtypes = call.dtypes() - _SUPPORTED
    if dtypes:
        return f"the Triton kernels compute in fp32, bf16 and fp16, got {sorted(map(str, dtypes))}"
    if call.op in ("layer_norm", "add_layer_norm"):
        channels = call["x"].shape[-1]
        if channels > layer_norm.MAX_CHANNELS:
            return (f"the Triton layer_norm keeps a row in registers and supports up to "
                    f"{layer_norm.MAX_CHANNELS} channels, got {channels}")
    if call.op == "causal_attention":
        head_dim = call["q"].shape[-1]
        if head_dim > attention.MAX_HEAD_DIM:
            return (f"the Triton attention supports head dims up to {attention.MAX_HEAD_DIM}, "
                    f"got {head_dim}")
        seq_len = call["k"].shape[2]  # at least the queries' length
        if seq_len > attention.MAX_SEQ_LEN:
            return (f"the Triton attention supports sequences up to {attention.MAX_SEQ_LEN}, "
                    f"got {seq_len}")
    return None
