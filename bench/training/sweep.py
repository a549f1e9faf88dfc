"""The design-parameter sweep: what each of n_layer, n_head, n_embd, block_size, batch_size
and dropout does to quality *and* to cost, the study a student runs with nanoGPT.

One parameter varies at a time around a base config. Every config trains on the same
number of tokens (so a larger batch takes fewer iterations) with the CLI's own step and
schedule (warmup, then the cosine decay ending at the budget), from the same seed, and is
evaluated along the way: val loss against tokens seen and against training time (evals
excluded), then at the end on more batches, with the standard error of that mean. The base
config also trains with other seeds (three at least): how far apart seeds land is the
training noise that a difference between configs has to beat. The final evals of configs
with the same block size read the same batches, so a difference between two of them is
judged by the spread of the per-batch differences (a paired comparison: both see the same
hard and easy batches, which independent standard errors would count as noise twice).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from bench.kernels.correctness import describe_error
from bench.kernels.problems import DTYPE_NAMES
from bench.output.results import FAILED, OK
from bench.timing import summarize
from bench.timing.peaks import Peak, percent_of_peak
from bench.training import loop as training
from gpt.model import GPT, GPTConfig

EVAL_BATCH_SIZE = 12  # eval windows per batch, the same for every config
SEED = 1337


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


@dataclass(frozen=True)
class Budget:
    tokens: int              # training tokens per config
    evals: int               # evals along the way (the curve); the last one at the end
    eval_batches: int        # batches per eval along the way
    final_eval_batches: int  # batches of the final eval (val_loss and its standard error)
    seeds: int               # seeds the base config trains with (the seed noise)


# Base configs and the values each parameter takes (the base's own value among them).
CPU_BASE = TrainSetting(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0)
CPU_VALUES = {"n_layer": (2, 4, 6), "n_head": (2, 4, 8), "n_embd": (64, 128, 192),
              "block_size": (32, 64, 128), "batch_size": (6, 12, 24), "dropout": (0.0, 0.1, 0.2)}
# `make bench`: 320 iterations of the base config (~3 minutes for the sweep on 2 cores);
# --full: the seed command's 2000 iterations of 12 x 64 tokens.
CPU_QUICK = Budget(tokens=320 * 768, evals=5, eval_batches=10, final_eval_batches=40, seeds=3)
CPU_FULL = Budget(tokens=2000 * 768, evals=8, eval_batches=20, final_eval_batches=100, seeds=3)
GPU_BASE = TrainSetting(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                        dropout=0.2)
GPU_VALUES = {"n_layer": (4, 6, 8), "n_head": (4, 6, 8), "n_embd": (192, 384, 576),
              "block_size": (128, 256, 512), "batch_size": (32, 64, 128),
              "dropout": (0.0, 0.1, 0.2)}
GPU_QUICK = Budget(tokens=300 * 64 * 256, evals=6, eval_batches=20, final_eval_batches=50,
                   seeds=3)
GPU_FULL = Budget(tokens=5000 * 64 * 256, evals=10, eval_batches=20, final_eval_batches=200,
                  seeds=3)


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


def iterations(setting: TrainSetting, budget: Budget) -> int:
    """Iterations that spend the token budget (at least one)."""
    return max(1, budget.tokens // (setting.batch_size * setting.block_size))


def eval_points(iters: int, evals: int) -> list[int]:
    """After which iterations (1-based counts) the curve is evaluated: evenly spread, the
    last one at the end."""
    return sorted({max(1, round(k * iters / evals)) for k in range(1, evals + 1)})


def _row(param, value, seed, setting: TrainSetting, dtype, budget: Budget, status=OK,
         error=None, iters=None, train_loss=None, val_loss=None, val_loss_se=None,
         final_losses=None,
         wall_s=None, step=None, tokens_per_s=None, mfu_pct=None, curve=None) -> dict:
    return {"param": param, "value": value, "seed": seed, **asdict(setting),
            "dtype": DTYPE_NAMES[dtype], "tokens": budget.tokens, "iters": iters,
            "status": status, "error": error, "train_loss": train_loss, "val_loss": val_loss,
            "val_loss_se": val_loss_se, "final_losses": final_losses or [], "wall_s": wall_s,
            "ms_per_iter": None if step is None else step.to_json(),
            "tokens_per_s": tokens_per_s, "mfu_pct": mfu_pct, "curve": curve or []}


def train_one(setting: TrainSetting, corpus, backend: str, device: torch.device,
              dtype: torch.dtype, budget: Budget, seed: int, peak_flops) -> dict:
    """Train one config to the budget: its curve, final val loss (and standard error),
    training time and speed."""
    config = GPTConfig(block_size=setting.block_size, vocab_size=corpus.vocab_size,
                       n_layer=setting.n_layer, n_head=setting.n_head, n_embd=setting.n_embd,
                       dropout=setting.dropout, bias=True, backend=backend,
                       gelu_approximate=training.cli.TrainConfig().gelu_approximate)
    iters = iterations(setting, budget)
    tokens_per_iter = setting.batch_size * setting.block_size
    torch.manual_seed(seed)
    model = GPT(config).to(device)
    step = training.new_step(model, corpus, training.run_config(
        setting.batch_size, setting.block_size, iters, dtype, seed=seed), device)

    def val_losses(batches):
        return training.batch_losses(model, corpus.val, EVAL_BATCH_SIZE, setting.block_size,
                                     batches, device, dtype)

    curve, samples, losses, wall = [], [], [], 0.0
    points = set(eval_points(iters, budget.evals))
    for it in range(iters):
        start = time.perf_counter()
        losses.append(step(it).item())
        elapsed = time.perf_counter() - start
        wall += elapsed
        samples.append(1e3 * elapsed)
        if it + 1 in points:
            curve.append({"tokens": (it + 1) * tokens_per_iter, "wall_s": wall,
                          "val_loss": statistics.fmean(val_losses(budget.eval_batches))})
    final = val_losses(budget.final_eval_batches)
    timing = summarize(samples)
    tokens_per_s = tokens_per_iter / (timing.median_ms * 1e-3)
    achieved = training.flops_per_token(config, setting.block_size) * tokens_per_s
    return dict(iters=iters, train_loss=statistics.fmean(losses[-10:]),
                val_loss=statistics.fmean(final), final_losses=final,
                val_loss_se=statistics.stdev(final) / len(final) ** 0.5 if len(final) > 1
                else None,
                wall_s=wall, step=timing, tokens_per_s=tokens_per_s,
                mfu_pct=percent_of_peak(achieved, peak_flops), curve=curve)


def run(base: TrainSetting, values: dict[str, tuple], corpus, backend: str, device: torch.device,
        dtype: torch.dtype, peak: Peak | None, budget: Budget) -> list[dict]:
    """One row per (parameter, value), then one per extra seed of the base config (param
    "seed"). Each config is a fresh run from step 0, as a student's would be; ms/iter is
    the median over all its steps, so the slow first steps are not it."""
    peak_flops = None if peak is None else peak.flops_for(DTYPE_NAMES[dtype])
    runs = [(param, value, SEED, setting) for param, value, setting in settings(base, values)]
    runs += [("seed", SEED + k, SEED + k, base) for k in range(1, budget.seeds)]
    done: dict[tuple[TrainSetting, int], dict] = {}  # the base appears once per parameter
    rows = []
    for param, value, seed, setting in tqdm(runs, desc="sweep", unit="config"):
        if (setting, seed) not in done:
            try:
                done[setting, seed] = train_one(setting, corpus, backend, device, dtype, budget,
                                                seed, peak_flops)
            except Exception as exc:  # a config that cannot train is reported, not hidden
                done[setting, seed] = dict(status=FAILED, error=describe_error(exc))
        rows.append(_row(param, value, seed, setting, dtype, budget, **done[setting, seed]))
    return rows


def setting_of(row: dict) -> TrainSetting:
    return TrainSetting(**{key: row[key] for key in TrainSetting.__dataclass_fields__})


def seed_spread(rows: list[dict], base: TrainSetting) -> tuple[float, float, int] | None:
    """(lowest, highest, number of seeds) of the base config's final val loss."""
    by_seed = {r["seed"]: r["val_loss"] for r in rows
               if r["status"] == OK and r["val_loss"] is not None and setting_of(r) == base}
    if len(by_seed) < 2:
        return None
    return min(by_seed.values()), max(by_seed.values()), len(by_seed)


def difference_se(row: dict, base_row: dict) -> float | None:
    """The standard error of row's val loss minus the base's: paired over the batches both
    evaluated (the same ones, for the same block size), else from the two evals' own
    standard errors as if independent."""
    a, b = row.get("final_losses") or [], base_row.get("final_losses") or []
    if row["block_size"] == base_row["block_size"] and len(a) == len(b) > 1:
        return statistics.stdev(x - y for x, y in zip(a, b)) / len(a) ** 0.5
    if row["val_loss_se"] is None or base_row["val_loss_se"] is None:
        return None
    return (row["val_loss_se"] ** 2 + base_row["val_loss_se"] ** 2) ** 0.5


def noise_floor(row: dict, base_row: dict, spread: tuple[float, float, int] | None) -> float | None:
    """The smallest val-loss difference from the base that counts: the larger of the base's
    seed-to-seed range and twice the standard error of the difference (`difference_se`)."""
    se = difference_se(row, base_row)
    if se is None:
        return None
    return max(2 * se, spread[1] - spread[0]) if spread is not None else 2 * se
