"""The spec itself: `kernels.reference` against PyTorch's independent built-ins (which are
the `torch` backend), fp64 gradcheck of every reference op, and the op API's contract."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference, torch_backend
from tolerance import assert_close


def _grads(fn, inputs):
    out = fn(*inputs)
    out = out[1] if isinstance(out, tuple) else out
    grad_out = torch.randn_like(out)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, tensors, grad_out)


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _check_same(fn_a, fn_b, inputs, dtype):
    torch.manual_seed(1)
    out_a, grads_a = _grads(fn_a, inputs)
    torch.manual_seed(1)
    out_b, grads_b = _grads(fn_b, inputs)
    assert_close(out_a, out_b, dtype)
    for ga, gb in zip(grads_a, grads_b):
        assert_close(ga, gb, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 768), (2, 1000)])
def test_layer_norm_matches_builtin(shape, dtype):
    c = shape[-1]
    inputs = (_leaf(*shape, dtype=dtype), _leaf(c, dtype=dtype), _leaf(c, dtype=dtype), 1e-5)
    _check_same(reference.layer_norm, torch_backend.layer_norm, inputs, dtype)


def test_layer_norm_without_bias_and_fp32_weights_on_bf16_input():
    x = _leaf(4, 48, dtype=torch.bfloat16)
    w = _leaf(48)
    for fn in (reference.layer_norm, torch_backend.layer_norm):
        assert fn(x, w, None).dtype == torch.bfloat16
    assert_close(reference.layer_norm(x, w, None), torch_backend.layer_norm(x, w, None))


def test_add_layer_norm_returns_sum_and_its_norm():
    x, r, w, b = _leaf(2, 3, 16), _leaf(2, 3, 16), _leaf(16), _leaf(16)
    summed, normed = reference.add_layer_norm(x, r, w, b)
    torch.testing.assert_close(summed, x + r)
    assert_close(normed, F.layer_norm(x + r, (16,), w, b))
    _check_same(lambda *a: reference.add_layer_norm(*a)[0] * 3 + reference.add_layer_norm(*a)[1],
                lambda *a: torch_backend.add_layer_norm(*a)[0] * 3 + torch_backend.add_layer_norm(*a)[1],
                (x, r, w, b), torch.float32)


def test_gelu_tanh_matches_builtin():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert not torch.allclose(reference.gelu_tanh(x), F.gelu(x))  # it is not the erf GELU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gelu_matches_builtin(dtype, bias):
    c, h = 24, 96
    inputs = (_leaf(2, 5, c, dtype=dtype), _leaf(h, c, dtype=dtype, scale=0.2),
              _leaf(h, dtype=dtype) if bias else None, _leaf(c, h, dtype=dtype, scale=0.1),
              _leaf(c, dtype=dtype) if bias else None)
    _check_same(reference.mlp_gelu, torch_backend.mlp_gelu, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t_q,t_k", [(1, 1), (7, 7), (65, 65), (1, 9), (4, 12)])
def test_causal_attention_matches_sdpa(t_q, t_k, dtype):
    q, k, v = _leaf(2, 3, t_q, 16, dtype=dtype), _leaf(2, 3, t_k, 16, dtype=dtype), \
        _leaf(2, 3, t_k, 16, dtype=dtype)
    _check_same(reference.causal_attention, torch_backend.causal_attention, (q, k, v, None, 0.0), dtype)


def test_causal_attention_is_causal_and_bottom_right_aligned():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    out = reference.causal_attention(q, k, v)
    v_changed = v.clone()
    v_changed[..., 4, :] += 1.0  # the last key: only the last query (aligned to key 4) sees it
    out_changed = reference.causal_attention(q, k, v_changed)
    torch.testing.assert_close(out[..., :2, :], out_changed[..., :2, :])
    assert not torch.allclose(out[..., 2, :], out_changed[..., 2, :])
    # the first query sees keys 0..2 exactly: softmax over three scores
    scores = (q[0, 0, 0] @ k[0, 0, :3].T) / math.sqrt(8)
    torch.testing.assert_close(out[0, 0, 0], torch.softmax(scores, -1) @ v[0, 0, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_builtin(reduction, dtype):
    logits = _leaf(4, 5, 1000, dtype=dtype, scale=3.0)
    targets = torch.randint(0, 1000, (4, 5))
    targets[0, :3] = -100
    _check_same(lambda *a: reference.cross_entropy(*a, -100, reduction),
                lambda *a: torch_backend.cross_entropy(*a, -100, reduction), (logits, targets), dtype)
    expected = F.cross_entropy(logits.float().reshape(-1, 1000), targets.reshape(-1),
                               reduction=reduction)
    got = reference.cross_entropy(logits, targets, -100, reduction)
    assert got.dtype == torch.float32
    assert_close(got, expected.view_as(got))


def test_cross_entropy_mean_of_all_ignored_is_nan_like_torch():
    logits, targets = torch.randn(3, 7), torch.full((3,), -100)
    assert torch.isnan(reference.cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))


def test_linear_cross_entropy_is_cross_entropy_of_the_linear():
    x, w, b = _leaf(6, 16), _leaf(50, 16), _leaf(50)
    targets = torch.randint(0, 50, (6,))
    targets[2] = -1
    _check_same(lambda *a: reference.linear_cross_entropy(*a, -1),
                lambda *a: torch_backend.linear_cross_entropy(*a, -1), (x, w, targets, b),
                torch.float32)


def test_reference_gradcheck_fp64():
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(3, 6, **d), torch.randn(6, **d), torch.randn(6, **d)
    assert torch.autograd.gradcheck(reference.layer_norm, (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: reference.add_layer_norm(*a), (x, torch.randn(3, 6, **d), w, b))
    assert torch.autograd.gradcheck(reference.mlp_gelu, (x, torch.randn(10, 6, **d), torch.randn(10, **d),
                                                         torch.randn(6, 10, **d), torch.randn(6, **d)))
    q, k, v = (torch.randn(1, 2, 5, 4, **d) for _ in range(3))
    assert torch.autograd.gradcheck(reference.causal_attention, (q, k, v))
    targets = torch.tensor([1, -100, 0, 4])
    logits = torch.randn(4, 5, **d)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda z: reference.cross_entropy(z, targets, -100, reduction),
                                        (logits,))
    assert torch.autograd.gradcheck(
        lambda a, wt, bb: reference.linear_cross_entropy(a, wt, targets, bb, -100),
        (torch.randn(4, 3, **d), torch.randn(5, 3, **d), torch.randn(5, **d)))
