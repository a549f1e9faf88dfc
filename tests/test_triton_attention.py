"""The Triton FlashAttention-2 kernels (kernels/triton/attention.py) against an fp64 reference.

Without a GPU these run under the Triton interpreter (tests/conftest.py), so shapes are
small but awkward: T not a multiple of any tile (1, 7, 33, 65, 130), head dims 32/64/128
plus a non-power-of-two one, fp32 / bf16 / fp16. Every check runs on each version
(`attention.VERSIONS`: the single-pass backward with atomic dQ, the deterministic
three-kernel one, and the single pass with TMA descriptor loads, which the interpreter
emulates), and the whole conformance suite of the op runs again with each version
tests/test_conformance.py does not (it runs the selected one). The tile lists are checked
per arch, and the single pass's sm_90 tiles compiled ahead of time: their SASS must issue
every product on wgmma. The `gpu` tests repeat the checks at training shapes with the
autotuned tiles and measure memory with the CUDA allocator.
"""
import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from aot_session import SM90_SINGLE_PASS_SOURCE
from bench.static import sass
from kernels import philox, reference, versions
from kernels.testing import assert_close
from kernels.triton import attention
from kernels.triton.aot import TARGET_ARCHS, compile_all
from kernels.triton.attention import attention_forward
from test_conformance import check_case, value_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")
VERSIONS = sorted(attention.VERSIONS.versions)
# The versions tests/test_conformance.py leaves out: it runs the one selected.
OTHER_VERSIONS = [v for v in VERSIONS if v != attention.VERSIONS.current()]


@pytest.fixture
def version(request):
    """Run the test with attention version request.param, then restore the selection."""
    before = attention.VERSIONS.current()
    versions.select("triton_attention", request.param)
    yield request.param
    versions.select("triton_attention", before)


