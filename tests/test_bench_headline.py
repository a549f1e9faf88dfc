"""The headline benchmarks' plans, predictions and tables, on the CPU (they time on a GPU
only; here each runs at a tiny size through the same code)."""
import pytest
import torch

from bench.kernels import headline
from bench.kernels.suite import Impl, op_on
from bench.kernels.problems import PROBLEMS
from bench.output.results import OK
from bench.static import predictions
from kernels import gpus, versions

CPU = torch.device("cpu")


def test_attention_lengths_keep_the_tokens_fixed():
    shapes = headline.attention_shapes()
    assert [s.dims["T"] for s in shapes] == [1024, 2048, 4096, 8192]
    assert {s.dims["B"] * s.dims["T"] for s in shapes} == {headline.ATTENTION_TOKENS}
    assert {(s.dims["H"], s.dims["D"]) for s in shapes} == {(12, 64)}
    with pytest.raises(ValueError, match="do not divide"):
        headline.attention_shapes(seq_lens=(3000,))


def test_attention_is_measured_against_every_sdpa_backend():
    (case,) = headline.attention_cases(CPU, seq_lens=(1024,))
    names = [impl.name for impl in case.impls]
    assert set(headline.SDPA_BACKENDS) <= set(names)
    assert case.dtype == torch.bfloat16


def test_memory_benchmarks_are_the_memory_bound_ops_at_gpt2_124m():
    cases = headline.memory_cases()
    assert {op for op, _ in cases} == {op for op, p in PROBLEMS.items() if p.bound == "memory"}
    assert all(shape.headline for _, shape in cases)
    for case in headline.memory_bound_cases(CPU):
        assert {"torch", "torch.compile"} <= {impl.name for impl in case.impls}


def test_an_sdpa_backend_runs_checked_and_timed_beside_no_prediction_on_the_cpu():
    cases = headline.attention_cases(CPU, seq_lens=(16,), tokens=32,
                                     sdpa_backends=("sdpa-math",))
    rows = headline.run_kernel_cases(cases, CPU)
    assert [r["impl"] for r in rows] == ["torch", "sdpa-math"]  # triton: interpreted, untimed
    row = rows[1]
    assert row["status"] == OK, row["error"]
    assert row["fwd_bwd"]["median_ms"] > 0
    assert row["fwd_bwd_ideal_ms"] is None  # a CPU is not in the GPU table
    assert "| causal_attention | B=2 H=12 T=16 D=64 | sdpa-math |" in \
        "\n".join(headline.kernel_table([row]))


def test_predictions_beside_a_gpu_row():
    problem = PROBLEMS["layer_norm"]
    shape = next(s for s in problem.gpu_shapes if s.headline)
    ratios = {("layer_norm", "fwd"): 1.0, ("layer_norm", "fwd_bwd"): 1.25}
    row = {"op": "layer_norm", "shape": shape.dims, "dtype": "bf16", "impl": "triton",
           "fwd": {"median_ms": 0.02}, "fwd_bwd": {"median_ms": 0.05}}
    (row,) = headline._with_predictions([row], gpus.gpu("H100 SXM"), ratios)
    assert row["fwd_bwd_triton_est_ms"] == pytest.approx(1.25 * row["fwd_bwd_ideal_ms"])
    assert row["fwd_over_ideal"] == pytest.approx(0.02 / row["fwd_ideal_ms"])
    predicted = predictions.predict("layer_norm", shape.dims, "bf16", gpus.gpu("H100 SXM"), {})
    assert predicted["fwd"]["triton_ms"] is None and predicted["fwd"]["bound"] == "memory"


def test_traffic_ratios_from_a_static_report():
    static = {"traffic": [
        {"op": "cross_entropy", "error": None,
         "passes": {"fwd": {"unique_bytes_ratio": 2.0}, "bwd": {"unique_bytes_ratio": None}}},
        {"op": "mlp_gelu", "error": "did not run", "passes": {}}]}
    assert predictions.traffic_ratios(static) == {("cross_entropy", "fwd"): 2.0}
    assert predictions.traffic_ratios(None) == {}


