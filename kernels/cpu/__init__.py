"""What makes small GPTs train fast on a CPU, in one place (none of it runs on a GPU):

- `block`        a whole transformer block as one autograd node for bf16 training, the
                 module path's ATen ops in its order with their backward ops called by
                 hand (bit for bit the module path's numbers);
- `attention`    causal attention for short bf16 sequences as batched matmuls with a
                 hand-written backward (the torch backend's CPU path);
- `dropout`      dropout masks drawn in bulk (the model's dropout and the two above);
- `host_memory`  glibc's malloc kept from returning each iteration's memory to the system
                 (called by the command-line programs' `main` only: a process-wide setting
                 is not a library's to change).

The model reaches it through this module's names only.
"""
from kernels.cpu.block import fused_block, pack_heads
from kernels.cpu.dropout import dropout
from kernels.cpu.host_memory import keep_freed_memory

__all__ = ["dropout", "fused_block", "keep_freed_memory", "pack_heads"]
