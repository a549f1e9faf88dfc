"""The resource table: registers, spills, stack and shared memory per kernel x config x arch.

    python -m bench resources      # writes bench/results/resources.{json,md}

No GPU is needed. Triton kernels: every `AotSpec` of kernels.triton compiled ahead of time
for sm_80 and sm_90 (`kernels.triton.aot`), with ptxas's own `-v` report of the compile.
`python -m bench static` writes this table too, from the compiles of its fuller report.
CUDA extension (when built): the per-arch cubins inside `kernels._C`, read with
`cuobjdump --dump-resource-usage`, which knows registers, stack and static shared memory
but not spill bytes; for those rows a non-empty stack frame is flagged as spilling, since
that is where ptxas puts spills (a local array would land there too: worth a look either way).
Registers are per thread, out of 255; shared memory is per block.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import triton

from kernels.triton.aot import AotReport, Resources, compile_all

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
COLUMNS = ("backend", "kernel", "config", "warps", "stages", "arch", "registers",
           "spill_stores", "spill_loads", "stack_bytes", "shared_bytes", "spills", "error")


def rows_and_notes(report: AotReport) -> tuple[list[dict], list[str]]:
    """One row per kernel x config x arch, Triton's (from `report`) and the built CUDA
    extension's, and notes on what was (not) found."""
    notes = [f"Triton {triton.__version__}: {len(report.results)} compiles "
             f"({len(report.failures())} failed, {len(report.spilling())} spill)"]
    notes += [f"collection problem: {problem}" for problem in report.problems]
    rows = triton_rows(report)
    extension = find_cuda_extension()
    if extension is None:
        notes.append("CUDA extension: not built (no kernels._C found), so no CUDA rows")
    else:
        cuda_rows = cuda_extension_rows(extension)
        notes.append(f"CUDA extension: {_shown(extension)}, {len(cuda_rows)} kernel x arch rows")
        rows += cuda_rows
    return rows, notes


def triton_rows(report: AotReport) -> list[dict]:
    rows = []
    for result in report.results:
        # Spec names read "kernel[config]", e.g. "layer_norm_fwd[bf16,BLOCK=1024]".
        kernel, _, config = result.name.partition("[")
        measured = (asdict(result.resources) if result.resources is not None
                    else dict.fromkeys(field.name for field in fields(Resources)))
        rows.append({
            "backend": "triton", "kernel": kernel, "config": config.removesuffix("]"),
            "warps": result.num_warps, "stages": result.num_stages, "arch": f"sm_{result.arch}",
            **measured,
            "spills": result.spills, "error": result.error,
        })
    return rows


def find_cuda_extension() -> Path | None:
    """The built `kernels._C` shared library: installed/in-place, or under build/."""
    spec = importlib.util.find_spec("kernels._C")
    if spec is not None and spec.origin and spec.origin.endswith(".so"):
        return Path(spec.origin)
    built = sorted(REPO_ROOT.glob("build/**/kernels/_C*.so"))
    return built[0] if built else None


_ARCH = re.compile(r"^arch = (sm_\d+\w*)")
_FUNCTION = re.compile(r"^\s*Function (\S+):")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")
_IDENTIFIER = re.compile(r"^identifier = (\S+)")


@dataclass(frozen=True)
class CudaKernelUsage:
    """What `cuobjdump --dump-resource-usage` says of one kernel of one arch's cubin."""
    symbol: str         # mangled, as in the SASS and ELF dumps
    name: str           # demangled: "kernel<template args>"
    source: str | None  # the .cu file it came from (recorded by -lineinfo, as csrc/build.py
                        # compiles); None otherwise
    arch: str           # "sm_80"
    registers: int
    stack_bytes: int
    shared_bytes: int   # static shared memory; dynamic shared memory is set at launch


def cuda_kernel_usage(library: Path) -> list[CudaKernelUsage]:
    """Every kernel of every arch's cubin in `library` (a fat binary)."""
    dump = subprocess.run([cuobjdump(), "--dump-resource-usage", str(library)],
                          check=True, capture_output=True, text=True).stdout
    found, arch, source, function = [], None, None, None
    for line in dump.splitlines():
        if match := _ARCH.match(line):
            arch = match.group(1)
        elif match := _IDENTIFIER.match(line):
            source = Path(match.group(1)).name
        elif match := _FUNCTION.match(line):
            function = match.group(1)
        elif (match := _USAGE.search(line)) and function is not None:
            registers, stack, shared = map(int, match.groups())
            found.append((function, source, arch, registers, stack, shared))
            function = None
    names = _demangle([function for function, *_ in found])
    return [CudaKernelUsage(function, names[function], source, arch, registers, stack, shared)
            for function, source, arch, registers, stack, shared in found]


