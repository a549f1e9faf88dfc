"""One entry per op: its work (FLOPs or bytes) for the forward and forward+backward, the
shapes each suite runs, and extra baselines. The inputs at a shape come from the op's
spec (`kernels.specs`: `Problem.make_inputs`), where the op is declared once.

Adding an op to `kernels.specs` means adding one `Problem` here (a test checks the table
covers every op); the suites, tables and plots pick it up from there.

Work conventions:
- memory-bound ops (layer norms, cross-entropy) count compulsory bytes: every tensor the
  pass must read or write, once, at its real dtype's size — the traffic of an ideal fused
  kernel, so GB/s over this count is directly comparable to the device's bandwidth.
  Targets are int64 (8 bytes). Backward counts reading the upstream gradient and the saved
  input and writing every input gradient; statistics are assumed recomputed, not stored.
- compute-bound ops count matmul FLOPs (2 per multiply-add). Backward of a matmul is two
  matmuls of the same size, so fwd+bwd = 3x fwd. Attention follows FlashAttention's
  convention: 4·B·H·T²·D forward (QK^T and PV), halved when causal, backward 2.5x forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels.specs import SPECS, Inputs, OpSpec

VOCAB = 50257  # GPT-2's tokenizer

# (name, n_embd, n_head) of the GPT-2 family; head dim is 64 in all of them.
GPT2_CONFIGS = (("124M", 768, 12), ("350M", 1024, 16), ("774M", 1280, 20), ("1.5B", 1600, 25))
HEAD_DIM = 64

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class Shape:
    dims: dict[str, int]
    headline: bool = False  # the shape the slow baselines (torch.compile) also run at

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())


@dataclass(frozen=True)
class Work:
    """What one pass does: FLOPs for compute-bound ops, bytes for memory-bound ones."""
    fwd: float
    fwd_bwd: float


@dataclass(frozen=True)
class Problem:
    op: str
    bound: str  # "memory" (reported in GB/s) or "compute" (TFLOP/s)
    work: Callable[[dict, int], Work]  # (dims, bytes per element) -> Work
    cpu_shapes: tuple[Shape, ...]
    gpu_shapes: tuple[Shape, ...]
    interpreter_shape: Shape  # tiny: correctness under the Triton interpreter is slow
    baselines: dict[str, Callable] = field(default_factory=dict)  # extra impls, by name

    @property
    def unit(self) -> str:
        return "GB/s" if self.bound == "memory" else "TFLOP/s"

    @property
    def spec(self) -> OpSpec:
        return SPECS[self.op]

    @property
    def reference(self) -> Callable:
        return self.spec.reference

    def make_inputs(self, dims: dict, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        """The op's inputs at a benchmark shape (from its spec: the op is declared once)."""
        return self.spec.bench_inputs(dims, dtype, device, generator)


# ----------------------------------------------------------------------------- layer norms

def _layer_norm_work(d, s):
    n, c = d["N"], d["C"]
    fwd = 2 * n * c * s + 2 * c * s           # read x, write y; read weight, bias
    bwd = 3 * n * c * s + 3 * c * s           # read dy, x; write dx; read w; write dw, db
    return Work(fwd, fwd + bwd)


def _add_layer_norm_work(d, s):
    n, c = d["N"], d["C"]
    fwd = 4 * n * c * s + 2 * c * s           # read x, residual; write sum, y; read w, b
    # Read d(sum), dy, sum; write one dx (d(residual) is the same tensor); read w; write dw, db.
    bwd = 4 * n * c * s + 3 * c * s
    return Work(fwd, fwd + bwd)


def _norm_shapes(batch, seq):
    return tuple(Shape({"N": batch * seq, "C": c}, headline=(name == "124M"))
                 for name, c, _ in GPT2_CONFIGS)


# ----------------------------------------------------------------------------- MLP

def _mlp_work(d, s):
    fwd = 2 * 2 * d["N"] * d["C"] * (4 * d["C"])  # two matmuls, N x C x 4C each
    return Work(fwd, 3 * fwd)


# ----------------------------------------------------------------------------- attention

def attention_flops(b, h, t, d, causal=True) -> Work:
    fwd = 4 * b * h * t * t * d / (2 if causal else 1)
    return Work(fwd, fwd * (1 + 2.5))


def _attention_work(d, s):
    return attention_flops(d["B"], d["H"], d["T"], d["D"])


