"""mlp_gelu: GPT-2's MLP, c_proj(gelu(c_fc(x))), weights in nn.Linear layout (out, in).

The GELU flavour is an argument: approximate="tanh" is GPT-2's (and Hugging Face's),
"none" the exact erf form that nanoGPT's nn.GELU() computes; a model trained with one
and evaluated with the other is off by ~1e-3 per activation. Under torch.autocast the
inputs are cast to the autocast dtype, as F.linear's would be; otherwise x, the weights
and the biases must share one dtype (as F.linear requires).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.specs import inputs as make
from kernels.specs.checks import (check_float, check_one_of, check_shape, contiguous_param,
                                  same_device)
from kernels.specs.core import OpSpec
from kernels.specs.inputs import Case, Inputs

PARAMS = ("x", "w_fc", "b_fc", "w_proj", "b_proj", "approximate")
APPROXIMATIONS = ("tanh", "none")


def autocast(device: torch.device, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for `device` (the
    tensors' one device, checked; the first is not None), as the matmul built-ins do."""
    # `device.type` builds a new string on every read (~0.25 us); `is_cpu` does not.
    device_type = "cpu" if tensors[0].is_cpu else device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def canonicalize(x, w_fc, b_fc, w_proj, b_proj, approximate="tanh"):
    check_float("x", x)
    check_float("w_fc", w_fc)
    x_shape, w_fc_shape = x.shape, w_fc.shape  # each attribute read once: ~0.1-0.3 us a read
    if len(w_fc_shape) != 2 or not x_shape or w_fc_shape[1] != x_shape[-1]:
        raise ValueError(f"w_fc must have shape (hidden, {x_shape[-1] if x_shape else 'C'}), "
                         f"got {tuple(w_fc_shape)}")
    hidden, channels = w_fc_shape
    check_shape("b_fc", b_fc, (hidden,))
    check_shape("w_proj", w_proj, (channels, hidden))
    check_shape("b_proj", b_proj, (channels,))
    check_one_of("approximate", approximate, APPROXIMATIONS)
    device = same_device(x=x, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj)
    x, w_fc, b_fc, w_proj, b_proj = autocast(device, x, w_fc, b_fc, w_proj, b_proj)
    dtype = x.dtype
    if not (w_fc.dtype == dtype and w_proj.dtype == dtype
            and (b_fc is None or b_fc.dtype == dtype)
            and (b_proj is None or b_proj.dtype == dtype)):
        named = {"x": x, "w_fc": w_fc, "b_fc": b_fc, "w_proj": w_proj, "b_proj": b_proj}
        listing = ", ".join(f"{name} {t.dtype}" for name, t in named.items() if t is not None)
        raise TypeError(f"mlp_gelu needs x, the weights and the biases in one dtype (or a "
                        f"torch.autocast region), got {listing}")
    return SPEC.call((x, w_fc, contiguous_param(b_fc), w_proj, contiguous_param(b_proj),
                      approximate), device)


def eager(x, w_fc, b_fc, w_proj, b_proj, approximate="tanh"):
    return F.linear(F.gelu(F.linear(x, w_fc, b_fc), approximate=approximate), w_proj, b_proj)


# ----------------------------------------------------------------------------- inputs

def _weights(channels, hidden, dtype, device, gen, layouts=("contiguous",) * 4, bias=True):
    w_fc = make.tensor((hidden, channels), dtype, device, gen, layouts[0], scale=channels ** -0.5)
    w_proj = make.tensor((channels, hidden), dtype, device, gen, layouts[2],
                         scale=hidden ** -0.5)
    b_fc = make.tensor((hidden,), dtype, device, gen, layouts[1], scale=0.5) if bias else None
    b_proj = make.tensor((channels,), dtype, device, gen, layouts[3], scale=0.1) if bias else None
    return w_fc, b_fc, w_proj, b_proj


