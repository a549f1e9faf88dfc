"""Train a GPT: nanoGPT's train.py, command line and log lines included, on `kernels` ops.

    python -m gpt.train config/train_shakespeare_char.py --device=cpu --compile=False
    torchrun --standalone --nproc_per_node=8 -m gpt.train config/train_shakespeare_char.py

Run with --help for every key. What differs from nanoGPT:
- `backend` picks the kernels (torch | triton | cuda | auto); the DDP backend is
  `ddp_backend` (nccl on GPU, gloo on CPU by default).
- Data: `dataset` names data/<dataset> (or `data_dir`); `--input=PATH|URL` prepares a
  text there first (cached); dataset=default is the embedded corpus, and shakespeare_char
  is prepared from ../shared/data/tinyshakespeare.txt or downloaded when absent.
- Randomness is a pure function of (seed, iteration): the data offsets and the dropout
  masks of iteration i are drawn from generators seeded by (seed, i, ...), so resuming
  from a checkpoint continues with exactly the losses of an uninterrupted run, and DDP
  ranks share one global batch, the same one a single process with the same total
  gradient_accumulation_steps sees. Eval batches are the same at every eval.
- The logged loss is the mean over all micro-batches (and ranks) of the iteration, not
  the last micro-batch's. mfu is relative to the peak of the device in the run's dtype:
  a GPU's datasheet dense peak, a CPU's measured matmul peak (gpt/peak.py: measured once,
  then cached), or --peak_flops; n/a for a GPU missing from the table (nanoGPT divides by
  the A100's 312 TFLOP/s on any device). Its FLOPs are counted as nanoGPT counts them
  (6 N + 12 L C T per token, attention over the full T x T); the causal mfu beside it counts
  the half the mask keeps (6 L C T), the work the fused kernels do.
- Evals stack their batches into a few large forward passes (same batches, same mean).
- One iteration is `gpt.step.TrainStep`, which the benchmarks time too.
- out_dir/metrics.jsonl gets every log line and eval as JSON; a tqdm bar shows progress
  when stderr is a terminal (--progress=False turns it off).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from kernels import cpu, gpus
from gpt.checkpoint import (CheckpointError, clean_state_dict, load_checkpoint_file, model_config,
                            save_checkpoint)
from gpt.configurator import ConfigError, configure, usage
from gpt.data import (DEFAULT_SOURCE, TINY_SHAKESPEARE_URL, TOKENIZERS, DataError, batch_at,
                      load_meta, load_split, prepare)
from gpt.model import GPT, GPTConfig
from gpt.peak import cpu_peak_flops, native_bf16_matmul
from gpt.step import TrainStep, get_lr

# ../shared/data/tinyshakespeare.txt, relative to the repository
TINY_SHAKESPEARE_FILE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Independent random streams of one iteration (see iteration_seed).
DATA_STREAM, DROPOUT_STREAM, EVAL_STREAM = 0, 1, 2


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype() -> str:
    """bf16 autocast where bf16 matmuls are native: GPUs that have them (else fp16, with a
    GradScaler) and CPUs with AVX512-BF16 or AMX, where they run at twice the fp32 rate or
    more; fp32 on other CPUs."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if native_bf16_matmul() else "float32"


@dataclass
class TrainConfig:
    """Every key of the command line, with nanoGPT's defaults (GPT-2 124M)."""
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # else only when val loss improves
    init_from: str = "scratch"  # scratch | resume (from out_dir) | path of a HF GPT-2 dir
    progress: bool = True  # tqdm bar (only when stderr is a terminal)
    seed: int = 1337
    # nanoGPT's wandb keys, accepted so its config files run; metrics go to metrics.jsonl
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    # data
    dataset: str = "default"  # data/<dataset>; "default" = the embedded corpus
    data_dir: str = ""  # overrides data/<dataset>
    input: str = ""  # text file or URL to prepare into the data dir (once, cached)
    tokenizer: str = "char"  # for preparing: char | gpt2
    gradient_accumulation_steps: int = 5 * 8  # in total, divided among DDP ranks
    batch_size: int = 12  # per micro-step and rank
    block_size: int = 1024
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # Biases in the Linears and LayerNorms, as GPT-2 (and nanoGPT when its Shakespeare
    # numbers were published; its train.py now defaults to False, which ends ~0.03 higher
    # in val loss on the CPU Shakespeare run: bench/results/shakespeare_char/README.md).
    bias: bool = True
    # The MLP's GELU: "none" is the exact one of nanoGPT's nn.GELU(), forward and backward
    # ~1.8x cheaper than "tanh" (GPT-2's approximation) on the CPU; both train alike.
    gelu_approximate: str = "none"
    backend: str = "auto"  # kernels: torch | triton | cuda | auto
    # Loss variants (kernels.losses), 0 = off: label smoothing, the z-loss coefficient (its
    # term is logged as z_loss), logit soft-capping (an architecture key, like bias: set it
    # when training from scratch; a checkpoint keeps its own).
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float = 0.0
    # CPU bf16 training runs each block as one autograd node (kernels.cpu.fused_block, the
    # same numbers as the modules); False always runs the modules. The log says which runs.
    cpu_fused_block: bool = True
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    # learning-rate schedule: linear warmup, cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # system
    ddp_backend: str = ""  # "" = nccl on GPU, gloo on CPU
    device: str = field(default_factory=default_device)
    dtype: str = field(default_factory=default_dtype)  # float32 | bfloat16 | float16
    compile: bool = True
    peak_flops: float = 0.0  # device peak for mfu; 0 = a GPU's datasheet, a CPU's measured


