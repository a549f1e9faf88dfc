"""The benchmark harness itself: work formulas, peaks, timing statistics, the results
schema, the renderer, and that a wrong implementation is reported FAILED, never timed."""
import json

import pytest
import torch

import kernels
from kernels import reference, torch_backend
from bench import timing
from bench.kernels import correctness, problems, suite as kernel_suite
from bench.kernels.problems import PROBLEMS, Shape, attention_flops, work
from bench.output import files as output, report, results
from bench.output.results import CHECK_ONLY, FAILED, OK
from bench.timing import peaks


# ----------------------------------------------------------------------------- formulas

def test_every_op_has_a_problem():
    assert set(kernels.OPS) <= set(PROBLEMS)
    with pytest.raises(KeyError, match="add one to bench.kernels.problems.PROBLEMS"):
        problems.problem("no_such_op")


def test_attention_flops_follow_the_flash_attention_convention():
    b, h, t, d = 2, 12, 1024, 64
    full = attention_flops(b, h, t, d, causal=False)
    assert full.fwd == 4 * b * h * t * t * d
    causal = attention_flops(b, h, t, d)
    assert causal.fwd == full.fwd / 2
    assert causal.fwd_bwd == pytest.approx(3.5 * causal.fwd)  # backward = 2.5x forward


def test_mlp_and_linear_cross_entropy_flops():
    mlp = work(PROBLEMS["mlp_gelu"], Shape({"N": 8, "C": 16}), torch.float32)
    assert mlp.fwd == 2 * (2 * 8 * 16 * 64)  # two matmuls of N x C x 4C
    assert mlp.fwd_bwd == 3 * mlp.fwd
    lce = work(PROBLEMS["linear_cross_entropy"], Shape({"N": 8, "C": 16, "V": 100}), torch.bfloat16)
    assert (lce.fwd, lce.fwd_bwd) == (2 * 8 * 16 * 100, 6 * 8 * 16 * 100)


def test_memory_bound_bytes_use_the_real_dtype():
    shape = Shape({"N": 1024, "C": 768})
    fp32 = work(PROBLEMS["layer_norm"], shape, torch.float32)
    bf16 = work(PROBLEMS["layer_norm"], shape, torch.bfloat16)
    assert fp32.fwd == 4 * (2 * 1024 * 768 + 2 * 768)  # read x, write y, read w and b
    assert bf16.fwd == fp32.fwd / 2 and bf16.fwd_bwd == fp32.fwd_bwd / 2
    ce = work(PROBLEMS["cross_entropy"], Shape({"N": 4, "V": 10}), torch.float16)
    assert ce.fwd == 4 * 10 * 2 + 4 * 8  # fp16 logits once, int64 targets
    assert ce.fwd_bwd == ce.fwd + 2 * 4 * 10 * 2 + 4 * 8


def test_rate_units():
    memory, compute = PROBLEMS["layer_norm"], PROBLEMS["causal_attention"]
    assert problems.rate(memory, 2e9, 1000.0) == pytest.approx(2.0)     # GB/s
    assert problems.rate(compute, 3e12, 500.0) == pytest.approx(6.0)    # TFLOP/s


# ----------------------------------------------------------------------------- peaks, timing

@pytest.mark.parametrize("name, bandwidth_tb", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100-SXM4-40GB", 1.555)])
def test_gpu_peak_table(name, bandwidth_tb):
    assert peaks.gpu_peak(name).bandwidth == pytest.approx(bandwidth_tb * 1e12)


def test_unknown_gpu_has_no_peak_and_no_percentage():
    assert peaks.gpu_peak("NVIDIA GeForce GTX 1080") is None
    assert peaks.percent_of_peak(5.0, None) is None
    assert peaks.percent_of_peak(None, 10.0) is None
    assert peaks.percent_of_peak(5.0, 10.0) == 50.0


def test_h100_bf16_peak():
    assert peaks.gpu_peak("NVIDIA H100 80GB HBM3").flops_for("bf16") == pytest.approx(989.4e12)


def test_summarize_gives_median_and_quartiles():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.q1_ms, t.q3_ms, t.repeats) == (3.0, 2.0, 4.0, 5)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_cpu_timing_measures_the_call():
    calls = []
    t = timing.time_cpu(lambda: calls.append(1), warmup=2, budget_s=0.01, min_repeats=3,
                        max_repeats=5)
    assert 3 <= t.repeats <= 5 and len(calls) == 2 + 1 + t.repeats
    assert 0 <= t.q1_ms <= t.median_ms <= t.q3_ms
    assert timing.peak_memory_mb(lambda: None, torch.device("cpu")) is None


# ----------------------------------------------------------------------------- the harness

