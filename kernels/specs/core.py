"""What an op declaration holds (`OpSpec`) and what a backend is asked to run (`Call`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable

import torch

from kernels.specs.inputs import Case, Inputs


class Call:
    """One validated call of an op: its canonical positional arguments, by parameter name.

    Backends decide from a Call whether they can run it (`unsupported(call)`).

    A plain class with slots, not a dataclass: one is built for every op call, and a
    frozen dataclass's constructor costs about a microsecond more."""
    __slots__ = ("op", "params", "args", "device")

    def __init__(self, op: str, params: tuple[str, ...], args: tuple, device: torch.device):
        self.op, self.params, self.args, self.device = op, params, args, device

    def __repr__(self) -> str:
        return (f"Call(op={self.op!r}, device={self.device}, "
                f"args={dict(zip(self.params, self.args))!r})")

    def __getitem__(self, name: str):
        return self.args[self.params.index(name)]

    def tensors(self) -> list[torch.Tensor]:
        """The floating-point tensor arguments (the ones a kernel computes with)."""
        return [a for a in self.args if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def dtypes(self) -> set[torch.dtype]:
        return {a.dtype for a in self.args
                if isinstance(a, torch.Tensor) and a.is_floating_point()}


@dataclass(frozen=True)
class OpSpec:
    """An op, declared once. From it come the public function's checks (`canonicalize`),
    the `torch` backend's set of ops, the conformance suite (`reference`, `eager`,
    `cases`) and the benchmark problem's inputs (`bench_inputs`).

    canonicalize(*public_args) -> Call   checks the arguments (clear errors), applies
        autocast to matmul ops and makes cheap canonical forms (contiguous targets and
        1-D parameters), so that backends see one form of every legal call.
    reference(*args)   the math, in elementary tensor ops (`kernels.reference`).
    eager(*args)       plain PyTorch as a user writes the op, computing in the inputs'
                       dtype: the accuracy a kernel is held to in low precision.
    bench_inputs(dims, dtype, device, generator) -> Inputs   a benchmark shape's inputs.
    cases              the conformance suite's calls (`kernels.specs.inputs.Case`).
    result_dtypes(call) -> (dtype, ...)   the dtype of each output the op promises for a
                       call (part of the answer: the conformance suite checks it).
    precision(call) -> dtype   the precision the op computes in, which bounds how exactly
                       its results can be judged: by default the call's coarsest floating
                       tensor (a matmul in bf16 rounds its products to bf16 however wide
                       its output); cross-entropy promises fp32 math on its logits.
    bench_variants     (name, ((public argument, value), ...)) pairs: the op's variants a
                       benchmark times against the plain call (attention dropout, the loss
                       variants), at bench_inputs' shapes (`variant_inputs`).
    """
    name: str
    params: tuple[str, ...]
    canonicalize: Callable[..., Call]
    reference: Callable
    eager: Callable
    bench_inputs: Callable[[dict, torch.dtype, torch.device, torch.Generator], Inputs]
    cases: tuple[Case, ...]
    result_dtypes: Callable[[Call], tuple[torch.dtype, ...]]
    precision: Callable[[Call], torch.dtype] | None = None
    bench_variants: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()

    def working_dtype(self, call: Call) -> torch.dtype:
        """`precision(call)`, or the call's coarsest floating dtype."""
        if self.precision is not None:
            return self.precision(call)
        return max(call.dtypes(), key=lambda dtype: torch.finfo(dtype).eps)

    def call(self, args: tuple, device: torch.device) -> Call:
        return Call(self.name, self.params, args, device)

    def variant_inputs(self, variant: str, dims: dict, dtype: torch.dtype,
                       device: torch.device, generator: torch.Generator) -> Inputs:
        """bench_inputs at `dims` with variant's public arguments set (the rest at their
        defaults)."""
        settings = dict(self.bench_variants)
        if variant not in settings:
            raise KeyError(f"{self.name} has no benchmark variant {variant!r}; variants: "
                           f"{[name for name, _ in self.bench_variants]}")
        inputs = self.bench_inputs(dims, dtype, device, generator)
        bound = inspect.signature(self.canonicalize).bind(*inputs.args)
        bound.apply_defaults()
        arguments = {**bound.arguments, **dict(settings[variant])}
        return replace(inputs, args=tuple(arguments.values()))

    def case(self, name: str) -> Case:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(f"{self.name} has no case {name!r}; cases: "
                       f"{[c.name for c in self.cases]}")
