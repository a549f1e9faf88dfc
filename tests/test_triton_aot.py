"""Every Triton kernel compiles ahead of time for sm_80 and sm_90.

One compile serves this file and test_static_report.py (`aot_session.project_report`:
worker processes without the interpreter, an empty Triton cache): every `AotSpec` of
every kernels.triton module, plus this file's own kernels, which test the machinery
itself - a vector add that must compile cleanly, a kernel that must spill, and specs that
must fail to compile. That no project kernel spills, at any config its launcher accepts,
is test_static_report.py's check.
"""
import pytest
import triton
import triton.language as tl

from aot_session import MACHINERY_SOURCES, project_report
from bench.static.resources import render_markdown, triton_rows
from kernels.triton.aot import TARGET_ARCHS, AotSpec, launch_configs, package_modules


@triton.jit
def _vector_add_kernel(X, Y, Out, N, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    x = tl.load(X + offsets, mask=mask)
    y = tl.load(Y + offsets, mask=mask)
    tl.store(Out + offsets, x + y, mask=mask)


@triton.jit
def _register_hog_kernel(X, Out, BLOCK: tl.constexpr):
    # One warp over BLOCK=8192 fp32 values holds 256 of them per thread; x * e / sum(e)
    # with e = exp(x - max(x)) keeps both x and e live across two reductions: ~512 values
    # for at most 255 registers, so ptxas has to spill.
    offsets = tl.arange(0, BLOCK)
    x = tl.load(X + offsets)
    e = tl.exp(x - tl.max(x, 0))
    tl.store(Out + offsets, x * e / tl.sum(e, 0))


@triton.jit
def _to_fp8_kernel(X, Out, BLOCK: tl.constexpr):
    # fp8e4nv exists from sm_89 on: this compiles for sm_90 and must fail for sm_80
    # (the interpreter would run it on any machine).
    offsets = tl.arange(0, BLOCK)
    tl.store(Out + offsets, tl.load(X + offsets).to(tl.float8e4nv))


def _vector_add(dtype: str, block: int) -> AotSpec:
    pointer = f"*{dtype}"
    return AotSpec(f"vector_add[{dtype},BLOCK={block}]", _vector_add_kernel,
                   {"X": pointer, "Y": pointer, "Out": pointer, "N": "i32", "BLOCK": "constexpr"},
                   {"BLOCK": block}, num_warps=4, num_stages=1)


AOT_SPECS = [_vector_add("fp32", 1024), _vector_add("bf16", 2048)]
SPILLING_SPECS = [
    AotSpec("register_hog[BLOCK=8192]", _register_hog_kernel,
            {"X": "*fp32", "Out": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 8192},
            num_warps=1, num_stages=1),
]
FAILING_SPECS = [
    AotSpec("to_fp8[BLOCK=128]", _to_fp8_kernel,
            {"X": "*fp32", "Out": "*fp8e4nv", "BLOCK": "constexpr"}, {"BLOCK": 128}),
    AotSpec("vector_add[missing N]", _vector_add_kernel,
            {"X": "*fp32", "Y": "*fp32", "Out": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 256}),
]
# A config only sm_90 picks (as the attention backward's wgmma tiles): compiled for sm_90
# alone, where it compiles (fp8 does not exist on sm_80).
ARCH_SPECS = [
    AotSpec("to_fp8[sm_90 only]", _to_fp8_kernel,
            {"X": "*fp32", "Out": "*fp8e4nv", "BLOCK": "constexpr"}, {"BLOCK": 128},
            archs=(90,)),
]
OWN_SOURCES = MACHINERY_SOURCES
KERNEL_MODULES = package_modules()


@pytest.fixture(scope="module")
def report():
    return project_report()


def _results(report, source, arch):
    return {r.name: r for r in report.results if r.source == source and r.arch == arch}


# ---- the machinery, on this file's kernels ----------------------------------------------

@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_clean_kernel_compiles_with_its_resources(report, arch):
    results = _results(report, OWN_SOURCES["AOT_SPECS"], arch)
    assert sorted(results) == sorted(spec.name for spec in AOT_SPECS)
    for result in results.values():
        assert result.error is None, result.error
        assert result.kernel.endswith("._vector_add_kernel")  # "module.function"
        assert 0 < result.resources.registers <= 255
        assert result.resources.spill_stores == result.resources.spill_loads == 0
        assert result.resources.stack_bytes == 0
        assert not result.spills


@pytest.mark.parametrize("arch", TARGET_ARCHS)
def test_spilling_config_is_detected(report, arch):
    (result,) = _results(report, OWN_SOURCES["SPILLING_SPECS"], arch).values()
    assert result.error is None, result.error
    assert result.spills
    assert result.resources.spill_loads > 0 and result.resources.stack_bytes > 0


def test_compile_failure_is_reported_per_spec_and_arch(report):
    sm80 = _results(report, OWN_SOURCES["FAILING_SPECS"], 80)["to_fp8[BLOCK=128]"]
    sm90 = _results(report, OWN_SOURCES["FAILING_SPECS"], 90)["to_fp8[BLOCK=128]"]
    assert sm80.resources is None and "fp8e4nv" in sm80.error
    assert sm90.error is None and sm90.resources.registers > 0


def test_a_spec_compiles_only_for_its_archs(report):
    source = OWN_SOURCES["ARCH_SPECS"]
    assert not _results(report, source, 80)
    (result,) = _results(report, source, 90).values()
    assert result.error is None and result.resources.registers > 0
    assert report.arch_counts[source] == {90: 1}


def test_signature_missing_a_parameter_is_a_clear_error(report):
    for arch in TARGET_ARCHS:
        result = _results(report, OWN_SOURCES["FAILING_SPECS"], arch)["vector_add[missing N]"]
        assert "must name every parameter" in result.error and "missing ['N']" in result.error


def test_resource_table_has_a_row_per_compile(report):
    rows = triton_rows(report)
    assert len(rows) == len(report.results)
    hog = [row for row in rows if row["kernel"] == "register_hog"]
    assert [row["arch"] for row in hog] == [f"sm_{arch}" for arch in TARGET_ARCHS]
    assert all(row["spills"] and row["config"] == "BLOCK=8192" for row in hog)
    table = render_markdown(rows, notes=[])
    assert table.count("**SPILLS**") == len(report.spilling())
    assert table.count("FAILED: ") == len(report.failures())


# ---- the project's kernels ---------------------------------------------------------------

def test_every_kernel_module_exports_its_specs(report):
    assert not report.problems, "\n".join(report.problems)


def _module_results(report, module, arch):
    source = f"{module}:AOT_SPECS"
    problems = [problem for problem in report.problems if module in problem]
    if problems:
        pytest.fail("\n".join(problems))
    if not report.spec_counts.get(source):
        pytest.skip(f"{module} defines no Triton kernels (it launches other modules' kernels)")
    results = _results(report, source, arch)
    assert len(results) == report.arch_counts[source].get(arch, 0), "a spec was not compiled"
    return results.values()


@pytest.mark.parametrize("arch", TARGET_ARCHS, ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("module", KERNEL_MODULES, ids=lambda module: module.rsplit(".")[-1])
def test_kernel_module_compiles(report, module, arch):
    failed = [f"{r.name}: {r.error}" for r in _module_results(report, module, arch) if r.error]
    assert not failed, f"{len(failed)} specs of {module} fail for sm_{arch}:\n" + "\n\n".join(failed)


def test_launch_configs_are_every_distinct_config_until_the_launcher_refuses():
    def tiles(size):
        if size > 100:
            raise ValueError("too wide")
        return min(64, triton.next_power_of_2(size))

    assert launch_configs(tiles) == {1: 1, 2: 2, 4: 3, 8: 5, 16: 9, 32: 17, 64: 33}
    assert launch_configs(lambda size: size // 1000, max_size=2500) == {0: 1, 1: 1000, 2: 2000}
