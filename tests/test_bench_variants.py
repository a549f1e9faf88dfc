"""bench/kernels/variants.py: the plan (every variant the specs declare, on both fused backends),
the verdict against the targets and the table, without a GPU; on a GPU, a real run."""
import pytest
import torch

from bench.kernels import variants
from bench.kernels.variants import TARGETS, Row
from kernels.specs import SPECS


def test_plan_times_every_declared_variant_on_both_fused_backends():
    rows = variants.plan()
    declared = {(op, name) for op in TARGETS for name, _ in SPECS[op].bench_variants}
    assert {(r.op, r.variant) for r in rows} == declared
    assert ("causal_attention", "dropout 0.1") in declared
    assert {name for _, name in declared} >= {"label_smoothing 0.1", "z_loss 1e-4", "softcap 30"}
    assert {r.backend for r in rows} == {"triton", "cuda"}
    assert all(r.plain_ms is None and r.error is None for r in rows)


def test_verdicts_and_table():
    fast = Row("causal_attention", "triton", "dropout 0.1", "B=8", 1.0, 1.1)
    slow = Row("cross_entropy", "cuda", "softcap 30", "N=8192", 1.0, 1.2)
    broken = Row("cross_entropy", "cuda", "z_loss 1e-4", "N=8192", error="boom")
    assert fast.verdict == "ok" and slow.verdict == "over target"
    assert broken.ratio is None and broken.verdict == "FAILED: boom"
    table = variants.render([fast, slow, broken], "GPU")
    assert "| 1.100x | <= 1.15x | ok |" in table and "| 1.200x | <= 1.05x | over target |" in table
    assert "| — | — | — | <= 1.05x | FAILED: boom |" in table


def test_variant_inputs_set_only_the_variants_arguments():
    spec = SPECS["linear_cross_entropy"]
    dims = {"N": 4, "C": 8, "V": 10}
    plain = spec.bench_inputs(dims, torch.float32, torch.device("cpu"), torch.Generator())
    capped = spec.variant_inputs("softcap 30", dims, torch.float32, torch.device("cpu"),
                                 torch.Generator())
    call = spec.canonicalize(*capped.args)
    assert call["softcap"] == 30.0 and call["label_smoothing"] == 0.0
    assert len(capped.args) == len(spec.params) and capped.grad_args == plain.grad_args
    with pytest.raises(KeyError, match="no benchmark variant 'dropout'"):
        spec.variant_inputs("dropout", dims, torch.float32, torch.device("cpu"),
                            torch.Generator())


@pytest.mark.gpu
def test_variants_run_on_a_gpu(tmp_path):
    assert variants.main(["--out-dir", str(tmp_path), "--backends", "triton"]) == 0
    table = (tmp_path / "variants.md").read_text()
    assert "FAILED" not in table and table.count("| triton |") == len(variants.plan(["triton"]))
