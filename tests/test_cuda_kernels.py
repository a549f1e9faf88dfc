"""The CUDA kernels beyond what the conformance suite judges through the public op (it
runs every case on the `cuda` backend whenever a GPU and the built extension are here, with
each kernel's default version): every kernel version of the attention over the
conformance cases and over sequences long enough for many tiles and pipeline stages,
version 2's deterministic mode, the MLP's cuBLASLt-epilogue inference path, deterministic
LayerNorm weight gradients, opcheck of every custom op, and the whole model compiled on the
backend. GPU only:

    pytest -q -m gpu tests/test_conformance.py tests/test_cuda_kernels.py
    compute-sanitizer --tool memcheck python -m pytest -q -m gpu tests/test_cuda_kernels.py
"""
import contextlib

import pytest
import torch

import kernels
import kernels.cuda as cuda_backend
from kernels import versions
from kernels.specs import SPECS
from kernels.specs import inputs as make
from kernels.specs.inputs import Case, Inputs
from kernels.testing import assert_close, autocast_for, high_precision_copy, run_case

pytestmark = pytest.mark.gpu
OPS = cuda_backend.OPS


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    status = kernels.available_backends()["cuda"]
    if not status.available:
        pytest.skip(f"cuda backend unavailable: {status.reason}")


def leaf(t):
    return t.detach().clone().requires_grad_()


@contextlib.contextmanager
def version(name, number):
    """Run kernel `name` at version `number` inside the block."""
    previous = next(k["selected"] for k in versions.table() if k["name"] == name)
    versions.select(name, number)
    try:
        yield
    finally:
        versions.select(name, previous)


def assert_case_passes(op, case, dtype):
    """The conformance rule (kernels.testing) on the cuda backend, skipping a call the
    backend refuses (the conformance suite checks the refusal itself)."""
    if not case.applies_to(dtype):
        pytest.skip(f"{case.name} is not a {dtype} case")
    inputs = case.build(dtype, torch.device("cuda"), torch.Generator().manual_seed(0))
    if not inputs.autocast:
        call = SPECS[op].canonicalize(*inputs.args)
        reason = kernels.backends.why_unsupported("cuda", call)
        if reason is not None:
            pytest.skip(f"cuda refuses this call: {reason}")
    verdicts = run_case(SPECS[op], case, "cuda", dtype, "cuda")
    failed = [str(v) for v in verdicts if not v.passed]
    assert not failed, "; ".join(failed)


# ----------------------------------------------------------------------------- attention versions

ATTENTION_VERSIONS = sorted(cuda_backend.attention.VERSIONS.versions)
ATTENTION_CASES = [c.name for c in SPECS["causal_attention"].cases if c.raises is None]


@pytest.mark.parametrize("number", ATTENTION_VERSIONS)
@pytest.mark.parametrize("case_name", ATTENTION_CASES)
def test_attention_conformance_cases_at_every_version(case_name, number):
    """The conformance cases of causal_attention in bf16 (the dtype the versions differ in)
    on every kernel version, not only the default one."""
    with version("cuda_attention", number):
        assert_case_passes("causal_attention", SPECS["causal_attention"].case(case_name),
                           torch.bfloat16)


def _long_attention_case(b, h, t, d, qkv_view=False, scale=1.0, t_k=None, dropout_p=0.0):
    """Sequences spanning many forward tiles (64 keys), backward key blocks (128) and query
    steps (64), with a ragged last tile: every stage of both cp.async rings is refilled.
    t_k > t: a KV cache longer than the queries; dropout_p: a mask from a fixed seed."""
    def build(dtype, device, gen):
        if qkv_view:  # the model's strided views of one (B, T, 3, H, D) projection
            qkv = make.tensor((b, t, 3, h, d), dtype, device, gen, scale=scale)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = make.tensor((b, h, t, d), dtype, device, gen, scale=scale)
            k, v = (make.tensor((b, h, t_k or t, d), dtype, device, gen, scale=scale)
                    for _ in range(2))
        seed = (0x5EED, 3) if dropout_p else None
        return Inputs((q, k, v, None, dropout_p, seed), (0, 1, 2))
    name = f"B{b}-H{h}-T{t}-D{d}{'-qkv' if qkv_view else ''}"
    return Case(name + (f"-TK{t_k}" if t_k else "") + (f"-p{dropout_p}" if dropout_p else ""),
                build)


LONG_ATTENTION = [
    _long_attention_case(2, 3, 300, 64),
    _long_attention_case(1, 2, 515, 32),
    _long_attention_case(1, 2, 257, 40),    # padded to 64
    _long_attention_case(1, 2, 200, 16),    # padded to 32
    _long_attention_case(1, 1, 390, 128),   # version 2: its forward, version 1's backward
    _long_attention_case(2, 2, 333, 64, qkv_view=True),
    _long_attention_case(1, 2, 260, 64, scale=4.0),  # peaked rows
    _long_attention_case(4, 12, 1024, 64),  # GPT-2 124M's attention
    _long_attention_case(1, 2, 77, 64, t_k=600),    # a prompt appended to a long cache
    _long_attention_case(2, 3, 1, 64, t_k=333),     # one decoding step
    _long_attention_case(2, 3, 300, 64, dropout_p=0.1),
    _long_attention_case(1, 2, 515, 32, dropout_p=0.3),
    _long_attention_case(1, 1, 390, 128, dropout_p=0.1),
    _long_attention_case(2, 2, 333, 64, qkv_view=True, dropout_p=0.2),
    _long_attention_case(1, 2, 150, 64, t_k=420, dropout_p=0.1),
]


