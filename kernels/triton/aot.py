"""Ahead-of-time compilation of the Triton kernels for named GPUs, without a GPU.

Every kernel module lists, in `AOT_SPECS`, each (kernel, config) its launchers may pick.
`triton.compile` with an explicit `GPUTarget("cuda", 80|90, 32)` runs Triton's whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas -> cubin) on the CPU; no driver is
touched. That catches what the Triton interpreter lets through (dtypes an architecture
lacks, layouts the backend cannot lower, `tl.dot` limits), and ptxas's `-v` report of
that very compile tells how many registers each thread uses and whether it spills
(a spill is a register ptxas had to park in per-thread local memory, i.e. DRAM behind
L1: the most common silent slowdown of a too-large tile or too few warps).

    compile_spec(spec, arch) -> Compiled      one spec, in this process (needs real JITFunctions):
                                              ptxas's resources and, on request, the SASS
                                              opcode counts of the cubin
    compile_all(...)         -> AotReport     every spec of kernels.triton (+ extra sources),
                                              for every arch, in fresh worker processes
    launch_configs(config_fn)                 the distinct configs a launcher's config function
                                              picks over every size it accepts (for AOT_SPECS
                                              that cover a launcher's whole range)

Why worker processes: the test suite runs without a GPU under TRITON_INTERPRET=1, where
`@triton.jit` returns interpreter objects that cannot be compiled. `compile_all` starts
workers with that variable removed, which import the kernel modules anew, and gives them
an empty Triton cache directory so that no cubin cached by an earlier run can hide a
failure. The workers split the (spec, arch) pairs between them.

Every compile assumes what the JIT sees at GPT-2 shapes, so that the code (and its register
count) is the code the GPU will run: the JIT specializes each pointer that is 16-byte
aligned and each integer that is a multiple of 16 (tt.divisibility=16), and at GPT-2 shapes
all are: tensors from PyTorch's allocator and the views the ops pass are aligned, and every
size and stride (C=768, 3C, 4C, T=1024, B*T, the vocabulary padded to 50304) is a multiple
of 16. Parameters a kernel excludes with `do_not_specialize[_on_alignment]`, and those a
spec lists as `unaligned` (sizes that real shapes leave odd), get no hint, as in the JIT.
Without these hints a matmul cannot use aligned vector or cp.async loads, and its software
pipeline keeps the prefetched tiles in registers: the 128x128x32 bf16 tile then
spills kilobytes on sm_80 where the real launch, with hints, uses 240 registers and none.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelInterface

TARGET_ARCHS = (80, 90)  # sm_80 (A100) and sm_90a (H100/H200)
PACKAGE = "kernels.triton"
SPECS_ATTRIBUTE = "AOT_SPECS"
_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parents[1]
_WARP_SIZE = 32


@dataclass(frozen=True)
class AotSpec:
    name: str                      # e.g. "layer_norm_fwd[bf16,BLOCK=1024]"
    fn: object                     # the @triton.jit function
    signature: dict[str, str]      # every parameter -> "*bf16", "i32", ..., or "constexpr"
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # Integer/pointer parameters that real launches may pass with no 16-divisibility (an
    # unpadded vocabulary's row stride, say): compiled without the alignment hint, as the
    # JIT would, to show the code those shapes get.
    unaligned: tuple[str, ...] = ()
    # Whether GPT-2's shapes pick this config. Every config a launcher accepts is checked
    # for spills and limits; the static report's speed findings look at the GPT-2 ones.
    gpt2: bool = True
    # The archs whose launchers can pick this config (None: every target arch). A config
    # chosen per arch (wgmma tiles for sm_90, TMA loads that only sm_90 runs) is compiled,
    # checked and reported for its own arch only.
    archs: tuple[int, ...] | None = None

    def compiles_for(self, arch: int) -> bool:
        return self.archs is None or arch in self.archs


@dataclass(frozen=True)
class Resources:
    """What ptxas reports for one compiled kernel."""
    registers: int       # per thread
    spill_stores: int    # bytes stored to local memory by register spills, per thread
    spill_loads: int     # bytes loaded back from those spills, per thread
    stack_bytes: int     # per-thread stack frame (where spills and local arrays live)
    shared_bytes: int    # per block: Triton's dynamic shared memory + any static smem


@dataclass(frozen=True)
class Compiled:
    resources: Resources
    # SASS opcode with its modifiers ("LDG.E.128", "HMMA.16816.F32.BF16") -> how many times
    # it appears in the cubin (static count: a loop body counts once); None if not asked for.
    sass_opcodes: dict[str, int] | None = None


@dataclass(frozen=True)
class AotResult:
    """One spec compiled for one arch: its resources, or why it did not compile."""
    source: str          # where the spec came from, "module:AOT_SPECS"
    name: str
    kernel: str          # the @triton.jit function, "module.function"
    arch: int
    num_warps: int
    num_stages: int
    compile_seconds: float
    gpt2: bool = True    # the spec's `gpt2`: GPT-2's shapes pick this config
    resources: Resources | None = None
    sass_opcodes: dict[str, int] | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        return self.resources is not None and self.resources.spill_stores > 0

    @classmethod
    def from_json(cls, data: dict) -> AotResult:
        resources = data["resources"]
        return cls(**{**data, "resources": Resources(**resources) if resources else None})


@dataclass(frozen=True)
class AotReport:
    archs: tuple[int, ...]
    results: list[AotResult]       # in collection order, each spec for each of its archs
    spec_counts: dict[str, int]    # source -> number of specs it exports
    problems: list[str]            # collection problems: import errors, kernels without specs
    # source -> arch -> how many of its specs compile for that arch (`AotSpec.archs`)
    arch_counts: dict[str, dict[int, int]] = field(default_factory=dict)

    def failures(self) -> list[AotResult]:
        return [result for result in self.results if result.error is not None]

    def spilling(self) -> list[AotResult]:
        return [result for result in self.results if result.spills]


# ----------------------------------------------------------------------------------------
# Compiling one spec


def compile_spec(spec: AotSpec, arch: int, sass: bool = False) -> Compiled:
    """Compile `spec` for sm_`arch` and read ptxas's report of registers, spills, stack;
    with `sass`, also count the SASS opcodes of the cubin."""
    fn = _jit_function(spec)
    signature, attrs = _triton_signature(spec, fn)
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    report = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True       # Triton runs `ptxas -v` and prints its log
        with contextlib.redirect_stdout(report):
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, _WARP_SIZE),
                                    options={"num_warps": spec.num_warps,
                                             "num_stages": spec.num_stages})
    resources = parse_ptxas_report(report.getvalue(), dynamic_shared=kernel.metadata.shared)
    return Compiled(resources, _cubin_opcodes(kernel.asm["cubin"]) if sass else None)


def _cubin_opcodes(cubin: bytes) -> dict[str, int]:
    """SASS opcode counts of a cubin, disassembled by the cuobjdump Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", file.name], check=True,
                              capture_output=True, text=True).stdout
    return sass_opcode_counts(sass)


