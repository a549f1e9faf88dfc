"""The `triton` backend: Triton kernels, their launchers and autograd Functions.

One module per op; `OPS` maps each implemented op name to its entry point, which takes
the op's public arguments (see `kernels.ops`). Kernels run on a CUDA GPU, or on the CPU
under the Triton interpreter when TRITON_INTERPRET=1 is set before triton is imported.
"""
OPS: dict = {}