def test_kernel_suite_rows_beside_the_static_prediction():
    doc = {"meta": {"device": "NVIDIA H100 80GB HBM3"}, "rows": [
        {"op": "cross_entropy", "shape": {"N": 8192, "V": 50257}, "shape_label": "N=8192 V=50257",
         "dtype": "bf16", "impl": "triton", "fwd": {"median_ms": 0.5},
         "fwd_bwd": {"median_ms": 1.5}},
        {"op": "cross_entropy", "shape": {"N": 8192, "V": 50257}, "shape_label": "N=8192 V=50257",
         "dtype": "bf16", "impl": "cuda", "fwd": None, "fwd_bwd": None}]}
    static = {"traffic": [{"op": "cross_entropy", "error": None,
                           "passes": {"fwd": {"unique_bytes_ratio": 2.0}}}]}
    text = predictions.kernels_vs_static(doc, static)
    lines = [line for line in text.splitlines() if line.startswith("| cross_entropy")]
    assert len(lines) == 2  # the untimed row is left out
    assert "| triton | fwd | 0.5 |" in lines[0]
    unknown = predictions.kernels_vs_static({"meta": {"device": "CPU"}, "rows": []}, None)
    assert unknown.startswith("No prediction")


def test_attention_runs_each_of_our_backends_at_every_kernel_version():
    import kernels.triton.attention  # noqa: F401  (declares triton_attention's versions)

    (declared,) = [k for k in versions.table() if k["name"] == "triton_attention"]
    seen = []
    impl = Impl("triton", lambda: lambda *args: seen.append(
        versions._DECLARED["triton_attention"].current()), timed=True)
    impls = headline.every_version("causal_attention",
                                   [impl, Impl("sdpa-math", lambda: None, timed=True)])
    names = [i.name for i in impls]
    default = declared["default"]
    assert names == [("triton" if v == default else f"triton v{v}")
                     for v in sorted(declared["versions"])] + ["sdpa-math"]
    before = versions._DECLARED["triton_attention"].current()
    try:
        for i in impls[:-1]:
            i.make()()
    finally:
        versions.select("triton_attention", before)
    assert seen == sorted(declared["versions"])  # each call ran at its own version


def test_a_version_row_runs_its_version_forward_and_backward(monkeypatch):
    """A version row selects its version for the call: the forward and the backward after
    it run that version, even when another row selects another one in between."""
    from kernels.triton import attention
    launched = []
    real_launch = attention._launch
    monkeypatch.setattr(attention, "_launch", lambda kernel, *a, **kw: (
        launched.append(kernel), real_launch(kernel, *a, **kw)))
    before = attention.VERSIONS.current()
    rows = {i.name: i.make() for i in headline.every_version(
        "causal_attention", [Impl("triton", lambda: op_on("causal_attention", "triton"),
                                  timed=True)])}
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    try:
        out = rows["triton v1"](q, k, v)
        rows["triton"](q, k, v)  # another version selected before the first's backward
        launched.clear()
        out.sum().backward()
    finally:
        versions.select("triton_attention", before)
    assert launched == ["dkdv", "dq"]  # version 1's backward: dK/dV, then dQ


def test_cross_entropy_runs_at_every_kernel_version():
    import kernels.triton.cross_entropy  # noqa: F401  (declares its versions)
    (declared,) = [k for k in versions.table() if k["name"] == "triton_cross_entropy"]
    names = [i.name for i in headline.every_version(
        "cross_entropy", [Impl("triton", lambda: None, timed=True)])]
    assert names == [("triton" if v == declared["default"] else f"triton v{v}")
                     for v in sorted(declared["versions"])]
    assert [i.name for i in headline.every_version(
        "layer_norm", [Impl("triton", lambda: None, timed=True)])] == ["triton"]


def test_attention_is_also_measured_on_the_torch_backend():
    (case,) = headline.attention_cases(CPU, seq_lens=(1024,))
    assert "torch" in [impl.name for impl in case.impls]