def _tiny_case(impls, op="layer_norm", dims=None):
    prob = PROBLEMS[op]
    return kernel_suite.Case(prob, Shape(dims or {"N": 8, "C": 32}), torch.float32, tuple(impls))


def _wrong_layer_norm(x, weight, bias, eps):
    return reference.layer_norm(x, weight, bias, eps) * 1.01


def test_correct_impl_is_timed_and_wrong_one_is_failed_untimed():
    cpu = torch.device("cpu")
    impls = [kernel_suite.Impl("torch", lambda: torch_backend.layer_norm, timed=True),
             kernel_suite.Impl("wrong", lambda: _wrong_layer_norm, timed=True),
             kernel_suite.Impl("interpreted", lambda: reference.layer_norm, timed=False)]
    rows = kernel_suite.run_case(_tiny_case(impls), cpu, peak=None, quick=True)
    good, bad, check_only = rows
    assert good["status"] == OK and good["fwd"]["median_ms"] > 0 and good["fwd_bwd_rate"] > 0
    assert good["fwd_pct_peak"] is None  # no peak given: no percentage
    assert bad["status"] == FAILED and bad["error"].startswith("output 0: row")
    assert "error 1.00e-02" in bad["error"]
    assert bad["fwd"] is None and bad["fwd_bwd"] is None and bad["fwd_rate"] is None
    assert check_only["status"] == CHECK_ONLY and check_only["fwd"] is None


def test_crashing_impl_is_failed_with_its_error():
    def crash(*args):
        raise RuntimeError("kernel launch failed\nsecond line")
    rows = kernel_suite.run_case(_tiny_case([kernel_suite.Impl("crash", lambda: crash, True)]),
                                 torch.device("cpu"), peak=None, quick=True)
    assert rows[0]["status"] == FAILED and rows[0]["error"] == "RuntimeError: kernel launch failed"


def test_wrong_gradient_is_caught():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, dy):
            return 2 * dy

    def identity_with_wrong_grad(x, weight, bias, eps):
        return WrongGrad.apply(reference.layer_norm(x, weight, bias, eps))
    rows = kernel_suite.run_case(
        _tiny_case([kernel_suite.Impl("bad-grad", lambda: identity_with_wrong_grad, True)]),
        torch.device("cpu"), peak=None, quick=True)
    assert rows[0]["status"] == FAILED and rows[0]["error"].startswith("grad 0")


def test_the_gate_applies_the_conformance_rule():
    """The bench's gate is kernels.testing's judgement, with the reference in high
    precision: the torch backend passes in fp32 and bf16, a 1% error fails in both."""
    prob = PROBLEMS["layer_norm"]
    for dtype in (torch.float32, torch.bfloat16):
        inputs = prob.make_inputs({"N": 8, "C": 32}, dtype, torch.device("cpu"),
                                  torch.Generator().manual_seed(0))
        expected = correctness.expected_result(prob.spec, inputs, dtype,
                                               torch.Generator().manual_seed(0))
        assert correctness.check(torch_backend.layer_norm, inputs, expected).passed
        assert not correctness.check(_wrong_layer_norm, inputs, expected).passed
    assert correctness.reference_dtype(torch.float32) == torch.float64


def test_plan_checks_interpreted_backends_at_the_tiny_shape_only(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernel_suite, "backend_impls", lambda op, backends, device: [
        kernel_suite.Impl("torch", lambda: None, True),
        kernel_suite.Impl("triton", lambda: None, False)])
    cases = kernel_suite.plan(["layer_norm"], ["torch", "triton"], [torch.float32], cpu,
                              use_compile=True)
    prob = PROBLEMS["layer_norm"]
    assert [c.shape for c in cases] == list(prob.cpu_shapes) + [prob.interpreter_shape]
    names = [[i.name for i in c.impls] for c in cases]
    assert names[-1] == ["triton"]
    headline = [n for c, n in zip(cases, names) if c.shape.headline]
    assert all(kernel_suite.COMPILE in n for n in headline)
    assert all(kernel_suite.COMPILE not in n for c, n in zip(cases, names) if not c.shape.headline)


# ----------------------------------------------------------------------------- schema, output

def _meta(suite="kernels"):
    return {"machine": "m", "cpu": "c", "cpu_count": 2, "device": "CPU (test)",
            "device_type": "cpu", "python": "3.11", "torch": "2", "triton": None, "cuda": None,
            "git_commit": "abc", "date": "2026-01-01", "triton_interpret": True,
            "peak": None, "options": {}}


