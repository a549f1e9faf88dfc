"""How every backend finishes a cross-entropy: the reduction of per-row losses, the loss
variants of cross_entropy and linear_cross_entropy (what they add to each row's loss and
gradient), and the z-loss value a call can return for logging.

Per row, with logits x, target t, V classes, z = softcap * tanh(x / softcap) (z = x without
soft-capping), lse = log sum_j exp(z_j), p = softmax(z), smoothing e and z-loss weight c:

    loss = (1 - e) (lse - z_t) + e (lse - mean_j z_j) + c lse^2
    d loss / d z_j = p_j (1 + 2 c lse) - (1 - e) [j == t] - e / V
    d loss / d x_j = d loss / d z_j * (1 - (z_j / softcap)^2)     (tanh' = 1 - tanh^2)

Label smoothing is F.cross_entropy's (the smoothed target puts 1 - e + e / V on t and
e / V elsewhere), the z-loss is PaLM's (it keeps lse near 0 so the logits do not drift),
soft-capping is Gemma 2's (it bounds every logit to (-softcap, softcap) smoothly). Each
kernel adds these to its own row pass: the soft cap where a logit is loaded, the sum of z
(for the smoothing) beside the online max and sum of exponentials, the rest per row.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LossVariant(NamedTuple):
    """The variant of one call: 0.0 turns each off (softcap 0.0: no soft-capping)."""
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0


PLAIN = LossVariant()  # plain cross-entropy


def check(label_smoothing, z_loss, softcap, return_z_loss) -> LossVariant:
    """The public arguments checked (errors name the argument) and in canonical form."""
    if (softcap is None and return_z_loss is False and type(label_smoothing) is float
            and type(z_loss) is float and label_smoothing == 0.0 and z_loss == 0.0):
        return PLAIN  # the defaults, as most calls pass them: five tests, not twelve
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not _is_number(z_loss) or not 0.0 <= z_loss < math.inf:
        raise ValueError(f"z_loss (the z-loss coefficient) must be a finite number >= 0, got "
                         f"{z_loss!r}")
    if softcap is not None and (not _is_number(softcap) or not 0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(return_z_loss, bool):
        raise TypeError(f"return_z_loss must be a bool, got {type(return_z_loss).__name__}")
    return LossVariant(float(label_smoothing), float(z_loss), float(softcap or 0.0))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_targets(targets: torch.Tensor) -> torch.Tensor:
    """The targets flat, (N,): one class index per loss row. (N,) targets, the common
    case, come back as they are: a no-op reshape is still a dispatcher round trip (~0.5 us
    of host time)."""
    return targets if targets.dim() == 1 else targets.reshape(-1)


def flat_int64_targets(targets: torch.Tensor) -> torch.Tensor:
    """`flat_targets` in int64, cast only when they are not already."""
    flat = flat_targets(targets)
    return flat if flat.dtype == torch.int64 else flat.long()


def reduce_losses(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  reduction: str) -> torch.Tensor:
    """Per-row losses reduced as F.cross_entropy does: mean over the kept targets (NaN when
    none is kept), sum, or none. No host sync: the count stays on the device."""
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


def z_loss_value(lse: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                 z_loss: float) -> torch.Tensor:
    """The z-loss term of the loss, z_loss * lse^2 per kept row, reduced as the loss is and
    detached: the value to log (its gradient is part of the loss's)."""
    terms = z_loss * lse.detach().float().square() if z_loss else torch.zeros_like(lse)
    return reduce_losses(torch.where(targets != ignore_index, terms, 0.0), targets,
                         ignore_index, reduction)


def finish(loss: torch.Tensor, lse: torch.Tensor | None, targets: torch.Tensor,
           ignore_index: int, reduction: str, variant: LossVariant, return_z_loss: bool):
    """What the op returns: the loss, or (loss, z-loss value) with return_z_loss. loss and
    lse are flat over rows; with reduction 'none' both come back in targets' shape."""
    if reduction == "none":
        loss = loss.view(targets.shape)
    if not return_z_loss:
        return loss
    value = z_loss_value(lse, flat_targets(targets), ignore_index, reduction, variant.z_loss)
    return loss, value.view(targets.shape) if reduction == "none" else value
