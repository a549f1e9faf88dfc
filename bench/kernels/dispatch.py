"""Dispatch overhead: what a call through `kernels.<op>` costs the host beyond the call it
wraps, per op, measured on the CPU.

    python -m bench dispatch [--rounds 101] [--calls 200] [--slices 10] [--out-dir DIR]

- `torch`: `kernels.<op>(..., backend="torch")` against the PyTorch built-ins the torch
  backend runs (F.layer_norm, F.scaled_dot_product_attention, F.cross_entropy, ...).
- `triton` and `cuda`, launch-free: the backend's whole Python path — the op's checks and
  canonical form, the backend's wrapper, its autograd, the allocation of outputs and the
  launcher's arithmetic — with each kernel launch replaced by a no-op (Triton's
  `kernel[grid](...)`; the CUDA extension's entry points, which return their outputs
  unwritten), against the kernel called directly less its launch (its outputs
  allocated): the host time our code adds to a GPU kernel, measurable without a GPU. The
  `cuda` rows call the backend's function on the op's canonical call (`backend="cuda"`
  refuses CPU tensors, so its backend choice, the same code as every backend's, is timed
  in the other rows). mlp_gelu and linear_cross_entropy are left out of these rows: they
  run cuBLAS matmuls beside our kernels, which on the CPU are real work that cannot be
  told apart from our host time.

Tiny inputs (nothing to compute), one thread, forward only, in two modes: training (grad
enabled, inputs that require grad: both calls build their autograd node) and inference
(no grad). The bare call and ours run interleaved, in rounds of `calls` calls each, the
order alternating from round to round; a round's overhead is the difference of the two
per-call times, and the row gives the median over the rounds (and their quartiles) with
both medians: on a shared machine only differences measured side by side carry over.
The rows take turns, a slice of their rounds at a time, so that each row's rounds are
spread over the whole run and a slow phase of the machine falls on every row alike.
Times are the thread's CPU time (time.thread_time), not the wall clock: the host work a
call costs, without the time other processes held the core.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

TARGET_US = 5.0     # the target: at most this much forward overhead per op
ROUNDS = 101
CALLS = 200
SLICES = 10         # each row's rounds are run in this many slices, spread over the run


@dataclass(frozen=True)
class Overhead:
    op: str
    backend: str
    mode: str                 # "training" (grad enabled) or "inference"
    bare_us: float            # per call, median over the rounds
    ours_us: float
    overhead_us: float        # median over the rounds of (ours - bare)
    overhead_q1_us: float
    overhead_q3_us: float
    rounds: int

    @property
    def within_target(self) -> bool:
        return self.overhead_us <= TARGET_US


def interleaved(bare: Callable[[], object], ours: Callable[[], object], rounds: int = ROUNDS,
                calls: int = CALLS, clock: Callable[[], float] = time.thread_time
                ) -> tuple[list[float], list[float]]:
    """Per-call microseconds of `bare` and of `ours`, one sample each per round, the two
    measured back to back with the order alternating (after one warm-up round)."""
    def per_call(fn) -> float:
        start = clock()
        for _ in range(calls):
            fn()
        return 1e6 * (clock() - start) / calls

    for fn in (bare, ours):
        per_call(fn)
    bare_us, ours_us = [], []
    for round_ in range(rounds):
        if round_ % 2:
            ours_us.append(per_call(ours))
            bare_us.append(per_call(bare))
        else:
            bare_us.append(per_call(bare))
            ours_us.append(per_call(ours))
    return bare_us, ours_us


def summarize(op: str, backend: str, mode: str, bare_us: list[float],
              ours_us: list[float]) -> Overhead:
    differences = [o - b for b, o in zip(bare_us, ours_us)]
    q1, median, q3 = statistics.quantiles(differences, n=4, method="inclusive")
    return Overhead(op, backend, mode, statistics.median(bare_us), statistics.median(ours_us),
                    median, q1, q3, len(differences))


# ----------------------------------------------------------------------------- the calls

def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def torch_pairs() -> dict[str, tuple[Callable, Callable]]:
    """op -> (the bare PyTorch call, the same call through kernels.<op> on `torch`), on
    tiny tensors that require grad."""
    import kernels

    x, r = _leaf(4, 16), _leaf(4, 16)
    w, b = _leaf(16), _leaf(16)
    w_fc, b_fc, w_proj, b_proj = _leaf(64, 16), _leaf(64), _leaf(16, 64), _leaf(16)
    q, k, v = _leaf(1, 2, 8, 16), _leaf(1, 2, 8, 16), _leaf(1, 2, 8, 16)
    logits, targets = _leaf(4, 32), torch.randint(0, 32, (4,))
    head = _leaf(32, 16)
    return {
        "layer_norm": (lambda: F.layer_norm(x, (16,), w, b, 1e-5),
                       lambda: kernels.layer_norm(x, w, b, backend="torch")),
        "add_layer_norm": (lambda: F.layer_norm(x + r, (16,), w, b, 1e-5),
                           lambda: kernels.add_layer_norm(x, r, w, b, backend="torch")),
        "mlp_gelu": (lambda: F.linear(F.gelu(F.linear(x, w_fc, b_fc)), w_proj, b_proj),
                     lambda: kernels.mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, "none",
                                              backend="torch")),
        "causal_attention": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                             lambda: kernels.causal_attention(q, k, v, backend="torch")),
        "cross_entropy": (lambda: F.cross_entropy(logits, targets),
                          lambda: kernels.cross_entropy(logits, targets, backend="torch")),
        "linear_cross_entropy": (lambda: F.cross_entropy(F.linear(x, head), targets),
                                 lambda: kernels.linear_cross_entropy(x, head, targets,
                                                                      backend="torch")),
    }


LAUNCH_FREE_OPS = ("layer_norm", "add_layer_norm", "causal_attention", "cross_entropy")


def _no_launch(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def triton_launch_free():
    """Every `kernel[grid](...)` of Triton (jit, interpreter, autotuner) a no-op."""
    from triton.runtime.jit import KernelInterface

    with mock.patch.object(KernelInterface, "__getitem__", lambda self, grid: _no_launch):
        yield


class LaunchFreeExtension:
    """The CUDA extension's forward entry points, returning their outputs (in the shapes
    and dtypes csrc/ gives them: statistics fp32) unwritten: what a call of the extension
    costs the host, less the launch."""

    @staticmethod
    def layer_norm_forward(x, weight, bias, eps):
        rows = x.numel() // x.shape[-1]
        return (torch.empty_like(x), x.new_empty(rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @staticmethod
    def add_layer_norm_forward(x, residual, weight, bias, eps):
        rows = x.numel() // x.shape[-1]
        return (torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=torch.float32),
                x.new_empty(rows, dtype=torch.float32))

    @staticmethod
    def attention_forward(q, k, v, scale, version, dropout_p, seed, offset):
        b, h, t, d = q.shape
        return (q.new_empty(b, t, h, d).permute(0, 2, 1, 3),
                q.new_empty(b, h, t, dtype=torch.float32))

    @staticmethod
    def cross_entropy_forward(logits, targets, ignore_index, smoothing, z_loss, softcap):
        rows = logits.shape[0]
        return (logits.new_empty(rows, dtype=torch.float32),
                logits.new_empty(rows, dtype=torch.float32))


@contextlib.contextmanager
def cuda_launch_free():
    """The cuda backend's modules calling LaunchFreeExtension instead of the extension."""
    from kernels.cuda import attention, cross_entropy, layer_norm

    with contextlib.ExitStack() as stack:
        for module in (attention, cross_entropy, layer_norm):
            stack.enter_context(mock.patch.object(module, "ext", LaunchFreeExtension))
        yield


