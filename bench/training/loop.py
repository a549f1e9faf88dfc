"""Training as the benchmarks time it: the CLI's own iteration (`gpt.train.make_step`:
learning-rate schedule, gradient accumulation, clipping, GradScaler, AdamW) with the
optimizer settings of nanoGPT's Shakespeare config, so that a benchmark's ms/iter is what
`python -m gpt.train` gives a user with the same model and batch."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.timing import Timing, summarize
from bench.timing.gpu import CudaDevice
from gpt import train as cli
from gpt.model import GPT, GPTConfig

GPT2_VOCAB = 50257
DEFAULT_DATA_DIR = Path("data") / "default-char"
# config/train_shakespeare_char.py's optimizer (the seed command's), and the CLI's clip.
SHAKESPEARE_OPTIMIZER = dict(learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100,
                             weight_decay=0.1, grad_clip=1.0)
LEARNING_RATE = SHAKESPEARE_OPTIMIZER["learning_rate"]


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    name: str


def char_corpus(data_dir: Path) -> Corpus:
    """The embedded default corpus, char-level (prepared once, then cached on disk)."""
    from gpt import data  # the data API; imported here so the kernel suite does not need it
    data.prepare("default", data_dir, tokenizer="char")
    return Corpus(data.load_split(data_dir, "train"), data.load_split(data_dir, "val"),
                  data.load_meta(data_dir)["vocab_size"], "embedded corpus, char-level")


def random_gpt2_tokens(n_tokens: int, seed: int = 0) -> Corpus:
    """Uniform random GPT-2 token ids: throughput does not depend on which tokens they are,
    and a GPT-2-tokenized corpus would need tiktoken's BPE files, i.e. the network. The
    model's vocabulary is padded to a multiple of 64 (50304), as nanoGPT's."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, GPT2_VOCAB, n_tokens, dtype=np.uint16)
    split = int(0.9 * n_tokens)
    padded_vocab = -(-GPT2_VOCAB // 64) * 64
    return Corpus(tokens[:split], tokens[split:], padded_vocab, "random GPT-2 token ids")


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token of a config, from a parameterless (meta-device) model."""
    with torch.device("meta"):
        return GPT(config).flops_per_token(seq_len)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in cli.DTYPES.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    return cli.autocast_context(cli.TrainConfig(dtype=dtype_name(dtype)), device)


def run_config(batch_size: int, block_size: int, iters: int, dtype: torch.dtype,
               seed: int = 1337, **overrides) -> cli.TrainConfig:
    """The CLI's configuration of a run of `iters` iterations (warmup, then the cosine
    decay ending at the last one) with the Shakespeare optimizer settings."""
    settings = {**SHAKESPEARE_OPTIMIZER, **overrides}
    settings["warmup_iters"] = min(settings["warmup_iters"], max(iters - 1, 0))
    return cli.TrainConfig(batch_size=batch_size, block_size=block_size, max_iters=iters,
                           lr_decay_iters=max(iters, 1), gradient_accumulation_steps=1,
                           dtype=dtype_name(dtype), seed=seed, compile=False, **settings)


def new_step(model: torch.nn.Module, corpus: Corpus, config: cli.TrainConfig,
             device: torch.device) -> cli.TrainStep:
    """The CLI's training step for `model` on `corpus`'s train split."""
    optimizer, scaler = cli.new_optimizer(config, model, device)
    dist = cli.Distributed()
    batches = cli.TrainBatches(corpus.train, config, device, dist)
    return cli.make_step(config, model, optimizer, scaler, batches, dist)


@dataclass(frozen=True)
class TrainResult:
    step: Timing          # ms per iteration, over the timed steps; on a GPU with the host's
                          # time to issue one and the GPU's busy time per iteration
    tokens_per_s: float   # from the median iteration
    loss: float           # mean training loss over the last (up to 10) steps


PROFILED_STEPS = 3  # on a GPU: iterations after the timed ones, run under torch.profiler


def train(model: torch.nn.Module, corpus: Corpus, batch_size: int, block_size: int, steps: int,
          warmup: int, device: torch.device, dtype: torch.dtype,
          generator: torch.Generator) -> TrainResult:
    """Train `warmup + steps` iterations of the CLI's step, timing the last `steps`; each
    one ends with the loss read on the host, as the CLI's per-iteration log does.
    `generator` seeds the run (its initial seed).

    On a GPU the timing also holds the host's time to issue an iteration (until the step
    returns, before the loss is read) and the GPU's busy time per iteration (torch.profiler's
    sum of device time over PROFILED_STEPS more iterations): an iteration much longer than
    its GPU time is one in which the GPU waits for the host."""
    profiled = PROFILED_STEPS if device.type == "cuda" else 0
    config = run_config(batch_size, block_size, warmup + steps + profiled, dtype,
                        seed=generator.initial_seed())
    step = new_step(model, corpus, config, device)
    model.train()
    samples, issue_us, losses = [], [], []
    for it in range(warmup + steps):
        start = time.perf_counter()
        loss = step(it)
        returned = time.perf_counter()
        losses.append(loss.item())
        if it >= warmup:
            samples.append(1e3 * (time.perf_counter() - start))
            issue_us.append(1e6 * (returned - start))
    details = {}
    if profiled:
        first = warmup + steps
        busy_ms = CudaDevice(device).profiled_ms(
            lambda: [step(it).item() for it in range(first, first + profiled)])
        details = dict(host_us=statistics.median(issue_us),
                       profiler_ms=None if busy_ms is None else busy_ms / profiled)
    timing = summarize(samples, **details)
    return TrainResult(timing, batch_size * block_size / (timing.median_ms * 1e-3),
                       float(np.mean(losses[-10:])))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, batch_size: int, block_size: int,
             batches: int, device: torch.device, dtype: torch.dtype, seed: int = 1234) -> float:
    """Mean loss over `batches` batches drawn with a fixed seed."""
    return float(np.mean(batch_losses(model, data, batch_size, block_size, batches, device,
                                      dtype, seed)))


@torch.inference_mode()
def batch_losses(model: torch.nn.Module, data: np.ndarray, batch_size: int, block_size: int,
                 batches: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 1234) -> list[float]:
    """The mean loss of each of `batches` batches drawn with a fixed seed (their spread
    gives the eval's own noise)."""
    from gpt.data import get_batch

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with autocast(device, dtype):
        for _ in range(batches):
            x, y = get_batch(data, batch_size, block_size, device, generator)
            losses.append(model(x, y)[1].float())
    model.train(was_training)
    return torch.stack(losses).tolist()
