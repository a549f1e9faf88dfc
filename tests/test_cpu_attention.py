"""The torch backend's CPU attention in bf16: batched matmuls for short sequences
(`kernels.cpu.attention`), SDPA for longer ones; and attention dropout, which the
conformance suite (deterministic ops only) does not cover. (fp16 calls with a backward
take SDPA in fp32: the conformance suite's fp16 cases run that path.)"""
import pytest
import torch

import kernels
from kernels.cpu import attention as cpu_attention
from kernels.cpu.dropout import keep_mask
from kernels.reference import causal_mask
from kernels.specs import SPECS
from kernels.testing import assert_close, run_case

ATTENTION = SPECS["causal_attention"]
CPU = torch.device("cpu")
CASES = [c.name for c in ATTENTION.cases if c.raises is None]


def _spy(monkeypatch) -> list:
    """Record the calls that reach the batched-matmul path."""
    calls, real = [], cpu_attention.causal_attention
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    return calls


@pytest.mark.parametrize("max_seq", [cpu_attention.MAX_SEQ, 0], ids=["batched", "sdpa"])
@pytest.mark.parametrize("case_name", CASES)
def test_both_cpu_paths_pass_every_case_in_bf16(case_name, max_seq, monkeypatch):
    """MAX_SEQ = 0 sends every call to SDPA."""
    monkeypatch.setattr(cpu_attention, "MAX_SEQ", max_seq)
    calls = _spy(monkeypatch)
    case = ATTENTION.case(case_name)
    failed = [str(v) for v in run_case(ATTENTION, case, "torch", torch.bfloat16, CPU)
              if not v.passed]
    assert not failed, "; ".join(failed)
    q, k, _, _, dropout_p, dropout_seed = case.build(torch.bfloat16, CPU,
                                                     torch.Generator().manual_seed(0)).args
    # A dropout_seed's mask is every backend's: the torch backend materializes it instead.
    seeded = dropout_p > 0 and dropout_seed is not None
    batched = max_seq > 0 and q.numel() > 0 and q.shape[-2] == k.shape[-2] and not seeded
    assert bool(calls) == batched, calls


def test_which_calls_take_the_batched_path():
    def qk(t_q, t_k, dtype=torch.bfloat16, device="cpu"):
        return torch.empty(1, 1, t_q, 8, dtype=dtype, device=device), \
               torch.empty(1, 1, t_k, 8, dtype=dtype, device=device)
    assert cpu_attention.applies(*qk(64, 64))
    assert cpu_attention.applies(*qk(cpu_attention.MAX_SEQ, cpu_attention.MAX_SEQ))
    assert not cpu_attention.applies(*qk(cpu_attention.MAX_SEQ + 1, cpu_attention.MAX_SEQ + 1))
    assert not cpu_attention.applies(*qk(5, 19))                      # KV cache
    assert not cpu_attention.applies(*qk(64, 64, torch.float32))      # SDPA is faster there
    assert not cpu_attention.applies(*qk(64, 64, device="meta"))


def _attention_with_mask(q, k, v, scale, keep, p, dtype):
    """Attention in `dtype` (fp64: the reference; bf16: eager's error), its probabilities
    dropped where `keep` is False; returns the output and the leaves it was computed from."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    probs = torch.softmax(scores.masked_fill(~causal_mask(t, t, q.device), float("-inf")), -1)
    out = (probs * keep.view(probs.shape) / (1 - p)) @ v
    return out, (q, k, v)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_the_same_probabilities_forward_and_backward(p):
    """The output and all three gradients match fp64 attention with the mask the kernel
    drew (redrawn from the same seed), within 3x the error of eager bf16 with that mask."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 19, 3, 3, 16, generator=gen).to(torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    upstream = torch.randn(2, 3, 19, 16, generator=gen)
    scale = 16 ** -0.5

    torch.manual_seed(7)
    out = kernels.causal_attention(q, k, v, dropout_p=p, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    torch.manual_seed(7)
    keep = keep_mask((6, 19, 19), p)
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=0.05)

    results = {}
    for dtype in (torch.float64, torch.bfloat16):
        result, leaves = _attention_with_mask(q, k, v, scale, keep, p, dtype)
        results[dtype] = [result, *torch.autograd.grad(result, leaves, upstream.to(dtype))]
    for name, got, want, eager in zip(("out", "dq", "dk", "dv"), [out, *grads],
                                      results[torch.float64], results[torch.bfloat16]):
        assert_close(got, want, eager=eager, name=name)


def test_dropout_is_reproducible_and_drawn_anew_each_call():
    q = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    torch.manual_seed(3)
    first = kernels.causal_attention(q, q, q, dropout_p=0.2, backend="torch")
    second = kernels.causal_attention(q, q, q, dropout_p=0.2, backend="torch")
    torch.manual_seed(3)
    again = kernels.causal_attention(q, q, q, dropout_p=0.2, backend="torch")
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_keep_mask_keeps_one_minus_p():
    torch.manual_seed(0)
    for p in (0.0, 0.1, 0.5, 0.9):
        kept = keep_mask((1000, 1000), p).double().mean().item()
        assert kept == pytest.approx(1 - p, abs=2e-3), p
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((4,), 1.0)


def test_compiled_calls_leave_the_batched_path_to_the_compiler():
    """Under torch.compile the call goes to SDPA, which the compiler lowers itself: the
    batched path's dropout masks come from numpy, which cannot be traced."""
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    def attention(q, k, v):
        return kernels.causal_attention(q, k, v, dropout_p=0.1, backend="torch")
    attention(q, k, v)  # eager first, as a model's first step: the backend module loads
    out = torch.compile(attention, fullgraph=True, backend="aot_eager")(q, k, v)
    out.float().sum().backward()
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
