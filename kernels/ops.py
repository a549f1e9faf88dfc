"""The public ops: one function per hot path of a GPT, dispatching to a backend.

Each op's spec (`kernels.specs`) checks the arguments once for every backend, so bad
input gets an error that names the problem instead of a crash inside a kernel, and puts
them in canonical form (autocast for the matmul ops, as `F.linear` would apply it;
contiguous targets and 1-D parameters). Then `kernels.backends.resolve` picks the
function that runs the call: ``backend=None`` means the process default, ``"auto"`` the
first backend that supports this very call. The math of each op is specified in
`kernels.reference`.
"""
from __future__ import annotations

import torch.nn.functional as F

from kernels.backends import resolve
from kernels.specs import OPS, SPECS
from kernels.specs.checks import REDUCTIONS
from kernels.specs.cross_entropy import without_classes

__all__ = ["OPS", "REDUCTIONS", "add_layer_norm", "causal_attention", "cross_entropy",
           "layer_norm", "linear_cross_entropy", "mlp_gelu"]

_LAYER_NORM = SPECS["layer_norm"]
_ADD_LAYER_NORM = SPECS["add_layer_norm"]
_MLP_GELU = SPECS["mlp_gelu"]
_CAUSAL_ATTENTION = SPECS["causal_attention"]
_CROSS_ENTROPY = SPECS["cross_entropy"]
_LINEAR_CROSS_ENTROPY = SPECS["linear_cross_entropy"]


def _run(call, backend):
    return resolve(call, backend)(*call.args)


def _without_classes(logits, call):
    """A cross-entropy call's result when there are no classes (every target is ignored):
    the losses, and with return_z_loss the z-loss term, whose per-row terms are 0 too."""
    loss = without_classes(logits, call["targets"], call["ignore_index"], call["reduction"])
    return (loss, loss.detach()) if call["return_z_loss"] else loss


def layer_norm(x, weight, bias=None, eps=1e-5, *, backend=None):
    """LayerNorm over the last dim of x[..., C] with weight[C] and optional bias[C]; the
    result has x's dtype (the parameters may be another float dtype)."""
    return _run(_LAYER_NORM.canonicalize(x, weight, bias, eps), backend)


def add_layer_norm(x, residual, weight, bias=None, eps=1e-5, *, backend=None):
    """The residual add fused with the next LayerNorm: returns (s, LN(s)) with
    s = x + residual in the dtype PyTorch gives the sum (fp32 for a bf16 x on an fp32
    residual stream)."""
    return _run(_ADD_LAYER_NORM.canonicalize(x, residual, weight, bias, eps), backend)


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, approximate="tanh", *, backend=None):
    """GPT-2's MLP: c_proj(gelu(c_fc(x))), weights in nn.Linear layout (out, in).
    approximate="tanh" is GPT-2's GELU, "none" the exact one (nanoGPT's nn.GELU())."""
    return _run(_MLP_GELU.canonicalize(x, w_fc, b_fc, w_proj, b_proj, approximate), backend)


def causal_attention(q, k, v, scale=None, dropout_p=0.0, dropout_seed=None, *, backend=None):
    """Causal softmax(q k^T * scale) v on (B, H, T, D); scale defaults to D**-0.5.

    k and v may be longer than q (decoding with a KV cache): the mask is then aligned to
    the bottom-right. With dropout_p > 0 the probabilities are dropped (kept ones scaled
    by 1 / (1 - dropout_p)) by a mask drawn from torch's default generator, or, given
    dropout_seed = (seed, offset), by the mask `kernels.philox` defines for it, the same
    on every backend (`kernels.philox.keep_mask` rebuilds it).
    """
    return _run(_CAUSAL_ATTENTION.canonicalize(q, k, v, scale, dropout_p, dropout_seed),
                backend)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, return_z_loss=False, *, backend=None):
    """Cross-entropy of logits[..., V] against class indices targets[...], as F.cross_entropy
    (mean over the targets that are not ignore_index). The loss is fp32 whatever the logits'
    dtype.

    Loss variants (all off by default; see `kernels.losses`): label_smoothing as
    F.cross_entropy's; z_loss, the coefficient of z_loss * logsumexp(logits)^2 added per
    row (PaLM); softcap, logits replaced by softcap * tanh(logits / softcap) first (Gemma
    2). With return_z_loss the result is (loss, z-loss term): the term reduced as the loss
    and detached, to log it."""
    call = _CROSS_ENTROPY.canonicalize(logits, targets, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap, return_z_loss)
    if logits.shape[-1] == 0:  # no classes (checked above): nothing for a kernel to compute
        return _without_classes(call["logits"], call)
    return _run(call, backend)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False, *,
                         backend=None):
    """cross_entropy(x @ weight.T + bias, targets, ...) without materializing all the logits
    at once where the backend can (the lm_head fused with the loss); the loss variants are
    cross_entropy's."""
    call = _LINEAR_CROSS_ENTROPY.canonicalize(x, weight, targets, bias, ignore_index, reduction,
                                              label_smoothing, z_loss, softcap, return_z_loss)
    if weight.shape[0] == 0:  # no classes (checked above): nothing for a kernel to compute
        return _without_classes(F.linear(call["x"], call["weight"], call["bias"]), call)
    return _run(call, backend)
