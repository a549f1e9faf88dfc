"""layer_norm and add_layer_norm: the checks, the eager baseline and the test inputs.

layer_norm(x[..., C], weight[C] | None, bias[C] | None, eps) -> [..., C] in x's dtype; the
parameters may be another float dtype than x (fp32 weights on a bf16 activation); no
weight means a gain of ones, as in F.layer_norm.
add_layer_norm(x, residual, weight, bias, eps) -> (s, layer_norm(s)), s = x + residual in
the dtype PyTorch gives the sum: under autocast a bf16 branch output is added to the fp32
residual stream, and s is fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.specs import inputs as make
from kernels.specs.checks import (check_eps, check_float, check_shape, contiguous_param,
                                  same_device)
from kernels.specs.core import OpSpec
from kernels.specs.inputs import Case, Inputs

PARAMS = ("x", "weight", "bias", "eps")
ADD_PARAMS = ("x", "residual", "weight", "bias", "eps")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def canonicalize(x, weight, bias=None, eps=1e-5):
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the channels), got a scalar")
    weight = _no_gain(x) if weight is None else weight
    channels = x.shape[-1:]
    check_shape("weight", weight, channels)
    check_shape("bias", bias, channels)
    check_eps(eps)
    device = same_device(x=x, weight=weight, bias=bias)
    return SPEC.call((x, contiguous_param(weight), contiguous_param(bias), float(eps)), device)


def canonicalize_add(x, residual, weight, bias=None, eps=1e-5):
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the channels), got a scalar")
    weight = _no_gain(x) if weight is None else weight
    channels = x.shape[-1:]
    check_shape("residual", residual, x.shape)
    check_shape("weight", weight, channels)
    check_shape("bias", bias, channels)
    check_eps(eps)
    device = same_device(x=x, residual=residual, weight=weight, bias=bias)
    return ADD_SPEC.call((x, residual, contiguous_param(weight), contiguous_param(bias),
                          float(eps)), device)


def _no_gain(x):
    """weight=None, as F.layer_norm takes it: a gain of ones (every backend then runs the
    one form; no gradient is asked of it)."""
    return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)


def eager(x, weight, bias=None, eps=1e-5):
    weight, bias = (None if t is None else t.to(x.dtype) for t in (weight, bias))
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def eager_add(x, residual, weight, bias=None, eps=1e-5):
    summed = x + residual
    return summed, eager(summed, weight, bias, eps)


# ----------------------------------------------------------------------------- inputs

def _params(channels, dtype, device, gen, layout="contiguous", param_dtype=None, bias=True):
    param_dtype = param_dtype or dtype
    weight = make.place(1.0 + 0.2 * make.draw((channels,), gen), param_dtype, device, layout)
    b = make.tensor((channels,), param_dtype, device, gen, layout, scale=0.2) if bias else None
    return weight, b


def _layer_norm_case(name, shape, x_layout="contiguous", param_layout="contiguous",
                     bias=True, fp32_params=False, scale=1.0, offset=0.0, constant_rows=0,
                     gain=True, dtypes=None):
    def build(dtype, device, gen):
        values = make.draw(shape, gen, scale, offset)
        if constant_rows:  # zero variance: y must be exactly the bias
            values.view(-1, shape[-1])[:constant_rows] = offset + 0.5
        x = make.place(values, dtype, device, x_layout)
        weight, b = _params(shape[-1], dtype, device, gen, param_layout,
                            torch.float32 if fp32_params else None, bias)
        grad_args = (0,) + ((1,) if gain else ()) + ((2,) if bias else ())
        return Inputs((x, weight if gain else None, b, 1e-5), grad_args)
    return Case(name, build, dtypes=dtypes)


LAYER_NORM_CASES = (
    _layer_norm_case("basic", (4, 7, 96)),
    _layer_norm_case("odd_channels", (5, 37)),
    _layer_norm_case("one_row", (1, 300)),
    _layer_norm_case("empty", (0, 64)),
    _layer_norm_case("one_channel", (6, 1)),
    _layer_norm_case("wide", (3, 4100)),
    _layer_norm_case("row_padded", (6, 80), x_layout="row_padded", param_layout="strided"),
    _layer_norm_case("strided", (3, 50), x_layout="strided", param_layout="offset"),
    _layer_norm_case("offset", (5, 64), x_layout="offset", param_layout="offset"),
    _layer_norm_case("no_bias", (4, 96), bias=False),
    _layer_norm_case("fp32_params", (4, 96), fp32_params=True, dtypes=LOW_PRECISION),
    _layer_norm_case("large_mean", (4, 128), offset=50.0, scale=3.0),
    _layer_norm_case("constant_rows", (5, 64), constant_rows=2, offset=2.0),
    # Enough rows that the weight and bias gradients are long reductions (a 16-bit sum
    # of them is off by ~1e-2), and that a 0.2 % bias stands out of the rounding noise.
    _layer_norm_case("many_rows", (384, 128)),
    _layer_norm_case("no_gain", (4, 64), gain=False),  # weight None, as F.layer_norm takes
    _layer_norm_case("no_channels", (4, 0)),
)


def _add_case(name, shape, x_layout="contiguous", residual_layout="contiguous",
              param_layout="contiguous", bias=True, fp32_residual=False, dtypes=None):
    def build(dtype, device, gen):
        x = make.tensor(shape, dtype, device, gen, x_layout)
        residual_dtype = torch.float32 if fp32_residual else dtype
        residual = make.tensor(shape, residual_dtype, device, gen, residual_layout, scale=2.0)
        weight, b = _params(shape[-1], residual_dtype, device, gen, param_layout, bias=bias)
        grad_args = (0, 1, 2, 3) if bias else (0, 1, 2)
        return Inputs((x, residual, weight, b, 1e-5), grad_args)
    return Case(name, build, dtypes=dtypes)


ADD_LAYER_NORM_CASES = (
    _add_case("basic", (3, 5, 96)),
    _add_case("odd_channels", (7, 37)),
    _add_case("one_row", (1, 200)),
    _add_case("empty", (0, 32)),
    _add_case("strided", (6, 80), x_layout="row_padded", residual_layout="offset",
              param_layout="strided"),
    _add_case("column_strided", (3, 40), x_layout="strided", residual_layout="strided"),
    _add_case("no_bias", (4, 64), bias=False),
    # The model under autocast: a bf16/fp16 branch output onto the fp32 residual stream.
    _add_case("autocast_mix", (4, 6, 96), fp32_residual=True, dtypes=LOW_PRECISION),
    _add_case("many_rows", (256, 128)),  # long reductions; a 0.2 % bias resolves
    _add_case("no_channels", (3, 0)),
)


def _bench_inputs(dims, dtype, device, gen):
    n, c = dims["N"], dims["C"]
    x = make.tensor((n, c), dtype, device, gen)
    weight, b = _params(c, dtype, device, gen)
    return Inputs((x, weight, b, 1e-5), (0, 1, 2))


def _bench_add_inputs(dims, dtype, device, gen):
    x, weight, b, eps = _bench_inputs(dims, dtype, device, gen).args
    residual = make.tensor(x.shape, dtype, device, gen)
    return Inputs((x, residual, weight, b, eps), (0, 1, 2, 3))


def _sum_dtype(call) -> torch.dtype:
    return torch.promote_types(call["x"].dtype, call["residual"].dtype)


SPEC = OpSpec("layer_norm", PARAMS, canonicalize, reference.layer_norm, eager,
              _bench_inputs, LAYER_NORM_CASES, result_dtypes=lambda call: (call["x"].dtype,))
ADD_SPEC = OpSpec("add_layer_norm", ADD_PARAMS, canonicalize_add, reference.add_layer_norm,
                  eager_add, _bench_add_inputs, ADD_LAYER_NORM_CASES,
                  result_dtypes=lambda call: (_sum_dtype(call), _sum_dtype(call)))
