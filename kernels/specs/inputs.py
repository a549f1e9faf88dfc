"""Building an op's test and benchmark inputs, including the layouts kernels get wrong.

Every tensor is drawn in fp32 from a seeded generator (on the generator's device: the CPU
for the conformance suite, the GPU for big benchmark shapes) and then stored in the case's
dtype on the case's device, so every dtype sees the same values up to rounding. A tensor that takes a gradient is a view of a leaf that requires one, so the
gradient with respect to the view itself is what the comparison reads.

Layouts (`layout=`), each a legal PyTorch tensor that a kernel assuming a dense
row-major buffer would read wrongly:
    "contiguous"  a fresh dense tensor;
    "row_padded"  rows of a wider buffer: unit column stride, row stride > row length;
    "strided"     every other element along the last dim (no unit stride anywhere);
    "offset"      a dense view starting 1 element into its storage (no 16-byte alignment);
    "transposed"  2-D only: the transpose of a dense (cols, rows) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LAYOUTS = ("contiguous", "row_padded", "strided", "offset", "transposed")


@dataclass(frozen=True)
class Inputs:
    """The positional arguments of one op call, as the public op takes them."""
    args: tuple
    grad_args: tuple[int, ...]  # indices of the arguments whose gradients are checked
    loss_scale: float = 1.0     # upstream gradients of reduced losses (a GradScaler's scale)
    autocast: bool = False      # call under torch.autocast(dtype) with fp32 inputs

    def differentiable(self) -> list[torch.Tensor]:
        return [self.args[i] for i in self.grad_args]


@dataclass(frozen=True)
class Case:
    """One named call of an op, built for any dtype and device. A case with `raises`
    describes a call that every backend must refuse with that error (matching `match`)."""
    name: str
    build: Callable[[torch.dtype, torch.device, torch.Generator], Inputs]
    raises: type[Exception] | None = None
    match: str = ""
    dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes it is meant for (None: all)

    def applies_to(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


def draw(shape, generator: torch.Generator, scale: float = 1.0, offset: float = 0.0):
    """fp32 N(offset, scale^2) values on the generator's device."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device) * scale \
        + offset


def place(values: torch.Tensor, dtype: torch.dtype, device, layout: str = "contiguous",
          requires_grad: bool = True) -> torch.Tensor:
    """`values` stored in `dtype` on `device` as a tensor of the given layout (see the
    module docstring); a view of a leaf that requires grad when `requires_grad`."""
    shape = tuple(values.shape)
    if layout == "contiguous":
        base = values.clone()
        pick = lambda t: t  # noqa: E731
    elif layout == "row_padded":
        pad = 3
        base = values.new_zeros(shape[:-1] + (shape[-1] + pad,))
        base[..., :shape[-1]] = values
        pick = lambda t: t[..., :shape[-1]]  # noqa: E731
    elif layout == "strided":
        base = values.new_zeros(shape[:-1] + (2 * shape[-1],))
        base[..., ::2] = values
        pick = lambda t: t[..., ::2]  # noqa: E731
    elif layout == "offset":
        base = values.new_zeros(values.numel() + 1)
        base[1:] = values.flatten()
        pick = lambda t: t[1:].view(shape)  # noqa: E731
    elif layout == "transposed":
        if len(shape) != 2:
            raise ValueError(f"layout 'transposed' needs a 2-D tensor, got shape {shape}")
        base = values.t().contiguous()
        pick = lambda t: t.t()  # noqa: E731
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    leaf = base.to(device=device, dtype=dtype)
    if requires_grad:
        leaf.requires_grad_()
    return pick(leaf)


def tensor(shape, dtype, device, generator, layout="contiguous", scale=1.0, offset=0.0,
           requires_grad=True) -> torch.Tensor:
    """`place(draw(...))`: a random tensor of the given layout."""
    return place(draw(shape, generator, scale, offset), dtype, device, layout, requires_grad)


def targets(rows, vocab, device, generator, layout="contiguous", ignore_index=-100,
            ignored=(), dtype=torch.int64) -> torch.Tensor:
    """Class indices in [0, vocab) with the rows in `ignored` set to ignore_index."""
    values = torch.randint(0, max(vocab, 1), (rows,), generator=generator, device=generator.device)
    for row in ignored:
        if row < rows:
            values[row] = ignore_index
    values = values.to(dtype)
    if layout == "contiguous":
        return values.to(device)
    if layout == "strided":
        base = values.new_zeros(2 * rows)
        base[::2] = values
        return base.to(device)[::2]
    if layout == "offset":
        base = values.new_zeros(rows + 1)
        base[1:] = values
        return base.to(device)[1:]
    raise ValueError(f"targets support layouts contiguous, strided, offset; got {layout!r}")
