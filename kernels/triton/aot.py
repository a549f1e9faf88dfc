"""Ahead-of-time compilation of the Triton kernels for named GPUs, without a GPU.

Every kernel module lists, in `AOT_SPECS`, each (kernel, config) its launchers may pick.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AotSpec:
    name: str                      # e.g. "layer_norm_fwd[bf16,BLOCK=1024]"
    fn: object                     # the @triton.jit function
    signature: dict[str, str]      # every parameter -> "*bf16", "i32", ..., or "constexpr"
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
