"""cross_entropy and linear_cross_entropy: the checks, eager baselines and test inputs.

cross_entropy(logits[..., V], targets[...], ignore_index, reduction) is F.cross_entropy:
mean over the targets that are not ignore_index (NaN when every one is), sum, or none;
the loss is fp32 whatever the logits' dtype. linear_cross_entropy(x[..., C], weight[V, C],
targets, bias[V] | None, ...) is cross_entropy(x @ weight.T + bias, targets) without the
whole logits at once where the backend can (the lm_head fused with the loss).

Both take the loss variants (`kernels.losses`): label_smoothing (F.cross_entropy's),
z_loss (the coefficient of PaLM's z_loss * lse^2 per row), softcap (Gemma 2's
softcap * tanh(logits / softcap) before everything else) and return_z_loss (return
(loss, the z-loss term, detached) to log it). All are off by default.

Targets are int64 or int32 and must be ignore_index or in [0, V): a target out of range
is an error on every backend (see `check_target_range`). Canonical form: targets and the
bias are made contiguous (they are small), the matmul inputs follow autocast, softcap None
becomes 0.0 (off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import losses, reference
from kernels.specs import inputs as make
from kernels.specs.checks import (check_float, check_shape, check_target_range, check_targets,
                                  same_device)
from kernels.specs.core import OpSpec
from kernels.specs.inputs import Case, Inputs
from kernels.specs.mlp import autocast

VARIANT_PARAMS = ("label_smoothing", "z_loss", "softcap", "return_z_loss")
PARAMS = ("logits", "targets", "ignore_index", "reduction") + VARIANT_PARAMS
LINEAR_PARAMS = ("x", "weight", "targets", "bias", "ignore_index", "reduction") + VARIANT_PARAMS
GRADSCALER_SCALE = 65536.0  # torch.amp.GradScaler's initial loss scale


def canonicalize(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, return_z_loss=False):
    check_float("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dim (the classes), got a scalar")
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, reduction)
    variant = losses.check(label_smoothing, z_loss, softcap, return_z_loss)
    device = same_device(logits=logits, targets=targets)
    check_target_range(targets, logits.shape[-1], ignore_index)
    return SPEC.call((logits, targets.contiguous(), ignore_index, reduction, *variant,
                      return_z_loss), device)


def canonicalize_linear(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2 or x.dim() == 0 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (vocab, {x.shape[-1] if x.dim() else 'C'}), "
                         f"got {tuple(weight.shape)}")
    check_shape("bias", bias, (weight.shape[0],))
    check_targets(targets, x.shape[:-1], weight.shape[0], ignore_index, reduction)
    variant = losses.check(label_smoothing, z_loss, softcap, return_z_loss)
    device = same_device(x=x, weight=weight, targets=targets, bias=bias)
    check_target_range(targets, weight.shape[0], ignore_index)
    x, weight, bias = autocast(device, x, weight, bias)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
        raise TypeError(f"linear_cross_entropy needs x, weight and bias in one dtype (or a "
                        f"torch.autocast region), got {sorted(map(str, dtypes))}")
    bias = None if bias is None else bias.contiguous()
    return LINEAR_SPEC.call((x, weight, targets.contiguous(), bias, ignore_index, reduction,
                             *variant, return_z_loss), device)


def without_classes(logits, targets, ignore_index, reduction):
    """The result for logits with no classes (V = 0), where every target is ignore_index
    (checked): losses of 0, reduced as F.cross_entropy does (a mean over no target is NaN),
    connected to the logits so that their (empty) gradient flows. No kernel is involved:
    `kernels.ops` answers such calls itself on every backend."""
    losses = logits.reshape(targets.numel(), 0).sum(dim=1, dtype=loss_dtype(logits.dtype))
    if reduction == "none":
        return losses.view(targets.shape)
    total = losses.sum()
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


def eager(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
          z_loss=0.0, softcap=None, return_z_loss=False):
    """F.cross_entropy on the logits upcast to fp32, as under torch.autocast, soft-capped
    there as a user writes it (Gemma 2's `cap * tanh(logits / cap)`), with the z-loss
    from torch.logsumexp."""
    rows = logits.reshape(targets.numel(), logits.shape[-1]).float()
    flat_targets = targets.reshape(-1).long()
    if softcap:
        rows = softcap * torch.tanh(rows / softcap)
    loss = F.cross_entropy(rows, flat_targets, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.view(targets.shape)
    if not (z_loss or return_z_loss):
        return loss
    kept = (flat_targets != ignore_index).float()
    terms = z_loss * torch.logsumexp(rows, dim=-1).square() * kept
    z_value = (terms.view(targets.shape) if reduction == "none" else terms.sum()
               if reduction == "sum" else terms.sum() / kept.sum())
    loss = loss + z_value
    return (loss, z_value.detach()) if return_z_loss else loss


def eager_linear(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    return eager(F.linear(x, weight, bias), targets, ignore_index, reduction, label_smoothing,
                 z_loss, softcap, return_z_loss)


# ----------------------------------------------------------------------------- inputs

def _case(name, rows, vocab, reduction="mean", lead=None, logits_layout="contiguous",
          targets_layout="contiguous", ignore_index=-100, ignored=(1,), index_dtype=torch.int64,
          scale=3.0, neg_inf_columns=0, offset=0.0, loss_scale=1.0, out_of_range=False,
          ignored_fill=None, dtypes=None, **variant):
    def build(dtype, device, gen):
        values = make.draw((rows, vocab), gen, scale, offset)
        values[:, :neg_inf_columns] = float("-inf")
        if ignored_fill is not None:  # what an ignored row holds must not matter
            values[list(ignored)] = ignored_fill
        if neg_inf_columns:  # the targets must have a finite logit for a finite loss
            values[:, -1] = values[:, -1].clamp(min=0.0)
        shape = lead + (vocab,) if lead else (rows, vocab)
        logits = make.place(values.view(shape), dtype, device, logits_layout)
        t = make.targets(rows, vocab, device, gen, targets_layout, ignore_index, ignored,
                         index_dtype)
        if neg_inf_columns:
            t = torch.where(t == ignore_index, t, vocab - 1)
        if out_of_range:
            t = t.clone()
            t[0] = vocab
        if lead:
            t = t.view(lead)
        return Inputs((logits, t, ignore_index, reduction, *_variant_args(**variant)), (0,),
                      loss_scale)
    raises = ValueError if out_of_range else None
    return Case(name, build, raises=raises, match="out of range" if out_of_range else "",
                dtypes=dtypes)


def _variant_args(label_smoothing=0.0, z_loss=0.0, softcap=None, return_z_loss=False):
    """The loss-variant arguments of a case, in the op's positional order."""
    return label_smoothing, z_loss, softcap, return_z_loss


# The loss variants, strong enough that each visibly moves the loss and its gradient.
SMOOTHING = dict(label_smoothing=0.1)
Z_LOSS = dict(z_loss=0.05, return_z_loss=True)
SOFTCAP = dict(softcap=4.0)
ALL_VARIANTS = dict(label_smoothing=0.2, z_loss=0.01, softcap=6.0, return_z_loss=True)

CASES = (
    _case("basic", 8, 300),
    _case("sum", 8, 300, reduction="sum"),
    _case("none", 8, 300, reduction="none"),
    _case("one_class", 4, 1, ignored=()),
    _case("odd_vocab", 5, 65),
    _case("one_row", 1, 1000, ignored=()),
    _case("empty", 0, 50),
    _case("empty_sum", 0, 50, reduction="sum"),
    _case("leading_dims", 6, 70, lead=(2, 3), ignore_index=-1, ignored=(1, 4)),
    _case("int32_targets", 6, 100, index_dtype=torch.int32, reduction="none"),
    _case("all_ignored", 3, 40, ignored=(0, 1, 2)),
    _case("row_padded_logits", 5, 130, logits_layout="row_padded"),
    _case("strided_logits", 5, 130, logits_layout="strided"),
    _case("offset_logits", 5, 130, logits_layout="offset", reduction="sum"),
    _case("strided_targets", 6, 90, targets_layout="strided"),
    _case("offset_targets", 6, 90, targets_layout="offset", reduction="none"),
    # -inf over more columns than any kernel's block (4096): a row's first blocks are empty.
    _case("neg_inf_run", 3, 5000, neg_inf_columns=4500, ignored=()),
    _case("large_logits", 6, 200, scale=50.0, offset=1000.0),
    _case("gpt2_vocab", 2, 50257, ignored=()),
    # fp16 training: the GradScaler multiplies the loss by 2^16 before the backward; the
    # gradient's small probabilities must survive in fp16.
    _case("gradscaler", 64, 512, loss_scale=GRADSCALER_SCALE, scale=4.0, ignored=(),
          dtypes=(torch.float16,)),
    _case("many_rows", 256, 256),  # a 0.2 % bias resolves
    # An ignored row counts 0 and gets a zero gradient whatever its logits, -inf included
    # (its softmax would be 0/0).
    _case("ignored_neg_inf_row", 5, 40, ignored=(1, 3), ignored_fill=float("-inf")),
    # ignore_index may name a class: the rows targeting it are ignored, -inf logits and all.
    _case("ignore_index_a_class", 5, 40, ignore_index=2, ignored=(1, 3),
          ignored_fill=float("-inf")),
    # No classes at all: every target must be ignored; F.cross_entropy's results.
    _case("no_classes", 3, 0, ignored=(0, 1, 2)),
    _case("no_classes_sum", 3, 0, ignored=(0, 1, 2), reduction="sum"),
    _case("no_classes_none", 3, 0, ignored=(0, 1, 2), reduction="none"),
    _case("target_out_of_range", 4, 30, out_of_range=True),
    # The loss variants, with every reduction and ignored rows.
    _case("smoothing", 8, 300, **SMOOTHING),
    _case("smoothing_sum", 8, 300, reduction="sum", **SMOOTHING),
    _case("smoothing_none", 8, 300, reduction="none", **SMOOTHING),
    _case("smoothing_full", 5, 65, label_smoothing=1.0),  # the uniform target
    _case("smoothing_all_ignored", 3, 40, ignored=(0, 1, 2), **SMOOTHING),
    # -inf logits: the smoothing term (and the loss) is +inf, as in F.cross_entropy; the
    # gradient stays finite.
    _case("smoothing_neg_inf", 3, 5000, neg_inf_columns=4500, ignored=(), **SMOOTHING),
    _case("z_loss", 8, 300, **Z_LOSS),
    _case("z_loss_none", 6, 100, reduction="none", **Z_LOSS),
    _case("z_loss_large_logits", 6, 200, scale=50.0, offset=1000.0, z_loss=1e-4,
          return_z_loss=True),
    _case("softcap", 8, 300, **SOFTCAP),
    _case("softcap_saturated", 6, 200, scale=40.0, softcap=10.0),  # tanh' ~ 0 for most logits
    _case("softcap_neg_inf", 3, 5000, neg_inf_columns=4500, ignored=(), **SOFTCAP),
    _case("all_variants", 6, 70, lead=(2, 3), ignore_index=-1, ignored=(1, 4), **ALL_VARIANTS),
    _case("all_variants_sum", 5, 130, logits_layout="row_padded", reduction="sum",
          **ALL_VARIANTS),
    _case("all_variants_none", 6, 90, targets_layout="strided", reduction="none",
          index_dtype=torch.int32, **ALL_VARIANTS),
    _case("all_variants_gpt2_vocab", 2, 50257, ignored=(), **ALL_VARIANTS),
    _case("all_variants_gradscaler", 64, 512, loss_scale=GRADSCALER_SCALE, scale=4.0,
          ignored=(), dtypes=(torch.float16,), **ALL_VARIANTS),
)


def _linear_case(name, rows, channels, vocab, reduction="mean", bias=True,
                 x_layout="contiguous", weight_layout="contiguous", bias_layout="contiguous",
                 targets_layout="contiguous", ignored=(1,), index_dtype=torch.int64,
                 neg_inf_bias=0, loss_scale=1.0, autocast_inputs=False, out_of_range=False,
                 dtypes=None, **variant):
    def build(dtype, device, gen):
        stored = torch.float32 if autocast_inputs else dtype
        x = make.tensor((rows, channels), stored, device, gen, x_layout)
        weight = make.tensor((vocab, channels), stored, device, gen, weight_layout,
                             scale=2.0 * channels ** -0.5)
        b = None
        if bias:
            values = make.draw((vocab,), gen, 0.5)
            values[:neg_inf_bias] = float("-inf")  # classes masked out through the bias
            b = make.place(values, stored, device, bias_layout)
        t = make.targets(rows, vocab, device, gen, targets_layout, -100, ignored, index_dtype)
        if neg_inf_bias:
            t = torch.where(t == -100, t, torch.randint(neg_inf_bias, vocab, t.shape, generator=gen,
                                                        device=gen.device).to(t))
        if out_of_range:
            t = t.clone()
            t[-1] = -5
        return Inputs((x, weight, t, b, -100, reduction, *_variant_args(**variant)),
                      (0, 1, 3) if bias else (0, 1), loss_scale, autocast_inputs)
    raises = ValueError if out_of_range else None
    return Case(name, build, raises=raises, match="out of range" if out_of_range else "",
                dtypes=dtypes)


LINEAR_CASES = (
    _linear_case("basic", 12, 32, 100),
    _linear_case("sum", 12, 32, 100, reduction="sum"),
    _linear_case("none", 12, 32, 100, reduction="none"),
    _linear_case("no_bias", 9, 24, 77, bias=False),
    _linear_case("one_row", 1, 16, 64, ignored=()),
    _linear_case("empty", 0, 16, 64),
    _linear_case("all_ignored", 4, 16, 64, ignored=(0, 1, 2, 3)),
    _linear_case("strided_inputs", 10, 24, 90, x_layout="row_padded", weight_layout="transposed",
                 bias_layout="strided"),
    _linear_case("strided_targets", 10, 24, 90, targets_layout="strided"),
    _linear_case("offset_targets_none", 10, 24, 90, targets_layout="offset", reduction="none",
                 index_dtype=torch.int32),
    _linear_case("neg_inf_bias", 4, 16, 5000, neg_inf_bias=4500, ignored=()),
    # Enough rows that 1/n folded into fp16 gradients early would flush them (p/n < 6e-8).
    _linear_case("gradscaler", 2048, 16, 2048, loss_scale=GRADSCALER_SCALE, ignored=(),
                 dtypes=(torch.float16,)),
    # The model under autocast: fp32 x and lm_head weight, the matmul in bf16/fp16.
    _linear_case("autocast", 16, 32, 100, bias=False, autocast_inputs=True,
                 dtypes=(torch.bfloat16, torch.float16)),
    _linear_case("many_rows", 256, 32, 256),  # a 0.2 % bias resolves
    _linear_case("no_classes", 4, 16, 0, ignored=(0, 1, 2, 3)),
    _linear_case("target_out_of_range", 5, 16, 40, out_of_range=True),
    _linear_case("smoothing", 12, 32, 100, **SMOOTHING),
    _linear_case("z_loss_none", 12, 32, 100, reduction="none", **Z_LOSS),
    _linear_case("softcap", 12, 32, 100, softcap=2.0),  # logits ~ N(0, 4): capped hard
    _linear_case("all_variants", 12, 32, 100, **ALL_VARIANTS),
    _linear_case("all_variants_sum", 9, 24, 77, bias=False, reduction="sum", **ALL_VARIANTS),
    _linear_case("all_variants_ignored", 4, 16, 64, ignored=(0, 2), **ALL_VARIANTS),
    _linear_case("all_variants_autocast", 16, 32, 100, bias=False, autocast_inputs=True,
                 dtypes=(torch.bfloat16, torch.float16), **ALL_VARIANTS),
)


def _bench_inputs(dims, dtype, device, gen):
    logits = make.tensor((dims["N"], dims["V"]), dtype, device, gen, scale=2.0)
    t = make.targets(dims["N"], dims["V"], device, gen)
    return Inputs((logits, t, -100, "mean"), (0,))


def _bench_linear_inputs(dims, dtype, device, gen):
    n, c, v = dims["N"], dims["C"], dims["V"]
    x = make.tensor((n, c), dtype, device, gen)
    weight = make.tensor((v, c), dtype, device, gen, scale=c ** -0.5)
    return Inputs((x, weight, make.targets(n, v, device, gen), None, -100, "mean"), (0, 1))


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are fp32 whatever the logits' dtype (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _loss_dtypes(tensor: str):
    """The result dtypes of a call: its loss's, and the z-loss term's with return_z_loss."""
    return lambda call: (loss_dtype(call[tensor].dtype),) * (2 if call["return_z_loss"] else 1)


# Each loss variant at the setting its users train with: label smoothing 0.1, PaLM's z-loss
# 1e-4 (its value returned), Gemma 2's final-logit cap of 30.
BENCH_VARIANTS = (("label_smoothing 0.1", (("label_smoothing", 0.1),)),
                  ("z_loss 1e-4", (("z_loss", 1e-4), ("return_z_loss", True))),
                  ("softcap 30", (("softcap", 30.0),)))

SPEC = OpSpec("cross_entropy", PARAMS, canonicalize, reference.cross_entropy, eager,
              _bench_inputs, CASES, result_dtypes=_loss_dtypes("logits"),
              precision=lambda call: loss_dtype(call["logits"].dtype),
              bench_variants=BENCH_VARIANTS)
LINEAR_SPEC = OpSpec("linear_cross_entropy", LINEAR_PARAMS, canonicalize_linear,
                     reference.linear_cross_entropy, eager_linear, _bench_linear_inputs,
                     LINEAR_CASES, result_dtypes=_loss_dtypes("x"),
                     bench_variants=BENCH_VARIANTS)
