"""The Triton fused MLP (kernels/triton/mlp.py, kernels/triton/matmul.py) against the
reference: forward and all five gradients, fp32 and bf16, awkward shapes, no biases,
strided inputs, the GELU epilogues at extreme values, the custom ops (opcheck and
torch.compile) and the AOT specs. On the CPU the kernels run under the Triton interpreter
with 32x32x32 tiles, so the widths below leave partial tiles on every edge."""
import pytest
import torch

import kernels
from kernels import reference
from kernels.triton import matmul, mlp
from tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ("x", "w_fc", "b_fc", "w_proj", "b_proj")


def make_inputs(lead, channels, hidden, dtype, bias=True):
    """x [*lead, C] and nn.Linear-scaled weights (outputs of order 1, as in a GPT)."""
    x = torch.randn(*lead, channels, device=DEVICE)
    w_fc = torch.randn(hidden, channels, device=DEVICE) * channels ** -0.5
    w_proj = torch.randn(channels, hidden, device=DEVICE) * hidden ** -0.5
    b_fc = torch.randn(hidden, device=DEVICE) if bias else None
    b_proj = torch.randn(channels, device=DEVICE) if bias else None
    return [None if t is None else t.to(dtype) for t in (x, w_fc, b_fc, w_proj, b_proj)]


