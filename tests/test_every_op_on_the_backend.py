"""Every op of a real training run and of sampling runs on the backend asked for: nanoGPT's
Shakespeare config (dropout 0.2) trained with --backend=triton, and generation with the KV
cache (queries shorter than keys) on triton, with no call left to the `torch` backend.
Here the Triton kernels run under the interpreter at a tiny size; the gpu-marked test runs
the config itself on a GPU."""
from pathlib import Path

import pytest
import torch

import kernels
import kernels.ops
from gpt import sample, train
from gpt.checkpoint import save_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.sample import SampleConfig
from test_sample import CHAR_META, CHARS

CONFIG = Path(__file__).resolve().parents[1] / "config" / "train_shakespeare_char.py"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")


def backend_of(op: str, fn) -> str:
    """Which backend's implementation of `op` the function `fn` is."""
    for name in kernels.BACKENDS:
        module = kernels.backends._module(name) if kernels.available_backends()[name].available \
            else None
        if module is not None and module.OPS.get(op) is fn:
            return name
    raise AssertionError(f"{fn} is no backend's {op}")


@pytest.fixture
def routes(monkeypatch):
    """Records (op, backend, the call's features) of every op call made through kernels."""
    seen = []
    resolve = kernels.ops.resolve

    def recording(call, backend):
        fn = resolve(call, backend)
        features = []
        if call.op == "causal_attention":
            if call["dropout_p"] > 0:
                features.append("dropout")
            if call["k"].shape[2] > call["q"].shape[2]:
                features.append("kv_cache")
        seen.append((call.op, backend_of(call.op, fn), tuple(features)))
        return fn

    monkeypatch.setattr(kernels.ops, "resolve", recording)
    return seen


def test_shakespeare_config_trains_with_every_op_on_triton(routes, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(TEXT)
    train.main([str(CONFIG), "--device=cpu", "--compile=False", "--dtype=float32",
                "--backend=triton", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1",
                "--max_iters=1", "--eval_iters=1", "--eval_interval=1", "--log_interval=1",
                "--progress=False", f"--input={text}", f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'out'}"])
    assert {backend for _, backend, _ in routes} == {"triton"}
    assert set(kernels.OPS) - {"cross_entropy"} <= {op for op, _, _ in routes}
    assert ("causal_attention", "triton", ("dropout",)) in routes  # the config's dropout 0.2


def test_sampling_with_the_kv_cache_runs_on_triton(routes, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "ckpt.pt", model, iter_num=0, config={}, meta=CHAR_META)
    config = SampleConfig(out_dir=str(tmp_path), start="Hello", num_samples=2,
                          max_new_tokens=14, device="cpu", dtype="float32", backend="triton")
    with_cache = sample.sample(config)
    assert {backend for _, backend, _ in routes} == {"triton"}
    assert ("causal_attention", "triton", ("kv_cache",)) in routes
    config.kv_cache = False
    assert sample.sample(config) == with_cache  # the same tokens without the cache


@pytest.mark.gpu
def test_shakespeare_config_on_a_gpu_runs_every_op_on_triton(routes, tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(TEXT * 20)
    train.main([str(CONFIG), "--device=cuda", "--compile=False", "--backend=triton",
                "--max_iters=3", "--eval_iters=2", "--eval_interval=3", "--log_interval=1",
                "--progress=False", f"--input={text}", f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'out'}"])
    assert {backend for _, backend, _ in routes} == {"triton"}
    assert ("causal_attention", "triton", ("dropout",)) in routes
