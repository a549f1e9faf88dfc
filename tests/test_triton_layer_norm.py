"""Triton LayerNorm and residual-fused LayerNorm: forward and every gradient against
`kernels.reference` (in fp64 for fp32 inputs), on awkward widths, under the interpreter
on the CPU. Big shapes run only on a GPU."""
import inspect

import pytest
import torch

import kernels
from kernels import reference
from kernels.triton import layer_norm as tln
from tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def fp64(tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def grads(outputs, inputs, upstream):
    wanted = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, wanted, upstream)


def make(shape, dtype, w_dtype=None, bias=True):
    channels = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(channels, device=DEVICE)).to(w_dtype or dtype)
    b = (0.1 * torch.randn(channels, device=DEVICE)).to(w_dtype or dtype) if bias else None
    return x, w, b


def check_layer_norm(x, w, b, dtype, view=lambda t: t):
    """layer_norm(view(x)) and its gradients against the fp64 reference."""
    x, w, b = leaves(x, w, b)
    y = tln.layer_norm(view(x), w, b, 1e-5)
    assert y.dtype == x.dtype and y.shape == view(x).shape
    dy = torch.randn_like(y)
    got = grads(y, (x, w, b), dy)
    x64, w64, b64 = fp64((x, w, b))
    y64 = reference.layer_norm(view(x64), w64, b64, 1e-5)
    want = grads(y64, (x64, w64, b64), dy.double())
    assert_close(y, y64, dtype)
    for g, r in zip(got, want):
        assert_close(g, r, dtype, factor=2)


# Widths: one channel, powers of two and not (GPT-2's 768 and 1600, 1000), with row counts
# that give partial tiles and several backward programs each walking several tiles.
@pytest.mark.parametrize("shape", [(1, 768), (4, 5, 768), (3, 1000), (2, 3, 1600), (7, 1),
                                   (2, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_matches_reference(shape, dtype):
    check_layer_norm(*make(shape, dtype), dtype)


def test_layer_norm_without_bias():
    check_layer_norm(*make((3, 4, 96), torch.float32, bias=False), torch.float32)


def test_layer_norm_fp32_weights_with_bf16_input():
    x, w, b = make((6, 200), torch.bfloat16, w_dtype=torch.float32)
    check_layer_norm(x, w, b, torch.bfloat16)


def test_layer_norm_strided_input():
    _, w, b = make((160,), torch.float32)
    every_other_column = torch.randn(4, 6, 2 * 160, device=DEVICE)  # copied once
    check_layer_norm(every_other_column, w, b, torch.float32, view=lambda t: t[..., ::2])
    first_columns = torch.randn(5, 2 * 160, device=DEVICE)  # row stride 320: read in place
    check_layer_norm(first_columns, w, b, torch.float32, view=lambda t: t[:, :160])


def test_layer_norm_statistics_are_fp32():
    x, w, b = make((3, 64), torch.bfloat16)
    y, mean, rstd = tln.layer_norm_fwd(x, w, b, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    xf = x.double()
    torch.testing.assert_close(mean.double(), xf.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (xf.var(-1, unbiased=False) + 1e-5).rsqrt(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32, torch.float32)],
                         ids=["fp32", "bf16", "bf16+fp32_residual"])
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 1000)])
def test_add_layer_norm_matches_reference(shape, dtypes):
    x_dtype, residual_dtype, w_dtype = dtypes
    x, w, b = make(shape, x_dtype, w_dtype)
    residual = torch.randn(shape, device=DEVICE).to(residual_dtype)
    x, residual, w, b = leaves(x, residual, w, b)
    summed, y = tln.add_layer_norm(x, residual, w, b, 1e-5)
    sum_dtype = torch.promote_types(x_dtype, residual_dtype)
    assert summed.dtype == y.dtype == sum_dtype
    ds, dy = torch.randn_like(summed), torch.randn_like(y)
    got = grads((summed, y), (x, residual, w, b), (ds, dy))

    x64, r64, w64, b64 = fp64((x, residual, w, b))
    # The kernel normalizes s rounded to its dtype, as torch's x + residual is.
    s_rounded = (x64 + r64).to(sum_dtype).double()
    s64 = x64 + r64 + (s_rounded - (x64 + r64)).detach()
    y64 = reference.layer_norm(s64, w64, b64, 1e-5)
    want = grads((s64, y64), (x64, r64, w64, b64), (ds.double(), dy.double()))
    tol_dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
    assert_close(summed, s_rounded, sum_dtype)
    assert_close(y, y64, tol_dtype)
    for g, r in zip(got, want):
        assert_close(g, r, tol_dtype, factor=2)
    assert got[0].dtype == x_dtype and got[1].dtype == residual_dtype


