"""Saving and loading models: our checkpoints, nanoGPT's ckpt.pt, Hugging Face GPT-2.

Checkpoint format (nanoGPT's, so either project loads the other's):
    {"model": state_dict, "model_args": GPTConfig fields, "optimizer": ..., "iter_num": int,
     "best_val_loss": float, "config": training config, ...}
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gpt.model import GPT, GPTConfig

_COMPILED_PREFIX = "_orig_mod."  # what torch.compile adds to every state-dict key
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
_HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face's activation_function names -> our gelu_approximate (GPT-2's is gelu_new).
_HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def clean_state_dict(state: dict) -> dict:
    """Strip torch.compile's and DDP's key prefixes, and drop the causal-mask buffers
    (`attn.bias`, `attn.masked_bias`) that older nanoGPT and GPT-2 checkpoints carry."""
    out = {}
    for key, value in state.items():
        for prefix in (_COMPILED_PREFIX, "module."):
            key = key.removeprefix(prefix)
        if not key.endswith(_MASK_BUFFERS):
            out[key] = value
    return out


class CheckpointError(ValueError):
    """A file that should be a checkpoint cannot be read as one (truncated, corrupted, or
    not a GPT checkpoint at all)."""


def load_checkpoint_file(path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch.load raises whatever the unpickler or zip reader did
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted? "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a GPT checkpoint (expected a dict with 'model' "
                              f"and 'model_args')")
    return ckpt


def model_config(model_args: dict, **overrides) -> GPTConfig:
    """The GPTConfig of a checkpoint's model_args, with `overrides` applied.

    model_args without `gelu_approximate` predate the field: nanoGPT's (which have no
    `backend` either) were trained with nn.GELU(), the exact GELU; ours (which have a
    `backend`) with GPT-2's tanh approximation. Evaluating a model with the other flavour
    shifts every MLP activation by up to ~1e-3."""
    args = dict(model_args)
    if "gelu_approximate" not in args:
        args["gelu_approximate"] = "tanh" if "backend" in args else "none"
    return GPTConfig.from_dict({**args, **overrides})


def load_model(path, map_location="cpu", **overrides) -> GPT:
    """A GPT from our checkpoint or nanoGPT's ckpt.pt (a file, or a directory holding one).
    `overrides` replace model_args fields (e.g. backend="triton", dropout=0.0)."""
    ckpt = load_checkpoint_file(path, map_location)
    model = GPT(model_config(ckpt["model_args"], **overrides))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model


def save_checkpoint(path, model: GPT, **extra) -> None:
    """Write {'model', 'model_args', **extra} atomically (a crash never leaves half a file)."""
    raw = getattr(model, "module", model)  # DDP
    raw = getattr(raw, "_orig_mod", raw)  # torch.compile
    state = {"model": raw.state_dict(), "model_args": raw.model_args(), **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- Hugging Face

def _read_hf_config(path: Path) -> dict:
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json beside {path}: it gives n_head, which the "
                                f"weights alone do not determine")
    return json.loads(config_file.read_text())


def _read_hf_weights(path: Path) -> dict:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _read_hf_weights(path / name)
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def load_hf_gpt2(path, **overrides) -> GPT:
    """GPT-2 from a Hugging Face GPT2LMHeadModel directory (config.json + model.safetensors
    or pytorch_model.bin) or a .safetensors file with config.json beside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Hugging Face GPT-2 model at {path} (a directory or "
                                f".safetensors file; nothing is downloaded)")
    hf = _read_hf_config(path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not GPT-2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _HF_GELU:
        raise ValueError(f"{path}: activation_function {activation!r} is not a GELU this model "
                         f"implements ({sorted(_HF_GELU)})")
    args = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                block_size=hf["n_positions"], vocab_size=hf["vocab_size"], bias=True, dropout=0.0,
                gelu_approximate=_HF_GELU[activation])
    model = GPT(GPTConfig(**{**args, **overrides}))
    weights = {k.removeprefix("transformer."): v
               for k, v in clean_state_dict(_read_hf_weights(path)).items()}
    state = model.state_dict()
    for key in state:
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        hf_key = key.removeprefix("transformer.")
        if hf_key not in weights:
            raise KeyError(f"{path} has no weight {hf_key!r}")
        w = weights[hf_key]
        if key.endswith(_HF_CONV1D):
            w = w.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
        if w.shape != state[key].shape:
            raise ValueError(f"{hf_key}: shape {tuple(w.shape)} in {path}, model expects "
                             f"{tuple(state[key].shape)}")
        with torch.no_grad():
            state[key].copy_(w)
    return model
