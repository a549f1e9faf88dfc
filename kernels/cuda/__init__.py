"""The `cuda` backend: the hand-written CUDA kernels of csrc/, compiled into `kernels._C`.

One module per op, mirroring `kernels.triton`: each wraps its kernels in `torch.library`
custom ops (`gptk::cuda_*`) with fake implementations (shapes only, for torch.compile) and
autograd formulas. `OPS` maps each public op to its implementation; `unsupported(call)`
names the limit a call exceeds (fp16, a head dim the tensor-core tiles cannot take, ...),
so that `auto` can choose another backend. `extension` loads the compiled module (or
builds it just in time) and says why the backend cannot run when it cannot.

- layer_norm / add_layer_norm: one fused kernel each way (csrc/layer_norm.cu);
- mlp_gelu: the two matmuls on cuBLAS, the bias + GELU between them fused (csrc/bias_gelu.cu);
  for inference with the tanh GELU in bf16, c_fc + bias + GELU in one cuBLASLt matmul
  (version 2 of `mlp.VERSIONS`);
- cross_entropy: per-row losses in one pass, gradient in one more (csrc/cross_entropy.cu);
- linear_cross_entropy: the shared chunk loop with the fused in-place cross-entropy pass;
- causal_attention: FlashAttention-2 forward and backward (csrc/attention*.cu), KV cache and
  dropout included: version 2 (the default) ldmatrix, a cp.async pipeline and a 5-GEMM
  backward, version 1 mma.sync with synchronous loads and a 7-GEMM backward
  (`attention.VERSIONS`, GPTK_CUDA_ATTENTION_VERSION).

The package imports without the extension and without a GPU; calling an op then raises
`BackendUnavailableError` with the reason.
"""
from __future__ import annotations

import torch

from kernels.cuda import attention, cross_entropy, layer_norm, linear_cross_entropy, mlp
from kernels.cuda.extension import (build_jit, extension_path, load_build_config,
                                    unavailable_reason)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)

OPS = {
    "layer_norm": layer_norm.layer_norm,
    "add_layer_norm": layer_norm.add_layer_norm,
    "mlp_gelu": mlp.mlp_gelu,
    "causal_attention": attention.causal_attention,
    "cross_entropy": cross_entropy.cross_entropy,
    "linear_cross_entropy": linear_cross_entropy.linear_cross_entropy,
}

__all__ = ["OPS", "SUPPORTED_DTYPES", "build_jit", "extension_path", "load_build_config",
           "unavailable_reason", "unsupported"]


def unsupported(call) -> str | None:
    """None when the CUDA kernels run `call`, else the limit it exceeds."""
    dtypes = call.dtypes() - _SUPPORTED
    if dtypes:
        return (f"the CUDA kernels compute in fp32 and bf16, got {sorted(map(str, dtypes))} "
                f"(fp16 runs on the triton or torch backend)")
    if call.op in ("layer_norm", "add_layer_norm"):
        channels = call["x"].shape[-1]
        limit = _max_layer_norm_channels(call.device)
        if channels > limit:
            return (f"the CUDA layer_norm backward keeps 2 fp32 values per channel in shared "
                    f"memory: at most {limit} channels on this GPU, got {channels}")
    if call.op == "causal_attention":
        head_dim, seq_len = call["q"].shape[-1], call["k"].shape[2]
        if head_dim % attention.HEAD_DIM_MULTIPLE or head_dim > attention.MAX_HEAD_DIM:
            return (f"the CUDA attention needs a head dim that is a multiple of "
                    f"{attention.HEAD_DIM_MULTIPLE} and at most {attention.MAX_HEAD_DIM}, "
                    f"got {head_dim}")
        if seq_len > attention.MAX_SEQ_LEN:
            return (f"the CUDA attention supports sequences up to {attention.MAX_SEQ_LEN}, got "
                    f"{seq_len}")
    return None


_SHARED_MEMORY: dict[int, int] = {}


def _max_layer_norm_channels(device: torch.device) -> int:
    """Channels whose dW/dB slice (2 fp32 per channel, one warp's) fits in shared memory."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_MEMORY:
        _SHARED_MEMORY[index] = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return _SHARED_MEMORY[index] // (2 * 4)