def _attention_gpu_shapes():
    c124 = GPT2_CONFIGS[0]
    by_length = [Shape({"B": 8, "H": c124[2], "T": t, "D": HEAD_DIM}, headline=(t == 1024))
                 for t in (256, 512, 1024, 2048)]
    by_model = [Shape({"B": 8, "H": n_head, "T": 1024, "D": HEAD_DIM})
                for _, _, n_head in GPT2_CONFIGS[1:]]
    return tuple(by_length + by_model)


# ----------------------------------------------------------------------------- losses

def _cross_entropy_work(d, s):
    n, v = d["N"], d["V"]
    fwd = n * v * s + 8 * n                   # read logits, targets (the loss is 4 bytes)
    bwd = 2 * n * v * s + 8 * n               # read logits, targets; write dlogits
    return Work(fwd, fwd + bwd)


def _linear_cross_entropy_work(d, s):
    fwd = 2 * d["N"] * d["C"] * d["V"]        # the lm_head matmul; the softmax is noise
    return Work(fwd, 3 * fwd)


# ----------------------------------------------------------------------------- the table

PROBLEMS: dict[str, Problem] = {p.op: p for p in (
    Problem("layer_norm", "memory", _layer_norm_work,
            cpu_shapes=(Shape({"N": 1024, "C": 768}, headline=True), Shape({"N": 1024, "C": 1600})),
            gpu_shapes=_norm_shapes(8, 1024),
            interpreter_shape=Shape({"N": 16, "C": 128})),
    Problem("add_layer_norm", "memory", _add_layer_norm_work,
            cpu_shapes=(Shape({"N": 1024, "C": 768}, headline=True), Shape({"N": 1024, "C": 1600})),
            gpu_shapes=_norm_shapes(8, 1024),
            interpreter_shape=Shape({"N": 16, "C": 128})),
    Problem("mlp_gelu", "compute", _mlp_work,
            cpu_shapes=(Shape({"N": 256, "C": 768}, headline=True),),
            gpu_shapes=tuple(Shape({"N": 8 * 1024, "C": c}, headline=(name == "124M"))
                             for name, c, _ in GPT2_CONFIGS),
            interpreter_shape=Shape({"N": 16, "C": 32})),
    Problem("causal_attention", "compute", _attention_work,
            cpu_shapes=(Shape({"B": 1, "H": 12, "T": 64, "D": HEAD_DIM}),
                        Shape({"B": 1, "H": 12, "T": 256, "D": HEAD_DIM}, headline=True)),
            gpu_shapes=_attention_gpu_shapes(),
            interpreter_shape=Shape({"B": 1, "H": 2, "T": 32, "D": 16}),
            # nanoGPT's non-flash path: the (T, T) scores materialized in the input dtype.
            baselines={"eager-math": SPECS["causal_attention"].eager}),
    Problem("cross_entropy", "memory", _cross_entropy_work,
            cpu_shapes=(Shape({"N": 256, "V": VOCAB}, headline=True),),
            gpu_shapes=(Shape({"N": 2048, "V": VOCAB}),
                        Shape({"N": 8192, "V": VOCAB}, headline=True),
                        Shape({"N": 16384, "V": VOCAB})),
            interpreter_shape=Shape({"N": 8, "V": 1000})),
    Problem("linear_cross_entropy", "compute", _linear_cross_entropy_work,
            cpu_shapes=(Shape({"N": 64, "C": 768, "V": VOCAB}, headline=True),),
            gpu_shapes=(Shape({"N": 2048, "C": 768, "V": VOCAB}),
                        Shape({"N": 8192, "C": 768, "V": VOCAB}, headline=True)),
            interpreter_shape=Shape({"N": 8, "C": 32, "V": 1000})),
)}


def problem(op: str) -> Problem:
    if op not in PROBLEMS:
        raise KeyError(f"no benchmark problem for op {op!r}; add one to "
                       f"bench.kernels.problems.PROBLEMS (known: {sorted(PROBLEMS)})")
    return PROBLEMS[op]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def work(prob: Problem, shape: Shape, dtype: torch.dtype) -> Work:
    return prob.work(shape.dims, element_size(dtype))


def rate(prob: Problem, amount: float, ms: float) -> float:
    """GB/s or TFLOP/s of `amount` bytes/FLOPs done in `ms` milliseconds."""
    return amount / (ms * 1e-3) / (1e9 if prob.bound == "memory" else 1e12)
