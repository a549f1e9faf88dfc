"""The `cuda` backend's Python side, without a GPU: how the extension is found and built
(toolkit discovery through nvcc wrapper scripts, arch flags, the clean skip), why the backend
is unavailable, and the torch.library ops' fake implementations and autograd wiring (run on
meta tensors, which need no device). The kernels themselves are checked against the
reference on a GPU in test_cuda_kernels.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
import kernels.cuda as cuda_backend
from kernels import versions
from kernels.cuda import extension

ROOT = Path(__file__).resolve().parent.parent
EXPORTED = {"layer_norm_forward", "add_layer_norm_forward", "layer_norm_backward",
            "bias_gelu_forward", "bias_gelu_backward", "cross_entropy_forward",
            "cross_entropy_backward", "cross_entropy_forward_backward_", "attention_forward",
            "attention_backward"}


@pytest.fixture
def build():
    return extension.load_build_config()


@pytest.fixture
def fresh_loader():
    """Forget the loaded extension around a test."""
    extension.forget()
    yield
    extension.forget()


def fake_toolkit(root: Path, top: Path) -> Path:
    """A CUDA toolkit layout whose nvcc answers a dry run the way the real one does."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={top}/bin"\necho "#$ TOP={top}/bin/.."\n')
    nvcc.chmod(0o755)
    return nvcc


# ----------------------------------------------------------------------------- toolkit

def test_wrapper_script_resolves_to_the_toolkit_it_runs(build, tmp_path):
    root = tmp_path / "cuda-13.0"
    real_nvcc = fake_toolkit(root, root)
    wrapper = tmp_path / "wrappers" / "bin" / "nvcc"  # like /usr/local/bin/nvcc
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {real_nvcc} "$@"\n')
    wrapper.chmod(0o755)
    assert not build.is_toolkit_root(wrapper.parent.parent)  # what dirname(dirname()) gives
    assert build.toolkit_root_of(wrapper) == root.resolve()
    assert build.find_cuda_home({"PATH": str(wrapper.parent)}) == root.resolve()


def test_symlinked_nvcc_resolves_to_its_toolkit(build, tmp_path):
    root = tmp_path / "cuda"
    real_nvcc = fake_toolkit(root, tmp_path / "elsewhere")  # the dry run is not needed
    link = tmp_path / "usr" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(real_nvcc)
    assert build.toolkit_root_of(link) == root.resolve()


def test_cuda_home_variable_wins_and_must_be_a_toolkit(build, tmp_path):
    root = tmp_path / "cuda"
    fake_toolkit(root, root)
    assert build.find_cuda_home({"CUDA_HOME": str(root), "PATH": ""}) == root
    assert build.find_cuda_home({"CUDA_HOME": str(tmp_path / "missing"), "PATH": ""}) is None


def test_no_toolkit_anywhere_gives_none_and_a_skip_reason(build, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "DEFAULT_CUDA_HOME", tmp_path / "no-cuda")
    environ = {"PATH": str(tmp_path)}
    assert build.find_cuda_home(environ) is None
    if torch.version.cuda is not None:
        assert "no CUDA toolkit found" in build.skip_reason(environ)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_this_machines_nvcc_resolves_to_a_real_toolkit(build):
    root = build.find_cuda_home({"PATH": os.environ["PATH"]})
    assert root is not None and build.is_toolkit_root(root)
    assert build.nvcc_release(root) is not None


def test_gencode_flags(build):
    assert build.gencode_flags("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert build.gencode_flags("9.0a, 10.0") == ["-gencode=arch=compute_90a,code=sm_90a",
                                                 "-gencode=arch=compute_100,code=sm_100"]
    with pytest.raises(ValueError, match="cannot parse CUDA arch 'sm_90'"):
        build.gencode_flags("sm_90")


def test_arch_list_defaults_to_sm80_and_sm90(build):
    flags = build.nvcc_flags({})
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert build.nvcc_flags({"TORCH_CUDA_ARCH_LIST": "8.6"})[-1] == "-gencode=arch=compute_86,code=sm_86"


def test_skip_reasons(build, monkeypatch):
    assert "GPTK_NO_CUDA_EXT=1" in build.skip_reason({"GPTK_NO_CUDA_EXT": "1"})
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in build.skip_reason({})


def test_every_source_exists(build):
    for path in build.source_paths():
        assert Path(path).is_file(), path


def test_skip_record_names_agree(build):
    assert extension.SKIP_RECORD.name == build.SKIP_RECORD


# ----------------------------------------------------------------------------- setup.py

def test_setup_py_skips_the_extension_cleanly(tmp_path):
    """With the build switched off, setup.py says why in one line, records it next to where
    the extension would go, and still configures the package."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "csrc").mkdir()
    shutil.copy(ROOT / "csrc" / "build.py", tmp_path / "csrc" / "build.py")
    (tmp_path / "kernels").mkdir()
    env = dict(os.environ, GPTK_NO_CUDA_EXT="1")
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    skip_lines = [line for line in run.stdout.splitlines() if "not building" in line]
    assert skip_lines == ["gpt-kernels: not building the CUDA extension kernels._C: "
                          "GPTK_NO_CUDA_EXT=1 is set"]
    assert "gpt-kernels" in run.stdout
    record = tmp_path / "kernels" / "_C_build_skipped.txt"
    assert record.read_text().strip() == "GPTK_NO_CUDA_EXT=1 is set"


# ----------------------------------------------------------------------------- availability

@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_unavailable_without_gpu_says_why():
    reason = extension.unavailable_reason()
    if extension.extension_path() is None:
        assert "is not built" in reason
    else:
        assert reason == "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    status = kernels.available_backends()["cuda"]
    assert not status.available and status.reason == reason


def test_reason_when_the_extension_is_missing(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(extension, "EXTENSION", "kernels._C_not_there")
    monkeypatch.setattr(extension, "SKIP_RECORD", tmp_path / "_C_build_skipped.txt")
    reason = extension.unavailable_reason()
    assert "kernels._C_not_there is not built" in reason and "pip install" in reason
    extension.forget()
    extension.SKIP_RECORD.write_text("torch 2.14.1+cpu is a CPU-only build\n")
    assert extension.unavailable_reason() == (
        "the CUDA extension kernels._C_not_there is not built "
        "(setup.py skipped it: torch 2.14.1+cpu is a CPU-only build)")
    assert extension.extension_path() is None
    assert kernels.available_backends()["cuda"].reason == extension.unavailable_reason()
    with pytest.raises(kernels.BackendUnavailableError, match="CPU-only build"):
        extension.ext()


@pytest.mark.parametrize("op", kernels.OPS)
def test_ops_on_cpu_tensors_raise_backend_unavailable(op):
    x = torch.randn(2, 4, 8)
    w = torch.ones(8)
    targets = torch.zeros(2, 4, dtype=torch.long)
    q = torch.randn(2, 2, 4, 8)
    calls = {
        "layer_norm": lambda: kernels.layer_norm(x, w, None, backend="cuda"),
        "add_layer_norm": lambda: kernels.add_layer_norm(x, x, w, None, backend="cuda"),
        "mlp_gelu": lambda: kernels.mlp_gelu(x, torch.ones(16, 8), None, torch.ones(8, 16), None,
                                             backend="cuda"),
        "causal_attention": lambda: kernels.causal_attention(q, q, q, backend="cuda"),
        "cross_entropy": lambda: kernels.cross_entropy(x, targets, backend="cuda"),
        "linear_cross_entropy": lambda: kernels.linear_cross_entropy(x, torch.ones(5, 8), targets,
                                                                     backend="cuda"),
    }
    with pytest.raises(kernels.BackendUnavailableError, match="'cuda'"):
        calls[op]()


# ----------------------------------------------------------------------------- the built module

def test_built_extension_exports_every_kernel(build):
    reason = build.skip_reason()
    if reason is not None:
        pytest.skip(f"the extension is not built here: {reason}")
    path = extension.extension_path()
    assert path is not None and path.is_file(), \
        "a CUDA torch and nvcc are present, so `pip install` should have built kernels._C"
    module = extension.ext()  # importing a CUDA extension needs no GPU
    assert EXPORTED <= set(dir(module))


def test_kernels_reject_cpu_tensors_with_clear_errors():
    if extension.extension_path() is None:
        pytest.skip("the extension is not built here")
    ext = extension.ext()
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor, got a tensor on cpu"):
        ext.layer_norm_forward(x, torch.ones(8), None, 1e-5)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.attention_forward(q, q, q, 1.0, 1, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="has versions 1 and 2, got 3"):
        ext.attention_forward(q, q, q, 1.0, 3, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="has versions 1 and 2, got 0"):
        ext.attention_backward(q, q, q, q, q, torch.zeros(1, 1, 4), 1.0, 0, False, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        ext.attention_backward(q, q, q, q, q, torch.zeros(1, 1, 4), 1.0, 2, True, 0.1, 5, 6)
    with pytest.raises(TypeError):  # the version is a required argument
        ext.attention_forward(q, q, q, 1.0)
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor"):
        ext.cross_entropy_forward(x, torch.zeros(4, dtype=torch.long), -100, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="pre must be a CUDA tensor"):
        ext.bias_gelu_forward(x, None, True)


# ----------------------------------------------------------------------------- meta tensors

def _fake_grads(fn, *inputs):
    """Run fn on meta copies of `inputs` (shapes only, no device: the ops' fake impls serve as
    their meta kernels) and backpropagate from its outputs, which exercises each forward op's
    fake impl, its registered autograd formula and the backward ops' fake impls. Returns fn's
    output and, per floating input, (shape, dtype, grad shape, grad dtype)."""
    leaves = [t.to("meta").requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()
    return out, [(t.shape, t.dtype, t.grad.shape, t.grad.dtype) for t in leaves
                 if t.is_floating_point()]


def _assert_grads_match(grads):
    assert grads
    for shape, dtype, grad_shape, grad_dtype in grads:
        assert (grad_shape, grad_dtype) == (shape, dtype)


OPS = cuda_backend.OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_layer_norms(dtype):
    x = torch.empty(3, 5, 96, dtype=dtype)
    w, b = torch.empty(96), torch.empty(96)  # fp32 parameters with bf16 activations
    y, grads = _fake_grads(lambda *a: OPS["layer_norm"](*a, 1e-5), x, w, b)
    assert y.shape == x.shape and y.dtype == dtype
    _assert_grads_match(grads)
    (s, y), grads = _fake_grads(lambda a, r, w: OPS["add_layer_norm"](a, r, w, None, 1e-5),
                                x, x, w)
    assert s.shape == y.shape == x.shape
    _assert_grads_match(grads)


@pytest.mark.parametrize("x_dtype, weight_dtype, bias_dtype", [
    (torch.float32, torch.bfloat16, torch.bfloat16),   # bf16 parameters on fp32 activations
    (torch.bfloat16, torch.float32, torch.bfloat16),   # the bias in another dtype than the weight
    (torch.bfloat16, torch.bfloat16, torch.float32)])
def test_meta_layer_norms_cast_parameters_to_a_dtype_the_kernels_take(x_dtype, weight_dtype,
                                                                      bias_dtype):
    """The kernels take the weight in x's dtype or fp32 and the bias in the weight's (the
    fakes check it as csrc/ does); the backend casts what differs, and each parameter gets
    its gradient in its own dtype back through the cast."""
    x = torch.empty(3, 64, dtype=x_dtype)
    w, b = torch.empty(64, dtype=weight_dtype), torch.empty(64, dtype=bias_dtype)
    _, grads = _fake_grads(lambda *a: OPS["layer_norm"](*a, 1e-5), x, w, b)
    _assert_grads_match(grads)
    _, grads = _fake_grads(lambda *a: OPS["add_layer_norm"](*a, 1e-5), x, x.clone(), w, b)
    _assert_grads_match(grads)
    meta_x = x.to("meta")
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        cuda_backend.layer_norm._layer_norm_fwd(meta_x, meta_x.new_empty(64, dtype=torch.float16),
                                                None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have weight's dtype"):
        cuda_backend.layer_norm._layer_norm_fwd(meta_x, meta_x.new_empty(64),
                                                meta_x.new_empty(64, dtype=torch.float64), 1e-5)


def test_meta_add_layer_norm_of_an_autocast_branch_onto_the_fp32_stream():
    """Under autocast a block adds its bf16 attention output to the fp32 residual stream;
    the kernels take one activation dtype (the fake impls check what the C++ checks), so
    the backend promotes both to the sum's dtype, and each input gets its gradient in its
    own dtype back through the cast."""
    x = torch.empty(2, 4, 64, dtype=torch.bfloat16)
    residual, w, b = torch.empty(2, 4, 64), torch.empty(64), torch.empty(64)
    (s, y), grads = _fake_grads(lambda *a: OPS["add_layer_norm"](*a, 1e-5), x, residual, w, b)
    assert s.dtype == y.dtype == torch.float32
    _assert_grads_match(grads)
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        cuda_backend.layer_norm._add_layer_norm_fwd(x.to("meta"), residual.to("meta"),
                                                    w.to("meta"), b.to("meta"), 1e-5)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_meta_mlp_and_attention(approximate):
    x = torch.empty(2, 7, 32, dtype=torch.bfloat16)
    weights = [torch.empty(128, 32, dtype=torch.bfloat16), torch.empty(128, dtype=torch.bfloat16),
               torch.empty(32, 128, dtype=torch.bfloat16), torch.empty(32, dtype=torch.bfloat16)]
    y, grads = _fake_grads(lambda *a: OPS["mlp_gelu"](*a, approximate), x, *weights)
    assert y.shape == x.shape
    _assert_grads_match(grads)

    def attention(qkv):  # the model's strided views of one (B, T, 3, H, D) projection
        q, k, v = qkv.view(2, 7, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return OPS["causal_attention"](q, k, v, 0.25, 0.0)

    out, grads = _fake_grads(attention, torch.empty(2, 7, 3 * 64, dtype=torch.bfloat16))
    assert out.shape == (2, 4, 7, 16)
    assert out.transpose(1, 2).is_contiguous()  # stored (B, T, H, D)
    _assert_grads_match(grads)


@pytest.mark.parametrize("dropout_seed", [None, (3, 4)])
def test_meta_attention_with_a_kv_cache_and_dropout(dropout_seed):
    """Keys outnumbering queries and dropout (a fresh seed, or a given one) reach both
    kernels; the gradients take their inputs' shapes (dK, dV the cache's length)."""
    q = torch.empty(2, 4, 3, 16, dtype=torch.bfloat16)
    k, v = (torch.empty(2, 4, 11, 16, dtype=torch.bfloat16) for _ in range(2))
    out, grads = _fake_grads(
        lambda q, k, v: OPS["causal_attention"](q, k, v, 0.25, 0.1, dropout_seed), q, k, v)
    assert out.shape == q.shape
    _assert_grads_match(grads)


@pytest.fixture
def restore_versions():
    """Put every kernel back at the version it ran at before the test."""
    before = {k["name"]: k["selected"] for k in versions.table()}
    yield
    for name, number in before.items():
        versions.select(name, number)


def test_cuda_kernel_versions_are_declared():
    table = {k["name"]: k for k in versions.table()}
    assert table["cuda_attention"]["versions"].keys() == {1, 2}
    assert table["cuda_attention"]["variable"] == "GPTK_CUDA_ATTENTION_VERSION"
    assert table["cuda_mlp"]["versions"].keys() == {1, 2}
    assert table["cuda_mlp"]["variable"] == "GPTK_CUDA_MLP_VERSION"


def _qkv_views(dtype=torch.bfloat16):
    return torch.empty(2, 7, 3 * 64, dtype=dtype)


def _attention_through_views(qkv, scale=0.25):
    q, k, v = qkv.view(2, 7, 3, 4, 16).permute(2, 0, 3, 1, 4)
    return OPS["causal_attention"](q, k, v, scale, 0.0)


@pytest.mark.parametrize("number", [1, 2])
@pytest.mark.parametrize("deterministic", [False, True])
def test_meta_attention_passes_version_and_mode_to_both_kernels(number, deterministic,
                                                                 restore_versions, monkeypatch):
    """The selected version reaches the forward op and, through autograd, the backward op,
    with torch's deterministic mode as version 2's choice of dQ."""
    seen = []
    backward_op = cuda_backend.attention._attention_bwd

    def recording(*args):
        seen.append(args[7:9])  # (version, deterministic)
        return backward_op(*args)

    monkeypatch.setattr(cuda_backend.attention, "_attention_bwd", recording)
    versions.select("cuda_attention", number)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, grads = _fake_grads(_attention_through_views, _qkv_views())
    finally:
        torch.use_deterministic_algorithms(was)
    assert out.shape == (2, 4, 7, 16)
    _assert_grads_match(grads)
    assert seen == [(number, deterministic)]


def test_attention_fake_impls_check_what_the_kernels_check():
    fwd, bwd = cuda_backend.attention._attention_fwd, cuda_backend.attention._attention_bwd
    q = torch.empty(1, 2, 5, 16, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(1, 2, 5, device="meta")
    longer = torch.empty(1, 2, 9, 16, dtype=torch.bfloat16, device="meta")
    with pytest.raises(RuntimeError, match="has versions 1 and 2, got 3"):
        fwd(q, q, q, 0.25, 3, 0.0, None)
    with pytest.raises(RuntimeError, match="multiple of 8 and at most 128, got 12"):
        fwd(*(torch.empty(1, 2, 5, 12, device="meta"),) * 3, 0.25, 1, 0.0, None)
    with pytest.raises(RuntimeError, match="k, v of one shape"):
        fwd(q, longer, q, 0.25, 2, 0.0, None)
    with pytest.raises(RuntimeError, match="T_K >= T"):
        fwd(longer, q, q, 0.25, 2, 0.0, None)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        fwd(q, q.float(), q, 0.25, 1, 0.0, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        fwd(*(q.half(),) * 3, 0.25, 1, 0.0, None)
    with pytest.raises(RuntimeError, match="has versions 1 and 2, got 0"):
        bwd(q, q, q, q, q, lse, 0.25, 0, False, 0.0, None)
    with pytest.raises(RuntimeError, match="lse must be the forward's contiguous float32"):
        bwd(q, q, q, q, q, lse.bfloat16(), 0.25, 2, False, 0.0, None)
    with pytest.raises(RuntimeError, match="dout must match q"):
        bwd(q.float(), q, q, q, q, lse, 0.25, 2, True, 0.0, None)
    dq, dk, dv = bwd(q, q, longer, longer, q, lse, 0.25, 2, False, 0.1, torch.tensor([1, 2]))
    assert dq.shape == q.shape and dk.shape == dv.shape == longer.shape


@pytest.mark.parametrize("number", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_mlp_version_2_takes_only_inference_with_the_tanh_gelu_in_bf16(number, dtype,
                                                                       approximate,
                                                                       restore_versions):
    """Version 2's cuBLASLt GELU epilogue returns no pre-activation (so no backward), is the
    tanh GELU, and is left to bf16: every other call runs version 1 (kernels/cuda/mlp.py)."""
    versions.select("cuda_mlp", number)
    x = torch.empty(2, 7, 32, dtype=dtype, device="meta")
    w_fc = torch.empty(128, 32, dtype=dtype, device="meta")
    b_fc = torch.empty(128, dtype=dtype, device="meta")
    w_proj, b_proj = torch.empty(32, 128, dtype=dtype, device="meta"), torch.empty(32, dtype=dtype, device="meta")
    takes = number == 2 and approximate == "tanh" and dtype == torch.bfloat16
    uses = cuda_backend.mlp.uses_gelu_epilogue
    assert uses(x, w_fc, b_fc, approximate) == takes
    assert not uses(x, w_fc, None, approximate)                          # no bias to fuse
    assert not uses(x, w_fc.requires_grad_(), b_fc, approximate)        # a backward follows
    with torch.no_grad():
        assert uses(x, w_fc, b_fc, approximate) == takes                 # ...unless no_grad
        y = OPS["mlp_gelu"](x, w_fc, b_fc, w_proj, b_proj, approximate)
        assert y.shape == x.shape and y.dtype == dtype
        one_row = OPS["mlp_gelu"](x[0, 0], w_fc, b_fc, w_proj, b_proj, approximate)
        assert one_row.shape == (32,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_meta_cross_entropies(reduction):
    logits = torch.empty(2, 5, 11)
    targets = torch.zeros(2, 5, dtype=torch.long)
    loss, grads = _fake_grads(lambda z, t: OPS["cross_entropy"](z, t, -1, reduction),
                              logits, targets)
    assert loss.shape == ((2, 5) if reduction == "none" else ()) and loss.dtype == torch.float32
    _assert_grads_match(grads)
    x = torch.empty(2, 5, 8, dtype=torch.bfloat16)
    w, b = torch.empty(11, 8, dtype=torch.bfloat16), torch.empty(11, dtype=torch.bfloat16)
    loss, grads = _fake_grads(
        lambda x, w, b, t: OPS["linear_cross_entropy"](x, w, t, b, -1, reduction),
        x, w, b, targets)
    assert loss.shape == ((2, 5) if reduction == "none" else ()) and loss.dtype == torch.float32
    _assert_grads_match(grads)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_cross_entropies_with_loss_variants(reduction):
    """Label smoothing, z-loss and soft cap reach both kernels; the z-loss value comes back
    beside the loss, shaped like it, without a gradient of its own."""
    targets = torch.zeros(2, 5, dtype=torch.long)
    variant = (0.1, 1e-4, 30.0, True)
    (loss, z_value), grads = _fake_grads(
        lambda z, t: OPS["cross_entropy"](z, t, -1, reduction, *variant),
        torch.empty(2, 5, 11), targets)
    assert loss.shape == z_value.shape == ((2, 5) if reduction == "none" else ())
    assert not z_value.requires_grad
    _assert_grads_match(grads)
    x = torch.empty(2, 5, 8, dtype=torch.bfloat16)
    w = torch.empty(11, 8, dtype=torch.bfloat16)
    (loss, z_value), grads = _fake_grads(
        lambda x, w, t: OPS["linear_cross_entropy"](x, w, t, None, -1, reduction, *variant),
        x, w, targets)
    assert loss.shape == z_value.shape and z_value.dtype == torch.float32
    _assert_grads_match(grads)


def test_every_op_has_a_cuda_implementation_and_a_limit_check():
    assert set(OPS) == set(kernels.OPS)
    fp16 = kernels.specs.SPECS["layer_norm"].canonicalize(
        torch.empty(2, 8, dtype=torch.float16), torch.empty(8, dtype=torch.float16))
    assert "fp16" in cuda_backend.unsupported(fp16)
    q = torch.empty(1, 2, 4, 12, dtype=torch.bfloat16)
    odd_head = kernels.specs.SPECS["causal_attention"].canonicalize(q, q, q)
    assert "multiple of 8" in cuda_backend.unsupported(odd_head)
