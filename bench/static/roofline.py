"""Roofline estimates: the least time an op's pass can take on a GPU, from the work it must
do (FLOPs) and the bytes it must move, and the datasheet peaks of `kernels.gpus`:

    time >= max(bytes / bandwidth, FLOPs / peak FLOP/s of the dtype)

The work is `bench.kernels.problems`' model: memory-bound ops (layer norms, cross-entropy) count
the compulsory bytes of an ideal fused kernel and no FLOPs (their elementwise math is
far below the FLOP roof); compute-bound ops count matmul FLOPs, and their compulsory
bytes are every input and output tensor once, forward, plus reading the upstream
gradient and the inputs and writing their gradients, backward (shapes from running the
reference op on fake tensors: no memory, no time).

`estimate` goes one step further for the kernels we wrote: the bytes a pass's Triton
kernels move beyond the minimum (`bench.static.traffic`, counted under the interpreter at a small
shape) are assumed to grow with the shape as the minimum does, and the estimate is the
roofline of those bytes. That holds for kernels whose traffic is a fixed multiple of the
op's tensors (an extra full-size buffer, a tensor read twice); it is an extrapolation,
labelled as such in the report.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.kernels.problems import DTYPE_NAMES, Problem, Shape, work
from kernels.gpus import Gpu

PASSES = ("fwd", "bwd", "fwd_bwd")


@dataclass(frozen=True)
class PassWork:
    bytes: float
    flops: float

    def __add__(self, other: PassWork) -> PassWork:
        return PassWork(self.bytes + other.bytes, self.flops + other.flops)


@dataclass(frozen=True)
class Roofline:
    seconds: float
    bound: str            # "memory" or "compute": which roof is the higher
    memory_seconds: float
    compute_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def tensor_io_bytes(problem: Problem, shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """(forward, backward) compulsory bytes from the op's tensors (see the module doc)."""
    with FakeTensorMode():
        inputs = problem.make_inputs(shape.dims, dtype, torch.device("cpu"), torch.Generator())
        out = problem.reference(*inputs.args)
        outputs = out if isinstance(out, tuple) else (out,)
        differentiable = inputs.differentiable()
        forward = _nbytes(inputs.args) + _nbytes(outputs)
        backward = _nbytes(o for o in outputs if o.is_floating_point()) \
            + 2 * _nbytes(differentiable)
    return forward, backward


def minimum_work(problem: Problem, shape: Shape, dtype: torch.dtype) -> dict[str, PassWork]:
    """{"fwd", "bwd", "fwd_bwd"} -> the bytes and FLOPs the pass cannot do without."""
    model = work(problem, shape, dtype)
    if problem.bound == "memory":
        fwd, bwd = PassWork(model.fwd, 0.0), PassWork(model.fwd_bwd - model.fwd, 0.0)
    else:
        fwd_bytes, bwd_bytes = tensor_io_bytes(problem, shape, dtype)
        fwd, bwd = PassWork(fwd_bytes, model.fwd), PassWork(bwd_bytes, model.fwd_bwd - model.fwd)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def flops_peak(gpu: Gpu, dtype: torch.dtype) -> float:
    """The dense peak for matmuls in `dtype` (fp32: the FMA rate, torch's default)."""
    return gpu.flops[DTYPE_NAMES[dtype]]


def roofline(amount: PassWork, gpu: Gpu, dtype: torch.dtype) -> Roofline:
    memory = amount.bytes / gpu.bandwidth
    compute = amount.flops / flops_peak(gpu, dtype)
    return Roofline(max(memory, compute), "memory" if memory >= compute else "compute",
                    memory, compute)


def percent_of_peak(minimum: PassWork, seconds: float, gpu: Gpu, dtype: torch.dtype,
                    bound: str) -> float:
    """The share of the `bound` resource's peak that the op's *minimum* work reaches when the
    pass takes `seconds` (100 at the roofline itself)."""
    if bound == "memory":
        return 100.0 * minimum.bytes / gpu.bandwidth / seconds
    return 100.0 * minimum.flops / flops_peak(gpu, dtype) / seconds


def estimate(minimum: PassWork, bytes_ratio: float, gpu: Gpu, dtype: torch.dtype) -> Roofline:
    """The roofline of a pass whose kernels move `bytes_ratio` x its minimum bytes (< 1 is
    read as 1: kernels cannot beat the minimum, a lower count means work done elsewhere)."""
    return roofline(PassWork(minimum.bytes * max(bytes_ratio, 1.0), minimum.flops), gpu, dtype)
