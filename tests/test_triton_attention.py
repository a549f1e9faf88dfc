"""The Triton FlashAttention-2 kernels (kernels/triton/attention.py) against an fp64 reference.

Without a GPU these run under the Triton interpreter (tests/conftest.py), so shapes are
small but awkward: T not a multiple of any tile (1, 7, 33, 65, 130), head dims 32/64/128
plus a non-power-of-two one, fp32 / bf16 / fp16. The `gpu` tests repeat the checks at
training shapes with the autotuned tiles and measure memory with the CUDA allocator.
"""
import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from kernels import reference
from kernels.triton import attention
from kernels.triton.attention import attention_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances against the fp64 reference: fp32 runs exact IEEE products, so only summation
# order differs; 16-bit inputs round P and dS to 16 bits before their matmuls.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def reference_attention(q, k, v, scale):
    """Causal attention and its log-sum-exp, written out in fp64."""
    t = q.shape[-2]
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    visible = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


def random_qkv(b, h, t, d, dtype):
    return [torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, requires_grad=True)
            for _ in range(3)]


def check_against_reference(q, k, v, scale=None):
    """Output, LSE and the gradients of q, k, v (through both o and lse) vs fp64."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    o, lse = attention_forward(q, k, v, scale)
    grad_o, grad_lse = torch.randn_like(o), torch.randn_like(lse)
    torch.autograd.backward([o, lse], [grad_o, grad_lse])

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o, ref_lse = reference_attention(*ref_inputs, scale)
    torch.autograd.backward([ref_o, ref_lse], [grad_o.double(), grad_lse.double()])

    tol = TOLERANCE[q.dtype]
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    for name, t, ref in zip("qkv", (q, k, v), ref_inputs):
        # Gradients sum over up to T terms: compare relative to their own magnitude.
        scaled_tol = tol * max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(t.grad.double(), ref.grad, atol=scaled_tol, rtol=tol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


# A covering set rather than the full product: every T (including 1 and non-multiples of
# both 16 and 32), every head dim, every dtype, without the slow large ones together.
@pytest.mark.parametrize("b, h, t, d, dtype", [
    (1, 2, 1, 32, torch.float32),
    (2, 1, 7, 64, torch.float32),
    (1, 1, 65, 128, torch.float32),
    (1, 2, 130, 32, torch.float32),
    (1, 1, 33, 20, torch.float32),    # head dim padded to 32 inside the kernels
    (1, 1, 130, 64, torch.bfloat16),
    (2, 1, 65, 32, torch.bfloat16),
    (1, 1, 7, 128, torch.bfloat16),
    (1, 1, 65, 64, torch.float16),
])
def test_matches_fp64_reference(b, h, t, d, dtype):
    check_against_reference(*random_qkv(b, h, t, d, dtype))


def test_custom_scale():
    check_against_reference(*random_qkv(1, 1, 33, 32, torch.float32), scale=0.3)


def test_reads_strided_qkv_views_in_place():
    """The model's layout: q, k, v are permuted views of one (B, T, 3, H, D) projection."""
    b, t, h, d = 2, 37, 2, 32
    qkv = torch.randn(b, t, 3, h, d, device=DEVICE, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o, lse = attention_forward(q, k, v)
    grad_o = torch.randn_like(o)
    o.backward(grad_o)

    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    dense_o, dense_lse = attention_forward(*dense)
    dense_o.backward(grad_o)
    # Same values, same tiles, same order of operations: bitwise the same results.
    assert torch.equal(o, dense_o) and torch.equal(lse, dense_lse)
    for i, x in enumerate(dense):  # qkv.grad[:, :, i] is (B, T, H, D); x.grad is (B, H, T, D)
        assert torch.equal(qkv.grad[:, :, i].transpose(1, 2), x.grad)


def test_non_unit_head_dim_stride_is_copied():
    q, k, v = (x.detach() for x in random_qkv(1, 2, 17, 32, torch.float32))
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) == T
    assert q_t.stride(-1) != 1
    assert torch.equal(attention_forward(q_t, k, v)[0], attention_forward(q, k, v)[0])


def test_output_is_laid_out_for_the_models_merge_of_heads():
    """o is (B, H, T, D) stored as (B, T, H, D): the model's transpose(1, 2).reshape(B, T, C)
    is then a view, not a copy."""
    q, k, v = (x.detach() for x in random_qkv(2, 3, 9, 32, torch.float32))
    o = attention.causal_attention(q, k, v)
    assert o.shape == (2, 3, 9, 32) and o.transpose(1, 2).is_contiguous()


def test_dispatch_through_kernels_ops():
    q, k, v = random_qkv(1, 2, 19, 32, torch.float32)
    o = kernels.causal_attention(q, k, v, backend="triton")
    expected = kernels.causal_attention(q, k, v, backend="torch")
    torch.testing.assert_close(o, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda q: attention.causal_attention(q, q, q, None, 0.1), ValueError, "dropout"),
    (lambda q: attention.causal_attention(q[:, :, :4], q, q, None, 0.0), ValueError, "keys"),
    (lambda q: attention_forward(q.double(), q.double(), q.double()), TypeError, "float64"),
    (lambda q: attention_forward(q, q.half(), q), TypeError, "share a dtype"),
    (lambda q: attention_forward(q, q[:, :, :4], q), ValueError, "shape"),
    (lambda q: attention_forward(*(torch.zeros(1, 1, 4, 256),) * 3), ValueError, "head dims"),
    (lambda q: attention_forward(q, q, q, float("nan")), ValueError, "finite"),
])
def test_bad_input_is_named(call, error, match):
    q = torch.zeros(1, 1, 8, 32, device=DEVICE)
    with pytest.raises(error, match=match):
        call(q)


