"""Triton cross-entropy: loss and gradient against `kernels.reference` (fp64 for fp32
logits) for every reduction, ignore_index rows, vocabularies of 1, 65, 1000 and 50257,
under the interpreter on the CPU. Big shapes run only on a GPU."""
import inspect

import pytest
import torch

import kernels
from kernels import reference
from kernels.triton import cross_entropy as tce
from tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")
REDUCTIONS = ("mean", "sum", "none")


def make(rows, vocab, dtype, ignore_index=-100, ignored=(1,)):
    logits = (3 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    for row in ignored:
        if row < rows:
            targets[row] = ignore_index
    return logits, targets


def check(logits, targets, ignore_index, reduction, dtype, view=lambda t: t):
    """cross_entropy(view(logits)) and its gradient against the fp64 reference."""
    leaf = logits.detach().clone().requires_grad_()
    loss = tce.cross_entropy(view(leaf), targets, ignore_index, reduction)
    assert loss.dtype == torch.float32
    upstream = torch.rand_like(loss) + 0.5
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    leaf64 = logits.detach().double().requires_grad_()
    loss64 = reference.cross_entropy(view(leaf64), targets, ignore_index, reduction)
    (grad64,) = torch.autograd.grad(loss64, leaf64, upstream.double())
    assert loss.shape == loss64.shape
    assert_close(loss, loss64, dtype)
    assert_close(grad, grad64, dtype)
    assert grad.dtype == logits.dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (4, 65), (3, 1000), (2, 50257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(rows, vocab, dtype, reduction):
    logits, targets = make(rows, vocab, dtype)
    check(logits, targets, -100, reduction, dtype)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_dims_int32_targets_and_custom_ignore_index(reduction):
    logits, targets = make(6, 70, torch.float32, ignore_index=-1, ignored=(1, 4))
    targets = targets.view(2, 3).to(torch.int32)
    check(logits, targets, -1, reduction, torch.float32, view=lambda t: t.view(2, 3, 70))


def test_strided_logits():
    logits, _ = make(5, 2 * 130, torch.float32)
    _, targets = make(5, 130, torch.float32)
    check(logits, targets, -100, "mean", torch.float32, view=lambda t: t[:, :130])
    check(logits, targets, -100, "mean", torch.float32, view=lambda t: t[:, ::2])


def test_every_target_ignored_gives_nan_mean_and_zero_gradient():
    logits, targets = make(3, 50, torch.float32, ignored=(0, 1, 2))
    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy(leaf, targets, -100, "mean")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_logits_are_never_modified_and_backward_can_repeat():
    """The gradient goes to its own buffer and the backward scales into a new tensor, so
    the logits and the saved gradient survive a retain_graph second backward."""
    logits, targets = make(4, 300, torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy(leaf, targets, -100, "sum")
    loss.backward(torch.tensor(3.0), retain_graph=True)
    first = leaf.grad.clone()
    leaf.grad = None
    loss.backward(torch.tensor(3.0))
    assert torch.equal(leaf.grad, first)
    assert torch.equal(leaf.detach(), logits)


def test_no_gradient_buffer_without_grad():
    logits, targets = make(4, 100, torch.float32)
    losses, grad = tce.cross_entropy_fwd(logits, targets, -100, False)
    assert grad.shape == (0, 100)
    with torch.no_grad():
        loss = tce.cross_entropy(logits.requires_grad_(), targets, -100, "none")
    assert_close(loss, reference.cross_entropy(logits.double(), targets, -100, "none"),
                 torch.float32)


def test_through_ops_api_matches_torch_backend():
    logits, targets = make(2 * 7, 97, torch.float32)
    logits, targets = logits.view(2, 7, 97), targets.view(2, 7)
    results = {}
    for backend in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        loss = kernels.cross_entropy(leaf, targets, backend=backend)
        loss.backward()
        results[backend] = (loss, leaf.grad)
    for got, want in zip(results["triton"], results["torch"]):
        assert_close(got, want, torch.float32)


def test_opcheck():
    logits, targets = make(5, 70, torch.float32)
    torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_fwd,
                          (logits.requires_grad_(), targets, -100, True))
    torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_bwd,
                          (torch.randn(5, 70, device=DEVICE), torch.rand(5, device=DEVICE),
                           targets, -100))


def test_aot_specs_describe_every_kernel_parameter():
    assert {spec.fn for spec in tce.AOT_SPECS} == {tce._cross_entropy_fwd_kernel,
                                                   tce._scale_rows_kernel}
    for spec in tce.AOT_SPECS:
        params = inspect.signature(spec.fn.fn).parameters
        assert list(spec.signature) == list(params), spec.name
        constexprs = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
        assert sorted(spec.constexprs) == sorted(constexprs), spec.name
    assert tce.block_v(50257) == tce.MAX_BLOCK_V  # the GPT-2 vocabulary's config is the spec's


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpt2_size_bf16_on_gpu(reduction):
    logits, targets = make(8192, 50257, torch.bfloat16, ignored=range(0, 8192, 13))
    check(logits, targets, -100, reduction, torch.bfloat16)
