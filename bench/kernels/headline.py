"""The headline GPU benchmarks of `make gpu-check`, each measurement beside the static
report's prediction for it (`bench.static.predictions`).

    python -m bench headline attention --out-dir DIR   # causal, d=64, bf16, T=1k..8k at fixed
                                                       # B*T: ours at every kernel version vs
                                                       # torch and every SDPA backend
    python -m bench headline memory --out-dir DIR      # the memory-bound ops at GPT-2 124M:
                                                       # ours (cross-entropy at every kernel
                                                       # version) vs torch and torch.compile

GPT-2 124M training is compared with nanoGPT's own train.py by `python -m bench gpt2`.

Every implementation is checked against the reference before it is timed (the kernel
suite's `run_case`); one that disagrees or cannot run is a FAILED row with the reason.
Each benchmark writes headline-<name>.json and .md into DIR.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.kernels import suite as kernel_suite
from bench.kernels.problems import DTYPE_NAMES, HEAD_DIM, PROBLEMS, Shape
from bench.kernels.suite import COMPILE, Case, Impl
from bench.output import columns
from bench.output.columns import number
from bench.output.results import OK
from bench.static.predictions import load_static, predict, traffic_ratios
from bench.timing import machine
from bench.timing.peaks import device_peak, percent_of_peak
from kernels import versions
from kernels.torch_backend import SDPA_KERNELS
from kernels.gpus import gpu_by_name

OUR_BACKENDS = ("triton", "cuda")
# torch.nn.attention.SDPBackend members, by the impl name they get in the tables (the names
# `auto`'s routes give the torch backend preferring each: kernels.routing).
SDPA_BACKENDS = SDPA_KERNELS
ATTENTION_SEQ_LENS = (1024, 2048, 4096, 8192)
ATTENTION_TOKENS = 16384          # B*T, the same at every length: B=16 at 1k, 2 at 8k
ATTENTION_HEADS = 12              # GPT-2 124M


# ----------------------------------------------------------------------------- plans

def attention_shapes(seq_lens=ATTENTION_SEQ_LENS, tokens=ATTENTION_TOKENS,
                     heads=ATTENTION_HEADS, head_dim=HEAD_DIM) -> list[Shape]:
    """One (B, H, T, D) per length with B*T = tokens: equal work per token across lengths
    but for attention's own T^2 term."""
    too_long = [t for t in seq_lens if t > tokens or tokens % t]
    if too_long:
        raise ValueError(f"sequence lengths {too_long} do not divide {tokens} tokens")
    return [Shape({"B": tokens // t, "H": heads, "T": t, "D": head_dim}) for t in seq_lens]


def memory_cases() -> list[tuple[str, Shape]]:
    """Every memory-bound op at its GPT-2 124M (headline) GPU shape."""
    return [(op, shape) for op, problem in PROBLEMS.items() if problem.bound == "memory"
            for shape in problem.gpu_shapes if shape.headline]


def sdpa_impl(backend: str) -> Callable:
    """Causal attention pinned to one SDPA backend, with the op's signature (the headline
    times it without dropout: SDPA cannot apply a dropout_seed's mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None):
        if dropout_seed is not None:
            raise ValueError("SDPA draws its own dropout mask; it cannot take a dropout_seed")
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                  scale=scale)
    return attention


def compiled_torch_impl(op: str) -> Impl:
    def make():
        torch._dynamo.reset()  # a fresh recompile budget per case
        return torch.compile(kernel_suite.op_on(op, "torch"), dynamic=False)
    return Impl(COMPILE, make, timed=True)


def our_impls(op: str, device: torch.device) -> list[Impl]:
    return [impl for impl in kernel_suite.backend_impls(op, list(OUR_BACKENDS), device)
            if impl.timed]


# The numbered kernel versions (`kernels.versions`) of each of our backends, per op.
KERNEL_VERSIONS = {
    "causal_attention": {"triton": "triton_attention", "cuda": "cuda_attention"},
    "cross_entropy": {"triton": "triton_cross_entropy"},
}


def at_version(impl: Impl, kernel: str, version: int, default: int) -> Impl:
    """`impl` running `kernel` at `version`: selected before every call (an op reads it
    once per call, in the forward, and its backward runs the same), so rows of different
    versions can interleave in one process. The default version keeps the backend's plain
    name; others are named "<backend> v<N>"."""
    def make():
        run = impl.make()

        def call(*args):
            versions.select(kernel, version)
            return run(*args)
        return call
    name = impl.name if version == default else f"{impl.name} v{version}"
    return Impl(name, make, impl.timed)


def every_version(op: str, impls: list[Impl]) -> list[Impl]:
    """Each of our backends at every version of its kernels for `op` (the backends'
    modules, imported by `our_impls`, have declared them)."""
    declared = {k["name"]: k for k in versions.table()}
    out = []
    for impl in impls:
        kernel = declared.get(KERNEL_VERSIONS.get(op, {}).get(impl.name))
        if kernel is None:
            out.append(impl)
            continue
        out += [at_version(impl, kernel["name"], v, kernel["default"])
                for v in sorted(kernel["versions"])]
    return out


# ----------------------------------------------------------------------------- running

def _with_predictions(rows: list[dict], gpu, ratios) -> list[dict]:
    """Each row with the static prediction for its op, shape and dtype."""
    for row in rows:
        predicted = None if gpu is None else predict(row["op"], row["shape"], row["dtype"],
                                                     gpu, ratios)
        for name in ("fwd", "fwd_bwd"):
            p = None if predicted is None else predicted[name]
            row[f"{name}_ideal_ms"] = None if p is None else p["ideal_ms"]
            # The Triton estimate applies to our Triton kernels only.
            row[f"{name}_triton_est_ms"] = (p["triton_ms"] if p is not None
                                            and row["impl"].split()[0] == "triton" else None)
            measured = row[name]["median_ms"] if row[name] else None
            row[f"{name}_over_ideal"] = (measured / p["ideal_ms"]
                                         if measured is not None and p is not None else None)
    return rows


def run_kernel_cases(cases: list[Case], device: torch.device) -> list[dict]:
    peak = device_peak(device, machine.cpu_name())
    gpu = gpu_by_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    ratios = traffic_ratios(load_static())
    rows = []
    for case in cases:
        rows += _with_predictions(kernel_suite.run_case(case, device, peak, quick=False), gpu,
                                  ratios)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def attention_cases(device: torch.device, seq_lens=ATTENTION_SEQ_LENS,
                    tokens=ATTENTION_TOKENS, sdpa_backends=tuple(SDPA_BACKENDS)) -> list[Case]:
    problem = PROBLEMS["causal_attention"]
    impls = every_version("causal_attention", our_impls("causal_attention", device)) + [
        Impl("torch", lambda: kernel_suite.op_on("causal_attention", "torch"), timed=True)] + [
        Impl(name, lambda backend=SDPA_BACKENDS[name]: sdpa_impl(backend), timed=True)
        for name in sdpa_backends]
    return [Case(problem, shape, torch.bfloat16, tuple(impls))
            for shape in attention_shapes(seq_lens, tokens)]


def memory_bound_cases(device: torch.device) -> list[Case]:
    return [Case(PROBLEMS[op], shape, torch.bfloat16,
                 tuple(every_version(op, our_impls(op, device))
                       + [Impl("torch", lambda op=op: kernel_suite.op_on(op, "torch"),
                               timed=True), compiled_torch_impl(op)]))
            for op, shape in memory_cases()]


# ----------------------------------------------------------------------------- tables

def _ms_as_us(value: float | None) -> str:
    return number(None if value is None else 1e3 * value)


def _checks(row: dict) -> str:
    """The GPU time check of the row's two timings, each named."""
    notes = [f"{name}: {note}" for name, key in (("fwd", "fwd"), ("fwd+bwd", "fwd_bwd"))
             if (note := columns.gpu_time_check(row[key]))]
    return "; ".join(notes)


def kernel_table(rows: list[dict]) -> list[str]:
    """Per row: GPU time and host time per call (columns of their own), the rate and % of
    peak from the GPU time, the static prediction, and whether the GPU time's two
    measurements agree (bench/timing/gpu.py)."""
    lines = ["| op | shape | impl | fwd GPU µs | fwd host µs | fwd+bwd GPU µs "
             "| fwd+bwd host µs | fwd+bwd rate | % of peak | ideal fwd+bwd µs "
             "| Triton est. µs | measured / ideal | GPU time check | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] if row["status"] == OK else f"{row['status']}: {row['error']}"
        lines.append(
            f"| {row['op']} | {row['shape_label']} | {row['impl']} "
            f"| {columns.gpu_us(row['fwd'])} | {columns.host_us(row['fwd'])} "
            f"| {columns.gpu_us(row['fwd_bwd'])} | {columns.host_us(row['fwd_bwd'])} "
            f"| {number(row['fwd_bwd_rate'])} {row['unit']} | {number(row['fwd_bwd_pct_peak'])} "
            f"| {_ms_as_us(row['fwd_bwd_ideal_ms'])} | {_ms_as_us(row['fwd_bwd_triton_est_ms'])} "
            f"| {number(row['fwd_bwd_over_ideal'])} | {_checks(row)} | {status} |")
    return lines


TITLES = {
    "attention": "Causal attention fwd+bwd, d=64 bf16, B*T fixed: ours vs every SDPA backend",
    "memory": "Memory-bound ops at GPT-2 124M shapes (bf16): GB/s and % of HBM bandwidth",
}


def write(name: str, rows: list[dict], device: torch.device, out_dir: Path) -> list[Path]:
    meta = machine.describe(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"headline-{name}.json", out_dir / f"headline-{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "bench": name, "rows": rows}, indent=1) + "\n")
    table = kernel_table(rows)
    md_path.write_text("\n".join([f"## {TITLES[name]}", "",
                                  f"{meta['device']}; torch {meta['torch']}, triton "
                                  f"{meta['triton']}; commit `{meta['git_commit']}`. "
                                  "ideal / Triton est.: the static report's prediction "
                                  "(bench/static/predictions.py).", "", *table]) + "\n")
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench headline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=tuple(TITLES))
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the headline benchmarks need a CUDA GPU, and torch sees none here")
    device = torch.device("cuda")
    if args.bench == "attention":
        rows = run_kernel_cases(attention_cases(device), device)
    else:
        rows = run_kernel_cases(memory_bound_cases(device), device)
    for path in write(args.bench, rows, device, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
