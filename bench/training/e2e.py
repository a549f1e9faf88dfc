"""End-to-end benchmarks, in this process: training tokens/sec and MFU of whole models per
backend, timed on the CLI's own training step (`bench.training.loop`); and sampling tokens/sec
with and without the KV cache.

The comparison with nanoGPT itself runs whole processes side by side
(`bench.training.side_by_side`, given a nanoGPT checkout). Without one, nanoGPT's model
re-implemented (bench/training/nanogpt_baseline.py) is trained by the same step here instead, a
fallback labelled as such: the re-implementation is not nanoGPT's code or loop."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench.kernels.correctness import describe_error
from bench.kernels.problems import DTYPE_NAMES
from bench.output.results import FAILED, OK
from bench.timing import summarize
from bench.timing.peaks import Peak, percent_of_peak
from bench.training import loop as training
from bench.training.nanogpt_baseline import NanoGPT
from gpt.model import GPT, GPTConfig
from kernels.testing import BUDGET

NANOGPT = "nanoGPT model.py re-implementation (fallback)"
# Backends' losses at initialization, same weights and batch, agree to this many times
# the comparison's fixed budget of the dtype (kernels.testing.BUDGET): a whole model
# compounds it.
INITIAL_LOSS_TOLERANCE = 2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    char_level: bool                        # trains on the embedded corpus, else random ids
    train_runs: tuple[tuple[int, int], ...]  # (batch_size, block_size) pairs
    new_tokens: int                          # sampled per inference run
    inference_batches: tuple[int, ...]


SEED_CPU = ModelSpec("seed-cpu", 4, 4, 128, True, ((12, 64),), 128, (1,))
CPU_SPECS = (SEED_CPU,
             ModelSpec("shakespeare-char", 6, 6, 384, True, ((4, 256),), 32, (1,)))
GPU_SPECS = (SEED_CPU,
             ModelSpec("shakespeare-char", 6, 6, 384, True, ((64, 256),), 256, (1,)),
             ModelSpec("gpt2-124M", 12, 12, 768, False, ((16, 1024), (32, 512)), 256, (1, 8)),
             ModelSpec("gpt2-350M", 24, 16, 1024, False, ((8, 1024),), 128, (1,)))


def _config(spec: ModelSpec, vocab_size: int, block_size: int, backend: str) -> GPTConfig:
    return GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=spec.n_layer,
                     n_head=spec.n_head, n_embd=spec.n_embd, dropout=0.0, bias=True,
                     backend=backend)


def _build(impl: str, config: GPTConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every implementation
    model = NanoGPT(config) if impl == NANOGPT else GPT(config)
    return model.to(device)


def _row(kind, spec, impl, config, batch_size, dtype, status=OK, error=None, step=None,
         tokens_per_s=None, mfu_pct=None, loss=None) -> dict:
    return {"kind": kind, "model": spec.name, "impl": impl, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_embd": config.n_embd, "block_size": config.block_size,
            "batch_size": batch_size, "dtype": DTYPE_NAMES[dtype], "status": status,
            "error": error, "ms_per_iter": None if step is None else step.to_json(),
            "tokens_per_s": tokens_per_s, "mfu_pct": mfu_pct, "loss": loss}


def _initial_loss(model, corpus, batch_size, block_size, device, dtype) -> float:
    return training.evaluate(model, corpus.train, batch_size, block_size, 1, device, dtype)


def _train_row(spec, impl, config, corpus, batch_size, device, dtype, steps, warmup,
               reference_loss, peak_flops) -> tuple[dict, float]:
    """Train one implementation; refuse (FAILED) if its loss at initialization disagrees
    with the `torch` backend's on the same weights and batch."""
    try:
        model = _build(impl, config, device)
        first_loss = _initial_loss(model, corpus, batch_size, config.block_size, device, dtype)
        if reference_loss is not None and impl != NANOGPT:
            error = abs(first_loss - reference_loss) / abs(reference_loss)
            if not error <= INITIAL_LOSS_TOLERANCE * BUDGET[dtype]:
                return _row("train", spec, impl, config, batch_size, dtype, FAILED,
                            f"initial loss {first_loss:.5f} != torch backend's "
                            f"{reference_loss:.5f}"), first_loss
        result = training.train(model, corpus, batch_size, config.block_size, steps, warmup,
                                device, dtype, torch.Generator().manual_seed(0))
    except Exception as exc:  # a backend that cannot run the model is reported, not hidden
        return _row("train", spec, impl, config, batch_size, dtype, FAILED,
                    describe_error(exc)), None
    achieved = training.flops_per_token(config, config.block_size) * result.tokens_per_s
    return _row("train", spec, impl, config, batch_size, dtype, step=result.step,
                tokens_per_s=result.tokens_per_s, mfu_pct=percent_of_peak(achieved, peak_flops),
                loss=result.loss), first_loss


