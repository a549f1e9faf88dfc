"""The Triton fused MLP (kernels/triton/mlp.py, kernels/triton/matmul.py) beyond what the
conformance suite judges through the public op: gradients of a subset of the inputs,
GPT-2's widths, no-grad calls, both GELU epilogues element by element over their whole
range, the operand checks, the custom ops (opcheck and torch.compile) and the AOT specs.
On the CPU the kernels run under the Triton interpreter with 32x32x32 tiles, so the widths
below leave partial tiles on every edge."""
import pytest
import torch

import kernels
from kernels import reference
from kernels.specs import SPECS, Inputs
from kernels.testing import judge, reference_results, run
from kernels.triton import matmul, mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = SPECS["mlp_gelu"]
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")


def make_inputs(lead, channels, hidden, dtype, bias=True):
    """x [*lead, C] and nn.Linear-scaled weights (outputs of order 1, as in a GPT)."""
    x = torch.randn(*lead, channels, device=DEVICE)
    w_fc = torch.randn(hidden, channels, device=DEVICE) * channels ** -0.5
    w_proj = torch.randn(channels, hidden, device=DEVICE) * hidden ** -0.5
    b_fc = torch.randn(hidden, device=DEVICE) if bias else None
    b_proj = torch.randn(channels, device=DEVICE) if bias else None
    return [None if t is None else t.to(dtype) for t in (x, w_fc, b_fc, w_proj, b_proj)]


def assert_matches_reference(inputs, requires_grad=(True,) * 5, approximate="tanh"):
    """The Triton MLP's output and the gradients of the inputs flagged in requires_grad
    against the fp64 reference, with eager PyTorch's error as the allowance."""
    args = tuple(None if t is None else t.detach().clone().requires_grad_(rg)
                 for t, rg in zip(inputs, requires_grad)) + (approximate,)
    grad_args = tuple(i for i, t in enumerate(args[:5]) if t is not None and t.requires_grad)
    case = Inputs(args, grad_args)
    expected, upstream = reference_results(SPEC, case, torch.Generator().manual_seed(0))
    eager = run(SPEC.eager, args, grad_args, upstream)
    actual = run(lambda *a: kernels.mlp_gelu(*a, backend="triton"), args, grad_args, upstream)
    assert actual.outputs[0].dtype == inputs[0].dtype
    failed = [str(v) for v in judge(actual, expected, eager) if not v.passed]
    assert not failed, failed


# ----------------------------------------------------------------------------- the op

@pytest.mark.parametrize("requires_grad", [
    (True, False, False, False, False), (False, True, True, False, False),
    (False, False, False, True, True), (False, True, False, False, True),
], ids=["x-only", "fc-only", "proj-only", "w_fc-and-b_proj"])
def test_gradients_of_a_subset_of_inputs(requires_grad):
    """The backward skips the matmuls nobody asked for; the rest must be unaffected."""
    assert_matches_reference(make_inputs((3, 7), 24, 40, torch.float32), requires_grad)


@pytest.mark.parametrize("channels,hidden", [(768, 3072), (1000, 200), (1600, 72)])
def test_gpt2_widths_on_a_few_rows(channels, hidden):
    assert_matches_reference(make_inputs((2,), channels, hidden, torch.float32))


def test_no_grad_forward():
    inputs = make_inputs((4,), 16, 64, torch.bfloat16)
    with torch.no_grad():
        y = kernels.mlp_gelu(*inputs, backend="triton")
    assert not y.requires_grad
    torch.testing.assert_close(y, SPEC.eager(*inputs), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- the epilogues

@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_epilogues_over_the_whole_range(approximate):
    """With a = diag(h) and b = I the forward kernel's pre-activation is exactly h, and with
    a = I and b = ones the backward kernel's incoming gradient is exactly 1: both epilogues
    are then checked element by element against autograd through the reference GELU,
    from saturated negative values (where exp overflows without the cap) to large positive."""
    h = torch.cat([torch.linspace(-12.0, 12.0, 44), torch.tensor([0.0, -1e4, 1e4, -60.0])])
    h = h.to(DEVICE)
    n = h.numel()
    eye = torch.eye(n, device=DEVICE)
    preact, act = matmul.matmul_bias_gelu(torch.diag(h), eye, None, approximate)
    h_ref = h.double().requires_grad_()
    act_ref = reference.gelu(h_ref, approximate)
    (grad_ref,) = torch.autograd.grad(act_ref.sum(), h_ref)
    torch.testing.assert_close(preact.diagonal(), h)
    torch.testing.assert_close(act.diagonal().double(), act_ref.detach(), rtol=1e-6, atol=1e-6)
    dpreact = matmul.matmul_dgelu(eye, torch.ones(n, n, device=DEVICE),
                                  preact.diagonal().expand(n, n), approximate)
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
    with pytest.raises(ValueError, match="approximate must be"):
        matmul.matmul_bias_gelu(a, torch.randn(8, 3, device=DEVICE), None, "erf")


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_op(bias, approximate):
    x, w_fc, b_fc, w_proj, b_proj = make_inputs((5,), 16, 48, torch.float32, bias=bias)
    args = [t if t is None else t.requires_grad_() for t in (x, w_fc, b_fc, w_proj, b_proj)]
    torch.library.opcheck(torch.ops.gptk.triton_mlp_gelu_fwd.default, (*args, approximate))


def test_opcheck_dgelu_op():
    dy, preact = torch.randn(5, 16, device=DEVICE), torch.randn(5, 48, device=DEVICE)
    w_proj = torch.randn(16, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.gptk.triton_matmul_dgelu.default, (dy, w_proj, preact, "none"))


def test_torch_compile_traces_forward_and_backward_in_one_graph():
    """The backend entry point compiles without a graph break (fullgraph=True fails on
    any); aot_eager runs AOTAutograd (the fake impls and the registered backward) without
    needing a compiler toolchain."""
    inputs = make_inputs((2, 3), 16, 64, torch.float32)
    dy = [torch.randn(2, 3, 16, device=DEVICE)]
    compiled = torch.compile(mlp.mlp_gelu, backend="aot_eager", fullgraph=True)
    leaves = [t.requires_grad_() for t in inputs]
    got = run(lambda *a: compiled(*a, "tanh"), leaves, range(5), dy)
    want = run(lambda *a: mlp.mlp_gelu(*a, "tanh"), leaves, range(5), dy)
    for a, b in zip(got.outputs + got.grads, want.outputs + want.grads):
        torch.testing.assert_close(a, b)


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
        assert {s.constexprs["TANH"] for s in specs if s.fn is kernel} == {True, False}
        for dtype, configs in (("*bf16", matmul.CONFIGS_16BIT), ("*fp32", matmul.CONFIGS_FP32)):
            listed = [(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"],
                       s.num_warps, s.num_stages)
                      for s in specs if s.fn is kernel and s.signature["A"] == dtype]
            tuned = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                      c.num_stages) for c in configs]
            assert set(listed) == set(tuned)