def test_opcheck_fwd_and_bwd_ops():
    """Schema, fake (meta) impls, autograd registration and AOT dispatch of the custom ops."""
    q, k, v = random_qkv(1, 2, 5, 16, torch.float32)
    torch.library.opcheck(torch.ops.gptk.triton_attention_fwd.default, (q, k, v, 0.25))
    o, lse = attention_forward(*(x.detach() for x in (q, k, v)), 0.25)
    grads = (torch.randn_like(o), torch.randn_like(lse))
    torch.library.opcheck(torch.ops.gptk.triton_attention_bwd.default,
                          (grads[0], q.detach(), k.detach(), v.detach(), o, lse, grads[1], 0.25))


def test_torch_compile_traces_the_custom_ops():
    q, k, v = random_qkv(1, 2, 11, 16, torch.float32)
    compiled = torch.compile(lambda q, k, v: attention.causal_attention(q, k, v).square().sum(),
                             backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    reference_attention(*ref, 16 ** -0.5)[0].square().sum().backward()
    for x, r in zip((q, k, v), ref):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- memory

def peak_cpu_bytes_of(step) -> int:
    """Peak bytes live at once during `step`, above what was live before it, from every
    CPU allocation and free the profiler records (saved tensors, outputs, workspaces)."""
    gc.collect()  # or an earlier step's autograd graph may be freed inside this window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def forward_backward_peak(attention_fn, t, d=16):
    q, k, v = (torch.randn(1, 1, t, d, requires_grad=True) for _ in range(3))
    grad_o = torch.randn(1, 1, t, d)
    return peak_cpu_bytes_of(lambda: attention_fn(q, k, v).backward(grad_o))


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU allocator measurement; see the gpu test")
def test_memory_grows_linearly_in_sequence_length():
    """4x the tokens must cost ~4x the memory (no T x T buffer). The reference, which does
    materialize the scores, shows the same measurement can see quadratic growth."""
    fused, materialized = attention.causal_attention, reference.causal_attention
    fused_growth = forward_backward_peak(fused, 128) / forward_backward_peak(fused, 32)
    reference_growth = (forward_backward_peak(materialized, 128)
                        / forward_backward_peak(materialized, 32))
    assert fused_growth < 5.0, f"fused attention memory grew {fused_growth:.1f}x for 4x T"
    assert reference_growth > 8.0, f"the reference grew only {reference_growth:.1f}x"


# ----------------------------------------------------------------------------- AOT specs

def test_aot_specs_cover_every_kernel_tile_dtype_and_head_dim():
    names = {spec.name for spec in attention.AOT_SPECS}
    assert len(names) == len(attention.AOT_SPECS)
    for type_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for d in attention.AOT_HEAD_DIMS:
            group = attention._tile_group(dtype, attention._block_d(d))
            for kernel, tiles in attention.AUTOTUNE_TILES.items():
                for bm, bn, warps, stages in tiles[group]:
                    assert (f"attention_{kernel}[{type_name},D={d},BLOCK_M={bm},BLOCK_N={bn},"
                            f"warps={warps},stages={stages}]") in names
            assert any(n.startswith(f"attention_bwd_preprocess[{type_name},D={d},") for n in names)
    for spec in attention.AOT_SPECS:  # the softmax statistics stay fp32 for bf16 operands
        assert all(spec.signature[p] == "*fp32" for p in ("LSE", "DELTA", "DLSE")
                   if p in spec.signature), spec.name


def test_tiles_respect_the_causal_split():
    """Forward and dQ walk key blocks that must tile a query block (BLOCK_N | BLOCK_M);
    dK/dV walks query blocks that must tile a key block (BLOCK_M | BLOCK_N)."""
    tiles = {kernel: [tile[:2] for group in groups.values() for tile in group]
             for kernel, groups in attention.AUTOTUNE_TILES.items()}
    for kernel in tiles:
        tiles[kernel].append(attention.INTERPRETER_TILES[kernel])
    for bm, bn in tiles["fwd"] + tiles["dq"]:
        assert bm % bn == 0, (bm, bn)
    for bm, bn in tiles["dkdv"]:
        assert bn % bm == 0, (bm, bn)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("t, d", [(1024, 64), (777, 128), (2048, 32)])
def test_gpu_autotuned_matches_reference(t, d):
    check_against_reference(*random_qkv(2, 4, t, d, torch.bfloat16))


@pytest.mark.gpu
def test_gpu_memory_grows_linearly_in_sequence_length():
    def peak(t):
        q, k, v = random_qkv(1, 12, t, 64, torch.bfloat16)
        grad_o = torch.randn_like(q)
        attention.causal_attention(q, k, v).backward(grad_o)  # autotune outside the window
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        attention.causal_attention(q, k, v).backward(grad_o)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    growth = peak(8192) / peak(2048)
    assert growth < 5.0, f"fused attention memory grew {growth:.1f}x for 4x T"