def _kernel_rows():
    cpu = torch.device("cpu")
    impls = [kernel_suite.Impl("torch", lambda: torch_backend.layer_norm, timed=True),
             kernel_suite.Impl("wrong", lambda: _wrong_layer_norm, timed=True),
             kernel_suite.Impl("triton", lambda: reference.layer_norm, timed=False)]
    return kernel_suite.run_case(_tiny_case(impls), cpu, peak=None, quick=True)


def test_document_round_trips_and_renders(tmp_path):
    doc = results.document("kernels", _meta(), _kernel_rows())
    written = output.write_suite(doc, tmp_path)
    assert results.load(tmp_path / "kernels.json") == json.loads(json.dumps(doc))
    md = (tmp_path / "kernels.md").read_text()
    assert "## layer_norm (memory-bound, GB/s)" in md
    failed = next(line for line in md.splitlines() if "| N=8 C=32 | fp32 | wrong |" in line)
    assert "**FAILED**: output 0: row" in failed and "error 1.00e-02" in failed
    assert "correctness only (Triton interpreter: checked, never timed)" in md
    assert "n/a" in md  # no peak, no CPU memory statistics: said, not faked
    assert (tmp_path / "kernels-layer_norm.png").stat().st_size > 0
    assert (tmp_path / "summary.md").read_text().startswith("# Kernel benchmarks")
    assert set(written) >= {tmp_path / "kernels.json", tmp_path / "kernels.md"}


def test_every_row_of_a_rendered_table_has_the_header_width():
    md = report.render(results.document("kernels", _meta(), _kernel_rows()))
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1


def test_a_gpu_table_has_gpu_and_host_time_columns_and_flags_disagreements():
    rows = _kernel_rows()
    rows[0]["fwd"] = timing.Timing(0.0152, 0.015, 0.0155, 7, "cuda-graph", 41.0,
                                   0.0149).to_json()
    rows[0]["fwd_bwd"] = timing.Timing(0.05, 0.049, 0.051, 7, "cuda-graph", 120.0,
                                       0.031).to_json()
    md = report.render(results.document("kernels", {**_meta(), "device_type": "cuda"}, rows))
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1
    assert "| fwd GPU µs | fwd host µs | fwd GPU time check |" in table[0]
    assert "| 15.2 (15–15.5) | 41 |  |" in table[2]                # fwd: agrees
    assert "| 50 (49–51) | 120 | **disagree**: profiler 31 µs (−61 %" in table[2]


@pytest.mark.parametrize("broken, message", [
    (lambda d: d.pop("rows"), "exactly the keys"),
    (lambda d: d["meta"].pop("git_commit"), "meta lacks"),
    (lambda d: d["meta"].update(suite="nope"), "unknown suite"),
    (lambda d: d["meta"].update(schema_version=99), "schema_version"),
    (lambda d: d["rows"][0].pop("fwd"), "missing \\['fwd'\\]"),
    (lambda d: d["rows"][0].update(extra=1), "unexpected \\['extra'\\]"),
])
def test_schema_rejects_malformed_documents(broken, message):
    doc = results.document("kernels", _meta(), _kernel_rows())
    broken(doc)
    with pytest.raises(results.SchemaError, match=message):
        results.validate(doc)


def test_load_rejects_non_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(results.SchemaError, match="is not JSON"):
        results.load(path)


def test_cli_arguments():
    from bench.__main__ import parse_args
    assert parse_args(["all", "--no-compile", "--ops", "layer_norm"]).ops == ["layer_norm"]
    for bad in (["render"], ["sweep", "--steps", "0"], ["kernels", "x.json"], ["nope"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_percentages_follow_the_best_cpu_peak(monkeypatch):
    from bench import runner
    busy = peaks.Peak("cpu", 10e9, {"fp32": 1e11}, "measured")
    quiet = peaks.Peak("cpu", 20e9, {"fp32": 4e11}, "measured")
    monkeypatch.setattr(peaks, "cpu_peak", lambda name: quiet)
    rows = [{"bound": "memory", "dtype": "fp32", "fwd_pct_peak": 50.0, "fwd_bwd_pct_peak": None},
            {"bound": "compute", "dtype": "fp32", "fwd_pct_peak": 80.0, "fwd_bwd_pct_peak": 40.0}]
    best = runner._remeasure_cpu_peak("kernels", rows, busy, "cpu")
    assert best == quiet
    assert rows[0]["fwd_pct_peak"] == 25.0 and rows[0]["fwd_bwd_pct_peak"] is None
    assert (rows[1]["fwd_pct_peak"], rows[1]["fwd_bwd_pct_peak"]) == (20.0, 10.0)
    sweep_rows = [{"dtype": "fp32", "mfu_pct": 40.0}]
    runner._remeasure_cpu_peak("sweep", sweep_rows, busy, "cpu")
    assert sweep_rows[0]["mfu_pct"] == 10.0
