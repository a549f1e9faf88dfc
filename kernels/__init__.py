"""Kernels for the hot paths of a GPT, each with `torch`, `triton` and `cuda` backends.

    import kernels
    kernels.available_backends()            # which backends run here, and why not
    y = kernels.layer_norm(x, w, b, backend="triton")
    kernels.set_default_backend("auto")     # per call, the first backend that supports it

Its import name is shared with Hugging Face's `kernels` (a dependency of transformers 5):
importing this package where that one is installed too fails at once, naming both
(`kernels._ownership`).
"""
from pathlib import Path as _Path

from kernels._ownership import DISTRIBUTION as __distribution__
from kernels._ownership import check_sole_owner as _check_sole_owner

_check_sole_owner(str(_Path(__file__).resolve().parent))

from kernels.availability import BackendStatus, BackendUnavailableError
from kernels.backends import (AUTO, BACKENDS, available_backends, get_default_backend,
                              set_default_backend)
from kernels.ops import (OPS, add_layer_norm, causal_attention, cross_entropy, layer_norm,
                         linear_cross_entropy, mlp_gelu)

__all__ = [
    "AUTO", "BACKENDS", "OPS", "BackendStatus", "BackendUnavailableError",
    "available_backends", "get_default_backend", "set_default_backend",
    "add_layer_norm", "causal_attention", "cross_entropy", "layer_norm",
    "linear_cross_entropy", "mlp_gelu",
]