def launch_free_pairs(backend: str) -> dict[str, tuple[Callable, Callable]]:
    """op -> (the bare call, our launch-free call of the op) on `backend`. The bare call is
    what calling the kernel directly costs less its launch: allocating its outputs (as
    LaunchFreeExtension does: the cuda backend's own entry point; a Triton kernel's
    caller allocates the same tensors)."""
    import kernels
    from kernels import cuda
    from kernels.specs import SPECS

    x, r = _leaf(4, 16), _leaf(4, 16)
    w, b = _leaf(16), _leaf(16)
    q, k, v = _leaf(1, 2, 8, 16), _leaf(1, 2, 8, 16), _leaf(1, 2, 8, 16)
    logits, targets = _leaf(4, 32), torch.randint(0, 32, (4,))
    public = {"layer_norm": (x, w, b), "add_layer_norm": (x, r, w, b),
              "causal_attention": (q, k, v), "cross_entropy": (logits, targets)}
    ext = LaunchFreeExtension
    d = {name: t.detach() for name, t in
         dict(x=x, r=r, w=w, b=b, q=q, k=k, v=v, logits=logits).items()}
    bare = {"layer_norm": lambda: ext.layer_norm_forward(d["x"], d["w"], d["b"], 1e-5),
            "add_layer_norm": lambda: ext.add_layer_norm_forward(d["x"], d["r"], d["w"], d["b"],
                                                                 1e-5),
            "causal_attention": lambda: ext.attention_forward(d["q"], d["k"], d["v"], 0.25, 1,
                                                              0.0, 0, 0),
            "cross_entropy": lambda: ext.cross_entropy_forward(d["logits"], targets, -100, 0.0,
                                                               0.0, 0.0)}
    if backend == "triton":
        def ours(op):
            return lambda: getattr(kernels, op)(*public[op], backend="triton")
    else:
        def ours(op):
            return lambda: cuda.OPS[op](*SPECS[op].canonicalize(*public[op]).args)
    return {op: (bare[op], ours(op)) for op in LAUNCH_FREE_OPS}


