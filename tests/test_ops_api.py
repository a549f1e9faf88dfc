"""The op API: backend registry and availability, dispatch, and clear errors on bad input."""
import pytest
import torch

import kernels
from kernels import backends


def test_available_backends_reports_every_backend_with_a_reason():
    status = kernels.available_backends()
    assert list(status) == list(kernels.BACKENDS)
    assert status["torch"].available
    for s in status.values():
        assert isinstance(s, kernels.BackendStatus) and s.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_cuda_backend_unavailable_without_gpu_says_why():
    status = kernels.available_backends()["cuda"]
    assert not status.available
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(kernels.BackendUnavailableError, match="'cuda' is not available"):
        kernels.layer_norm(x, w, None, backend="cuda")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        kernels.layer_norm(torch.randn(2, 4), torch.ones(4), backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.set_default_backend("tpu")


def test_auto_on_cpu_tensors_picks_torch_never_the_interpreter():
    assert backends.resolve_name("layer_norm", "auto", torch.device("cpu")) == "torch"


def test_default_backend_is_used_when_none_is_given(monkeypatch):
    monkeypatch.setattr(backends, "_default_backend", "torch")
    assert kernels.get_default_backend() == "torch"
    kernels.set_default_backend("auto")
    assert kernels.get_default_backend() == "auto"
    assert backends.resolve_name("cross_entropy", None, torch.device("cpu")) == "torch"


def test_backend_without_the_op_is_a_clear_error(monkeypatch):
    module = backends._module("torch")
    monkeypatch.setattr(module, "OPS", {k: v for k, v in module.OPS.items() if k != "layer_norm"})
    with pytest.raises(kernels.BackendUnavailableError, match="does not implement 'layer_norm'"):
        backends.resolve_name("layer_norm", "torch", torch.device("cpu"))


def test_every_op_is_declared_once_and_implemented_by_torch():
    """The specs are the list of ops; the public functions, the `torch` backend and the
    benchmark problems all cover exactly that list."""
    from bench.kernels.problems import PROBLEMS
    from kernels.specs import SPECS

    assert kernels.OPS == tuple(SPECS)
    assert set(backends._module("torch").OPS) == set(SPECS) == set(PROBLEMS)
    for op in kernels.OPS:
        assert callable(getattr(kernels, op))


def test_backend_packages_do_not_import_the_registry():
    """The registry imports the backends, never the other way round (no import cycle)."""
    import ast
    from pathlib import Path

    root = Path(kernels.__file__).parent
    for path in [*root.glob("cuda/*.py"), *root.glob("triton/*.py"), root / "torch_backend.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("kernels.backends", "kernels.ops"), path
                assert not (node.module == "kernels" and any(
                    a.name in ("backends", "ops") for a in node.names)), path


@pytest.mark.parametrize("call, error, message", [
    (lambda: kernels.layer_norm(torch.randn(2, 4), torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
    (lambda: kernels.layer_norm(torch.ones(2, 4, dtype=torch.long), torch.ones(4)), TypeError, "x must be a floating"),
    (lambda: kernels.layer_norm(torch.randn(2, 4), torch.ones(4), eps=0.0), ValueError, "eps must be a positive"),
    (lambda: kernels.layer_norm(torch.randn(2, 4).tolist(), torch.ones(4)), TypeError, "x must be a torch.Tensor"),
    (lambda: kernels.add_layer_norm(torch.randn(2, 4), torch.randn(2, 3), torch.ones(4)), ValueError,
     r"residual must have shape \(2, 4\)"),
    (lambda: kernels.mlp_gelu(torch.randn(2, 4), torch.randn(16, 5), None, torch.randn(4, 16), None),
     ValueError, r"w_fc must have shape \(hidden, 4\)"),
    (lambda: kernels.mlp_gelu(torch.tensor(1.0), torch.randn(16, 4), None, torch.randn(4, 16), None),
     ValueError, r"w_fc must have shape \(hidden, C\)"),
    (lambda: kernels.mlp_gelu(torch.randn(2, 4), torch.randn(16, 4), None, torch.randn(16, 4), None),
     ValueError, r"w_proj must have shape \(4, 16\)"),
    (lambda: kernels.mlp_gelu(torch.randn(2, 4), torch.randn(16, 4), None, torch.randn(4, 16), None,
                              approximate="erf"), ValueError, "approximate must be one of"),
    (lambda: kernels.mlp_gelu(torch.randn(2, 4), torch.randn(16, 4), torch.randn(16).bfloat16(),
                              torch.randn(4, 16), None), TypeError, "one dtype"),
    (lambda: kernels.causal_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
     ValueError, "q must be 4-D"),
    (lambda: kernels.causal_attention(torch.randn(1, 2, 4, 8), torch.randn(2, 4, 8), torch.randn(1, 2, 4, 8)),
     ValueError, "k must be 4-D"),
    (lambda: kernels.causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 1, 2, 4, 8)),
     ValueError, "v must be 4-D"),
    (lambda: kernels.causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)),
     ValueError, "shorter than q"),
    (lambda: kernels.causal_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)),
     ValueError, "k and v must have shape"),
    (lambda: kernels.causal_attention(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                                      torch.randn(1, 1, 2, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (lambda: kernels.causal_attention(*[torch.randn(1, 1, 2, 8)] * 3, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: kernels.causal_attention(*[torch.randn(1, 1, 2, 8)] * 3, scale=float("inf")), ValueError,
     "scale must be a finite"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2.0])), TypeError, "int64 or int32"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, r"targets must have shape \(3,\)"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 5])), ValueError, r"out of range \[0, 5\)"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, -1, 4])), ValueError, r"out of range \[0, 5\).*: \[-1\]"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg"), ValueError, "reduction"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([0, 1, 2])),
     ValueError, r"weight must have shape \(vocab, 4\)"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).double(),
                                          torch.tensor([0, 1, 2])), TypeError, "one dtype"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), ignore_index=1.5),
     TypeError, "ignore_index must be an int"),
    (lambda: kernels.layer_norm(torch.tensor(1.0), torch.ones(1)), ValueError, "at least one dim"),
    (lambda: kernels.causal_attention(*[torch.randn(1, 1, 2, 8)] * 3, dropout_p=0.1,
                                      dropout_seed=(1,)), TypeError, "pair of ints"),
    (lambda: kernels.causal_attention(*[torch.randn(1, 1, 2, 8)] * 3, dropout_p=0.1,
                                      dropout_seed=(1, 2 ** 32)), ValueError, "offset < 2\\^32"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=1.5),
     ValueError, r"label_smoothing must be a number in \[0, 1\]"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), z_loss=-1e-4),
     ValueError, "z_loss"),
    (lambda: kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), softcap=0.0),
     ValueError, "softcap must be None or a finite number > 0"),
    (lambda: kernels.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                          return_z_loss=1), TypeError, "return_z_loss must be a bool"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_mixed_devices_is_a_clear_error():
    x = torch.randn(2, 4)
    w = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="same device"):
        kernels.layer_norm(x, w)