# One instruction of `cuobjdump -sass`: "/*0040*/  @!P0 LDG.E.128 R4, desc[UR14][R2.64] ;"
# (the encoding lines that follow, "/* 0x000e22... */", have a space after "/*").
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")


def sass_opcode_counts(sass: str) -> dict[str, int]:
    """Opcode (with modifiers) -> count over the instructions of a `cuobjdump -sass` text."""
    counts: dict[str, int] = {}
    for opcode in _SASS_INSTRUCTION.findall(sass):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def _jit_function(spec: AotSpec) -> JITFunction:
    # @triton.autotune / @triton.heuristics wrap the JITFunction; each wrapper keeps it in .fn.
    fn = spec.fn
    while isinstance(fn, KernelInterface) and not isinstance(fn, JITFunction):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(
            f"AotSpec {spec.name!r}: fn is a {type(fn).__name__}, not a @triton.jit function"
            + (" (TRITON_INTERPRET=1 is set in this process: compile with compile_all, whose "
               "workers run without it)" if os.environ.get("TRITON_INTERPRET") == "1" else ""))
    return fn


def _triton_signature(spec: AotSpec, fn: JITFunction) -> tuple[dict[str, str], dict]:
    """The signature in parameter order, and the alignment hints of its pointers."""
    params = list(fn.arg_names)
    missing = [p for p in params if p not in spec.signature]
    unknown = [p for p in spec.signature if p not in params]
    if missing or unknown:
        raise ValueError(f"AotSpec {spec.name!r}: the signature must name every parameter of "
                         f"{fn.__name__}({', '.join(params)}); missing {missing}, "
                         f"not parameters {unknown}")
    constexpr_params = [p for p in params if spec.signature[p] == "constexpr"]
    without_value = [p for p in constexpr_params if p not in spec.constexprs]
    not_constexpr = [p for p in spec.constexprs if p not in constexpr_params]
    if without_value or not_constexpr:
        raise ValueError(f"AotSpec {spec.name!r}: constexprs must give a value to exactly the "
                         f"'constexpr' parameters; no value for {without_value}, "
                         f"not 'constexpr' in the signature {not_constexpr}")
    not_params = [p for p in spec.unaligned if p not in params]
    if not_params:
        raise ValueError(f"AotSpec {spec.name!r}: unaligned names non-parameters {not_params}")
    signature = {p: spec.signature[p] for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (p, param) in enumerate(zip(params, fn.params))
             if _SPECIALIZED_TYPE.match(signature[p]) and p not in spec.unaligned
             and not (param.do_not_specialize or param.do_not_specialize_on_alignment)}
    return signature, attrs