def _inference_rows(spec, impl, config, batch_size, device, dtype, new_tokens) -> list[dict]:
    # Past block_size the window slides, every position's embedding changes and the cache
    # is refilled each step: stay inside the window to measure what the cache saves.
    new_tokens = min(new_tokens, config.block_size - 1)
    model = _build(impl, config, device).eval()
    rows = []
    for use_cache in (True, False):
        kind = "sample, KV cache" if use_cache else "sample, no cache"
        prompt = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(0)
        runs = []
        try:
            with training.autocast(device, dtype):
                model.generate(prompt, 4, use_kv_cache=use_cache, generator=generator)  # warm-up
                for _ in range(3):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    model.generate(prompt, new_tokens, use_kv_cache=use_cache, generator=generator)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    runs.append(1e3 * (time.perf_counter() - start) / new_tokens)
        except Exception as exc:
            rows.append(_row(kind, spec, impl, config, batch_size, dtype, FAILED,
                             describe_error(exc)))
            continue
        per_token = summarize(runs)
        rows.append(_row(kind, spec, impl, config, batch_size, dtype, step=per_token,
                         tokens_per_s=batch_size / (per_token.median_ms * 1e-3)))
    return rows


def run(specs, backends: list[str], device: torch.device, dtype: torch.dtype, peak: Peak | None,
        steps: int, warmup: int, corpus_for, reimplementation: bool = True,
        sample_dtype: torch.dtype | None = None) -> list[dict]:
    """`backends`: the model backends to run (the first is the one others are checked
    against, normally `torch`); `corpus_for(spec)` gives a spec's training data;
    `reimplementation`: also train nanoGPT's re-implemented model (the fallback when no
    nanoGPT checkout is compared side by side); `sample_dtype`: the sampling rows' dtype
    (default: `dtype`)."""
    impls = list(backends) + ([NANOGPT] if reimplementation else [])
    peak_flops = None if peak is None else peak.flops_for(DTYPE_NAMES[dtype])
    total = sum(len(s.train_runs) * len(impls) + len(s.inference_batches) * len(backends)
                for s in specs)
    rows = []
    with tqdm(total=total, desc="e2e", unit="run") as progress:
        for spec in specs:
            corpus = corpus_for(spec)
            for batch_size, block_size in spec.train_runs:
                reference_loss = None
                for impl in impls:
                    progress.set_postfix_str(f"train {spec.name} B={batch_size} T={block_size} "
                                             f"{impl}")
                    config = _config(spec, corpus.vocab_size, block_size,
                                     backends[0] if impl == NANOGPT else impl)
                    row, first_loss = _train_row(spec, impl, config, corpus, batch_size, device,
                                                 dtype, steps, warmup, reference_loss, peak_flops)
                    if impl == backends[0]:
                        reference_loss = first_loss
                    rows.append(row)
                    progress.update()
            for batch_size in spec.inference_batches:
                for backend in backends:  # nanoGPT's generate has no KV cache to compare
                    progress.set_postfix_str(f"sample {spec.name} B={batch_size} {backend}")
                    config = _config(spec, corpus.vocab_size, spec.train_runs[0][1], backend)
                    rows += _inference_rows(spec, backend, config, batch_size, device,
                                            sample_dtype or dtype, spec.new_tokens)
                    progress.update()
    return rows