# ----------------------------------------------------------------------------- setup

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        if "RANK" not in os.environ:
            return cls()
        return cls(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                   int(os.environ["WORLD_SIZE"]))


def check_config(config: TrainConfig, world_size: int) -> None:
    """Reject values that would fail later, or silently do the wrong thing."""
    def fail(message):
        raise ConfigError(message)

    for key in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd"):
        if getattr(config, key) <= 0:
            fail(f"{key} must be positive, got {getattr(config, key)}")
    for key in ("max_iters", "warmup_iters", "learning_rate", "min_lr", "weight_decay",
                "grad_clip", "peak_flops"):
        if getattr(config, key) < 0:
            fail(f"{key} must be >= 0, got {getattr(config, key)}")
    if config.n_embd % config.n_head:
        fail(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if not 0.0 <= config.dropout < 1.0:
        fail(f"dropout must be in [0, 1), got {config.dropout}")
    if not 0.0 <= config.label_smoothing <= 1.0:
        fail(f"label_smoothing must be in [0, 1], got {config.label_smoothing}")
    for key in ("z_loss", "logit_softcap"):
        if getattr(config, key) < 0:
            fail(f"{key} must be >= 0 (0: off), got {getattr(config, key)}")
    if config.gradient_accumulation_steps % world_size:
        fail(f"gradient_accumulation_steps ({config.gradient_accumulation_steps}) must be "
             f"divisible by the number of processes ({world_size})")
    if config.gelu_approximate not in ("tanh", "none"):
        fail(f"gelu_approximate must be 'tanh' (GPT-2) or 'none' (exact), got "
             f"{config.gelu_approximate!r}")
    if config.dtype not in DTYPES:
        fail(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    if config.tokenizer not in TOKENIZERS:
        fail(f"tokenizer must be one of {TOKENIZERS}, got {config.tokenizer!r}")
    if config.wandb_log:
        fail("wandb logging is not built in; the metrics are in out_dir/metrics.jsonl")
    if config.init_from not in ("scratch", "resume") and not Path(config.init_from).exists():
        fail(f"init_from must be 'scratch', 'resume' or the path of a Hugging Face GPT-2 "
             f"directory; {config.init_from!r} does not exist")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        fail(f"device {config.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("device is cuda but CUDA is not available here; pass --device=cpu")
    if config.backend not in kernels.BACKENDS + (kernels.AUTO,):
        fail(f"backend must be one of {kernels.BACKENDS + (kernels.AUTO,)}, got {config.backend!r}")
    status = kernels.available_backends().get(config.backend)
    if status is not None and not status.available:
        fail(f"backend {config.backend!r} is not available: {status.reason}")


def find_dataset(config: TrainConfig) -> Path:
    """The prepared data directory of `config.dataset`, preparing it when it can."""
    data_dir = Path(config.data_dir or Path("data") / config.dataset)
    if config.input:
        return prepare(config.input, data_dir, config.tokenizer)
    if config.dataset == "default":
        return prepare(DEFAULT_SOURCE, data_dir, config.tokenizer)
    if (data_dir / "train.bin").is_file() and (data_dir / "val.bin").is_file():
        return data_dir
    if config.dataset == "shakespeare_char":
        source = TINY_SHAKESPEARE_FILE if TINY_SHAKESPEARE_FILE.is_file() else TINY_SHAKESPEARE_URL
        try:
            return prepare(source, data_dir, "char")
        except DataError as exc:
            raise DataError(f"{exc}. Pass --input=PATH of Tiny Shakespeare's text") from exc
    raise DataError(f"no prepared dataset in {data_dir} (train.bin, val.bin): pass "
                    f"--input=PATH (a text file or URL) to prepare one there, or "
                    f"--dataset=default for the embedded corpus")


def build_model(config: TrainConfig, meta: dict | None, device) -> tuple[GPT, dict | None, str]:
    """(model, checkpoint to resume from or None, what was done) per config.init_from."""
    overrides = dict(dropout=config.dropout, backend=config.backend,
                     cpu_fused_block=config.cpu_fused_block,
                     label_smoothing=config.label_smoothing, z_loss=config.z_loss)
    checkpoint = None
    if config.init_from == "scratch":
        vocab_size = meta["vocab_size"] if meta else 50304  # nanoGPT: GPT-2's, padded
        model = GPT(GPTConfig(block_size=config.block_size, vocab_size=vocab_size,
                              n_layer=config.n_layer, n_head=config.n_head,
                              n_embd=config.n_embd, bias=config.bias,
                              gelu_approximate=config.gelu_approximate,
                              logit_softcap=config.logit_softcap, **overrides))
        how = "Initializing a new model from scratch"
    elif config.init_from == "resume":
        checkpoint = load_checkpoint_file(config.out_dir, map_location=device)
        model = GPT(model_config(checkpoint["model_args"], **overrides))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
        how = f"Resuming training from {config.out_dir} at iter {checkpoint['iter_num']}"
    else:
        model = GPT.from_pretrained(config.init_from, **overrides)
        how = f"Initializing from the Hugging Face GPT-2 weights in {config.init_from}"
    if config.block_size < model.config.block_size:
        model.crop_block_size(config.block_size)
    if meta and meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"the dataset's vocabulary ({meta['vocab_size']} tokens) does not fit "
                          f"the model's ({model.config.vocab_size})")
    return model.to(device), checkpoint, how


# ----------------------------------------------------------------------------- pieces of the loop

def iteration_seed(seed: int, iter_num: int, stream: int, rank: int = 0) -> int:
    """A 64-bit seed for one random stream of one iteration (on one rank). SeedSequence
    hashes the tuple, so nearby tuples give unrelated generators."""
    entropy = np.random.SeedSequence([seed, iter_num, stream, rank])
    return int(entropy.generate_state(1, np.uint64)[0])


class TrainBatches:
    """The training micro-batches. Iteration i draws the offsets of the whole global batch
    (gradient_accumulation_steps x batch_size windows, over all ranks) from a generator
    seeded by (seed, i); micro-step m of rank r takes row m * world_size + r. Every rank
    thus agrees on the global batch, which is the one a single process with the same total
    gradient_accumulation_steps sees, and a resumed run redraws exactly the same batches."""

    def __init__(self, data: np.ndarray, config: TrainConfig, device, dist: Distributed):
        if len(data) <= config.block_size:
            raise DataError(f"the train split has {len(data)} tokens, fewer than block_size + 1 "
                            f"= {config.block_size + 1}")
        self.data, self.device, self.dist = data, device, dist
        self.batch_size, self.block_size = config.batch_size, config.block_size
        self.seed = config.seed
        self.global_steps = config.gradient_accumulation_steps
        self.generator = torch.Generator()
        self.offsets_iter, self.offsets = -1, None

    def get(self, iter_num: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if iter_num != self.offsets_iter:
            self.generator.manual_seed(iteration_seed(self.seed, iter_num, DATA_STREAM))
            self.offsets = torch.randint(len(self.data) - self.block_size,
                                         (self.global_steps, self.batch_size),
                                         generator=self.generator)
            self.offsets_iter = iter_num
        row = micro_step * self.dist.world_size + self.dist.rank
        return batch_at(self.data, self.offsets[row], self.block_size, self.device)


# Eval batches are stacked into forward passes of up to this many tokens: a few large
# matmuls instead of many small ones, and each op's fixed cost paid once per stack.
EVAL_TOKENS_PER_FORWARD = 1 << 14


def eval_offsets(data, config: TrainConfig, name: str) -> torch.Tensor:
    """The (eval_iters, batch_size) window offsets of a split's eval batches: drawn from
    a fixed seed, so every eval sees the same batches."""
    if len(data) <= config.block_size:
        raise DataError(f"the {name} split has {len(data)} tokens, fewer than "
                        f"block_size + 1 = {config.block_size + 1}")
    generator = torch.Generator().manual_seed(iteration_seed(config.seed, 0, EVAL_STREAM))
    return torch.stack([torch.randint(len(data) - config.block_size, (config.batch_size,),
                                      generator=generator) for _ in range(config.eval_iters)])


@torch.inference_mode()
def estimate_loss(model, splits: dict, config: TrainConfig, device, autocast) -> dict[str, float]:
    """Mean loss over eval_iters batches per split; the same batches at every eval (fixed
    seed), so successive evals differ only by the model. The batches are stacked into
    forwards of up to EVAL_TOKENS_PER_FORWARD tokens (one batch each under torch.compile,
    which would compile again for every new batch shape): every batch has as many tokens,
    so the mean over the stacked rows is the mean of the batch means. One host sync per
    split."""
    model.eval()
    per_forward = 1 if config.compile else \
        max(1, EVAL_TOKENS_PER_FORWARD // (config.batch_size * config.block_size))
    out = {}
    for name, data in splits.items():
        offsets = eval_offsets(data, config, name)
        total = torch.zeros((), device=device)
        for group in offsets.split(per_forward):
            x, y = batch_at(data, group.flatten(), config.block_size, device)
            with autocast:
                _, loss = model(x, y)
            total += loss.float() * len(group)
        out[name] = (total / config.eval_iters).item()
    model.train()
    return out


def describe_backend(backend: str, device: torch.device) -> str:
    """Which kernels backend runs each op ("auto" may pick a different one per op)."""
    chosen = {op: kernels.backends.resolve_name(op, backend, device) for op in kernels.OPS}
    if len(set(chosen.values())) == 1:
        return f"model backend {backend!r} on {device}: {next(iter(chosen.values()))} for every op"
    return f"model backend {backend!r} on {device}: " + ", ".join(
        f"{op}: {name}" for op, name in chosen.items())


def describe_precision(config: TrainConfig, model: GPT, device: torch.device) -> str:
    """The dtype the run computes in, and how its blocks run: the modules, or (CPU bf16
    training) one autograd node per block (`kernels.cpu.fused_block`), and why not."""
    if config.dtype == "float32":
        dtype = "dtype float32 (no autocast)"
    else:
        dtype = f"dtype {config.dtype} (autocast; fp32 weights, optimizer and residual stream)"
    return f"{dtype}; blocks: {block_path(config, model, device)}"


def block_path(config: TrainConfig, model: GPT, device: torch.device) -> str:
    """Which path a training forward of the model's blocks takes (see `gpt.model.Block`)."""
    modules = "the modules"
    if device.type != "cpu" or config.dtype != "bfloat16":
        return modules
    if not config.cpu_fused_block:
        return f"{modules} (--cpu_fused_block=False)"
    if config.compile:
        return f"{modules}, compiled (torch.compile fuses them itself)"
    probe = torch.zeros(1, min(config.block_size, model.config.block_size), model.config.n_embd,
                        device=device)
    blocks = list(model.transformer.h)
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.enable_grad():
        fused = all(b.cpu_fused and cpu.block.applies(probe, b.fused_params(), b.ln_1.backend)
                    and b.runs_as_written() for b in blocks)
    if fused:
        return "one autograd node each (kernels.cpu.fused_block; --cpu_fused_block=False for " \
               "the modules)"
    return f"{modules} (the one-node CPU path does not apply: kernels.cpu.block.applies, " \
           f"Block.runs_as_written)"


def device_peak_flops(config: TrainConfig, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s or None, a description for the log)."""
    if config.peak_flops > 0:
        return config.peak_flops, f"{config.peak_flops / 1e12:g} TFLOP/s (--peak_flops)"
    if device.type == "cpu":  # measured in the run's dtype
        return cpu_peak_flops(DTYPES[config.dtype])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = gpus.gpu_by_name(name)  # the project's one table of datasheet peaks
        if gpu is not None:  # bf16 whatever the dtype, as nanoGPT's MFU
            peak = gpu.flops["bf16"]
            return peak, f"{peak / 1e12:g} TFLOP/s, the bf16 dense peak of {name}"
        return None, f"n/a: the peak of {name} is unknown (pass --peak_flops=FLOP/s)"
    return None, f"n/a: no known peak for {device.type} (pass --peak_flops=FLOP/s)"


class MetricsLog:
    """out_dir/metrics.jsonl: one JSON object per log line and per eval."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a" if append else "w")

    def write(self, **entry) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ----------------------------------------------------------------------------- the step

def autocast_context(config: TrainConfig, device: torch.device):
    return (nullcontext() if config.dtype == "float32"
            else torch.autocast(device.type, dtype=DTYPES[config.dtype]))


def lr_schedule(config: TrainConfig):
    """iter_num -> learning rate: warmup and cosine decay, or constant without decay_lr."""
    if config.decay_lr:
        return lambda it: get_lr(it, config)
    return lambda it: config.learning_rate


def new_optimizer(config: TrainConfig, model: GPT,
                  device: torch.device) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW with the config's settings, and the GradScaler (a no-op unless fp16)."""
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate,
                                           (config.beta1, config.beta2), device.type)
    return optimizer, torch.amp.GradScaler(device.type, enabled=config.dtype == "float16")


def dropout_generators(device: torch.device) -> list[torch.Generator]:
    """The CPU's generator and, on a GPU, the device's, which its dropout draws from.
    Seeding these two directly costs ~1 us where torch.manual_seed (every device of
    every kind) costs ~90 us (2-core EPYC): 0.3% of a small model's iteration on the CPU."""
    generators = [torch.default_generator]
    if device.type == "cuda":
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        generators.append(torch.cuda.default_generators[index])
    return generators


def make_step(config: TrainConfig, model, optimizer, scaler, batches: TrainBatches,
              dist: Distributed, gpt: GPT | None = None) -> TrainStep:
    """The iteration of `config`: what the CLI runs, and what the benchmarks time. `gpt`:
    the model itself (model may wrap it), whose z-loss term the step collects."""
    generators = dropout_generators(batches.device)

    def seed_dropout(iter_num: int) -> None:
        # Dropout masks of this iteration: reproducible on resume, distinct per rank.
        seed = iteration_seed(config.seed, iter_num, DROPOUT_STREAM, dist.rank)
        for generator in generators:
            generator.manual_seed(seed)

    return TrainStep(model, optimizer, scaler, batches.get, lr_schedule(config),
                     accumulation_steps=config.gradient_accumulation_steps // dist.world_size,
                     grad_clip=config.grad_clip,
                     autocast=autocast_context(config, batches.device),
                     distributed=dist.enabled, seed_iteration=seed_dropout,
                     z_loss_of=(lambda: gpt.last_z_loss) if gpt is not None and config.z_loss
                     else None)


def progress_bar(config: TrainConfig, dist: Distributed, iter_num: int):
    """A tqdm bar when stderr is a terminal (else None: tqdm is then never imported)."""
    if not (config.progress and dist.master and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=config.max_iters + 1, initial=iter_num, unit="iter", dynamic_ncols=True)


# ----------------------------------------------------------------------------- training

def train(config: TrainConfig) -> None:
    dist = Distributed.from_env()
    check_config(config, dist.world_size)
    device = torch.device(config.device)
    if dist.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        default_backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(config.ddp_backend or default_backend)
    try:
        _train(config, dist, device)
    finally:
        if dist.enabled:
            torch_dist.destroy_process_group()


def _train(config: TrainConfig, dist: Distributed, device: torch.device) -> None:
    tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * config.block_size
    log = print_log if dist.master else (lambda line: None)
    log(f"tokens per iteration will be: {tokens_per_iter:,}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # Only rank 0 prepares the data; the others wait, then find it prepared.
    data_dir = find_dataset(config) if dist.master else None
    if dist.enabled:
        torch_dist.barrier()
    data_dir = data_dir or find_dataset(config)
    meta = load_meta(data_dir) if (data_dir / "meta.pkl").is_file() else None
    if meta:
        log(f"found vocab_size = {meta['vocab_size']} (inside {data_dir / 'meta.pkl'})")
    splits = {split: load_split(data_dir, split) for split in ("train", "val")}

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, checkpoint, how = build_model(config, meta, device)
    gpt_model = model  # before any wrapping
    log(how)
    log(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    log("kernels: " + "; ".join(str(s) for s in kernels.available_backends().values()))
    log(describe_backend(config.backend, device))
    log(describe_precision(config, model, device))
    peak_flops, peak_text = device_peak_flops(config, device)
    log(f"mfu: {peak_text}")
    log("mfu counts FLOPs as nanoGPT does (6 N + 12 L C T per token: attention over the full "
        "T x T); causal mfu counts the half the mask keeps (6 N + 6 L C T)")
    # For each log line's two MFUs (nanoGPT's count first, so the logs compare line by line).
    flops_per_token = {count: model.flops_per_token(config.block_size, count)
                       for count in ("nanogpt", "causal")}

    optimizer, scaler = new_optimizer(config, model, device)
    iter_num, best_val_loss = 0, 1e9
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        checkpoint = None  # free it
    if config.compile:
        log("compiling the model... (takes a ~minute)")
        model = torch.compile(model)
    eval_model = model
    if dist.enabled:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    saved_config = dataclasses.asdict(config) | {"data_dir": str(data_dir)}
    metrics = MetricsLog(Path(config.out_dir) / "metrics.jsonl",
                         append=config.init_from == "resume") if dist.master else None
    bar = progress_bar(config, dist, iter_num)
    if bar is not None:
        log = bar.write

    step = make_step(config, model, optimizer, scaler,
                     TrainBatches(splits["train"], config, device, dist), dist, gpt_model)
    lr_at = lr_schedule(config)
    t0 = time.perf_counter()
    local_iter_num, running_mfu = 0, {count: -1.0 for count in flops_per_token}
    while True:
        lr = lr_at(iter_num)
        if iter_num % config.eval_interval == 0 and dist.master:
            losses = estimate_loss(eval_model, splits, config, device, step.autocast)
            log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.write(event="eval", iter=iter_num, train_loss=losses["train"],
                          val_loss=losses["val"], lr=lr)
            if losses["val"] < best_val_loss or config.always_save_checkpoint:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    log(f"saving checkpoint to {config.out_dir}")
                    save_checkpoint(Path(config.out_dir) / "ckpt.pt", model,
                                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                    iter_num=iter_num, best_val_loss=best_val_loss,
                                    config=saved_config, meta=meta)
        if config.eval_only:
            break

        log_now = iter_num % config.log_interval == 0
        loss = step(iter_num, want_loss=log_now)

        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        if bar is not None:
            bar.update()
        if log_now:
            if dist.enabled:  # the iteration's loss over every rank (gloo has no AVG)
                torch_dist.all_reduce(loss)
                loss /= dist.world_size
            # The z-loss term rides along (rank 0's micro-batches: a value to watch).
            logged = loss if step.z_loss is None else torch.stack([loss, step.z_loss])
            lossf, *z_loss = logged.flatten().tolist()  # the only host sync of an iteration
            z_lossf = z_loss[0] if z_loss else None
            tokens_per_sec = tokens_per_iter / dt
            if local_iter_num >= 5 and peak_flops:  # let the first iterations warm up
                for count, flops in flops_per_token.items():
                    now = flops * tokens_per_sec / dist.world_size / peak_flops
                    running_mfu[count] = now if running_mfu[count] == -1.0 \
                        else 0.9 * running_mfu[count] + 0.1 * now
            mfu = {count: value if value >= 0 else None for count, value in running_mfu.items()}
            mfu_text = {count: "n/a" if value is None else f"{value * 100:.2f}%"
                        for count, value in mfu.items()}
            z_text = "" if z_lossf is None else f", z_loss {z_lossf:.4f}"
            log(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
                f"mfu {mfu_text['nanogpt']}, causal mfu {mfu_text['causal']}{z_text}")
            if bar is not None:
                bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
            if metrics:
                extra = {} if z_lossf is None else {"z_loss": z_lossf}
                metrics.write(event="train", iter=iter_num, loss=lossf, lr=lr, time_ms=dt * 1000,
                              tokens_per_sec=tokens_per_sec, mfu=mfu["nanogpt"],
                              mfu_causal=mfu["causal"], **extra)
        iter_num += 1
        local_iter_num += 1
        if iter_num > config.max_iters:
            break
    if bar is not None:
        bar.close()
    if metrics:
        metrics.close()


def print_log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    """The command line (argv None: this process's, which then ends with the run)."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage("gpt-train", TrainConfig()))
        return
    try:
        config = configure(TrainConfig(), argv, verbose=Distributed.from_env().master)
        if as_program and config.device.split(":")[0] == "cpu":
            # A process-wide malloc setting: this program's to make, not the library's.
            cpu.keep_freed_memory()  # no page faults on every iteration's activations
        train(config)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"gpt-train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if as_program:
        exit_quickly()


def exit_quickly() -> None:
    """Spare the interpreter's shutdown its garbage collections over every object torch and
    its compiler stack created: ~0.8 s of a process's exit (torch 2.14), for nothing, since
    the process ends. gc.freeze() moves them out of the collector's reach; atexit handlers,
    finalizers and flushing run as always."""
    gc.freeze()


if __name__ == "__main__":
    main()
