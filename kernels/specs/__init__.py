"""Every op declared once (`OpSpec`): its checks and canonical form, its reference, the
eager PyTorch baseline it is judged against, its conformance cases and its benchmark
inputs. `kernels.ops` (the public functions), the `torch` backend, the conformance suite
(`kernels.testing`, tests/test_conformance.py) and the benchmarks (bench/kernels/problems.py)
are all derived from `SPECS`: adding an op starts here.
"""
from kernels.specs.attention import SPEC as CAUSAL_ATTENTION
from kernels.specs.core import Call, OpSpec
from kernels.specs.cross_entropy import LINEAR_SPEC as LINEAR_CROSS_ENTROPY
from kernels.specs.cross_entropy import SPEC as CROSS_ENTROPY
from kernels.specs.inputs import Case, Inputs
from kernels.specs.layer_norm import ADD_SPEC as ADD_LAYER_NORM
from kernels.specs.layer_norm import SPEC as LAYER_NORM
from kernels.specs.mlp import SPEC as MLP_GELU

SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (
    LAYER_NORM, ADD_LAYER_NORM, MLP_GELU, CAUSAL_ATTENTION, CROSS_ENTROPY, LINEAR_CROSS_ENTROPY)}
OPS = tuple(SPECS)

__all__ = ["OPS", "SPECS", "Call", "Case", "Inputs", "OpSpec"]
