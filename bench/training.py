"""The training loop the end-to-end benchmark and the sweep time: nanoGPT's iteration
(get_batch, forward, backward, grad clip at 1.0, AdamW step) with nanoGPT's
shakespeare_char optimizer settings, at a constant learning rate."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.timing import Timing, summarize
from gpt.model import GPT, GPTConfig

LEARNING_RATE = 1e-3
BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
GPT2_VOCAB = 50257
DEFAULT_DATA_DIR = Path("data") / "default-char"


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


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class TrainResult:
    step: Timing          # ms per iteration, over the timed steps
    tokens_per_s: float   # from the median iteration
    loss: float           # mean training loss over the last (up to 10) steps


def train(model: torch.nn.Module, corpus: Corpus, batch_size: int, block_size: int, steps: int,
          warmup: int, device: torch.device, dtype: torch.dtype,
          generator: torch.Generator) -> TrainResult:
    """Train `warmup + steps` iterations, timing the last `steps` (each one synchronized,
    as nanoGPT's per-iteration loss logging does)."""
    from gpt.data import get_batch

    optimizer = model.configure_optimizers(WEIGHT_DECAY, LEARNING_RATE, BETAS, device.type)
    model.train()
    samples, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        x, y = get_batch(corpus.train, batch_size, block_size, device, generator)
        with autocast(device, dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            samples.append(1e3 * (time.perf_counter() - start))
        losses.append(loss.detach())
    timing = summarize(samples)
    return TrainResult(timing, batch_size * block_size / (timing.median_ms * 1e-3),
                       torch.stack(losses[-10:]).float().mean().item())


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, batch_size: int, block_size: int,
             batches: int, device: torch.device, dtype: torch.dtype, seed: int = 1234) -> float:
    """Mean loss over `batches` batches drawn with a fixed seed."""
    from gpt.data import get_batch

    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(batches):
        x, y = get_batch(data, batch_size, block_size, device, generator)
        with autocast(device, dtype):
            losses.append(model(x, y)[1].float())
    model.train()
    return torch.stack(losses).mean().item()
