"""Peak memory of the lm_head + loss, forward and backward: eager vs chunked.

    python -m bench lce-memory            # GPT-2 size, writes bench/results/
    python -m bench lce-memory --rows 1024 --vocab 8192 --no-write

Eager is nanoGPT's `F.cross_entropy(lm_head(x).float(), targets)` (the fp32 cast is what
autocast does to cross_entropy), which holds the whole (rows, V) logits and its softmax
and their gradients. The chunked versions (`kernels.chunked_linear_cross_entropy`, the
`torch` backend, and on a GPU the Triton one) never hold more than one chunk of logits.

What is measured: the peak of the bytes allocated by the forward + backward above what
was allocated before it (the inputs x and W), gradients of x and W included.
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
- CPU: torch has no peak counter for the CPU allocator, so the run goes under the torch
  profiler with `profile_memory=True`, which records every allocation and free of the CPU
  allocator with the running total of bytes allocated since the profiler started; the
  peak is the largest running total. It counts tensor storage only (as the CUDA counter
  does), not allocator fragmentation or the Python heap.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from bench.timing.machine import REPO_ROOT, describe
from kernels.chunked_linear_cross_entropy import linear_cross_entropy as chunked_torch

GPT2 = dict(rows=8192, channels=768, vocab=50257)  # B*T = 8 x 1024, GPT-2 small
MAX_RATIO = 0.25  # the bound: chunked peak <= 1/4 of eager's
RESULTS = REPO_ROOT / "bench" / "results" / "linear_cross_entropy_memory"
IGNORE_INDEX = -1


def eager_lm_head_cross_entropy(x, weight, targets):
    logits = x @ weight.t()
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def chunked_triton(x, weight, targets):
    from kernels.triton.linear_cross_entropy import linear_cross_entropy
    return linear_cross_entropy(x, weight, targets, None, IGNORE_INDEX, "mean")


def chunked_torch_backend(x, weight, targets):
    return chunked_torch(x, weight, targets, None, IGNORE_INDEX, "mean")


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _profiled_cpu_peak(run) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    totals = [node.extra_fields.total_allocated
              for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"]
    return max(totals, default=0)


def peak_bytes(loss_fn, x, weight, targets) -> int:
    """Peak bytes allocated by loss_fn's forward + backward above those already allocated."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()

    def run():
        loss_fn(x, weight, targets).backward()

    if x.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _profiled_cpu_peak(run)


def make_inputs(rows, channels, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, channels, generator=gen).to(device, dtype)
    weight = (0.02 * torch.randn(vocab, channels, generator=gen)).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    targets[::17] = IGNORE_INDEX  # some ignored positions, as padding would give
    return x, weight, targets


def measure(rows, channels, vocab, dtype, device) -> list[dict]:
    """One row per implementation: peak bytes and ratio to eager."""
    x, weight, targets = make_inputs(rows, channels, vocab, dtype, device)
    impls = {"eager lm_head + F.cross_entropy": eager_lm_head_cross_entropy,
             "chunked (torch backend)": chunked_torch_backend}
    if device.type == "cuda":
        impls["chunked (triton backend)"] = chunked_triton
    peaks = {name: peak_bytes(fn, x, weight, targets) for name, fn in impls.items()}
    eager = peaks["eager lm_head + F.cross_entropy"]
    return [{"impl": name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
             "rows": rows, "channels": channels, "vocab": vocab, "peak_bytes": peak,
             "peak_mib": round(peak / 2**20, 1), "ratio_to_eager": round(peak / eager, 4)}
            for name, peak in peaks.items()]


def to_markdown(doc: dict) -> str:
    lines = ["# Linear + cross-entropy: peak memory, forward + backward", "",
             f"Problem: rows (B*T) = {doc['problem']['rows']}, C = {doc['problem']['channels']}, "
             f"V = {doc['problem']['vocab']}. Peak bytes allocated above the inputs "
             f"(gradients of x and W included); bound: chunked <= {MAX_RATIO} x eager.", "",
             "| device | dtype | implementation | peak (MiB) | ratio to eager |",
             "|---|---|---|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['impl']} | {r['peak_mib']} | "
                     f"{r['ratio_to_eager']} |")
    lines += ["", f"Measured on {doc['meta']['device']}, torch {doc['meta']['torch']}, "
              f"commit {doc['meta']['git_commit']}, {doc['meta']['date']}.",
              "CPU peaks come from the torch profiler's allocation events (profile_memory=True), "
              "CUDA peaks from torch.cuda.max_memory_allocated.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench lce-memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=GPT2["rows"])
    parser.add_argument("--channels", type=int, default=GPT2["channels"])
    parser.add_argument("--vocab", type=int, default=GPT2["vocab"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    problem = dict(rows=args.rows, channels=args.channels, vocab=args.vocab)
    runs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        runs += [(torch.device("cuda"), torch.float32), (torch.device("cuda"), torch.bfloat16)]
    rows = [r for device, dtype in runs for r in measure(**problem, dtype=dtype, device=device)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = {"meta": describe(device), "problem": problem, "max_ratio": MAX_RATIO, "rows": rows}
    markdown = to_markdown(doc)
    print(markdown)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        RESULTS.with_suffix(".md").write_text(markdown)
    worst = max(r["ratio_to_eager"] for r in rows if r["impl"].startswith("chunked"))
    return 0 if worst <= MAX_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
