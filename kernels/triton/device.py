"""Launching on the tensors' own GPU.

A Triton launch goes to the *current* CUDA device, not to the device of the tensors it
is given: with tensors on cuda:1 while cuda:0 is current, a kernel would run on cuda:0
and dereference cuda:1 addresses (an illegal memory access). Every launcher therefore
runs under `on_device_of(tensor)`.
"""
from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """A context in which Triton launches go to t's GPU (a no-op for CPU tensors, which
    only the interpreter runs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
