"""What a GPT does when one of its activations is changed, on one prompt: ablation of every
head and every MLP, and activation patching of the residual stream. Both run the model
through `GPT.run_with_hooks`, one forward per change (no batching, so that each number is
exactly what that single forward gives).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from gpt.model import GPT

ABLATIONS = ("zero", "mean")


def prompt_loss(logits: torch.Tensor, idx: torch.Tensor) -> float:
    """The next-token loss on the prompt idx (1, T): the mean cross-entropy of each
    position's logits against the next token, over the T - 1 positions that have one."""
    return F.cross_entropy(logits[0, :-1].float(), idx[0, 1:]).item()


def logit_difference(logits: torch.Tensor, answer: tuple[int, int]) -> float:
    """logit(a) - logit(b) after the prompt (at its last position), for answer = (a, b)."""
    last = logits[0, -1].float()
    return (last[answer[0]] - last[answer[1]]).item()


# ----------------------------------------------------------------------------- ablation

def ablate_head(head: int, how: str):
    """A hook on attn_z (B, T, H, D) replacing head `head`'s output, before c_proj mixes the
    heads, by zero or by its mean over the prompt's positions (c_proj's bias, shared by the
    heads, stays)."""
    def hook(z: torch.Tensor, name: str) -> torch.Tensor:
        z = z.clone()
        z[:, :, head] = _ablated(z[:, :, head], how)
        return z
    return hook


def ablate_write(how: str):
    """A hook on a write into the stream (B, T, C), e.g. mlp_out, replacing all of it (bias
    included) by zero or by its mean over the prompt's positions."""
    return lambda write, name: _ablated(write, how)


def _ablated(x: torch.Tensor, how: str) -> torch.Tensor:
    """x (B, T, ...) replaced by zero or by its mean over the positions T."""
    if how == "zero":
        return torch.zeros_like(x)
    return x.mean(dim=1, keepdim=True).expand_as(x).clone()


@torch.no_grad()
def ablation(model: GPT, idx: torch.Tensor) -> dict:
    """For each head and each MLP, one at a time, the change in the prompt's loss when its
    output is replaced by zero and by its mean over the prompt's positions (a single prompt
    has no other mean): positive where removing it hurts. [layer][head] and [layer]."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    clean = prompt_loss(model.logits(idx), idx)

    def change(hooks: dict) -> float:
        return prompt_loss(model.run_with_hooks(idx, hooks), idx) - clean

    record = {"loss": clean}
    for how in ABLATIONS:
        record[how] = {
            "head": [[change({f"blocks.{i}.attn_z": ablate_head(h, how)}) for h in range(n_head)]
                     for i in range(n_layer)],
            "mlp": [change({f"blocks.{i}.mlp_out": ablate_write(how)}) for i in range(n_layer)],
        }
    return record


# ----------------------------------------------------------------------------- patching

def patch_positions(clean: torch.Tensor, positions):
    """A hook writing the clean run's activation (B, T, ...) into the hooked run at
    `positions` (an index or slice of T)."""
    def hook(corrupted: torch.Tensor, name: str) -> torch.Tensor:
        patched = corrupted.clone()
        patched[:, positions] = clean[:, positions]
        return patched
    return hook


def check_same_length(clean: int, corrupted: int) -> None:
    if clean != corrupted:
        raise ValueError(f"patching pairs the prompts' positions one to one: the clean prompt "
                         f"is {clean} tokens and the corrupted one {corrupted}; make them "
                         f"the same length")


@torch.no_grad()
def patch_residual_stream(model: GPT, clean: torch.Tensor, corrupted: torch.Tensor,
                          answer: tuple[int, int]) -> dict:
    """Activation patching from the clean prompt into the corrupted one (both (1, T)): for
    each block i and position t, the corrupted run with the stream entering block i at t
    (blocks.{i}.resid_pre) taken from the clean run. Measured: the logit difference
    logit(a) - logit(b) after the prompt, and the fraction of the clean - corrupted
    difference the patch recovers (0: none, 1: all of it). [layer][position]."""
    check_same_length(clean.shape[1], corrupted.shape[1])
    names = [f"blocks.{i}.resid_pre" for i in range(model.config.n_layer)]
    clean_logits, cache = model.run_with_cache(clean, names=names)
    clean_diff = logit_difference(clean_logits, answer)
    corrupted_diff = logit_difference(model.logits(corrupted), answer)
    if clean_diff == corrupted_diff:
        raise ValueError(f"the clean and corrupted prompts give the same logit difference "
                         f"({clean_diff:.4f}): there is nothing for patching to recover")
    diffs = [[logit_difference(model.run_with_hooks(
        corrupted, {name: patch_positions(cache[name], t)}), answer)
        for t in range(clean.shape[1])] for name in names]
    return {
        "answer": list(answer), "stream": "resid_pre", "corrupted_tokens": corrupted[0].tolist(),
        "clean_logit_diff": clean_diff, "corrupted_logit_diff": corrupted_diff,
        "logit_diff": diffs,
        "recovered": [[(d - corrupted_diff) / (clean_diff - corrupted_diff) for d in layer]
                      for layer in diffs],
    }