def reference_attention(q, k, v, scale):
    """Causal attention and its log-sum-exp, written out in q's dtype (fp64 for the
    reference; the inputs' own 16-bit dtype for eager PyTorch, the allowance)."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def random_qkv(b, h, t, d, dtype):
    return [torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, requires_grad=True)
            for _ in range(3)]


def check_against_reference(q, k, v, scale=None):
    """Output, LSE and the gradients of q, k, v (through both o and lse) against fp64,
    judged by kernels.testing (eager attention in the same dtype as the allowance)."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    o, lse = attention_forward(q, k, v, scale)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    upstream = [torch.randn_like(o), torch.randn_like(lse)]
    grads = torch.autograd.grad([o, lse], (q, k, v), upstream)
    results = {}
    for name, dtype in (("reference", torch.float64), ("eager", q.dtype)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        outputs = reference_attention(*inputs, scale)
        results[name] = list(outputs) + list(torch.autograd.grad(
            outputs, inputs, [u.to(out.dtype) for u, out in zip(upstream, outputs)]))
    for name, got, want, eager in zip(("o", "lse", "dq", "dk", "dv"), [o, lse, *grads],
                                      results["reference"], results["eager"]):
        assert_close(got, want, eager, name)


# A covering set rather than the full product: every T (including 1 and non-multiples of
# both 16 and 32), every head dim, every dtype, without the slow large ones together.
@pytest.mark.parametrize("version", VERSIONS, indirect=True)
@pytest.mark.parametrize("b, h, t, d, dtype", [
    (1, 2, 1, 32, torch.float32),
    (2, 1, 7, 64, torch.float32),
    (1, 1, 65, 128, torch.float32),
    (1, 2, 130, 32, torch.float32),
    (1, 1, 33, 20, torch.float32),    # head dim padded to 32 inside the kernels
    (1, 1, 33, 24, torch.bfloat16),   # padded, and TMA-eligible (48-byte rows): zero-filled
    (1, 1, 130, 64, torch.bfloat16),
    (2, 1, 65, 32, torch.bfloat16),
    (1, 1, 7, 128, torch.bfloat16),
    (1, 1, 65, 64, torch.float16),
])
def test_matches_fp64_reference(version, b, h, t, d, dtype):
    check_against_reference(*random_qkv(b, h, t, d, dtype))


@pytest.mark.parametrize("version", OTHER_VERSIONS, indirect=True)
@pytest.mark.parametrize("op, case_name, dtype_name", list(value_cases(["causal_attention"])))
def test_conformance_of_the_other_versions(version, op, case_name, dtype_name):
    """tests/test_conformance.py's cases of causal_attention, on the versions it skips."""
    check_case(op, case_name, dtype_name, "triton")


@pytest.mark.parametrize("version", VERSIONS, indirect=True)
def test_custom_scale(version):
    check_against_reference(*random_qkv(1, 1, 33, 32, torch.float32), scale=0.3)


@pytest.mark.parametrize("version", VERSIONS, indirect=True)
def test_reads_strided_qkv_views_in_place(version):
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
    (lambda q: attention.causal_attention(q, q, q, None, 1.0), ValueError, "dropout_p"),
    (lambda q: attention.causal_attention(q, q[:, :, :4], q[:, :, :4], None, 0.0), ValueError,
     "T_K >= T"),
    (lambda q: attention.causal_attention(q, q, q, None, 0.1, (-1, 0)), ValueError,
     "dropout_seed"),
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


@pytest.mark.parametrize("version", VERSIONS, indirect=True)
@pytest.mark.parametrize("t_k, dropout_p", [(5, 0.0), (9, 0.0), (5, 0.3), (9, 0.3)])
def test_opcheck_fwd_and_bwd_ops(version, t_k, dropout_p):
    """Schema, fake (meta) impls, autograd registration and AOT dispatch of the custom ops,
    with and without a KV cache and dropout."""
    q, = random_qkv(1, 2, 5, 16, torch.float32)[:1]
    k, v = random_qkv(1, 2, t_k, 16, torch.float32)[:2]
    rng = philox.seed_tensor((11, 3)) if dropout_p else None
    torch.library.opcheck(torch.ops.gptk.triton_attention_fwd.default,
                          (q, k, v, 0.25, version, dropout_p, rng))
    o, lse = attention.attention_forward(*(x.detach() for x in (q, k, v)), 0.25, dropout_p,
                                         (11, 3) if dropout_p else None)
    grads = (torch.randn_like(o), torch.randn_like(lse))
    torch.library.opcheck(torch.ops.gptk.triton_attention_bwd.default,
                          (grads[0], q.detach(), k.detach(), v.detach(), o, lse, grads[1], 0.25,
                           version, dropout_p, rng))


def test_torch_compile_traces_the_custom_ops():
    q, k, v = random_qkv(1, 2, 11, 16, torch.float32)
    compiled = torch.compile(lambda q, k, v: attention.causal_attention(q, k, v).square().sum(),
                             backend="aot_eager", fullgraph=True)
    compiled(q, k, v).backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    reference_attention(*ref, 16 ** -0.5)[0].square().sum().backward()
    for x, r in zip((q, k, v), ref):
        assert_close(x.grad, r.grad)


def test_torch_compile_traces_dropout_and_the_kv_cache():
    """A fresh dropout seed is drawn inside the graph (no graph break on it): a compiled
    call is the eager call with the same torch seed, bit for bit, and draws a new mask
    each time."""
    q = random_qkv(1, 2, 7, 16, torch.float32)[0]
    k, v = random_qkv(1, 2, 20, 16, torch.float32)[:2]

    def step(q, k, v):
        return attention.causal_attention(q, k, v, None, 0.3)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    eager_out = step(q, k, v)
    torch.manual_seed(5)
    compiled_out, again = compiled(q, k, v), compiled(q, k, v)
    assert torch.equal(compiled_out, eager_out)
    assert not torch.equal(again, compiled_out)


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
    """Every tile each arch's launcher can pick has a spec compiled for that arch, and no
    spec is compiled for an arch that never runs it (sm_90's wgmma tiles, TMA)."""
    specs = {spec.name: spec for spec in attention.AOT_SPECS}
    assert len(specs) == len(attention.AOT_SPECS)
    expected = set()
    for type_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for d in attention.AOT_HEAD_DIMS:
            group = attention._tile_group(dtype, attention._block_d(d))
            for kernel in attention._KERNELS:
                for arch in TARGET_ARCHS:
                    # TMA: 16-bit on sm_90 only
                    for bm, bn, warps, stages in attention.tiles_for(kernel, group, arch):
                        name = (f"attention_{kernel}[{type_name},D={d},BLOCK_M={bm},BLOCK_N={bn},"
                                f"warps={warps},stages={stages}]")
                        assert specs[name].compiles_for(arch), (name, arch)
                        expected.add((name, arch))
            assert any(n.startswith(f"attention_bwd_preprocess[{type_name},D={d},") for n in specs)
    compiled = {(name, arch) for name, spec in specs.items() if "preprocess" not in name
                for arch in TARGET_ARCHS if spec.compiles_for(arch)}
    assert compiled == expected
    assert not any(spec.compiles_for(80) for name, spec in specs.items() if "_tma[" in name)
    for spec in attention.AOT_SPECS:  # the softmax statistics stay fp32 for bf16 operands
        assert all(spec.signature[p] == "*fp32" for p in ("LSE", "DELTA", "DLSE")
                   if p in spec.signature), spec.name


def test_tiles_respect_the_causal_split():
    """Forward and dQ walk key blocks that must tile a query block (BLOCK_N | BLOCK_M);
    dK/dV (and the single pass) walk query blocks that must tile a key block
    (BLOCK_M | BLOCK_N)."""
    for kernel in attention._KERNELS:
        tiles = [tile[:2] for lists in (attention.AUTOTUNE_TILES, attention.HOPPER_TILES)
                 for group in lists.get(kernel, {}).values() for tile in group]
        for bm, bn in tiles + [attention.INTERPRETER_TILES[kernel]]:
            assert (bn % bm if kernel.startswith("dkdv") else bm % bn) == 0, (kernel, bm, bn)


def test_hopper_single_pass_tiles_are_wgmma_shaped():
    """wgmma multiplies 64 rows per warpgroup of 4 warps: the single pass's products have
    BLOCK_N rows (S^T, dP^T, dV, dK) and BLOCK_M rows (dQ), so on sm_90 both are multiples
    of 64, for every 16-bit head dim; sm_80 keeps its own (mma.sync) tiles."""
    for kernel in ("dkdv_dq", "dkdv_dq_tma"):
        for d in attention.AOT_HEAD_DIMS:
            group = attention._tile_group(torch.bfloat16, attention._block_d(d))
            hopper = attention.tiles_for(kernel, group, 90)
            assert hopper, (kernel, d)
            for bm, bn, warps, _ in hopper:
                assert bm % 64 == 0 and bn % 64 == 0 and warps % 4 == 0, (kernel, d, bm, bn)
    group = attention._tile_group(torch.bfloat16, 64)
    assert attention.tiles_for("dkdv_dq", group, 80) == attention.AUTOTUNE_TILES["dkdv_dq"][group]
    assert attention.tiles_for("fwd", group, 90) == attention.AUTOTUNE_TILES["fwd"][group]


def test_hopper_single_pass_is_all_wgmma_in_the_sass():
    """The single-pass backward's sm_90 cubins at D = 64 (with and without TMA) issue every
    product as wgmma: HGMMA in the SASS and no mma.sync (HMMA) at all. The sm_80 tiles on
    sm_90 show what this catches: their dQ product (32 query rows) is HMMA."""
    report = compile_all(archs=(90,), extra_sources=(SM90_SINGLE_PASS_SOURCE,),
                         include_package=False, sass=True)
    assert not report.problems and not report.failures(), report.problems or report.failures()
    kinds = {r.name: sass.opcode_mix(r.sass_opcodes).tensor_core_kind for r in report.results}
    hopper = {name: kind for name, kind in kinds.items() if "control" not in name}
    assert {name.split("[")[0] for name in hopper} == {"attention_dkdv_dq",
                                                        "attention_dkdv_dq_tma"}
    assert set(hopper.values()) == {"HGMMA"}, hopper
    assert kinds["control: sm_80 tile on sm_90"] == "HGMMA+HMMA"


def record_launches(monkeypatch) -> list[str]:
    """The tile-list names of the kernels attention launches from now on, in order (each
    launch still runs)."""
    launched = []
    real_launch = attention._launch

    def launch(kernel, *args, **kwargs):
        launched.append(kernel)
        real_launch(kernel, *args, **kwargs)
    monkeypatch.setattr(attention, "_launch", launch)
    return launched


@pytest.mark.parametrize("d, dtype, tma", [(16, torch.bfloat16, True),
                                          (20, torch.bfloat16, False),
                                          (16, torch.float32, False)])
def test_each_version_launches_its_kernels(monkeypatch, d, dtype, tma):
    """Version 2's backward is Delta + one single-pass kernel (5 GEMM-equivalents);
    version 1's is Delta + dK/dV + dQ; version 3 is version 2 with TMA loads for 16-bit
    operands where TMA's 16-byte rules hold (rows of 20 bf16 are 40 bytes apart). In
    deterministic mode every version's backward is version 1's."""
    launched = record_launches(monkeypatch)
    q, k, v = random_qkv(1, 1, 9, d, dtype)
    tma = ["fwd_tma", "dkdv_dq_tma"] if tma else ["fwd", "dkdv_dq"]
    for version, expected in ((1, ["fwd", "dkdv", "dq"]), (2, ["fwd", "dkdv_dq"]), (3, tma)):
        before = attention.VERSIONS.current()
        versions.select("triton_attention", version)
        try:
            launched.clear()
            attention.causal_attention(q, k, v).sum().backward()
        finally:
            versions.select("triton_attention", before)
        assert launched == expected, version
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # every version then takes version 1's single-owner dQ
        launched.clear()
        attention.causal_attention(q, k, v).sum().backward()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert launched[1:] == ["dkdv", "dq"]


def test_backward_runs_the_version_of_its_forward(monkeypatch):
    """The version is read once, by the forward: selecting another before the backward
    (a benchmark pinning versions, say) does not mix two versions in one step."""
    launched = record_launches(monkeypatch)
    q, k, v = random_qkv(1, 1, 9, 16, torch.float32)
    before = attention.VERSIONS.current()
    try:
        versions.select("triton_attention", 1)
        loss = attention.causal_attention(q, k, v).sum()
        versions.select("triton_attention", 2)
        loss.backward()
    finally:
        versions.select("triton_attention", before)
    assert launched == ["fwd", "dkdv", "dq"]


def test_dropout_launches_its_own_kernels_never_tma(monkeypatch):
    """Dropout calls run the DROPOUT instances with their own (spill-free) tile lists, at
    every version, and never the TMA kernels (a TMA box cannot read keys in the mask's
    order)."""
    launched = record_launches(monkeypatch)
    q, k, v = random_qkv(1, 1, 9, 16, torch.bfloat16)
    for version, expected in ((1, ["fwd_dropout", "dkdv_dropout", "dq_dropout"]),
                              (2, ["fwd_dropout", "dkdv_dq_dropout"]),
                              (3, ["fwd_dropout", "dkdv_dq_dropout"])):
        before = attention.VERSIONS.current()
        versions.select("triton_attention", version)
        try:
            launched.clear()
            attention.causal_attention(q, k, v, None, 0.2).sum().backward()
        finally:
            versions.select("triton_attention", before)
        assert launched == expected, version
    assert all(attention._FLAGS[kernel]["DROPOUT"] == kernel.endswith("_dropout")
               for kernel in attention._KERNELS)


def test_autotuning_is_keyed_on_the_length_bucket():
    """T_BUCKET = next_power_of_2(T) is the autotuner's key, not T; the single pass zeroes
    its atomically accumulated dQ buffer before every trial."""
    for kernel in attention._KERNELS:
        for arch in TARGET_ARCHS:
            if not attention.tiles_for(kernel, ("16bit", 64), arch):
                continue  # TMA on sm_80
            tuner = attention._autotuned(kernel, ("16bit", 64), arch)
            assert tuner.keys == ["T_BUCKET", "HEAD_DIM"], kernel
            assert tuner.reset_to_zero == (["DQ_ACCUM"] if kernel.startswith("dkdv_dq")
                                           else []), kernel
    for spec in attention.AOT_SPECS:
        if "T" in spec.signature and "preprocess" not in spec.name:
            assert spec.signature["T_BUCKET"] == "i32", spec.name


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("version", VERSIONS, indirect=True)
@pytest.mark.parametrize("t, d", [(1024, 64), (777, 128), (2048, 32)])
def test_gpu_autotuned_matches_reference(version, t, d):
    check_against_reference(*random_qkv(2, 4, t, d, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1], indirect=True)
def test_gpu_deterministic_version_gives_the_same_bits(version):
    q, k, v = random_qkv(2, 4, 1024, 64, torch.bfloat16)
    grad_o = torch.randn_like(q)
    first = torch.autograd.grad(attention.causal_attention(q, k, v), (q, k, v), grad_o)
    second = torch.autograd.grad(attention.causal_attention(q, k, v), (q, k, v), grad_o)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


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
