"""The global-memory bytes and tensor-core FLOPs each Triton kernel actually asks for,
counted by running an op under the Triton interpreter (no GPU).

The interpreter executes every `tl.load`, `tl.store`, atomic and `tl.dot` through one
builder object; wrapping those builder methods sees every access with its mask, so the
count is exact for the code as written: bytes of the active (mask-true) elements of
every load and store, each atomic as a read plus a write, and 2·M·N·K per dot. Two byte
counts per kernel: *requested* counts every access, so a re-read (cross-entropy's second
sweep over a row, a weight vector every program loads) counts again; *unique* counts each
address once per launch, loads and stores apart: the DRAM traffic of a kernel whose
re-reads all hit in L2. A GPU's DRAM traffic lies between the two. PyTorch ops between the
kernels (cuBLAS matmuls, reductions, copies) are not Triton code and are not counted. The
interpreter runs the launchers' interpreter configurations (tiles, program counts), which
may differ from the GPU's autotuned ones.

    count_op(problem, shape, dtype) -> {"fwd": [KernelTraffic], "bwd": [...]}

Needs TRITON_INTERPRET=1 in the environment before triton is imported.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

import kernels
from bench.kernels.problems import Problem, Shape

PASSES = ("fwd", "bwd")


@dataclass
class KernelTraffic:
    kernel: str          # "module.function" of the @triton.jit kernel
    launches: int = 0
    programs: int = 0
    bytes_loaded: int = 0     # requested
    bytes_stored: int = 0
    unique_loaded: int = 0    # distinct addresses, per launch
    unique_stored: int = 0
    dot_flops: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    @property
    def unique_bytes(self) -> int:
        return self.unique_loaded + self.unique_stored

    def to_json(self) -> dict:
        return {**asdict(self), "bytes": self.bytes, "unique_bytes": self.unique_bytes}


class _Launch:
    """The addresses one launch touched, per direction and element size."""

    def __init__(self, traffic: KernelTraffic) -> None:
        self.traffic = traffic
        self.addresses: dict[tuple[str, int], list[np.ndarray]] = {}

    def access(self, direction: str, pointers, mask) -> None:
        size = _element_bytes(pointers)
        addresses = np.broadcast_to(np.asarray(pointers.data), np.shape(pointers.data))
        if mask is not None:  # a mask combined with a scalar may hold integers: as bool
            addresses = addresses[np.broadcast_to(mask.data.astype(bool), addresses.shape)]
        addresses = addresses.reshape(-1)
        self.addresses.setdefault((direction, size), []).append(addresses)
        if direction == "load":
            self.traffic.bytes_loaded += addresses.size * size
        else:
            self.traffic.bytes_stored += addresses.size * size

    def close(self) -> None:
        for (direction, size), chunks in self.addresses.items():
            unique = np.unique(np.concatenate(chunks)).size * size
            if direction == "load":
                self.traffic.unique_loaded += unique
            else:
                self.traffic.unique_stored += unique


class _Log:
    """Accumulates per (pass, kernel) while the interpreter runs."""

    def __init__(self) -> None:
        self.passes: dict[str, dict[str, KernelTraffic]] = {}
        self.current_pass: str | None = None
        self.current: _Launch | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current_pass = name
        self.passes.setdefault(name, {})
        try:
            yield
        finally:
            self.current_pass = None

    def launch(self, kernel: str) -> _Launch:
        kernels = self.passes.setdefault(self.current_pass or "outside a pass", {})
        traffic = kernels.setdefault(kernel, KernelTraffic(kernel))
        traffic.launches += 1
        return _Launch(traffic)


def _element_bytes(pointers) -> int:
    return math.ceil(pointers.get_element_ty().primitive_bitwidth / 8)


@contextlib.contextmanager
def counting() -> Iterator[_Log]:
    """Count every kernel launch's traffic while inside the block."""
    from triton.runtime import interpreter

    log = _Log()
    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    originals = {(builder, name): getattr(builder, name) for name in (
        "create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
        "create_dot", "set_grid_dim")}
    originals[(executor, "__call__")] = executor.__call__

    def masked_load(self, ptrs, mask, *args, **kwargs):
        if log.current is not None:
            log.current.access("load", ptrs, mask)
        return originals[(builder, "create_masked_load")](self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        if log.current is not None:
            log.current.access("store", ptrs, mask)
        return originals[(builder, "create_masked_store")](self, ptrs, value, mask, *args,
                                                           **kwargs)

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        if log.current is not None:
            log.current.access("load", ptr, mask)
            log.current.access("store", ptr, mask)
        return originals[(builder, "create_atomic_rmw")](self, op, ptr, val, mask, *args,
                                                         **kwargs)

    def atomic_cas(self, ptr, *args, **kwargs):
        if log.current is not None:
            log.current.access("load", ptr, None)
            log.current.access("store", ptr, None)
        return originals[(builder, "create_atomic_cas")](self, ptr, *args, **kwargs)

    def dot(self, a, b, *args, **kwargs):
        if log.current is not None:
            # a: (..., M, K), b: (..., K, N): 2·M·N·K per matrix of the batch.
            log.current.traffic.dot_flops += 2 * int(np.size(a.data)) * int(np.shape(b.data)[-1])
        return originals[(builder, "create_dot")](self, a, b, *args, **kwargs)

    def set_grid_dim(self, *grid):
        if log.current is not None:
            log.current.traffic.programs += math.prod(grid)
        return originals[(builder, "set_grid_dim")](self, *grid)

    def launch(self, *args, **kwargs):
        fn = self.fn
        log.current = log.launch(f"{fn.__module__}.{fn.__name__}")
        try:
            return originals[(executor, "__call__")](self, *args, **kwargs)
        finally:
            log.current.close()
            log.current = None

    replacements = {(builder, "create_masked_load"): masked_load,
                    (builder, "create_masked_store"): masked_store,
                    (builder, "create_atomic_rmw"): atomic_rmw,
                    (builder, "create_atomic_cas"): atomic_cas,
                    (builder, "create_dot"): dot, (builder, "set_grid_dim"): set_grid_dim,
                    (executor, "__call__"): launch}
    for (owner, name), replacement in replacements.items():
        setattr(owner, name, replacement)
    try:
        yield log
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def _differentiable_outputs(out) -> list[torch.Tensor]:
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]


def count_op(problem: Problem, shape: Shape, dtype: torch.dtype,
             backend: str = "triton") -> dict[str, list[KernelTraffic]]:
    """Run `problem`'s op forward, then backward with a random upstream gradient, on the
    CPU through `backend` (the Triton interpreter), and count each pass's kernels."""
    device = torch.device("cpu")
    generator = torch.Generator(device).manual_seed(0)
    inputs = problem.make_inputs(shape.dims, dtype, device, generator)
    with counting() as log:
        with log.phase("fwd"):
            outputs = _differentiable_outputs(
                getattr(kernels, problem.op)(*inputs.args, backend=backend))
        upstream = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in outputs]
        with log.phase("bwd"):
            torch.autograd.backward(outputs, upstream)
    return {name: list(log.passes.get(name, {}).values()) for name in PASSES}
