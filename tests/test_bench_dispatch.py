"""The dispatch-overhead row (bench/kernels/dispatch.py): its interleaving and arithmetic
with a fake clock, its launch-free stand-ins against the ops' own fake implementations,
and a short run of every row."""
import pytest
import torch

import kernels
from bench.kernels import dispatch
from kernels import cuda
from kernels.specs import SPECS


class FakeClock:
    """Each call of the function being timed advances the clock by its cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def costing(self, seconds):
        def fn():
            self.now += seconds
        return fn


def test_rounds_alternate_and_give_per_call_microseconds():
    clock = FakeClock()
    order = []
    bare_fn, ours_fn = clock.costing(2e-6), clock.costing(5e-6)
    bare = lambda: (order.append("b"), bare_fn())  # noqa: E731
    ours = lambda: (order.append("o"), ours_fn())  # noqa: E731
    bare_us, ours_us = dispatch.interleaved(bare, ours, rounds=4, calls=3, clock=clock)
    assert bare_us == pytest.approx([2.0] * 4) and ours_us == pytest.approx([5.0] * 4)
    rounds = "".join(order)[6:]  # after the warm-up round of each
    assert rounds == "bbbooo" + "ooobbb" + "bbbooo" + "ooobbb"


@pytest.mark.parametrize("rounds, slices, sizes", [(201, 10, [21] + [20] * 9), (6, 3, [2, 2, 2]),
                                                  (3, 10, [1, 1, 1]), (5, 1, [5])])
def test_rounds_are_cut_into_nearly_equal_slices(rounds, slices, sizes):
    assert dispatch.slice_sizes(rounds, slices) == sizes


def test_the_rows_take_turns_so_each_rows_rounds_span_the_run(monkeypatch):
    """A slow phase of the machine falls on every row alike: the rows run a slice of their
    rounds each in turn (each slice after its warm-up round), not all of one row's rounds
    and then the next row's."""
    order = []

    def pairs():
        return {op: (lambda: None, lambda op=op: order.append(op)) for op in ("a", "b")}
    monkeypatch.setattr(dispatch, "torch_pairs", pairs)
    rows = dispatch.measure(("torch",), modes=("inference",), rounds=6, calls=1, slices=3)
    assert "".join(order) == "aaabbb" * 3   # per slice: a warm-up call and 2 rounds
    assert [(r.op, r.rounds) for r in rows] == [("a", 6), ("b", 6)]


def test_the_overhead_is_the_median_of_the_rounds_differences():
    row = dispatch.summarize("layer_norm", "torch", "training", [4.0, 4.0, 9.0, 4.0, 4.0],
                             [7.0, 8.0, 10.0, 7.5, 30.0])
    assert row.overhead_us == 3.5 and row.bare_us == 4.0 and row.ours_us == 8.0
    assert row.rounds == 5 and row.within_target
    assert not dispatch.summarize("x", "torch", "inference", [1.0, 1.0], [9.0, 9.0]).within_target


@pytest.mark.parametrize("op", dispatch.LAUNCH_FREE_OPS)
def test_the_launch_free_extension_returns_what_the_ops_fakes_say(op):
    """Each stand-in gives the outputs the cuda op's fake implementation (what csrc/
    returns) gives, in shape and dtype."""
    bf16 = torch.bfloat16  # statistics and losses stay fp32 whatever the activations' dtype
    x, r = torch.randn(4, 16, dtype=bf16), torch.randn(4, 16, dtype=bf16)
    w, b = torch.randn(16, dtype=bf16), torch.randn(16, dtype=bf16)
    q = torch.randn(1, 2, 8, 16, dtype=bf16)
    logits, targets = torch.randn(4, 32, dtype=bf16), torch.randint(0, 32, (4,))
    # (entry point, op, their shared arguments, the entry point's own, the op's own): the
    # attention's and cross-entropy's dropout and loss-variant arguments differ in form.
    calls = {"layer_norm": ("layer_norm_forward", "cuda_layer_norm_fwd", (x, w, b, 1e-5), (), ()),
             "add_layer_norm": ("add_layer_norm_forward", "cuda_add_layer_norm_fwd",
                                (x, r, w, b, 1e-5), (), ()),
             "causal_attention": ("attention_forward", "cuda_attention_fwd",
                                  (q, q, q, 0.25, 1), (0.0, 0, 0), (0.0, None)),
             "cross_entropy": ("cross_entropy_forward", "cuda_cross_entropy_fwd",
                               (logits, targets, -100), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))}
    entry, op_name, args, entry_args, op_args = calls[op]
    stand_in = getattr(dispatch.LaunchFreeExtension, entry)(*args, *entry_args)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args + op_args]
    fake = getattr(torch.ops.gptk, op_name)(*meta)
    assert [(t.shape, t.dtype) for t in stand_in] == [(t.shape, t.dtype) for t in fake]


def test_launch_free_paths_run_the_backends_code_without_a_kernel(monkeypatch):
    x, w = torch.randn(4, 16), torch.randn(16)
    with dispatch.cuda_launch_free():
        call = SPECS["layer_norm"].canonicalize(x, w, None)
        assert cuda.OPS["layer_norm"](*call.args).shape == (4, 16)
    if kernels.available_backends()["triton"].available:
        launched = []
        monkeypatch.setattr(dispatch, "_no_launch", lambda *a, **k: launched.append(1))
        with dispatch.triton_launch_free():
            assert kernels.layer_norm(x, w, backend="triton").shape == (4, 16)
        assert launched == [1]


def test_every_row_runs_and_the_table_says_whether_it_meets_the_target():
    backends = ["torch", "cuda"] + (["triton"] if kernels.available_backends()[
        "triton"].available else [])
    rows = dispatch.measure(tuple(backends), rounds=3, calls=2)
    expected = (len(dispatch.torch_pairs()) + len(dispatch.LAUNCH_FREE_OPS)
                * (len(backends) - 1)) * len(dispatch.MODES)
    assert len(rows) == expected
    text = dispatch.table(rows)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == expected + 1 and len({line.count("|") for line in lines}) == 1
    assert "| layer_norm | cuda, launch-free | training |" in text