@pytest.mark.parametrize("number", ATTENTION_VERSIONS)
@pytest.mark.parametrize("case", LONG_ATTENTION, ids=lambda c: c.name)
def test_attention_long_sequences_at_every_version(case, number):
    with version("cuda_attention", number):
        assert_case_passes("causal_attention", case, torch.bfloat16)


def _attention_grads(q, k, v, dout):
    q, k, v = (leaf(t) for t in (q, k, v))
    out = OPS["causal_attention"](q, k, v, q.shape[-1] ** -0.5, 0.0)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("number", ATTENTION_VERSIONS)
def test_attention_backward_is_deterministic_in_deterministic_mode(number):
    """Version 2 adds dQ with atomics in the default mode; under torch's deterministic mode
    its dQ comes from version 1's single-owner kernel: run-to-run identical gradients, and
    the same dK, dV as the atomic mode (the same kernel computes them)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, 700, 64, device="cuda", generator=gen,
                                 dtype=torch.bfloat16) for _ in range(4))
    was = torch.are_deterministic_algorithms_enabled()
    with version("cuda_attention", number):
        fast = _attention_grads(q, k, v, dout)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            first = _attention_grads(q, k, v, dout)
            second = _attention_grads(q, k, v, dout)
        finally:
            torch.use_deterministic_algorithms(was)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(first[1], fast[1]) and torch.equal(first[2], fast[2])
    # The two dQ sum the same fp32 products in different orders: one bf16 rounding apart.
    assert_close(first[0], fast[0].double(), name="dQ, deterministic against atomic")


# ----------------------------------------------------------------------------- MLP versions

MLP_CASES = [c.name for c in SPECS["mlp_gelu"].cases if c.raises is None]


@pytest.mark.parametrize("number", sorted(cuda_backend.mlp.VERSIONS.versions))
@pytest.mark.parametrize("case_name", MLP_CASES)
def test_mlp_inference_at_every_version(case_name, number):
    """The MLP forward without gradients in bf16, where version 2 runs c_fc + bias + GELU as
    one cuBLASLt matmul (tanh GELU with a bias), judged by the conformance rule (the
    conformance suite differentiates every call, which version 2 leaves to version 1)."""
    spec, case, dtype = SPECS["mlp_gelu"], SPECS["mlp_gelu"].case(case_name), torch.bfloat16
    if not case.applies_to(dtype):
        pytest.skip(f"{case_name} is not a bf16 case")
    inputs = case.build(dtype, torch.device("cuda"), torch.Generator().manual_seed(0))
    expected = spec.reference(*high_precision_copy(inputs.args, ()))
    with torch.no_grad(), autocast_for(inputs, "cuda", dtype), version("cuda_mlp", number):
        eager = spec.eager(*inputs.args)
        actual = kernels.ops.mlp_gelu(*inputs.args, backend="cuda")
        call = spec.canonicalize(*inputs.args)
        epilogue = cuda_backend.mlp.uses_gelu_epilogue(call["x"], call["w_fc"], call["b_fc"],
                                                       call["approximate"])
    assert epilogue == (number == 2 and call["approximate"] == "tanh"
                        and call["b_fc"] is not None)
    assert_close(actual, expected, eager)


def _opcheck_samples():
    x = torch.randn(5, 40, device="cuda")
    w, b = torch.randn(40, device="cuda"), torch.randn(40, device="cuda")
    logits = torch.randn(6, 11, device="cuda")
    targets = torch.randint(0, 11, (6,), device="cuda")
    q = torch.randn(1, 2, 9, 32, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 20, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    loop = cuda_backend.linear_cross_entropy.chunk_loop.op
    return [
        (torch.ops.gptk.cuda_layer_norm_fwd, (x.requires_grad_(), w.requires_grad_(), b, 1e-5)),
        (torch.ops.gptk.cuda_add_layer_norm_fwd, (x, x.detach().clone(), w, None, 1e-5)),
        (torch.ops.gptk.cuda_bias_gelu_fwd, (x, b.requires_grad_(), True)),
        (torch.ops.gptk.cuda_bias_gelu_fwd, (x, b, False)),
        (torch.ops.gptk.cuda_cross_entropy_fwd, (logits.requires_grad_(), targets, -100,
                                                 0.0, 0.0, 0.0)),
        (torch.ops.gptk.cuda_cross_entropy_fwd, (logits, targets, -100, 0.1, 1e-4, 5.0)),
        (torch.ops.gptk.cuda_cross_entropy_fwd_bwd_, (logits.detach().clone(), targets,
                                                      torch.rand(6, device="cuda"), -100,
                                                      0.1, 1e-4, 5.0)),
        (torch.ops.gptk.cuda_attention_fwd, (q.requires_grad_(), q.detach().clone(),
                                             q.detach().clone(), 0.2, 1, 0.0, None)),
        (torch.ops.gptk.cuda_attention_fwd, (q, q.detach().clone(), q.detach().clone(), 0.2, 2,
                                             0.0, None)),
        (torch.ops.gptk.cuda_attention_fwd, (q, kv.clone(), kv.clone(), 0.2, 2, 0.1,
                                             torch.tensor([5, 6]))),
        (loop, (x.detach(), torch.randn(11, 40, device="cuda"), targets[:5], None, -100,
                torch.rand(5, device="cuda"), True, 0.1, 1e-4, 5.0)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    # Numerics are the conformance suite's; opcheck checks schema, fake impl and autograd.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_autograd_registration"))


def test_model_compiles_with_the_cuda_backend():
    from gpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=100,
                          backend="cuda")).cuda()
    idx = torch.randint(0, 100, (2, 32), device="cuda")
    eager_loss = model(idx, idx)[1]
    compiled_loss = torch.compile(model)(idx, idx)[1]
    assert_close(compiled_loss, eager_loss)
