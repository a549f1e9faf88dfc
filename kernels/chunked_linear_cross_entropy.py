"""Linear + cross-entropy (the lm_head and its loss) in pure PyTorch.

Interim version that materializes the full logits; the chunked algorithm replaces it.
"""
import torch.nn.functional as F


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    logits = F.linear(x, weight, bias).float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=ignore_index, reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses
