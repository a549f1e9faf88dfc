"""Triton cross-entropy beyond what the conformance suite judges through the public op:
NaN mean and zero gradient when every target is ignored, logits never written and a
retained graph, no (N, V) buffer of its own in versions 2 and 3, rows split at their
16-byte boundaries for any V and alignment (with and without version 3's prefetching
sweeps and its loop-free backward), the backward running its forward's version, opcheck
of the custom ops, AOT specs; and the conformance cases again with the versions
tests/test_conformance.py does not run. Under the interpreter on the CPU."""
import inspect

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference, versions
from kernels.testing import assert_close
from kernels.triton import cross_entropy as tce
from test_conformance import check_case, value_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                                reason="triton backend unavailable")
REDUCTIONS = ("mean", "sum", "none")
VERSIONS = sorted(tce.VERSIONS.versions)
OTHER_VERSIONS = [v for v in VERSIONS if v != tce.VERSIONS.current()]


@pytest.fixture
def version(request):
    """Run the test with cross-entropy version request.param, then restore the selection."""
    before = tce.VERSIONS.current()
    versions.select("triton_cross_entropy", request.param)
    yield request.param
    versions.select("triton_cross_entropy", before)


def make(rows, vocab, dtype, ignore_index=-100, ignored=(1,)):
    logits = (3 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    for row in ignored:
        if row < rows:
            targets[row] = ignore_index
    return logits, targets


@pytest.mark.parametrize("version", VERSIONS, indirect=True)
def test_every_target_ignored_gives_nan_mean_and_zero_gradient(version):
    logits, targets = make(3, 50, torch.float32, ignored=(0, 1, 2))
    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy(leaf, targets, -100, "mean")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.parametrize("version", VERSIONS, indirect=True)
def test_logits_are_never_modified_and_backward_can_repeat(version):
    """Each backward writes a new tensor (version 2 from the saved logits and row
    statistics, version 1 from its saved gradient), so the logits and what was saved
    survive a retain_graph second backward."""
    logits, targets = make(4, 300, torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    loss = tce.cross_entropy(leaf, targets, -100, "sum")
    loss.backward(torch.tensor(3.0), retain_graph=True)
    first = leaf.grad.clone()
    leaf.grad = None
    loss.backward(torch.tensor(3.0))
    assert torch.equal(leaf.grad, first)
    assert torch.equal(leaf.detach(), logits)


def test_versions_2_and_3_save_no_buffer_of_their_own():
    """Versions 2 and 3 save the logits (alive anyway) and (N, 2) statistics: the only new
    (N, V) tensor is the gradient the backward returns. Version 1 saves an (N, V) gradient
    computed in the forward, a buffer of its own."""
    logits, targets = make(6, 300, torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    for version, saves_the_logits in ((3, True), (2, True), (1, False)):
        saved = []
        before = tce.VERSIONS.current()
        versions.select("triton_cross_entropy", version)
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                          lambda t: t):
                tce.cross_entropy(leaf, targets, -100, "mean")
        finally:
            versions.select("triton_cross_entropy", before)
        (rows,) = [t for t in saved if t.shape[-1:] == (300,)]  # the one (N, V) tensor
        assert (rows.data_ptr() == leaf.data_ptr()) == saves_the_logits, version


@pytest.mark.parametrize("version", [2, 3], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 65, 300, 4099])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_rows_at_every_alignment(version, dtype, vocab, shift):
    """Rows starting anywhere modulo 16 bytes (a shifted, row-padded view) and any V: the
    head, the aligned body and the tail of each row together cover it exactly, in the
    loss, in the backward (version 2's sweep, version 3's blocks: a quarter row each under
    the interpreter) and in the in-place gradient of the fused op (with version 3's
    prefetching sweep and without)."""
    storage = (3 * torch.randn(5 * (vocab + 5) + shift, device=DEVICE)).to(dtype)
    logits = storage[shift:shift + 5 * (vocab + 5)].view(5, vocab + 5)[:, :vocab]
    targets = torch.randint(0, vocab, (5,), device=DEVICE)
    leaf = logits.detach().requires_grad_()
    loss = tce.cross_entropy(leaf, targets, -100, "sum")
    loss.backward()
    expected = logits.double().requires_grad_()
    F.cross_entropy(expected, targets, reduction="sum").backward()
    assert_close(loss, F.cross_entropy(logits.double(), targets, reduction="sum"))
    assert_close(leaf.grad, expected.grad)
    in_place = logits.clone()
    losses, stats = torch.empty(5, device=DEVICE), torch.empty(5, 2, device=DEVICE)
    tce.launch_cross_entropy(in_place, targets, -100, losses, in_place,
                             torch.ones(1, device=DEVICE).expand(5), stats)
    assert_close(in_place, expected.grad)


def test_backward_runs_the_version_of_its_forward(monkeypatch):
    """The version is read by the forward and passed to the backward: version 3's
    loop-free kernel runs on a 2-D grid, version 2's sweep one program per row, whatever is
    selected between the two."""
    grids = []
    for kernel in ("_cross_entropy_bwd_kernel", "_cross_entropy_bwd_block_kernel"):
        real = getattr(tce, kernel)
        monkeypatch.setattr(tce, kernel, type("Spy", (), {
            "__getitem__": lambda self, grid, real=real, kernel=kernel:
                grids.append((kernel, grid)) or real[grid]})())
    logits, targets = make(3, 300, torch.float32)
    for forward, backward in ((3, 2), (2, 3)):
        leaf = logits.clone().requires_grad_()
        before = tce.VERSIONS.current()
        try:
            versions.select("triton_cross_entropy", forward)
            loss = tce.cross_entropy(leaf, targets, -100, "mean")
            versions.select("triton_cross_entropy", backward)
            loss.backward()
        finally:
            versions.select("triton_cross_entropy", before)
    block = tce.bwd_block_v(300, 4)
    assert grids == [("_cross_entropy_bwd_block_kernel", (3, -(-300 // block))),
                     ("_cross_entropy_bwd_kernel", (3,))]
    assert -(-300 // block) > 1  # several programs per row under the interpreter


def test_alignment_shared_by_logits_and_gradient():
    logits = torch.empty(4, 50257, dtype=torch.bfloat16, device=DEVICE)
    assert tce.shares_alignment(logits, logits)
    assert tce.shares_alignment(logits, torch.empty_like(logits))
    assert not tce.shares_alignment(logits[:, 1:], torch.empty(4, 50256, dtype=torch.bfloat16,
                                                                 device=DEVICE))


@pytest.mark.parametrize("version", OTHER_VERSIONS, indirect=True)
@pytest.mark.parametrize("op, case_name, dtype_name", list(value_cases(["cross_entropy"])))
def test_conformance_of_the_other_versions(version, op, case_name, dtype_name):
    """tests/test_conformance.py's cases of cross_entropy, on the versions it skips."""
    check_case(op, case_name, dtype_name, "triton")


def test_version_1_stores_no_gradient_without_grad():
    logits, targets = make(4, 100, torch.float32)
    losses, grad, _stats = tce.cross_entropy_fwd(logits, targets, -100, False, 0.0, 0.0, 0.0)
    assert grad.shape == (0, 100)
    with torch.no_grad():
        loss = tce.cross_entropy(logits.requires_grad_(), targets, -100, "none")
    assert_close(loss, reference.cross_entropy(logits.double(), targets, -100, "none"))


@pytest.mark.parametrize("variant", [(0.0, 0.0, 0.0), (0.1, 1e-3, 5.0)])
def test_opcheck(variant):
    logits, targets = make(5, 70, torch.float32)
    for version in (2, 3):
        torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_stats_fwd,
                              (logits.clone().requires_grad_(), targets, -100, version, *variant))
        _, stats = tce.cross_entropy_stats_fwd(logits, targets, -100, version, *variant)
        torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_stats_bwd,
                              (torch.rand(5, device=DEVICE), logits, targets, stats, -100,
                               version, *variant))
    torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_fwd,
                          (logits.requires_grad_(), targets, -100, True, *variant))
    torch.library.opcheck(torch.ops.gptk.triton_cross_entropy_bwd,
                          (torch.randn(5, 70, device=DEVICE), torch.rand(5, device=DEVICE),
                           targets, -100))


def test_aot_specs_describe_every_kernel_parameter():
    assert {spec.fn for spec in tce.AOT_SPECS} == {tce._cross_entropy_fwd_kernel,
                                                   tce._cross_entropy_bwd_kernel,
                                                   tce._cross_entropy_bwd_block_kernel,
                                                   tce._scale_rows_kernel}
    for spec in tce.AOT_SPECS:
        params = inspect.signature(spec.fn.fn).parameters
        assert list(spec.signature) == list(params), spec.name
        constexprs = [n for n, p in params.items() if "constexpr" in str(p.annotation)]
        assert sorted(spec.constexprs) == sorted(constexprs), spec.name
    # Every kernel of every version, for GPT-2's unpadded vocabulary (no alignment hint on
    # the row sizes: the row partition keeps the loads vectorised) and a padded one.
    names = {spec.name for spec in tce.AOT_SPECS}
    for vocab in (50257, 50304):
        for kernel in ("cross_entropy_bwd[bf16,", "cross_entropy_bwd_block[bf16,"):
            assert any(n.startswith(kernel) and f"V={vocab}" in n for n in names)
        for prefetch in (False, True):
            assert any(n.startswith("cross_entropy_fwd[bf16,") and f"PREFETCH={prefetch}" in n
                       and f"V={vocab}" in n for n in names)
    unaligned = [spec for spec in tce.AOT_SPECS if "V=50257" in spec.name]
    assert all("n_cols" in spec.unaligned for spec in unaligned)
    # The forward's instances the launcher picks, and only those (the AOT spill check
    # covers what runs): the forward that writes the gradient under a loss variant never
    # prefetches (its fp32 prefetching instance spilled on sm_80).
    for version in tce.VERSIONS.versions:
        for compute_grad in (False, True):
            for variant in (False, True):
                prefetch = tce.prefetches(version, compute_grad, variant)
                assert any(n.startswith(f"cross_entropy_fwd[fp32,COMPUTE_GRAD={compute_grad},")
                           and f"SOFTCAP={variant},SMOOTHING={variant}," in n
                           and f"PREFETCH={prefetch}" in n for n in names)
    assert tce.prefetches(3, False, True) and tce.prefetches(3, True, False)
    assert not tce.prefetches(3, True, True) and not tce.prefetches(2, False, False)
    assert not any("COMPUTE_GRAD=True" in n and "SOFTCAP=True" in n and "PREFETCH=True" in n
                   for n in names)
