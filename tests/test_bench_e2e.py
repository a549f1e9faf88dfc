"""The end-to-end benchmark and the sweep on a tiny model: rows, schema, tables."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench import e2e, peaks, report, results, sweep, training
from bench.results import OK
from gpt.model import GPT, GPTConfig

CPU = torch.device("cpu")
PEAK = peaks.Peak("test CPU", 10e9, {"fp32": 1e12}, "test")


def _corpus(vocab=32, n=4000):
    tokens = np.random.default_rng(0).integers(0, vocab, n, dtype=np.uint16)
    return training.Corpus(tokens[:3600], tokens[3600:], vocab, "test tokens")


def _meta(options):
    return {"machine": "m", "cpu": "c", "device": "CPU (test)", "device_type": "cpu",
            "python": "3.11", "torch": "2", "triton": None, "cuda": None, "git_commit": "abc",
            "date": "2026-01-01", "peak": PEAK.to_json(), "options": options}


def test_flops_per_token_matches_the_model():
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
    assert training.flops_per_token(config, 16) == GPT(config).flops_per_token(16)


def test_e2e_rows_train_sample_and_render():
    spec = e2e.ModelSpec("tiny", 1, 2, 16, True, ((2, 8),), new_tokens=3, inference_batches=(1,))
    rows = e2e.run([spec], ["torch"], CPU, torch.float32, PEAK, steps=2, warmup=1,
                   corpus_for=lambda spec: _corpus())
    kinds = [(r["kind"], r["impl"]) for r in rows]
    assert kinds == [("train", "torch"), ("train", e2e.NANOGPT),
                     ("sample, KV cache", "torch"), ("sample, no cache", "torch")]
    assert all(r["status"] == OK and r["tokens_per_s"] > 0 for r in rows)
    ours, nanogpt = rows[0], rows[1]
    assert ours["ms_per_iter"]["repeats"] == 2
    assert ours["mfu_pct"] == pytest.approx(
        100 * training.flops_per_token(GPTConfig(block_size=8, vocab_size=32, n_layer=1,
                                                 n_head=2, n_embd=16), 8)
        * ours["tokens_per_s"] / 1e12)
    assert abs(ours["loss"] - nanogpt["loss"]) < 0.05  # same weights, same batches
    md = report.render(results.document("e2e", _meta({}), rows))
    assert "reported, not measured by us" in md and "--n_embd=128" in md
    assert "| tiny (1L/2H/16d) | nanoGPT model.py (re-impl.) | 2 | 8 | fp32 |" in md


def test_sweep_varies_one_parameter_at_a_time():
    base = sweep.TrainSetting(2, 2, 16, 8, 2, 0.0)
    settings = sweep.settings(base, {"n_layer": (1, 2), "dropout": (0.0, 0.1)})
    assert [(p, v) for p, v, _ in settings] == [("n_layer", 1), ("n_layer", 2),
                                                ("dropout", 0.0), ("dropout", 0.1)]
    for param, value, setting in settings:
        assert getattr(setting, param) == value
        assert replace(setting, **{param: getattr(base, param)}) == base
    with pytest.raises(ValueError, match="cannot sweep 'lr'"):
        sweep.settings(base, {"lr": (1e-3,)})


def test_sweep_rows_and_table():
    base = sweep.TrainSetting(1, 2, 16, 8, 2, 0.0)
    rows = sweep.run(base, {"n_embd": (8, 16)}, _corpus(), "torch", CPU, torch.float32, PEAK,
                     steps=2, eval_batches=2)
    assert [r["value"] for r in rows] == [8, 16]
    assert all(r["status"] == OK and r["val_loss"] > 0 and r["mfu_pct"] > 0 for r in rows)
    options = {"steps": 2, "learning_rate": 1e-3, "backend": "torch", "base": base.label(),
               "eval_batches": 2}
    md = report.render(results.document("sweep", _meta(options), rows))
    assert "| n_embd | 8 | 1/2/8 | 8 | 2 | 0 |" in md
