"""Routing by measurement: `auto` runs, per op and GPU architecture, the fastest correct
implementation of the committed GPU records (kernels/routes.json, derived by
bench/kernels/routes.py), PyTorch's own included; `backend=` still forces one."""
import json

import pytest
import torch

import kernels
from bench.kernels import routes
from kernels import backends, routing, torch_backend
from kernels.specs import SPECS

CUDA = torch.device("cuda", 0)


# ----------------------------------------------------------------------------- the table

def test_the_committed_table_is_what_the_committed_records_give():
    assert routing.ROUTES_PATH.read_text() == routes.render(routes.derive()), \
        "kernels/routes.json is stale: run python -m bench routes"


def test_the_h200_record_routes_attention_to_cudnn_until_ours_wins():
    table = routing.load()
    assert table[("causal_attention", "sm_90")][0] == "torch:sdpa-cudnn"
    assert table[("cross_entropy", "sm_90")][:2] == ("cuda", "triton")
    assert all(order[-1] == "torch" or "torch" in order for order in table.values())


def _record(tmp_path, folder, device, date, rows, name="headline-attention.json"):
    path = tmp_path / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {"device": device, "date": date}, "rows": rows}))
    return path


def _row(impl, ms, shape="T=1024", status="ok", dtype="bf16", op="causal_attention"):
    return {"op": op, "impl": impl, "dtype": dtype, "shape_label": shape, "status": status,
            "error": None if status == "ok" else "output 0: error 1", "fwd_bwd":
            {"median_ms": ms, "method": "cuda-graph"} if status == "ok" else None}


def test_fastest_correct_first_over_the_shapes_all_were_timed_at(tmp_path):
    rows = [_row("triton", 1.0), _row("triton", 2.0, "T=2048"),
            _row("sdpa-cudnn", 1.2), _row("sdpa-cudnn", 2.5, "T=2048"),
            _row("cuda", 0.5), _row("cuda", 9.0, "T=2048", status="FAILED"),
            _row("torch.compile", 0.1), _row("triton v1", 0.1),       # not routes
            _row("sdpa-flash", 0.9)]                                  # T=1024 only
    path = _record(tmp_path, "h100", "NVIDIA H100 80GB HBM3", "2027-01-01", rows)
    (route,) = routes.derive([path], tmp_path)["routes"]
    # Common shape: T=1024 (sdpa-flash was timed only there); cuda is out: it FAILED.
    assert route["order"] == ["torch:sdpa-flash", "triton", "torch:sdpa-cudnn"]
    assert route["shapes"] == ["T=1024"] and route["arch"] == "sm_90"
    assert route["excluded"] == {"cuda": "FAILED at T=2048: output 0: error 1"}
    assert route["records"] == ["h100/headline-attention.json"] and route["timing"] == "cuda-graph"


def test_the_newest_record_of_an_arch_wins_and_other_dtypes_and_cpus_are_ignored(tmp_path):
    old = _record(tmp_path, "h200-old", "NVIDIA H200", "2026-01-01",
                  [_row("cuda", 1.0), _row("triton", 2.0)])
    new = _record(tmp_path, "h100-new", "NVIDIA H100 80GB HBM3", "2026-06-01",
                  [_row("cuda", 3.0), _row("triton", 2.0), _row("torch", 0.1, dtype="fp32")])
    cpu = _record(tmp_path, "cpu", "CPU (AMD EPYC, 2 cores)", "2026-12-01",
                  [_row("torch", 0.01)], name="kernels.json")
    (route,) = routes.derive([old, new, cpu], tmp_path)["routes"]
    assert route["order"] == ["triton", "cuda"] and route["records"][0].startswith("h100-new")


def test_a_route_ends_with_torch_and_an_unrecorded_arch_takes_the_default(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": [{"op": "layer_norm", "arch": "sm_90",
                                            "order": ["cuda", "triton"]}]}))
    assert routing.load(path) == {("layer_norm", "sm_90"): ("cuda", "triton", "torch")}
    assert routing.load(tmp_path / "missing.json") == {}
    assert routing.order("mlp_gelu", "sm_90") == routing.DEFAULT_ORDER
    assert routing.order("layer_norm", "sm_75") == routing.DEFAULT_ORDER
    assert routing.DEFAULT_ORDER[-1] == "torch"


def test_cpu_tensors_are_routed_to_torch_only():
    assert routing.candidates("causal_attention", torch.device("cpu")) == ("torch",)
    assert backends.resolve_name("causal_attention", "auto", torch.device("cpu")) == "torch"


