"""The `triton` backend: Triton kernels, their launchers and autograd Functions.

One module per op; `OPS` maps each implemented op name to its entry point, which takes
the op's public arguments (see `kernels.ops`). Kernels run on a CUDA GPU, or on the CPU
under the Triton interpreter when TRITON_INTERPRET=1 is set before triton is imported.
"""
from kernels.triton import attention, cross_entropy, layer_norm, linear_cross_entropy, mlp

OPS: dict = {
    "layer_norm": layer_norm.layer_norm,
    "add_layer_norm": layer_norm.add_layer_norm,
    "cross_entropy": cross_entropy.cross_entropy,
    "linear_cross_entropy": linear_cross_entropy.linear_cross_entropy,
    "causal_attention": attention.causal_attention,
    "mlp_gelu": mlp.mlp_gelu,
}
