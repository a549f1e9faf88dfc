"""The static performance report: what can be said of every kernel's speed without a GPU.

    python -m bench static      # bench/results/static.{json,md} (and resources.{json,md})

For every kernel x config the launchers can pick x dtype x arch (sm_80, sm_90), Triton
(every AotSpec, compiled ahead of time: `kernels.triton.aot`) and CUDA (every kernel of the built extension, `cuobjdump`):
- registers, spills, shared memory against the arch's per-block limit, and theoretical
  occupancy (`bench.static.occupancy`);
- the SASS instruction mix (`bench.static.sass`): tensor-core instruction, ldmatrix, async
  copies, 128-bit global accesses, local memory.
Per op: the bytes each pass's Triton kernels move and the FLOPs they issue, counted under
the Triton interpreter at the op's interpreter shape, beside the op's minimum at that
shape (`bench.static.traffic`); and at GPT-2 shapes, the roofline (`bench.static.roofline`)
on the GPUs of `kernels.gpus.ROOFLINE_GPUS`, ideal and with the counted traffic.
Findings (`bench.static.findings`) list what the numbers say needs work.

Needs TRITON_INTERPRET=1 before triton is imported (`python -m bench static` sets it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import triton

from bench.kernels.problems import DTYPE_NAMES, PROBLEMS, Problem
from bench.static import resources, roofline, sass, traffic
from bench.static.findings import findings
from bench.static.markdown import render
from bench.static.occupancy import occupancy
from bench.timing import machine
from kernels.gpus import ARCHS, ROOFLINE_GPUS, Gpu
from kernels.triton.aot import AotResult, compile_all

RESULTS_DIR = machine.REPO_ROOT / "bench" / "results"
ROOFLINE_DTYPES = (torch.bfloat16, torch.float32)
TRAFFIC_DTYPE = torch.bfloat16
SHARED_MEMORY_OPCODES = ("LDS", "STS", "LDSM", "ATOMS", "LDGSTS", "REDS")


# ----------------------------------------------------------------------------- kernel rows

def _arch(label: str) -> int:
    return int(label.removeprefix("sm_").rstrip("a"))


def _fits(row: dict) -> bool | None:
    """Shared memory within the arch's per-block limit (None when the size is unknown)."""
    if row["shared_bytes"] is None:
        return None
    return row["shared_bytes"] <= ARCHS[_arch(row["arch"])].shared_per_block


def triton_row(result: AotResult, serves: list[str]) -> dict:
    """One compiled Triton spec: resources, occupancy, instruction mix."""
    kernel, _, config = result.name.partition("[")
    limits = ARCHS[result.arch]
    res = result.resources
    row = {
        "backend": "triton", "module": result.kernel.rsplit(".", 1)[0],
        "kernel": kernel, "config": config.removesuffix("]"), "arch": limits.name,
        "warps": result.num_warps, "stages": result.num_stages,
        "threads": result.num_warps * 32,
        "registers": getattr(res, "registers", None),
        "spill_stores": getattr(res, "spill_stores", None),
        "stack_bytes": getattr(res, "stack_bytes", None),
        "shared_bytes": getattr(res, "shared_bytes", None),
        "dynamic_shared": False, "shared_limit": limits.shared_per_block,
        "spills": result.spills,
        "occupancy": None if res is None else occupancy(
            limits, result.num_warps, res.registers, res.shared_bytes).to_json(),
        "sass": None if result.sass_opcodes is None
        else sass.opcode_mix(result.sass_opcodes).to_json(),
        "gpt2": result.gpt2,
        "serves": serves, "error": result.error,
    }
    row["shared_fits"] = _fits(row)
    return row