def test_add_layer_norm_through_ops_api_matches_torch_backend():
    x, w, b = make((2, 3, 48), torch.float32)
    residual = torch.randn_like(x)
    outs = {}
    for backend in ("torch", "triton"):
        ins = leaves(x, residual, w, b)
        summed, y = kernels.add_layer_norm(*ins, 1e-5, backend=backend)
        (summed * 0.5 + y).square().sum().backward()
        outs[backend] = [summed, y] + [t.grad for t in ins]
    for got, want in zip(outs["triton"], outs["torch"]):
        assert_close(got, want, torch.float32, factor=2)


def test_weight_gradient_partial_sums_cover_every_row():
    """dW/dB are summed from per-program partials: with more rows than one program takes,
    every row must land in exactly one partial (a gradient of all-ones dy makes
    dB = number of rows exactly)."""
    x, w, b = make((23, 64), torch.float32)
    x, w, b = leaves(x, w, b)
    tln.layer_norm(x, w, b, 1e-5).sum().backward()
    torch.testing.assert_close(b.grad, torch.full_like(b, 23.0))


def test_too_wide_rows_are_refused():
    x, w, b = make((2, tln.MAX_BLOCK_N + 1), torch.float32)
    with pytest.raises(ValueError, match="channels"):
        tln.layer_norm(x, w, b)


def test_opcheck():
    x, w, b = make((5, 40), torch.float32)
    residual = torch.randn_like(x)
    x, residual, w, b = leaves(x, residual, w, b)
    torch.library.opcheck(torch.ops.gptk.triton_layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.gptk.triton_add_layer_norm_fwd, (x, residual, w, None, 1e-5))
    _, mean, rstd = tln.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.gptk.triton_layer_norm_bwd,
                          (torch.randn_like(x), torch.randn_like(x), x.detach(), w.detach(),
                           mean, rstd))


def test_aot_specs_describe_every_kernel_parameter():
    assert tln.AOT_SPECS
    for spec in tln.AOT_SPECS:
        params = inspect.signature(spec.fn.fn).parameters
        assert list(spec.signature) == list(params), spec.name
        constexprs = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
        assert sorted(spec.constexprs) == sorted(constexprs), spec.name
        assert all(spec.signature[n] == "constexpr" for n in constexprs), spec.name
    channels = {spec.constexprs["BLOCK_N"] for spec in tln.AOT_SPECS}
    assert channels == {tln.launch_config(c)[1] for c in tln.GPT2_CHANNELS}


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [768, 1600])
def test_gpt2_shapes_bf16_on_gpu(channels):
    x, w, b = make((8, 1024, channels), torch.bfloat16, w_dtype=torch.float32)
    check_layer_norm(x, w, b, torch.bfloat16)


@pytest.mark.gpu
def test_weight_gradient_is_deterministic_on_gpu():
    x, w, b = make((8192, 768), torch.bfloat16)
    dy = torch.randn_like(x)
    _, mean, rstd = tln.layer_norm_fwd(x, w, b, 1e-5)
    first = tln.layer_norm_bwd(dy, None, x, w, mean, rstd)
    second = tln.layer_norm_bwd(dy, None, x, w, mean, rstd)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)