# ----------------------------------------------------------------------------- auto follows it

@pytest.fixture
def gpu_of_arch(monkeypatch):
    """Calls on a CUDA device of a given arch, where every backend is usable (the CPU
    stands in: nothing is launched, only chosen)."""
    def setup(arch, usable=("torch", "triton", "cuda"), refused=()):
        monkeypatch.setattr(routing, "arch_of", lambda device: arch)
        monkeypatch.setattr(backends, "_can_take",
                            lambda name, op, device: name in usable)
        monkeypatch.setattr(backends, "_ABLE", set())  # what earlier answers found able
        for name in usable:
            monkeypatch.setattr(backends._module(name), "unsupported",
                                lambda call, name=name: "refused" if name in refused else None)
    return setup


def _call(op="causal_attention"):
    q = torch.randn(1, 2, 8, 16)
    return SPECS[op].call((q, q, q, None, 0.0, None), CUDA) if op == "causal_attention" else \
        SPECS[op].call((q.view(-1, 16), torch.ones(16), None, 1e-5), CUDA)


def test_auto_runs_the_first_implementation_of_the_route(gpu_of_arch):
    gpu_of_arch("sm_90")
    chosen = backends.resolve(_call(), "auto")
    assert chosen is torch_backend.VARIANTS["causal_attention"]["sdpa-cudnn"]
    assert backends.resolve(_call("layer_norm"), "auto") is torch_backend.OPS["layer_norm"]


def test_auto_moves_down_the_route_past_what_cannot_run_the_call(gpu_of_arch, monkeypatch):
    monkeypatch.setattr(routing, "_ROUTES", {("causal_attention", "sm_90"):
                                             ("cuda", "triton", "torch")})
    gpu_of_arch("sm_90", usable=("torch", "triton"))          # no cuda extension here
    assert backends.resolve(_call(), "auto") is backends._module("triton").OPS["causal_attention"]
    gpu_of_arch("sm_90", usable=("torch", "triton"), refused=("triton",))
    assert backends.resolve(_call(), "auto") is torch_backend.OPS["causal_attention"]


def test_an_unrecorded_arch_follows_the_default_order(gpu_of_arch):
    gpu_of_arch("sm_80")
    expected = backends._module(routing.DEFAULT_ORDER[0]).OPS["causal_attention"]
    assert backends.resolve(_call(), "auto") is expected


def test_auto_asks_whether_a_backend_can_take_an_op_once_per_device(gpu_of_arch, monkeypatch):
    """What does not depend on a call's arguments (available, implements the op, runs on
    the device) is asked once; a no is asked again (a JIT build can make a backend
    available), a yes is not."""
    monkeypatch.setattr(routing, "_ROUTES", {("layer_norm", "sm_90"): ("cuda", "triton")})
    gpu_of_arch("sm_90")
    cuda_builds = iter([False, True, True])
    asked = []

    def can_take(name, op, device):
        asked.append(name)
        return name == "triton" or next(cuda_builds)
    monkeypatch.setattr(backends, "_can_take", can_take)
    chosen = [backends.resolve(_call("layer_norm"), "auto") for _ in range(3)]
    assert chosen == [backends._module("triton").OPS["layer_norm"]] + \
        [backends._module("cuda").OPS["layer_norm"]] * 2
    assert asked == ["cuda", "triton", "cuda"]


def test_a_named_backend_is_still_forced(gpu_of_arch):
    gpu_of_arch("sm_90")
    assert backends.resolve(_call(), "triton") is \
        backends._module("triton").OPS["causal_attention"]


def test_dropout_and_kv_cache_calls_follow_the_route(gpu_of_arch, monkeypatch):
    """Attention dropout and a KV cache are every backend's: such calls take the route's
    first implementation, as any other call does."""
    monkeypatch.setattr(routing, "_ROUTES", {("causal_attention", "sm_90"):
                                             ("triton", "torch:sdpa-flash", "torch")})
    gpu_of_arch("sm_90")
    q, kv = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 12, 16)
    for args in ((q, q, q, None, 0.1, None), (q, kv, kv, None, 0.0, None)):
        assert backends.resolve(SPECS["causal_attention"].call(args, CUDA), "auto") is \
            backends._module("triton").OPS["causal_attention"]


def test_the_preferred_sdpa_kernel_computes_attention():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    expected = kernels.causal_attention(q, k, v, backend="torch")
    for attention in torch_backend.VARIANTS["causal_attention"].values():
        torch.testing.assert_close(attention(q, k, v, None, 0.0), expected)
