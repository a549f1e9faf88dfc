"""One training iteration, the one `python -m gpt.train` runs and the benchmarks time.

An iteration sets the learning rate of its schedule, runs the micro-batches of gradient
accumulation (fetching each next batch before the backward, so that on a GPU the copy
overlaps the queued work), scales the loss for fp16 (GradScaler), clips the gradient norm,
steps the optimizer and the scaler and frees the gradients. Keeping it in one place is
what makes a benchmark number the number a user of the CLI gets.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def get_lr(it: int, config) -> float:
    """nanoGPT's schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
    (`config` has learning_rate, min_lr, warmup_iters, lr_decay_iters)."""
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    if it >= config.lr_decay_iters:  # (where the cosine below also ends)
        return config.min_lr
    decay_ratio = (it - config.warmup_iters) / (config.lr_decay_iters - config.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return config.min_lr + coeff * (config.learning_rate - config.min_lr)


class TrainStep:
    """`step(iter_num)` trains one iteration and returns its loss (the mean over the
    micro-batches, a 0-d tensor: reading it is the caller's host sync), or None when
    `want_loss` is False.

    model        the module to train (compiled or DDP-wrapped as the caller likes);
    batches      (iter_num, micro_step) -> (x, y), a pure function of its arguments;
    lr_at        iter_num -> learning rate;
    seed_iteration  called with iter_num before the forward passes (the CLI seeds the
                 dropout masks of each iteration there, for exact resume), or None;
    z_loss_of    called after each forward: the z-loss term of its loss (a detached 0-d
                 tensor: `GPT.last_z_loss`), or None when the model has no z-loss. With it,
                 `z_loss` holds the iteration's mean z-loss term after each call that
                 wants the loss.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, batches: Callable[[int, int], Batch],
                 lr_at: Callable[[int], float], accumulation_steps: int, grad_clip: float,
                 autocast: AbstractContextManager, distributed: bool = False,
                 seed_iteration: Callable[[int], None] | None = None,
                 z_loss_of: Callable[[], torch.Tensor | None] | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.batches, self.lr_at = batches, lr_at
        self.accumulation_steps, self.grad_clip = accumulation_steps, grad_clip
        self.autocast, self.distributed = autocast, distributed
        self.seed_iteration = seed_iteration
        self.z_loss_of = z_loss_of
        self.z_loss: torch.Tensor | None = None
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._prefetched: tuple[tuple[int, int], Batch] | None = None

    def _batch(self, iter_num: int, micro_step: int) -> Batch:
        key = (iter_num, micro_step)
        if self._prefetched is not None and self._prefetched[0] == key:
            return self._prefetched[1]
        return self.batches(iter_num, micro_step)

    def __call__(self, iter_num: int, want_loss: bool = True) -> torch.Tensor | None:
        lr = self.lr_at(iter_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.seed_iteration is not None:
            self.seed_iteration(iter_num)
        steps = self.accumulation_steps
        loss_sum = z_loss_sum = None
        x, y = self._batch(iter_num, 0)
        for micro_step in range(steps):
            last = micro_step == steps - 1
            if self.distributed:  # all-reduce the gradients only after the last micro-step
                self.model.require_backward_grad_sync = last
            with self.autocast:
                _, loss = self.model(x, y)
                loss = loss / steps  # the gradients sum over micro-steps: their mean
            # Fetch the next batch while the device still works on this one.
            following = (iter_num + 1, 0) if last else (iter_num, micro_step + 1)
            next_batch = self.batches(*following)
            self.scaler.scale(loss).backward()
            if want_loss:
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                z_loss = None if self.z_loss_of is None else self.z_loss_of()
                if z_loss is not None:
                    z_loss = z_loss / steps
                    z_loss_sum = z_loss if z_loss_sum is None else z_loss_sum + z_loss
            x, y = next_batch
            self._prefetched = (following, next_batch)
        if self.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.z_loss = z_loss_sum
        return loss_sum
