"""Fused linear + cross-entropy, chunked: the pure-PyTorch version (the `torch` backend) and
the Triton one, against `kernels.reference` (fp64 for fp32 inputs) for every reduction,
with and without bias, ignored targets, one chunk and many; plus torch.compile, opcheck and
the memory bound against eager lm_head + F.cross_entropy."""
import pytest
import torch

import kernels
from bench.linear_cross_entropy_memory import (MAX_RATIO, chunked_torch_backend,
                                               eager_lm_head_cross_entropy, make_inputs,
                                               peak_bytes)
from kernels import chunked_linear_cross_entropy as chunked
from kernels import reference
from tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ("mean", "sum", "none")
HAS_TRITON = kernels.available_backends()["triton"].available
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton backend unavailable"))]


def implementation(name):
    if name == "torch":
        return chunked.linear_cross_entropy
    from kernels.triton.linear_cross_entropy import linear_cross_entropy
    return linear_cross_entropy


def make(rows, channels, vocab, dtype, bias=True, ignored=(1,), ignore_index=-1):
    x = torch.randn(rows, channels, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, channels, device=DEVICE) / channels ** 0.5).to(dtype)
    b = (0.1 * torch.randn(vocab, device=DEVICE)).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[[r for r in ignored if r < rows]] = ignore_index
    return x, weight, b, targets


def bias_of(inputs):
    return inputs[2] if len(inputs) == 3 else None


def check(impl, x, weight, bias, targets, ignore_index, reduction, dtype, factor=1.0):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    loss = implementation(impl)(inputs[0], inputs[1], targets, bias_of(inputs),
                                ignore_index, reduction)
    assert loss.dtype == torch.float32 and loss.shape == targets.shape[:loss.dim()]
    upstream = torch.rand_like(loss) + 0.5
    got = torch.autograd.grad(loss, inputs, upstream)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    loss64 = reference.linear_cross_entropy(inputs64[0], inputs64[1], targets,
                                            bias_of(inputs64), ignore_index, reduction)
    want = torch.autograd.grad(loss64, inputs64, upstream.double())
    assert_close(loss, loss64, dtype, factor)
    for g, w, t in zip(got, want, inputs):
        assert g.dtype == t.dtype
        assert_close(g, w, dtype, factor)


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
    check(impl, x, weight, b, targets, -1, reduction, dtype, factor=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_tiny_vocabulary_in_one_chunk(impl, reduction):
    x, weight, b, targets = make(2 * 32, 32, 65, torch.float32, bias=False)
    assert chunked.chunk_rows(64, 65) == 64
    x, targets = x.view(2, 32, 32), targets.view(2, 32)
    check(impl, x, weight, b, targets, -1, reduction, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_gpt2_vocabulary(impl):
    x, weight, b, targets = make(3, 48, 50257, torch.float32, bias=False, ignore_index=-100)
    check(impl, x, weight, b, targets, -100, "mean", torch.float32)


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
def test_through_ops_api_as_the_model_calls_it(impl):
    x, weight, _, targets = make(2 * 5, 16, 70, torch.float32, bias=False)
    x, targets = x.view(2, 5, 16).requires_grad_(), targets.view(2, 5)
    weight.requires_grad_()
    loss = kernels.linear_cross_entropy(x, weight, targets, ignore_index=-1, backend=impl)
    loss.backward()
    x_ref, w_ref = x.detach().requires_grad_(), weight.detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy((x_ref @ w_ref.t()).view(-1, 70), targets.view(-1),
                                            ignore_index=-1)
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(x.grad, x_ref.grad, torch.float32)
    assert_close(weight.grad, w_ref.grad, torch.float32)


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
        assert_close(got, want, torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
def test_opcheck():
    import kernels.triton.linear_cross_entropy  # noqa: F401  (registers the op)
    x, weight, b, targets = make(6, 16, 40, torch.float32)
    for row_weight, compute_grad in ((torch.rand(6, device=DEVICE), True), (None, False)):
        torch.library.opcheck(torch.ops.gptk.triton_linear_cross_entropy,
                              (x, weight, targets, b, -1, row_weight, compute_grad))


def test_chunk_policy():
    assert chunked.chunk_rows(12 * 256, 65) == 12 * 256  # a char-level model: no loop
    assert chunked.chunk_rows(0, 50257) == 1
    # GPT-2: 13 chunks of at most MAX_CHUNK_LOGITS; a smaller batch still gets MIN_CHUNKS.
    assert chunked.chunk_rows(8192, 50257) == 631
    assert chunked.chunk_rows(8192, 50257) * 50257 <= chunked.MAX_CHUNK_LOGITS
    assert chunked.chunk_rows(1024, 50257) == 1024 // chunked.MIN_CHUNKS


def test_peak_memory_is_at_most_a_quarter_of_eager():
    """At V/C = 256 the eager path holds several (rows, V) fp32 tensors at once; the chunked
    one never more than one chunk's worth (bench/linear_cross_entropy_memory.py measures the
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
    inputs = [t.requires_grad_() for t in (x, weight)]
    loss = implementation(impl)(x, weight, targets, None, -1, "mean")
    got = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (x, weight)]
    ref = torch.nn.functional.cross_entropy((ref_inputs[0] @ ref_inputs[1].t()).float(), targets,
                                            ignore_index=-1)
    want = torch.autograd.grad(ref, ref_inputs)
    assert_close(loss, ref, torch.bfloat16)
    for g, w in zip(got, want):
        assert_close(g, w, torch.bfloat16, factor=2)