# The argument types the JIT specializes on divisibility by 16: pointers and integers.
_SPECIALIZED_TYPE = re.compile(r"\*|[iu](8|16|32|64)$")


# ptxas -v prints, per function: "Function properties for NAME" and then
#   "    S bytes stack frame, W bytes spill stores, R bytes spill loads"
# and, per entry function: "Used N registers, used B barriers[, M bytes smem][, ...]".
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers[^\n]*")
_STATIC_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(report: str, dynamic_shared: int) -> Resources:
    """Resources from a `ptxas -v` log of one Triton kernel (one entry function plus any
    non-inlined callees, whose frames and spills are part of the kernel's)."""
    frames = _FRAME.findall(report)
    used = _USED.search(report)
    if not frames or used is None:
        raise RuntimeError("no ptxas -v report was captured from triton.compile (did "
                           f"TRITON_DUMP_PTXAS_LOG stop printing it?): {report[:500]!r}")
    static_smem = _STATIC_SMEM.search(used.group(0))
    return Resources(
        registers=int(used.group(1)),
        spill_stores=sum(int(stores) for _, stores, _ in frames),
        spill_loads=sum(int(loads) for _, _, loads in frames),
        stack_bytes=sum(int(stack) for stack, _, _ in frames),
        shared_bytes=dynamic_shared + (int(static_smem.group(1)) if static_smem else 0),
    )


def launch_configs(config_fn, max_size: int = 1 << 17) -> dict[object, int]:
    """Every distinct result of a launcher's config function (e.g. a size -> tile function)
    over the sizes it accepts, with the smallest size that gets it: sizes 1, 2, ... until
    the function raises ValueError (how a launcher rejects a size) or `max_size` (a
    function whose configs stop changing, like a capped block size). AOT_SPECS built from
    these cover every config the launcher can pick, not only those of GPT-2's shapes."""
    configs: dict[object, int] = {}
    for size in range(1, max_size + 1):
        try:
            config = config_fn(size)
        except ValueError:
            break
        configs.setdefault(config, size)
    return configs


# ----------------------------------------------------------------------------------------
# Collecting the specs


def package_modules() -> list[str]:
    """The kernel modules of kernels.triton, found by file name, without importing them."""
    return [f"{PACKAGE}.{info.name}" for info in pkgutil.iter_modules([str(_PACKAGE_DIR)])
            if not info.ispkg and info.name != "aot"]