def _case(name, lead, channels, hidden, x_layout="contiguous", layouts=("contiguous",) * 4,
          bias=True, approximate="tanh", x_scale=1.0, autocast_inputs=False, dtypes=None):
    def build(dtype, device, gen):
        stored = torch.float32 if autocast_inputs else dtype
        x = make.tensor(lead + (channels,), stored, device, gen, x_layout, scale=x_scale)
        w_fc, b_fc, w_proj, b_proj = _weights(channels, hidden, stored, device, gen, layouts,
                                              bias)
        grad_args = (0, 1, 2, 3, 4) if bias else (0, 1, 3)
        return Inputs((x, w_fc, b_fc, w_proj, b_proj, approximate), grad_args,
                      autocast=autocast_inputs)
    return Case(name, build, dtypes=dtypes)


def _gelu_tails_case(name, rows, channels, approximate):
    """Each output is one GELU of a pre-activation in [-3.3, -2.5], where the two flavours
    differ by 1.8-3 % of the largest output (and by 3-20 % of each): c_fc copies channel
    j % C into hidden unit j and c_proj reads hidden unit i into output i, all exact in
    every dtype. A kernel computing the other flavour fails here even in bf16, whose
    rounding hides the difference in an ordinary MLP (~1e-4 of its outputs). 16-bit only:
    fp32 sees the flavour in every case, and its erf form loses ~6e-5 of each value to
    cancellation in these tails (1 + erf(x / sqrt 2) with erf near -1), in PyTorch too."""
    hidden = 4 * channels

    def build(dtype, device, gen):
        x = make.place(-2.9 + 0.4 * torch.tanh(make.draw((rows, channels), gen)), dtype, device)
        copy = torch.zeros(hidden, channels)
        copy[torch.arange(hidden), torch.arange(hidden) % channels] = 1.0
        read = torch.zeros(channels, hidden)
        read[torch.arange(channels), torch.arange(channels)] = 1.0
        w_fc, w_proj = make.place(copy, dtype, device), make.place(read, dtype, device)
        b_fc = make.place(torch.zeros(hidden), dtype, device)
        b_proj = make.place(torch.zeros(channels), dtype, device)
        return Inputs((x, w_fc, b_fc, w_proj, b_proj, approximate), (0, 1, 2, 3, 4))
    return Case(name, build, dtypes=(torch.bfloat16, torch.float16))


CASES = (
    _case("basic", (3, 5), 32, 128),
    _case("exact_gelu", (3, 5), 32, 128, approximate="none"),
    _case("odd_sizes", (7,), 20, 52),
    _case("one_row", (1,), 48, 192),
    _case("empty", (0,), 32, 128),
    _case("strided", (6,), 40, 160, x_layout="row_padded",
          layouts=("transposed", "strided", "offset", "offset")),
    _case("column_strided", (4,), 24, 96, x_layout="strided",
          layouts=("contiguous", "contiguous", "transposed", "strided")),
    _case("no_bias", (2, 3), 32, 128, bias=False),
    # Pre-activations of +-30: both GELU tails, where the tanh / erf forms saturate.
    _case("large_activations", (4,), 32, 64, x_scale=30.0),
    # The model under autocast: fp32 parameters and activations, matmuls in bf16/fp16.
    _case("autocast", (2, 5), 32, 128, autocast_inputs=True,
          dtypes=(torch.bfloat16, torch.float16)),
    _case("autocast_exact_gelu", (2, 5), 32, 128, approximate="none", autocast_inputs=True,
          dtypes=(torch.bfloat16, torch.float16)),
    _case("many_rows", (512,), 64, 256),  # long reductions; a 0.2 % bias resolves
    _gelu_tails_case("gelu_tails", 64, 32, "tanh"),
    _gelu_tails_case("gelu_tails_exact", 64, 32, "none"),
)


def _bench_inputs(dims, dtype, device, gen):
    n, c = dims["N"], dims["C"]
    x = make.tensor((n, c), dtype, device, gen)
    w_fc, b_fc, w_proj, b_proj = _weights(c, 4 * c, dtype, device, gen)
    return Inputs((x, w_fc, b_fc, w_proj, b_proj, "tanh"), (0, 1, 2, 3, 4))


SPEC = OpSpec("mlp_gelu", PARAMS, canonicalize, reference.mlp_gelu, eager, _bench_inputs, CASES,
              result_dtypes=lambda call: (call["x"].dtype,))  # autocast's, under autocast
