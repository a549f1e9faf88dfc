"""GPU time of each op's variants against its plain call: attention forward + backward with
dropout 0.1 against the same call without, each loss variant (label smoothing, z-loss,
soft-capping) against plain cross-entropy, on the triton and cuda backends.

    python -m bench variants --out-dir DIR     # on a GPU: variants.json and variants.md

The variants are the specs' (`OpSpec.bench_variants`), run at each op's headline GPU shape
(`bench.kernels.problems`) in bf16. Each time is the forward and backward of one call as
the GPU sees it, by `bench.timing.gpu` (CUDA-graph replay over input sets larger than L2,
cross-checked by the profiler), plain and variant measured alike, one after the other. A
dropout call draws its (seed, offset) when it is captured, so every replay applies one
mask (every mask costs the same). The targets (`TARGETS`) are the ratio each variant may
cost over its plain call.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import kernels
from bench.kernels.problems import PROBLEMS
from bench.timing import gpu
from kernels.specs import SPECS
from kernels.specs.inputs import Inputs
from kernels.testing import as_tensors

TARGETS = {"causal_attention": 1.15, "cross_entropy": 1.05, "linear_cross_entropy": 1.05}
BACKENDS = ("triton", "cuda")


@dataclass(frozen=True)
class Row:
    op: str
    backend: str
    variant: str
    shape: str
    plain_ms: float | None = None
    variant_ms: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.plain_ms is None or self.variant_ms is None:
            return None
        return self.variant_ms / self.plain_ms

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return f"FAILED: {self.error}"
        return "ok" if self.ratio <= TARGETS[self.op] else "over target"


def _headline(op: str):
    return next(s for s in PROBLEMS[op].gpu_shapes if s.headline)


def plan(backends=BACKENDS) -> list[Row]:
    """Every (op with variants, backend, variant), at the op's headline GPU shape."""
    return [Row(op, backend, variant, _headline(op).label)
            for op in TARGETS for backend in backends
            for variant, _ in SPECS[op].bench_variants]


def input_sets(op: str, variant: str | None, device: torch.device
               ) -> Callable[[int], list[Inputs]]:
    """n -> n input sets of `op` at its headline shape in bf16 (the plain call's when
    variant is None), drawn once and kept."""
    spec, dims = SPECS[op], _headline(op).dims
    generator = torch.Generator(device).manual_seed(0)
    drawn: list[Inputs] = []

    def sets(count: int) -> list[Inputs]:
        while len(drawn) < count:
            drawn.append(spec.bench_inputs(dims, torch.bfloat16, device, generator)
                         if variant is None else
                         spec.variant_inputs(variant, dims, torch.bfloat16, device, generator))
        return drawn[:count]
    return sets


def forward_backward(op: str, backend: str) -> Callable[[Inputs], None]:
    """call(inputs): one forward and backward of `op` on `backend`, upstream gradients of
    ones."""
    fn = getattr(kernels.ops, op)

    def call(inputs: Inputs) -> None:
        outputs = [o for o in as_tensors(fn(*inputs.args, backend=backend)) if o.requires_grad]
        torch.autograd.grad(outputs, inputs.differentiable(),
                            [torch.ones_like(o) for o in outputs], allow_unused=True)
    return call


def measure_row(row: Row, device: torch.device) -> Row:
    call = forward_backward(row.op, row.backend)
    try:
        times = []
        for variant in (None, row.variant):
            sets = input_sets(row.op, variant, device)
            timing = gpu.time_rotating(call, sets, gpu.tensor_bytes(sets(1)[0].args), device)
            times.append(timing.median_ms)
    except (kernels.BackendUnavailableError, RuntimeError) as exc:
        return Row(**{**asdict(row), "error": str(exc).splitlines()[0]})
    return Row(**{**asdict(row), "plain_ms": times[0], "variant_ms": times[1]})


def render(rows: list[Row], device_name: str) -> str:
    lines = [f"# Variants against their plain call ({device_name}, bf16, forward + backward, "
             f"GPU time)", "",
             "| op | backend | variant | shape | plain ms | variant ms | ratio | target | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        numbers = ("—", "—", "—") if r.ratio is None else \
            (f"{r.plain_ms:.3f}", f"{r.variant_ms:.3f}", f"{r.ratio:.3f}x")
        lines.append(f"| {r.op} | {r.backend} | {r.variant} | {r.shape} | "
                     f"{' | '.join(numbers)} | <= {TARGETS[r.op]}x | {r.verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench variants times GPU kernels: no CUDA GPU here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = [measure_row(row, device) for row in plan(args.backends)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "variants.json").write_text(json.dumps(
        [asdict(r) | {"ratio": r.ratio, "target": TARGETS[r.op], "verdict": r.verdict}
         for r in rows], indent=2))
    table = render(rows, torch.cuda.get_device_name())
    (args.out_dir / "variants.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