def run_with_grads(fn, inputs, dy, requires_grad=(True,) * 5):
    """fn(*inputs) and the gradient of <fn(...), dy> for every input flagged in
    requires_grad (None for the others)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(rg)
              for t, rg in zip(inputs, requires_grad)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def reference_fp64(inputs, dy, requires_grad=(True,) * 5):
    """The spec evaluated in fp64 on the same (possibly bf16-rounded) inputs."""
    return run_with_grads(reference.mlp_gelu, [None if t is None else t.double() for t in inputs],
                          dy.double(), requires_grad)


def triton_mlp(*inputs):
    return kernels.mlp_gelu(*inputs, backend="triton")


def assert_matches_reference(inputs, dtype, requires_grad=(True,) * 5, factor=1.0):
    dy = torch.randn(*inputs[0].shape, device=DEVICE).to(dtype)
    y, grads = run_with_grads(triton_mlp, inputs, dy, requires_grad)
    y_ref, grads_ref = reference_fp64(inputs, dy, requires_grad)
    assert y.dtype == dtype and y.shape == inputs[0].shape
    assert_close(y, y_ref, dtype, factor)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert grad.dtype == dtype, name
            assert_close(grad, grad_ref, dtype, factor)


# ----------------------------------------------------------------------------- the op

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,channels,hidden", [
    ((1,), 16, 64),      # a single row
    ((7,), 20, 72),      # no dimension a multiple of the tile
    ((3, 11), 48, 192),  # M = 33: one row past a tile; GPT-2's 4C hidden width
])
def test_forward_and_grads_match_reference(lead, channels, hidden, dtype):
    assert_matches_reference(make_inputs(lead, channels, hidden, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_biases(dtype):
    inputs = make_inputs((2, 9), 24, 96, dtype, bias=False)
    assert_matches_reference(inputs, dtype, requires_grad=(True, True, False, True, False))


@pytest.mark.parametrize("requires_grad", [
    (True, False, False, False, False),  # frozen MLP: only dx (dH is still needed)
    (False, True, True, True, True),     # a first layer: weight gradients only
    (False, False, False, True, True),   # only c_proj trains: no dGELU kernel at all
])
def test_gradients_of_a_subset_of_inputs(requires_grad):
    inputs = make_inputs((5,), 20, 80, torch.float32)
    assert_matches_reference(inputs, torch.float32, requires_grad)


@pytest.mark.parametrize("channels,hidden", [
    (768, 3072),  # GPT-2 small's MLP: 96 tiles along N, 24 steps along K
    (1000, 200),  # a K loop ending in a tail of 8, a partial N tile
    (1600, 72),   # GPT-2 XL's width: a 50-step K loop (its 4C hidden is left to the GPU test)
])
def test_gpt2_widths_on_a_few_rows(channels, hidden):
    assert_matches_reference(make_inputs((2,), channels, hidden, torch.float32), torch.float32)


def test_strided_input_is_read_in_place():
    """x as a column slice of a wider tensor (row stride 2C): the kernel takes the strides
    as they are."""
    wide, w_fc, b_fc, w_proj, b_proj = make_inputs((6,), 40, 64, torch.float32)
    x = wide[:, :20]
    w_fc, w_proj = w_fc[:, :20].contiguous(), w_proj[:20].contiguous()
    assert not x.is_contiguous() and x.reshape(-1, 20).data_ptr() == x.data_ptr()
    assert_matches_reference([x, w_fc, b_fc, w_proj, b_proj[:20]], torch.float32)


def test_empty_batch():
    inputs = make_inputs((0,), 16, 64, torch.float32)
    assert_matches_reference(inputs, torch.float32)


def test_no_grad_forward():
    inputs = make_inputs((4,), 16, 64, torch.bfloat16)
    with torch.no_grad():
        y = triton_mlp(*inputs)
    assert not y.requires_grad
    assert_close(y, reference.mlp_gelu(*[t.double() for t in inputs]), torch.bfloat16)


def test_mixed_dtypes_are_rejected():
    x, w_fc, b_fc, w_proj, b_proj = make_inputs((3,), 16, 64, torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        mlp.mlp_gelu(x, w_fc, b_fc.bfloat16(), w_proj, b_proj)
    with pytest.raises(TypeError, match="one dtype"):
        mlp.mlp_gelu(*[t.double() for t in (x, w_fc, b_fc, w_proj, b_proj)])


# ----------------------------------------------------------------------------- the epilogues

def test_gelu_epilogues_over_the_whole_range():
    """With a = diag(h) and b = I the forward kernel's pre-activation is exactly h, and with
    a = I and b = ones the backward kernel's incoming gradient is exactly 1: both epilogues
    are then checked element by element against autograd through the reference GELU,
    from saturated negative values (where exp overflows without the cap) to large positive."""
    h = torch.cat([torch.linspace(-12.0, 12.0, 44), torch.tensor([0.0, -1e4, 1e4, -60.0])])
    h = h.to(DEVICE)
    n = h.numel()
    eye = torch.eye(n, device=DEVICE)
    preact, act = matmul.matmul_bias_gelu(torch.diag(h), eye, None)
    h_ref = h.double().requires_grad_()
    act_ref = reference.gelu_tanh(h_ref)
    (grad_ref,) = torch.autograd.grad(act_ref.sum(), h_ref)
    torch.testing.assert_close(preact.diagonal(), h)
    torch.testing.assert_close(act.diagonal().double(), act_ref.detach(), rtol=1e-6, atol=1e-6)
    dpreact = matmul.matmul_dgelu(eye, torch.ones(n, n, device=DEVICE), preact.diagonal().expand(n, n))
    assert torch.isfinite(dpreact).all()
    torch.testing.assert_close(dpreact[0].double(), grad_ref, rtol=1e-5, atol=1e-6)


def test_matmul_operand_checks():
    a = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
        matmul.matmul_bias_gelu(a, torch.randn(7, 3, device=DEVICE), None)
    with pytest.raises(TypeError, match="share one of"):
        matmul.matmul_bias_gelu(a, torch.randn(8, 3, device=DEVICE).bfloat16(), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        matmul.matmul_bias_gelu(a, torch.randn(8, 3, device=DEVICE), torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="preact must have shape"):
        matmul.matmul_dgelu(a, torch.randn(8, 3, device=DEVICE), torch.randn(4, 4, device=DEVICE))


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_op(bias):
    x, w_fc, b_fc, w_proj, b_proj = make_inputs((5,), 16, 48, torch.float32, bias=bias)
    args = [t if t is None else t.requires_grad_() for t in (x, w_fc, b_fc, w_proj, b_proj)]
    torch.library.opcheck(torch.ops.gptk.triton_mlp_gelu_fwd.default, tuple(args))


def test_opcheck_dgelu_op():
    dy, preact = torch.randn(5, 16, device=DEVICE), torch.randn(5, 48, device=DEVICE)
    w_proj = torch.randn(16, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.gptk.triton_matmul_dgelu.default, (dy, w_proj, preact))


def test_torch_compile_traces_forward_and_backward_in_one_graph():
    """The backend entry point compiles without a graph break (fullgraph=True fails on
    any); aot_eager runs AOTAutograd (the fake impls and the registered backward) without
    needing a compiler toolchain."""
    inputs = make_inputs((2, 3), 16, 64, torch.float32)
    dy = torch.randn(2, 3, 16, device=DEVICE)
    compiled = torch.compile(mlp.mlp_gelu, backend="aot_eager", fullgraph=True)
    y, grads = run_with_grads(compiled, inputs, dy)
    y_eager, grads_eager = run_with_grads(mlp.mlp_gelu, inputs, dy)
    torch.testing.assert_close(y, y_eager)
    for grad, grad_eager in zip(grads, grads_eager):
        torch.testing.assert_close(grad, grad_eager)


# ----------------------------------------------------------------------------- AOT specs

def test_aot_specs_cover_every_kernel_config_and_dtype():
    specs = matmul.AOT_SPECS
    assert len({s.name for s in specs}) == len(specs)
    for spec in specs:
        assert list(spec.signature) == list(spec.fn.arg_names), spec.name
        assert {p for p, t in spec.signature.items() if t == "constexpr"} == set(spec.constexprs)
        block = spec.constexprs
        element_size = 2 if spec.signature["A"] == "*bf16" else 4
        smem = spec.num_stages * (block["BLOCK_M"] + block["BLOCK_N"]) * block["BLOCK_K"] * element_size
        assert smem <= 163 * 1024, f"{spec.name} needs {smem} B of shared memory (sm_80 has 163 KiB)"
    for kernel in (matmul._matmul_bias_gelu_kernel, matmul._matmul_dgelu_kernel):
        for dtype, configs in (("*bf16", matmul.CONFIGS_16BIT), ("*fp32", matmul.CONFIGS_FP32)):
            listed = [(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"],
                       s.num_warps, s.num_stages)
                      for s in specs if s.fn is kernel and s.signature["A"] == dtype]
            tuned = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                      c.num_stages) for c in configs]
            assert set(listed) == set(tuned)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("channels", [768, 1600])
def test_gpt2_shapes_bf16_on_gpu(channels):
    """GPT-2 small and XL widths at a training batch (M = 4096), through the autotuned
    configs, against the spec evaluated in fp32."""
    inputs = make_inputs((4, 1024), channels, 4 * channels, torch.bfloat16)
    dy = torch.randn(4, 1024, channels, device=DEVICE).bfloat16()
    y, grads = run_with_grads(triton_mlp, inputs, dy)
    y_ref, grads_ref = run_with_grads(reference.mlp_gelu, [t.float() for t in inputs], dy.float())
    assert_close(y, y_ref, torch.bfloat16)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert_close(grad, grad_ref, torch.bfloat16, factor=2)
