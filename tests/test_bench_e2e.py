"""The end-to-end benchmark and the sweep on a tiny model: rows, schema, tables."""
import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.output import report, results
from bench.output.results import OK
from bench.timing import peaks
from bench.training import e2e, loop as training, sweep
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
    assert "re-implementation (fallback)" in md and "It is not nanoGPT's code" in md
    assert f"| tiny (1L/2H/16d) | {e2e.NANOGPT} | 2 | 8 | fp32 |" in md


def test_e2e_without_the_fallback_points_to_the_side_by_side_table():
    spec = e2e.ModelSpec("tiny", 1, 2, 16, True, ((2, 8),), new_tokens=2, inference_batches=())
    rows = e2e.run([spec], ["torch"], CPU, torch.float32, PEAK, steps=1, warmup=0,
                   corpus_for=lambda spec: _corpus(), reimplementation=False)
    assert [r["impl"] for r in rows] == ["torch"]
    assert "nanogpt.md" in report.render(results.document("e2e", _meta({}), rows))


def test_benchmark_training_runs_the_cli_step(monkeypatch):
    """bench.training times gpt.train's own step: its schedule and optimizer settings."""
    calls = []
    real = training.cli.make_step
    monkeypatch.setattr(training.cli, "make_step",
                        lambda config, *args: calls.append(config) or real(config, *args))
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    training.train(model, _corpus(), 2, 8, steps=3, warmup=1, device=CPU, dtype=torch.float32,
                   generator=torch.Generator().manual_seed(7))
    [config] = calls
    assert (config.max_iters, config.lr_decay_iters, config.warmup_iters, config.seed) == (4, 4, 3, 7)
    assert (config.learning_rate, config.beta2, config.grad_clip) == (1e-3, 0.99, 1.0)


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


def test_sweep_spends_the_same_tokens_on_every_config():
    budget = sweep.Budget(tokens=768 * 10, evals=4, eval_batches=2, final_eval_batches=3, seeds=1)
    base = sweep.CPU_BASE
    assert sweep.iterations(base, budget) == 10
    assert sweep.iterations(replace(base, batch_size=24), budget) == 5
    assert sweep.iterations(replace(base, block_size=32), budget) == 20
    assert sweep.eval_points(10, 4) == [2, 5, 8, 10]
    assert sweep.eval_points(2, 4) == [1, 2]


def test_sweep_rows_curves_noise_and_table():
    base = sweep.TrainSetting(1, 2, 16, 8, 2, 0.0)
    budget = sweep.Budget(tokens=16 * 6, evals=3, eval_batches=2, final_eval_batches=4, seeds=3)
    rows = sweep.run(base, {"n_embd": (8, 16)}, _corpus(), "torch", CPU, torch.float32, PEAK,
                     budget)
    assert [(r["param"], r["value"], r["seed"]) for r in rows] == [
        ("n_embd", 8, sweep.SEED), ("n_embd", 16, sweep.SEED),
        ("seed", sweep.SEED + 1, sweep.SEED + 1), ("seed", sweep.SEED + 2, sweep.SEED + 2)]
    for r in rows:
        assert r["status"] == OK and r["val_loss"] > 0 and r["val_loss_se"] > 0
        assert r["mfu_pct"] > 0 and r["iters"] == 6 and r["tokens"] == 96
        assert [p["tokens"] for p in r["curve"]] == [32, 64, 96]
        assert all(p["wall_s"] > 0 for p in r["curve"]) and r["wall_s"] >= r["curve"][-1]["wall_s"]
    low, high, seeds = sweep.seed_spread(rows, base)
    assert seeds == 3 and low <= high
    floor = sweep.noise_floor(rows[0], rows[1], (low, high, seeds))
    assert floor >= high - low
    assert len(rows[0]["final_losses"]) == 4  # the same batches: a paired comparison
    options = {**dataclasses.asdict(budget), "learning_rate": 1e-3, "backend": "torch",
               "base": dataclasses.asdict(base), "corpus": "test tokens"}
    md = report.render(results.document("sweep", _meta(options), rows))
    assert "| n_embd | 8 | 1337 | 1/2/8 | 8 | 2 | 0 | 6 |" in md
    assert "noise)" in md and "over 3 seeds" in md and "96 tokens of test tokens" in md


def test_configs_on_the_same_batches_are_compared_paired():
    """Two configs evaluated on the same batches share each batch's difficulty: the
    difference's standard error comes from the per-batch differences, not from the two
    evals' spreads as if independent (which would call a consistent +0.04 noise)."""
    hard_and_easy = [1.0, 3.0, 1.5, 2.5, 1.2, 2.8]
    base = {"block_size": 64, "val_loss": 2.0, "val_loss_se": 0.33,
            "final_losses": hard_and_easy}
    row = {"block_size": 64, "val_loss": 2.04, "val_loss_se": 0.33,
           "final_losses": [x + 0.04 + 0.001 * (-1) ** i for i, x in enumerate(hard_and_easy)]}
    paired = sweep.difference_se(row, base)
    assert paired < 0.001 < 0.04
    assert sweep.noise_floor(row, base, (1.999, 2.001, 3)) < 0.04  # beyond noise
    other_block = {**row, "block_size": 32}  # other windows: not paired
    assert sweep.difference_se(other_block, base) == pytest.approx((2 * 0.33 ** 2) ** 0.5)
