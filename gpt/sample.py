"""Sample from a trained GPT: nanoGPT's sample.py command line, on `kernels` ops.

    python -m gpt.sample --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python -m gpt.sample --init_from=path/to/hf-gpt2-dir --start=FILE:prompt.txt

The model comes from out_dir/ckpt.pt (init_from=resume), or init_from names a checkpoint
file, a directory holding ckpt.pt, or a Hugging Face GPT-2 directory (config.json +
weights). Text is encoded and decoded with the checkpoint's dataset vocabulary (stored in
the checkpoint; else the meta.pkl of its data directory, as nanoGPT), else GPT-2 BPE.
All samples are generated together, as one batch, with the model's KV cache
(--kv_cache=False recomputes the whole context at every step, for comparison).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kernels
from kernels import cpu
from gpt.checkpoint import clean_state_dict, load_checkpoint_file, model_config
from gpt.configurator import ConfigError, configure, usage
from gpt.data import DataError, load_meta, tokenizer_from_meta
from gpt.model import GPT
from gpt.train import DTYPES, default_device, default_dtype, exit_quickly

GPT2_META = {"vocab_size": 50257, "tokenizer": "gpt2"}
SEPARATOR = "---------------"


def default_sample_dtype() -> str:
    """Training's default on a GPU; fp32 on the CPU, where a decoding step's one-token
    matmuls are too small for bf16 to pay for autocast's casts (the seed model, 2-core
    EPYC: 2.5 against 3.0 ms/token with the KV cache, 2.2 against 4.9 without)."""
    return default_dtype() if torch.cuda.is_available() else "float32"


@dataclass
class SampleConfig:
    init_from: str = "resume"  # resume (from out_dir) | checkpoint path | HF GPT-2 directory
    out_dir: str = "out"
    start: str = "\n"  # the prompt, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8  # < 1 sharpens the distribution, > 1 flattens it
    top_k: int = 200  # sample among the top_k most likely tokens; 0 = among all
    seed: int = 1337
    device: str = field(default_factory=default_device)
    dtype: str = field(default_factory=default_sample_dtype)
    backend: str = "auto"  # kernels: torch | triton | cuda | auto
    kv_cache: bool = True


def check_config(config: SampleConfig) -> None:
    for key in ("num_samples", "max_new_tokens"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(config, key)}")
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be positive, got {config.temperature}")
    if config.top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = no top-k filtering), got {config.top_k}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    check_device_and_backend(config.device, config.backend)


def check_device_and_backend(device: str, backend: str) -> None:
    if backend not in kernels.BACKENDS + (kernels.AUTO,):
        raise ConfigError(f"backend must be one of {kernels.BACKENDS + (kernels.AUTO,)}, "
                          f"got {backend!r}")
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a torch device") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but CUDA is not available here; pass --device=cpu")
    if backend != kernels.AUTO:
        status = kernels.available_backends()[backend]
        if not status.available:
            raise ConfigError(f"backend {backend!r} is not available here: {status.reason} "
                              f"(--backend=auto picks one that is)")


def load_for_sampling(config: SampleConfig) -> tuple[GPT, dict]:
    """(model, meta of its vocabulary) for config.init_from."""
    source = config.out_dir if config.init_from == "resume" else config.init_from
    return load_with_vocabulary(source, config.backend)


def load_with_vocabulary(source, backend: str) -> tuple[GPT, dict]:
    """(model without dropout, meta of its vocabulary) from a checkpoint file or a directory
    holding ckpt.pt (ours or nanoGPT's), or a Hugging Face GPT-2 directory."""
    source = Path(source)
    overrides = dict(dropout=0.0, backend=backend)
    if (source / "config.json").is_file() or source.suffix == ".safetensors":  # Hugging Face
        return GPT.from_pretrained(source, **overrides), GPT2_META
    checkpoint = load_checkpoint_file(source)
    model = GPT(model_config(checkpoint["model_args"], **overrides))
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    return model, checkpoint_meta(checkpoint)


def checkpoint_meta(checkpoint: dict) -> dict:
    """The vocabulary a checkpoint was trained with: stored in it (ours), else the meta.pkl
    of its dataset (nanoGPT's), else GPT-2's."""
    if checkpoint.get("meta"):
        return checkpoint["meta"]
    train_config = checkpoint.get("config", {})
    data_dir = train_config.get("data_dir") or (Path("data") / train_config.get("dataset", ""))
    if (Path(data_dir) / "meta.pkl").is_file():
        return load_meta(data_dir)
    return GPT2_META


def read_prompt(start: str) -> str:
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        return path.read_text(encoding="utf-8")
    return start


def sample(config: SampleConfig) -> list[str]:
    """The num_samples texts (prompt included), as printed."""
    check_config(config)
    device = torch.device(config.device)
    model, meta = load_for_sampling(config)
    model.eval().to(device)
    encode, decode = tokenizer_from_meta(meta)
    prompt = encode(read_prompt(config.start))
    if not prompt:
        raise ConfigError("the prompt (--start) is empty: give at least one token")
    x = torch.tensor(prompt, dtype=torch.long, device=device).expand(config.num_samples, -1)
    generator = torch.Generator(device).manual_seed(config.seed)
    autocast = (nullcontext() if config.dtype == "float32"
                else torch.autocast(device.type, dtype=DTYPES[config.dtype]))
    with torch.inference_mode(), autocast:  # the tokens are only decoded: no autograd at all
        y = model.generate(x, config.max_new_tokens, temperature=config.temperature,
                           top_k=config.top_k or None, use_kv_cache=config.kv_cache,
                           generator=generator)
    return [decode(row) for row in y.tolist()]


def main(argv: list[str] | None = None) -> None:
    """The command line (argv None: this process's, which then ends with the run)."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage("gpt-sample", SampleConfig()))
        return
    try:
        config = configure(SampleConfig(), argv, verbose=False)  # stdout: samples only
        if as_program and config.device.split(":")[0] == "cpu":
            # A process-wide malloc setting: this program's to make, not the library's.
            cpu.keep_freed_memory()  # no page faults on every step's activations
        texts = sample(config)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"gpt-sample: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for text in texts:
        print(text)
        print(SEPARATOR)
    if as_program:
        exit_quickly()


if __name__ == "__main__":
    main()