def test_ignore_index_targets_are_not_out_of_range():
    loss = kernels.cross_entropy(torch.randn(3, 5), torch.tensor([0, -100, 4]))
    assert torch.isfinite(loss)


def test_matmul_ops_follow_autocast():
    x, w_fc, w_proj = torch.randn(2, 8), torch.randn(32, 8), torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.mlp_gelu(x, w_fc, None, w_proj, None)
        attn = kernels.causal_attention(*[torch.randn(1, 1, 3, 8)] * 3)
    assert y.dtype == torch.bfloat16 and attn.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), kernels.mlp_gelu(x, w_fc, None, w_proj, None), atol=0.1, rtol=0.05)


@pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                    reason="triton backend unavailable")
def test_dropout_and_kv_cache_calls_run_on_the_named_backend(recwarn):
    """Attention dropout and queries shorter than keys are every backend's: a named backend
    runs them itself, with no warning and no detour through `torch`."""
    q, kv = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 6, 8)
    triton_attention = backends._module("triton").OPS["causal_attention"]
    for args in ((q, q, q, None, 0.5), (q, kv, kv), (q, kv, kv, None, 0.2, (1, 2))):
        call = kernels.specs.SPECS["causal_attention"].canonicalize(*args)
        assert backends.resolve(call, "triton") is triton_attention
        assert kernels.causal_attention(*args, backend="triton").shape == q.shape
    assert not recwarn.list


@pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                    reason="triton backend unavailable")
def test_a_call_the_backend_cannot_run_is_refused_with_the_limit():
    q = torch.randn(1, 1, 4, 256)
    call = kernels.specs.SPECS["causal_attention"].canonicalize(q, q, q)
    assert "head dims up to 128" in backends.why_unsupported("triton", call)
    with pytest.raises(kernels.BackendUnavailableError, match="head dims up to 128, got 256"):
        kernels.causal_attention(q, q, q, backend="triton")


@pytest.mark.skipif(not kernels.available_backends()["triton"].available,
                    reason="triton backend unavailable")
def test_the_launchers_interpreter_flag_is_how_triton_decorated_the_kernels():
    """The launchers branch on `INTERPRETED`, read once (triton.jit decides at decoration
    whether a kernel is interpreted), not on the environment at every call: the flag must
    say what every kernel is."""
    from triton.runtime.interpreter import InterpretedFunction

    from kernels.triton import attention, cross_entropy, interpreter, layer_norm, matmul

    kernels_ = (layer_norm._layer_norm_fwd_kernel, cross_entropy._cross_entropy_fwd_kernel,
                *attention._KERNELS.values(), matmul._matmul_bias_gelu_kernel)
    assert all(isinstance(k, InterpretedFunction) == interpreter.INTERPRETED
               for k in kernels_)