# ----------------------------------------------------------------------------- the suite

MODES = {"training": True, "inference": False}  # mode -> grad enabled


def slice_sizes(rounds: int, slices: int) -> list[int]:
    """`rounds` split into at most `slices` nearly equal slices (none empty)."""
    slices = max(1, min(slices, rounds))
    return [rounds // slices + (i < rounds % slices) for i in range(slices)]


def measure(backends=("torch", "triton", "cuda"), modes=tuple(MODES), rounds: int = ROUNDS,
            calls: int = CALLS, slices: int = SLICES) -> list[Overhead]:
    """Every op's overhead row on each backend, in each mode: "training" (grad enabled,
    inputs that require grad: the autograd node is built) and "inference" (no grad). The
    triton rows need TRITON_INTERPRET=1 set before triton is imported, as
    `python -m bench dispatch` does.

    The rows take turns, a slice of their rounds each (`slice_sizes`), so that each row's
    rounds are spread over the whole run: a slow phase of the shared machine (they last
    seconds to minutes) lands on every row alike, and while it is shorter than half the
    run the medians leave it out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pairs = {backend: torch_pairs() if backend == "torch" else launch_free_pairs(backend)
             for backend in backends}
    contexts = {"torch": contextlib.nullcontext, "triton": triton_launch_free,
                "cuda": cuda_launch_free}
    samples = {(op, backend, mode): ([], []) for backend in backends for mode in modes
               for op in pairs[backend]}
    try:
        for size in slice_sizes(rounds, slices):
            for backend in backends:
                for mode in modes:
                    with contexts[backend](), torch.set_grad_enabled(MODES[mode]):
                        for op, (bare, ours) in pairs[backend].items():
                            bare_us, ours_us = interleaved(bare, ours, size, calls)
                            samples[op, backend, mode][0].extend(bare_us)
                            samples[op, backend, mode][1].extend(ours_us)
    finally:
        torch.set_num_threads(threads)
    return [summarize(*key, *times) for key, times in samples.items()]


def table(rows: list[Overhead]) -> str:
    lines = ["| op | backend | mode | bare µs | ours µs | overhead µs (quartiles) | "
             f"≤ {TARGET_US:g} µs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        backend = r.backend if r.backend == "torch" else f"{r.backend}, launch-free"
        lines.append(f"| {r.op} | {backend} | {r.mode} | {r.bare_us:.2f} | {r.ours_us:.2f} "
                     f"| {r.overhead_us:.2f} ({r.overhead_q1_us:.2f}–{r.overhead_q3_us:.2f}) "
                     f"| {'yes' if r.within_target else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench dispatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--slices", type=int, default=SLICES,
                        help="run each row's rounds in this many slices, spread over the run")
    parser.add_argument("--backends", nargs="+", default=["torch", "triton", "cuda"],
                        choices=("torch", "triton", "cuda"))
    parser.add_argument("--out-dir", type=Path, help="also write dispatch.{json,md} there")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in args.backends:
        parser.error("the launch-free triton rows run Triton's launchers on the CPU: set "
                     "TRITON_INTERPRET=1 (python -m bench dispatch does)")
    from bench.timing.machine import describe

    rows = measure(tuple(args.backends), rounds=args.rounds, calls=args.calls,
                   slices=args.slices)
    text = table(rows)
    print(text, end="")
    if args.out_dir is not None:
        import json

        meta = describe(torch.device("cpu"))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "dispatch.json").write_text(json.dumps(
            {"meta": meta, "rounds": args.rounds, "calls": args.calls, "slices": args.slices,
             "target_us": TARGET_US, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
        (args.out_dir / "dispatch.md").write_text(
            f"# Dispatch overhead per op, forward (CPU, one thread)\n\n"
            f"{meta['device']}; torch {meta['torch']}; commit `{meta['git_commit']}`; "
            f"{args.rounds} interleaved rounds of {args.calls} calls per row, in "
            f"{args.slices} slices spread over the run (bench/kernels/dispatch.py).\n\n"
            f"{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
