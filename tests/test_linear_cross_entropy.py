"""Fused linear + cross-entropy, chunked: the one chunk loop every backend shares, with the
torch, Triton and (on a GPU) CUDA chunk steps. What the conformance suite cannot reach
from the public op: many chunks at a testable size, a retained graph, torch.compile,
opcheck, the chunk policy, and the memory bound against eager lm_head + F.cross_entropy."""
import pytest
import torch

import kernels
from bench.kernels.linear_cross_entropy_memory import (MAX_RATIO, chunked_torch_backend,
                                               eager_lm_head_cross_entropy, make_inputs,
                                               peak_bytes)
from kernels import chunked_linear_cross_entropy as chunked
from kernels.specs import SPECS, Inputs
from kernels.testing import assert_close, judge, reference_results, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ("mean", "sum", "none")
SPEC = SPECS["linear_cross_entropy"]
IMPLS = [b for b in kernels.BACKENDS if kernels.available_backends()[b].available]


def implementation(name):
    """The backend's function for the op (canonical arguments, no dispatch in between)."""
    return kernels.backends._module(name).OPS["linear_cross_entropy"]


def make(rows, channels, vocab, dtype, bias=True, ignored=(1,), ignore_index=-1):
    x = torch.randn(rows, channels, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, channels, device=DEVICE) / channels ** 0.5).to(dtype)
    b = (0.1 * torch.randn(vocab, device=DEVICE)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[[r for r in ignored if r < rows]] = ignore_index
    return x, weight, b, targets


def check(impl, x, weight, bias, targets, ignore_index, reduction, variant=(0.0, 0.0, None, False)):
    """The backend's loss and gradients against the fp64 reference, eager as the allowance
    (variant: label_smoothing, z_loss, softcap, return_z_loss)."""
    args = tuple(t if t is None or not t.is_floating_point() else t.detach().requires_grad_()
                 for t in (x, weight, targets, bias)) + (ignore_index, reduction)
    smoothing, z_loss, softcap, return_z_loss = variant
    canonical = args + (smoothing, z_loss, softcap or 0.0, return_z_loss)
    args += variant
    inputs = Inputs(args, (0, 1) if bias is None else (0, 1, 3))
    expected, upstream = reference_results(SPEC, inputs, torch.Generator().manual_seed(0))
    eager = run(SPEC.eager, inputs.args, inputs.grad_args, upstream)
    actual = run(implementation(impl), canonical, inputs.grad_args, upstream)
    assert actual.outputs[0].dtype == torch.float32
    for grad, arg in zip(actual.grads, inputs.differentiable()):
        assert grad.dtype == arg.dtype
    failed = [str(v) for v in judge(actual, expected, eager) if not v.passed]
    assert not failed, failed


@pytest.fixture
def many_chunks(monkeypatch):
    """Chunks of a few rows, as GPT-2's 8192 x 50257 logits get, at a testable size."""
    monkeypatch.setattr(chunked, "SINGLE_CHUNK_LOGITS", 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_in_many_chunks(impl, reduction, bias, dtype, many_chunks):
    x, weight, b, targets = make(13, 24, 200, dtype, bias, ignored=(1, 5, 6))
    assert chunked.chunk_rows(13, 200) == 2
    check(impl, x, weight, b, targets, -1, reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_variants_in_many_chunks(impl, reduction, dtype, many_chunks):
    """Label smoothing, z-loss (its value returned too) and soft-capping through the chunk
    step of each backend, in every reduction, with ignored rows."""
    x, weight, b, targets = make(13, 24, 200, dtype, True, ignored=(1, 5, 6))
    check(impl, x, weight, b, targets, -1, reduction, (0.2, 0.01, 1.5, True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tiny_vocabulary_in_one_chunk(impl, reduction):
    x, weight, b, targets = make(2 * 32, 32, 65, torch.float32, bias=False)
    assert chunked.chunk_rows(64, 65) == 64
    x, targets = x.view(2, 32, 32), targets.view(2, 32)
    check(impl, x, weight, b, targets, -1, reduction)


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_vocabulary(impl):
    x, weight, b, targets = make(3, 48, 50257, torch.float32, bias=False, ignore_index=-100)
    check(impl, x, weight, b, targets, -100, "mean")


@pytest.mark.parametrize("impl", IMPLS)
def test_every_target_ignored_gives_nan_mean_and_zero_gradients(impl, many_chunks):
    x, weight, b, targets = make(5, 16, 40, torch.float32, ignored=range(5))
    x, weight, b = (t.requires_grad_() for t in (x, weight, b))
    loss = implementation(impl)(x, weight, targets, b, -1, "mean")
    loss.backward()
    assert torch.isnan(loss)
    for t in (x, weight, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_can_repeat_with_retain_graph(impl):
    x, weight, b, targets = make(6, 16, 50, torch.float32)
    x.requires_grad_()
    loss = implementation(impl)(x, weight, targets, b, -1, "mean")
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    loss.backward(torch.tensor(2.0))
    assert torch.equal(x.grad, first)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile(impl, many_chunks):
    x, weight, b, targets = make(8, 16, 40, torch.float32)
    fn = implementation(impl)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, b)]
        loss = f(leaves[0], leaves[1], targets, leaves[2], -1, "mean")
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert_close(got, want)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
def test_opcheck(impl):
    """The loop's custom op (what torch.compile sees) against its fake implementation."""
    module = kernels.backends._module(impl).linear_cross_entropy
    x, weight, b, targets = make(6, 16, 40, torch.float32)
    for row_weight, compute_grad in ((torch.rand(6, device=DEVICE), True), (None, False)):
        for variant in ((0.0, 0.0, 0.0), (0.1, 1e-3, 5.0)):
            torch.library.opcheck(module.chunk_loop.op,
                                  (x, weight, targets, b, -1, row_weight, compute_grad, *variant))


def test_chunk_policy():
    assert chunked.chunk_rows(12 * 256, 65) == 12 * 256  # a char-level model: no loop
    assert chunked.chunk_rows(0, 50257) == 1
    # GPT-2: 13 chunks of at most MAX_CHUNK_LOGITS; a smaller batch still gets MIN_CHUNKS.
    assert chunked.chunk_rows(8192, 50257) == 631
    assert chunked.chunk_rows(8192, 50257) * 50257 <= chunked.MAX_CHUNK_LOGITS
    assert chunked.chunk_rows(1024, 50257) == 1024 // chunked.MIN_CHUNKS


def test_peak_memory_is_at_most_a_quarter_of_eager():
    """At V/C = 256 the eager path holds several (rows, V) fp32 tensors at once; the chunked
    one never more than one chunk's worth (bench/kernels/linear_cross_entropy_memory.py measures the
    same at GPT-2 size)."""
    x, weight, targets = make_inputs(2048, 64, 16384, torch.float32, torch.device(DEVICE))
    eager = peak_bytes(eager_lm_head_cross_entropy, x, weight, targets)
    chunked_peak = peak_bytes(chunked_torch_backend, x, weight, targets)
    logits_bytes = 2048 * 16384 * 4
    assert eager >= 2 * logits_bytes  # the measurement sees the logits and their softmax
    assert chunked_peak <= MAX_RATIO * eager, (chunked_peak, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_size_bf16_on_gpu(impl):
    x, weight, _, targets = make(8192, 768, 50257, torch.bfloat16, bias=False,
                                 ignored=range(0, 8192, 11))
    check(impl, x, weight, None, targets, -1, "mean")
