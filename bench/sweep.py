"""The design-parameter sweep: vary one of n_layer, n_head, n_embd, block_size, batch_size,
dropout at a time around a base config, train each for a fixed number of steps from the
same seed on the embedded corpus, and record loss, tokens/sec and MFU side by side — the
study a student runs with nanoGPT, in one command."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from bench import training
from bench.correctness import describe_error
from bench.peaks import Peak, percent_of_peak
from bench.problems import DTYPE_NAMES
from bench.results import FAILED, OK
from gpt.model import GPT, GPTConfig


@dataclass(frozen=True)
class TrainSetting:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    dropout: float

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


# Base configs and the values each parameter takes (the base's own value among them).
CPU_BASE = TrainSetting(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0)
CPU_VALUES = {"n_layer": (2, 4, 6), "n_head": (2, 4, 8), "n_embd": (64, 128, 192),
              "block_size": (32, 64, 128), "batch_size": (6, 12, 24), "dropout": (0.0, 0.1, 0.2)}
GPU_BASE = TrainSetting(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                        dropout=0.2)
GPU_VALUES = {"n_layer": (4, 6, 8), "n_head": (4, 6, 8), "n_embd": (192, 384, 576),
              "block_size": (128, 256, 512), "batch_size": (32, 64, 128),
              "dropout": (0.0, 0.1, 0.2)}


def settings(base: TrainSetting,
             values: dict[str, tuple]) -> list[tuple[str, object, TrainSetting]]:
    """(parameter, value, setting) for every value of every parameter, one change at a time."""
    out = []
    for param, options in values.items():
        if param not in asdict(base):
            raise ValueError(f"cannot sweep {param!r}: not one of {list(asdict(base))}")
        for value in options:
            out.append((param, value, replace(base, **{param: value})))
    return out


def _row(param, value, setting: TrainSetting, dtype, steps, status=OK, error=None,
         train_loss=None, val_loss=None, step=None, tokens_per_s=None, mfu_pct=None) -> dict:
    return {"param": param, "value": value, **asdict(setting), "dtype": DTYPE_NAMES[dtype],
            "steps": steps, "status": status,
            "error": error, "train_loss": train_loss, "val_loss": val_loss,
            "ms_per_iter": None if step is None else step.to_json(),
            "tokens_per_s": tokens_per_s, "mfu_pct": mfu_pct}


def _train_one(setting: TrainSetting, corpus, backend, device, dtype, steps, eval_batches,
               peak_flops) -> dict:
    config = GPTConfig(block_size=setting.block_size, vocab_size=corpus.vocab_size,
                       n_layer=setting.n_layer, n_head=setting.n_head, n_embd=setting.n_embd,
                       dropout=setting.dropout, bias=True, backend=backend)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    result = training.train(model, corpus, setting.batch_size, setting.block_size, steps,
                            warmup=0, device=device, dtype=dtype,
                            generator=torch.Generator().manual_seed(0))
    val_loss = training.evaluate(model, corpus.val, setting.batch_size, setting.block_size,
                                 eval_batches, device, dtype)
    achieved = training.flops_per_token(config, setting.block_size) * result.tokens_per_s
    return dict(train_loss=result.loss, val_loss=val_loss, step=result.step,
                tokens_per_s=result.tokens_per_s, mfu_pct=percent_of_peak(achieved, peak_flops))


def run(base: TrainSetting, values: dict[str, tuple], corpus, backend: str, device: torch.device,
        dtype: torch.dtype, peak: Peak | None, steps: int, eval_batches: int) -> list[dict]:
    """No warm-up steps: each config is a fresh training run from step 0, as a student's
    would be; ms/iter is the median over all its steps, so the slow first step is not it."""
    peak_flops = None if peak is None else peak.flops_for(DTYPE_NAMES[dtype])
    done: dict[TrainSetting, dict] = {}  # the base appears once per parameter: train it once
    rows = []
    for param, value, setting in tqdm(settings(base, values), desc="sweep", unit="config"):
        if setting not in done:
            try:
                done[setting] = _train_one(setting, corpus, backend, device, dtype, steps,
                                           eval_batches, peak_flops)
            except Exception as exc:
                done[setting] = dict(status=FAILED,
                                     error=describe_error(exc))
        rows.append(_row(param, value, setting, dtype, steps, **done[setting]))
    return rows