@dataclass
class _Collection:
    specs: list[tuple[str, AotSpec]] = field(default_factory=list)  # (source, spec)
    spec_counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, source: str, specs: object) -> None:
        if not isinstance(specs, (list, tuple)) or not all(isinstance(s, AotSpec) for s in specs):
            self.problems.append(f"{source} is not a list of AotSpec")
            return
        names = [spec.name for spec in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            self.problems.append(f"{source} repeats spec names {duplicates}")
        self.specs += [(source, spec) for spec in specs]
        self.spec_counts[source] = len(specs)


def _collect(extra_sources: list[str], include_package: bool) -> _Collection:
    collection = _Collection()
    if include_package:
        _collect_package(collection)
    for source in extra_sources:
        where, _, attribute = source.rpartition(":")
        try:
            module = _import_source(where)
            collection.add(source, getattr(module, attribute))
        except Exception as exc:  # noqa: BLE001 - reported per source, the others still compile
            collection.problems.append(f"{source}: {_describe(exc)}")
    return collection


def _import_source(where: str):
    if not where.endswith(".py"):
        return importlib.import_module(where)
    path = Path(where).resolve()
    if str(path.parent) not in sys.path:  # it may import its neighbours, as a script would
        sys.path.insert(0, str(path.parent))
    name = f"_aot_source_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _collect_package(collection: _Collection) -> None:
    """Every kernels.triton module that defines Triton kernels must export AOT_SPECS, and
    every kernel must appear in a spec unless it is a helper another kernel calls."""
    kernels: dict[str, JITFunction] = {}  # "module.name" -> function
    for module_name in package_modules():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - an unimportable module is a reported problem
            collection.problems.append(f"{module_name} does not import: {_describe(exc)}")
            continue
        defined = {f"{module_name}.{name}": jit for name, jit in _jit_functions(module).items()}
        kernels.update(defined)
        source = f"{module_name}:{SPECS_ATTRIBUTE}"
        if hasattr(module, SPECS_ATTRIBUTE):
            collection.add(source, getattr(module, SPECS_ATTRIBUTE))
            if defined and not getattr(module, SPECS_ATTRIBUTE):
                collection.problems.append(f"{source} is empty but the module defines kernels")
        elif defined:
            collection.problems.append(f"{module_name} defines Triton kernels "
                                       f"{sorted(defined)} but no {SPECS_ATTRIBUTE}")
    # A kernel is covered by a spec of its own, or by being passed to one as a constexpr.
    covered = {id(_unwrap(value)) for _, spec in collection.specs
               for value in (spec.fn, *spec.constexprs.values())}
    called = {name for jit in kernels.values() for name in _called_names(jit)}
    for qualified, jit in kernels.items():
        if id(jit) not in covered and jit.__name__ not in called:
            collection.problems.append(f"Triton kernel {qualified} is in no {SPECS_ATTRIBUTE} "
                                       "entry and no other kernel calls it")


def _unwrap(obj: object) -> object:
    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _jit_functions(module) -> dict[str, JITFunction]:
    """The @triton.jit functions defined (not imported) in `module`."""
    found = {}
    for name, value in vars(module).items():
        jit = _unwrap(value)
        if isinstance(jit, JITFunction) and jit.fn.__module__ == module.__name__:
            found[name] = jit
    return found


def _called_names(jit: JITFunction) -> set[str]:
    """Names a kernel calls, as `f(...)` or `module.f(...)`: its device-function helpers."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(jit.fn)))
    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))}


def _kernel_name(fn: object) -> str:
    """"module.function" of a spec's kernel, as reported alongside its results."""
    fn = _unwrap(fn)
    python_fn = getattr(fn, "fn", fn)
    return f"{getattr(python_fn, '__module__', '?')}.{getattr(python_fn, '__name__', repr(fn))}"


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-3000:]


# ----------------------------------------------------------------------------------------
# The workers, and compile_all that runs them