def cuda_rows(library: Path) -> list[dict]:
    """Every kernel x arch of the CUDA extension. The binary knows registers, stack and
    static shared memory; the block size only where the kernel declares __launch_bounds__,
    and dynamic shared memory never (so occupancy is missing where either is unknown)."""
    tool = resources.cuobjdump()
    opcodes = sass.extension_opcodes(library, tool)
    bounds = resources.cuda_launch_bounds(library)
    rows = []
    for usage in resources.cuda_kernel_usage(library):
        limits = ARCHS[_arch(usage.arch)]
        counts = opcodes.get((usage.arch, usage.symbol))
        mix = None if counts is None else sass.opcode_mix(counts)
        # sm_90 cubins count the driver's 1 KiB reserve in the static shared memory of
        # every kernel that uses shared memory (+1024 B against the same kernel's sm_80
        # cubin); the occupancy adds the reserve itself, so it is taken out here.
        own_shared = usage.shared_bytes
        if limits.arch >= 90 and own_shared >= limits.reserved_shared_per_block:
            own_shared -= limits.reserved_shared_per_block
        uses_shared = counts is not None and any(
            opcode.split(".")[0] in SHARED_MEMORY_OPCODES for opcode in counts)
        dynamic = uses_shared and own_shared == 0
        threads = bounds.get((usage.arch, usage.symbol))
        row = {
            "backend": "cuda", "module": usage.source, "kernel": usage.name, "config": "",
            "arch": limits.name, "warps": None if threads is None else threads // 32,
            "stages": None, "threads": threads, "registers": usage.registers,
            "spill_stores": None, "stack_bytes": usage.stack_bytes,
            "shared_bytes": own_shared, "dynamic_shared": dynamic,
            "shared_limit": limits.shared_per_block,
            # cuobjdump knows no spill bytes: a stack frame or local-memory instructions is
            # where spills live (a local array would be there too: worth a look either way).
            "spills": usage.stack_bytes > 0 or bool(mix and mix.local),
            "occupancy": None if threads is None or dynamic else occupancy(
                limits, threads // 32, usage.registers, own_shared).to_json(),
            "sass": None if mix is None else mix.to_json(),
            "gpt2": True, "serves": [], "error": None,
        }
        row["shared_fits"] = _fits(row)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- per op

def _traffic_rows(problem: Problem) -> dict:
    """Counted traffic of every pass's Triton kernels beside the op's minimum, at the
    op's interpreter shape."""
    shape = problem.interpreter_shape
    minimum = roofline.minimum_work(problem, shape, TRAFFIC_DTYPE)
    try:
        counted = traffic.count_op(problem, shape, TRAFFIC_DTYPE)
    except Exception as exc:  # noqa: BLE001 - one op that cannot run is reported, not fatal
        return {"op": problem.op, "shape": shape.label, "dtype": DTYPE_NAMES[TRAFFIC_DTYPE],
                "error": f"{type(exc).__name__}: {exc}"[:500], "passes": {}}
    counted["fwd_bwd"] = counted["fwd"] + counted["bwd"]
    passes = {}
    for name, kernels in counted.items():
        unique = sum(k.unique_bytes for k in kernels)
        requested = sum(k.bytes for k in kernels)
        flops = sum(k.dot_flops for k in kernels)
        least = minimum[name]
        passes[name] = {
            "kernels": [k.to_json() for k in kernels] if name != "fwd_bwd" else [],
            "bytes_requested": requested, "bytes_unique": unique, "dot_flops": flops,
            "minimum_bytes": least.bytes, "minimum_flops": least.flops,
            "unique_bytes_ratio": unique / least.bytes if least.bytes else None,
            "requested_per_unique": requested / unique if unique else None,
            "dot_flops_ratio": flops / least.flops if least.flops else None,
        }
    return {"op": problem.op, "shape": shape.label, "dtype": DTYPE_NAMES[TRAFFIC_DTYPE],
            "error": None, "passes": passes}


def _kernel_estimates(pass_traffic: dict, minimum: roofline.PassWork, gpu: Gpu,
                      dtype: torch.dtype) -> list[dict]:
    """Each kernel's roofline at the shape of `minimum`: its counted unique bytes scaled as
    the pass's minimum bytes scale from the interpreter shape, and its share of the model's
    FLOPs (its dot FLOPs over the larger of all kernels' and the model's, so that FLOPs
    done in cuBLAS stay out and masked tiles of the interpreter's tiny shape add none)."""
    bytes_scale = minimum.bytes / pass_traffic["minimum_bytes"] if pass_traffic["minimum_bytes"] \
        else 0.0
    flops_basis = max(pass_traffic["dot_flops"], pass_traffic["minimum_flops"])
    rows = []
    for k in pass_traffic["kernels"]:
        share = roofline.PassWork(
            k["unique_bytes"] * bytes_scale,
            minimum.flops * k["dot_flops"] / flops_basis if flops_basis else 0.0)
        line = roofline.roofline(share, gpu, dtype)
        rows.append({"kernel": k["kernel"], "bytes": share.bytes, "flops": share.flops,
                     "seconds": line.seconds, "bound": line.bound})
    return rows


def roofline_rows(traffic_by_op: dict[str, dict]) -> list[dict]:
    """Every op x GPT-2 shape x dtype x pass x GPU: minimum work, ideal roofline, and the
    estimate with the Triton kernels' counted bytes; per kernel at the headline shape."""
    rows = []
    for op, problem in PROBLEMS.items():
        passes = traffic_by_op.get(op, {}).get("passes", {})
        for dtype in ROOFLINE_DTYPES:
            for shape in problem.gpu_shapes:
                minimum = roofline.minimum_work(problem, shape, dtype)
                for name, least in minimum.items():
                    counted = passes.get(name)
                    ratio = None if counted is None else counted["unique_bytes_ratio"]
                    for gpu in ROOFLINE_GPUS:
                        ideal = roofline.roofline(least, gpu, dtype)
                        row = {"op": op, "shape": shape.label, "headline": shape.headline,
                               "dtype": DTYPE_NAMES[dtype], "pass": name, "gpu": gpu.key,
                               "bytes": least.bytes, "flops": least.flops,
                               "ideal": ideal.to_json(), "estimate": None,
                               "estimate_pct_of_peak": None, "kernels": []}
                        if ratio is not None:
                            estimate = roofline.estimate(least, ratio, gpu, dtype)
                            row["estimate"] = estimate.to_json()
                            row["estimate_pct_of_peak"] = roofline.percent_of_peak(
                                least, estimate.seconds, gpu, dtype, ideal.bound)
                            if shape.headline and counted["kernels"]:
                                row["kernels"] = _kernel_estimates(counted, least, gpu, dtype)
                        rows.append(row)
    return rows


def _serves(traffic_by_op: dict[str, dict]) -> dict[str, list[str]]:
    """Kernel "module.function" -> the "op pass" entries it runs in."""
    serves: dict[str, list[str]] = {}
    for op, entry in traffic_by_op.items():
        for name, counted in entry["passes"].items():
            for kernel in counted["kernels"]:
                serves.setdefault(kernel["kernel"], []).append(f"{op} {name}")
    return serves


# ----------------------------------------------------------------------------- the document

def build(workers: int | None = None, log=print) -> tuple[dict, list[dict]]:
    """The whole report as a JSON-able document, and the resource table's rows from the
    same compiles (minutes: every spec is compiled for both archs, and disassembled)."""
    start = time.perf_counter()
    log("counting each op's Triton traffic under the interpreter ...")
    traffic_by_op = {op: _traffic_rows(problem) for op, problem in PROBLEMS.items()}
    serves = _serves(traffic_by_op)
    log("compiling every Triton spec for sm_80 and sm_90, with SASS ...")
    report = compile_all(sass=True, workers=workers, timeout_s=3600)
    kernels = [triton_row(result, serves.get(result.kernel, [])) for result in report.results]
    resource_rows, notes = resources.rows_and_notes(report)
    extension = resources.find_cuda_extension()
    if extension is not None:
        log("reading the CUDA extension's cubins ...")
        kernels += cuda_rows(extension)
    doc = {
        "meta": {"generated_by": "python -m bench static", "git_commit": machine.git_commit(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "triton": triton.__version__, "torch": torch.__version__,
                 "seconds": None, "notes": notes},
        "archs": {limits.name: vars(limits) for limits in ARCHS.values()},
        "gpus": [{"key": gpu.key, "name": gpu.name, "arch": gpu.arch.name,
                  "sm_count": gpu.sm_count, "bandwidth": gpu.bandwidth, "flops": gpu.flops,
                  "source": gpu.source} for gpu in ROOFLINE_GPUS],
        "kernels": kernels,
        "traffic": list(traffic_by_op.values()),
        "roofline": roofline_rows(traffic_by_op),
    }
    doc["findings"] = findings(doc)
    doc["meta"]["seconds"] = round(time.perf_counter() - start)
    return doc, resource_rows


def write(doc: dict, resource_rows: list[dict], out_dir: Path = RESULTS_DIR) -> list[Path]:
    """static.json and static.md, and the resource table from the same compiles."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "static.json", out_dir / "static.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(render(doc))
    written = [json_path, md_path]
    written += resources.write_tables(resource_rows, doc["meta"]["notes"], out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--workers", type=int, default=None,
                        help="compile worker processes (default: 2 or the CPU count)")
    args = parser.parse_args(argv)
    doc, resource_rows = build(args.workers)
    for path in write(doc, resource_rows, args.out_dir):
        print(path)
    for finding in doc["findings"]:
        print(f"- {finding['title']}")
    print(f"done in {doc['meta']['seconds']} s")
    return 0