def cuda_extension_rows(library: Path) -> list[dict]:
    """Resource-table rows for every kernel of every arch's cubin in `library`."""
    return [{"backend": "cuda", "kernel": usage.name, "config": "", "warps": None,
             "stages": None, "arch": usage.arch, "registers": usage.registers,
             "spill_stores": None, "spill_loads": None, "stack_bytes": usage.stack_bytes,
             "shared_bytes": usage.shared_bytes, "spills": usage.stack_bytes > 0, "error": None}
            for usage in cuda_kernel_usage(library)]


# `cuobjdump -elf`: each kernel's attributes follow a ".nv.info.<symbol>" line; a kernel
# compiled with __launch_bounds__(N) has "Attribute: EIATTR_MAX_THREADS" and then
# "Value: <x> <y> <z>" (hex), the most threads per block it may be launched with.
_ELF_INFO = re.compile(r"^\.nv\.info\.(\S+)")
_ELF_VALUE = re.compile(r"^\s*Value:\s*(.*)")


def cuda_launch_bounds(library: Path) -> dict[tuple[str, str], int]:
    """(arch, symbol) -> the __launch_bounds__ thread count of the kernels that declare one
    (the block size the launcher uses, for the kernels that tell the compiler)."""
    dump = subprocess.run([cuobjdump(), "-elf", str(library)], check=True, capture_output=True,
                          text=True).stdout
    bounds, arch, symbol, wanted = {}, None, None, False
    for line in dump.splitlines():
        if match := _ARCH.match(line):
            arch, symbol = match.group(1), None
        elif match := _ELF_INFO.match(line):
            symbol = match.group(1)
        elif "EIATTR_MAX_THREADS" in line:
            wanted = symbol is not None
        elif wanted and (match := _ELF_VALUE.match(line)):
            x, y, z = (int(value, 16) for value in match.group(1).split()[:3])
            bounds[(arch, symbol)] = x * y * z
            wanted = False
    return bounds


def cuobjdump() -> str:
    try:
        return triton.knobs.nvidia.cuobjdump.path  # the one Triton ships
    except RuntimeError:
        found = shutil.which("cuobjdump") or shutil.which("/usr/local/cuda/bin/cuobjdump")
        if found is None:
            raise RuntimeError("cuobjdump not found (neither Triton's nor the CUDA toolkit's)")
        return found


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled C++ kernel name -> "kernel<template args>" (c++filt -p drops the parameters)."""
    if not names or shutil.which("c++filt") is None:
        return {name: name for name in names}
    out = subprocess.run(["c++filt", "-p"], input="\n".join(names), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def write_tables(rows: list[dict], notes: list[str], out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "resources.json", out_dir / "resources.md"
    json_path.write_text(json.dumps({"notes": notes, "columns": COLUMNS, "rows": rows}, indent=1)
                         + "\n")
    md_path.write_text(render_markdown(rows, notes))
    return json_path, md_path


def render_markdown(rows: list[dict], notes: list[str]) -> str:
    header = ("| backend | kernel | config | warps | stages | arch | regs | spill stores (B) "
              "| spill loads (B) | stack (B) | shared (B) | spills |")
    lines = ["# Kernel resources per arch", "",
             "Generated by `python -m bench resources` (no GPU needed). Registers per thread "
             "(max 255), spill/stack bytes per thread, shared memory per block.", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in rows:
        if row["error"] is not None:
            first_line = row["error"].splitlines()[0][:120]
            cells = [row["backend"], row["kernel"], row["config"], row["warps"], row["stages"],
                     row["arch"], f"FAILED: {first_line}", "", "", "", "", ""]
        else:
            cells = [row[column] for column in COLUMNS[:-2]]
            cells.append("**SPILLS**" if row["spills"] else "no")
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return "—" if value is None else str(value).replace("|", "\\|")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m bench resources", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rows, notes = rows_and_notes(compile_all())
    json_path, md_path = write_tables(rows, notes)
    for note in notes:
        print(note)
    print(f"wrote {_shown(json_path)} and {_shown(md_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