def compile_all(archs: tuple[int, ...] = TARGET_ARCHS, extra_sources: tuple[str, ...] = (),
                include_package: bool = True, workers: int | None = None,
                timeout_s: float = 1200, sass: bool = False) -> AotReport:
    """Compile every spec of kernels.triton (and of `extra_sources`, each "module:ATTR" or
    "path/to/file.py:ATTR") for each of `archs` it compiles for (`AotSpec.archs`), in
    `workers` fresh processes; with `sass`, each result also counts its cubin's SASS opcodes
    (about half a second more per compile)."""
    workers = workers or min(2, os.cpu_count() or 1)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # empty: nothing cached can hide a failure
        shards = []
        for shard in range(workers):
            out, log = Path(tmp, f"shard{shard}.json"), Path(tmp, f"shard{shard}.log")
            argv = ["--shard", str(shard), "--shards", str(workers), "--out", str(out)]
            argv += [arg for arch in archs for arg in ("--arch", str(arch))]
            argv += [arg for source in extra_sources for arg in ("--source", source)]
            argv += [] if include_package else ["--no-package"]
            argv += ["--sass"] if sass else []
            with open(log, "w") as log_file:
                process = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, *argv],
                                           cwd=_REPO_ROOT, env=env, stdout=log_file,
                                           stderr=subprocess.STDOUT)
            shards.append((process, out, log))
        try:
            for process, _, log in shards:
                if process.wait(timeout=timeout_s) != 0:
                    raise RuntimeError(f"AOT compile worker exited with {process.returncode}; "
                                       f"the end of its log:\n{log.read_text()[-4000:]}")
        finally:
            for process, _, _ in shards:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        outputs = [json.loads(out.read_text()) for _, out, _ in shards]
    indexed = sorted((index, AotResult.from_json(row))
                     for output in outputs for index, row in output["results"])
    arch_counts = {source: {int(arch): n for arch, n in counts.items()}  # JSON keys are strings
                   for source, counts in outputs[0]["arch_counts"].items()}
    return AotReport(archs=tuple(archs), results=[result for _, result in indexed],
                     spec_counts=outputs[0]["spec_counts"], problems=outputs[0]["problems"],
                     arch_counts=arch_counts)


_WORKER_BOOT = "import sys; from kernels.triton.aot import _worker; sys.exit(_worker(sys.argv[1:]))"


def _worker(argv: list[str]) -> int:
    """Compile this shard's (spec, arch) pairs; write the results as JSON."""
    parser = argparse.ArgumentParser(prog="kernels.triton.aot worker")
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", type=int, action="append", required=True)
    parser.add_argument("--source", action="append", default=[])
    parser.add_argument("--no-package", action="store_true")
    parser.add_argument("--sass", action="store_true")
    args = parser.parse_args(argv)
    collection = _collect(args.source, include_package=not args.no_package)
    pairs = [(source, spec, arch) for source, spec in collection.specs for arch in args.arch
             if spec.compiles_for(arch)]
    arch_counts: dict[str, dict[int, int]] = {}
    for source, _, arch in pairs:
        counts = arch_counts.setdefault(source, {})
        counts[arch] = counts.get(arch, 0) + 1
    results = []
    for index in range(args.shard, len(pairs), args.shards):
        source, spec, arch = pairs[index]
        # Named before compiling, so a crash inside LLVM or ptxas points at its spec.
        print(f"compiling {source} {spec.name} for sm_{arch}", flush=True)
        start = time.perf_counter()
        try:
            compiled, error = compile_spec(spec, arch, sass=args.sass), None
        except Exception as exc:  # noqa: BLE001 - a failing spec is a result, not a crash
            compiled, error = None, _describe(exc)
        result = AotResult(source=source, name=spec.name, kernel=_kernel_name(spec.fn),
                           arch=arch, num_warps=spec.num_warps, num_stages=spec.num_stages,
                           compile_seconds=round(time.perf_counter() - start, 3),
                           gpt2=spec.gpt2,
                           resources=None if compiled is None else compiled.resources,
                           sass_opcodes=None if compiled is None else compiled.sass_opcodes,
                           error=error)
        results.append((index, asdict(result)))
    Path(args.out).write_text(json.dumps({"results": results, "spec_counts": collection.spec_counts,
                                          "problems": collection.problems,
                                          "arch_counts": arch_counts}))
    return 0
