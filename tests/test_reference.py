"""The spec itself: `kernels.reference` against PyTorch's independent built-ins in fp64 (so
any difference is a difference of math, not of rounding), fp64 gradcheck of every
reference op, and the op's documented edge semantics. Every backend is then judged
against the reference by the conformance suite (test_conformance.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import philox, reference, torch_backend
from kernels.testing import assert_close

FP64 = dict(dtype=torch.float64, requires_grad=True)


def _outputs_and_grads(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    upstream = [torch.randn_like(o) for o in outs]
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(outs, tensors, upstream)


def _check_same(reference_fn, builtin_fn, inputs):
    """The reference and the built-in agree to fp64 rounding, outputs and gradients."""
    ref_outs, ref_grads = _outputs_and_grads(reference_fn, inputs)
    outs, grads = _outputs_and_grads(builtin_fn, inputs)
    for got, want in zip(outs + grads, ref_outs + ref_grads):
        assert_close(got, want)


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 768), (2, 1000)])
def test_layer_norm_matches_builtin(shape):
    c = shape[-1]
    inputs = (torch.randn(*shape, **FP64), torch.randn(c, **FP64), torch.randn(c, **FP64), 1e-5)
    _check_same(reference.layer_norm, torch_backend.layer_norm, inputs)


def test_layer_norm_keeps_the_activations_dtype_with_fp32_weights():
    x = torch.randn(4, 48).to(torch.bfloat16)
    for fn in (reference.layer_norm, torch_backend.layer_norm):
        assert fn(x, torch.ones(48), None, 1e-5).dtype == torch.bfloat16


def test_add_layer_norm_returns_sum_and_its_norm():
    x, r, w, b = (torch.randn(*s, **FP64) for s in ((2, 3, 16), (2, 3, 16), (16,), (16,)))
    summed, normed = reference.add_layer_norm(x, r, w, b)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed, F.layer_norm(x + r, (16,), w, b))
    _check_same(reference.add_layer_norm, lambda *a: torch_backend.add_layer_norm(*a, 1e-5),
                (x, r, w, b))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_flavours_match_builtin(approximate):
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu(x, approximate), F.gelu(x, approximate=approximate))
    other = "none" if approximate == "tanh" else "tanh"
    gap = (reference.gelu(x, approximate) - F.gelu(x, approximate=other)).abs().max()
    assert gap > 1e-4  # the flavours differ by far more than fp32 rounding


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gelu_matches_builtin(bias, approximate):
    c, h = 24, 96
    inputs = (torch.randn(2, 5, c, **FP64), torch.randn(h, c, **FP64),
              torch.randn(h, **FP64) if bias else None, torch.randn(c, h, **FP64),
              torch.randn(c, **FP64) if bias else None, approximate)
    _check_same(reference.mlp_gelu, torch_backend.mlp_gelu, inputs)


@pytest.mark.parametrize("t_q,t_k", [(1, 1), (7, 7), (65, 65), (1, 9), (4, 12)])
def test_causal_attention_matches_sdpa(t_q, t_k):
    q, k, v = (torch.randn(2, 3, t, 16, **FP64) for t in (t_q, t_k, t_k))
    _check_same(reference.causal_attention,
                lambda *a: torch_backend.causal_attention(*a, 0.25, 0.0), (q, k, v))


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


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_builtin(reduction, index_dtype):
    logits = (3 * torch.randn(4, 5, 1000, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 1000, (4, 5))
    targets[0, :3] = -100
    _check_same(lambda z: reference.cross_entropy(z, targets.to(index_dtype), -100, reduction),
                lambda z: torch_backend.cross_entropy(z, targets.to(index_dtype), -100, reduction),
                (logits,))
    assert reference.cross_entropy(logits.float(), targets, -100, reduction).dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_variants_match_their_definitions(reduction):
    """Label smoothing against F.cross_entropy's own, the soft cap as cap * tanh(x / cap)
    first, the z-loss as coef * logsumexp^2 per kept row, its value returned detached."""
    logits = (3 * torch.randn(6, 50, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (6,))
    targets[[1, 4]] = -100
    loss, z_value = reference.cross_entropy(logits, targets, -100, reduction, 0.2, 1e-2, 4.0,
                                            True)
    capped = 4.0 * torch.tanh(logits / 4.0)
    kept = (targets != -100).double()
    z_terms = 1e-2 * torch.logsumexp(capped, -1).square() * kept
    expected_z = {"none": z_terms, "sum": z_terms.sum(), "mean": z_terms.sum() / kept.sum()}
    expected = F.cross_entropy(capped, targets, ignore_index=-100, reduction=reduction,
                               label_smoothing=0.2) + expected_z[reduction]
    assert_close(loss, expected)
    assert_close(z_value, expected_z[reduction])
    assert not z_value.requires_grad and loss.requires_grad
    plain = reference.cross_entropy(logits, targets, -100, reduction)
    assert_close(reference.cross_entropy(logits, targets, -100, reduction, 0.0, 0.0, None),
                 plain)


def test_attention_dropout_applies_the_seeds_mask():
    q = torch.randn(2, 3, 5, 8, **FP64)
    k, v = torch.randn(2, 3, 9, 8, **FP64), torch.randn(2, 3, 9, 8, **FP64)
    seed = (77, 3)
    out = reference.causal_attention(q, k, v, None, 0.25, seed)
    scores = (q @ k.transpose(-2, -1)) * 8 ** -0.5
    scores = scores.masked_fill(~reference.causal_mask(5, 9, "cpu"), float("-inf"))
    keep = philox.keep_mask(seed, 0.25, 2, 3, 5, 9)
    assert_close(out, (torch.softmax(scores, -1) * keep / 0.75) @ v)
    assert not torch.equal(out, reference.causal_attention(q, k, v, None, 0.25, (77, 4)))


def test_cross_entropy_mean_of_all_ignored_is_nan_like_torch():
    logits, targets = torch.randn(3, 7), torch.full((3,), -100)
    assert torch.isnan(reference.cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))


def test_linear_cross_entropy_is_cross_entropy_of_the_linear():
    x, w, b = torch.randn(6, 16, **FP64), torch.randn(50, 16, **FP64), torch.randn(50, **FP64)
    targets = torch.randint(0, 50, (6,))
    targets[2] = -1
    _check_same(lambda *a: reference.linear_cross_entropy(a[0], a[1], targets, a[2], -1),
                lambda *a: torch_backend.linear_cross_entropy(a[0], a[1], targets, a[2], -1,
                                                              "mean"),
                (x, w, b))


def test_reference_gradcheck_fp64():
    x, w, b = torch.randn(3, 6, **FP64), torch.randn(6, **FP64), torch.randn(6, **FP64)
    assert torch.autograd.gradcheck(reference.layer_norm, (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: reference.add_layer_norm(*a),
                                    (x, torch.randn(3, 6, **FP64), w, b))
    for approximate in ("tanh", "none"):
        assert torch.autograd.gradcheck(
            lambda *a: reference.mlp_gelu(*a, approximate),
            (x, torch.randn(10, 6, **FP64), torch.randn(10, **FP64), torch.randn(6, 10, **FP64),
             torch.randn(6, **FP64)))
    q, k, v = (torch.randn(1, 2, 5, 4, **FP64) for _ in range(3))
    assert torch.autograd.gradcheck(reference.causal_attention, (q, k, v))
    targets = torch.tensor([1, -100, 0, 4])
    logits = torch.randn(4, 5, **FP64)
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z: reference.cross_entropy(z, targets, -100, reduction), (logits,))
    assert torch.autograd.gradcheck(
        lambda a, wt, bb: reference.linear_cross_entropy(a, wt, targets, bb, -100),
        (torch.randn(4, 3, **FP64), torch.randn(5, 3, **FP64), torch.randn(5, **FP64)))
    for reduction in ("mean", "none"):  # every loss variant at once
        assert torch.autograd.gradcheck(
            lambda z: reference.cross_entropy(z, targets, -100, reduction, 0.1, 0.05, 2.0),
            (logits,))
    assert torch.autograd.gradcheck(  # attention with a dropout mask and a KV cache
        lambda *a: reference.causal_attention(*a, None, 0.3, (5, 6)),
        (q[:, :, :3], k, v))
