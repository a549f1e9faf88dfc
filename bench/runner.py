"""Runs the suites a command line asks for: picks the device and sizes, measures or looks up
the peak once, and writes each suite's results as soon as it finishes."""
from __future__ import annotations

import os
import sys
from argparse import Namespace
from dataclasses import asdict, replace
from pathlib import Path

import torch

import kernels
from bench.kernels import suite as kernel_suite
from bench.kernels.problems import DTYPES
from bench.output import files as output, results
from bench.timing import machine, peaks
from bench.training import e2e, loop as training, side_by_side, sweep
from gpt import train as cli
from gpt.sample import default_sample_dtype

GPU_DTYPES = ("bf16", "fp16", "fp32")
CPU_E2E = dict(steps=10, warmup=1)
GPU_E2E = dict(steps=30, warmup=5)


def _device(args: Namespace) -> torch.device:
    if not args.gpu_suite:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--gpu-suite needs a CUDA GPU, and torch sees none here")
    return torch.device("cuda")


def _backends(args: Namespace) -> list[str]:
    """The requested backends that can run here ('torch' first: others are checked
    against it end to end)."""
    status = kernels.available_backends()
    wanted = args.backends or list(kernels.BACKENDS)
    unknown = [b for b in wanted if b not in status]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {list(status)}")
    for name in wanted:
        if not status[name].available:
            print(f"skipping backend {name}: {status[name].reason}")
    return sorted((b for b in wanted if status[b].available), key=kernels.BACKENDS.index)


def _model_backends(backends: list[str], device: torch.device) -> list[str]:
    """Backends that run whole models here: never the Triton interpreter."""
    runnable = [b for b in backends if device.type == "cuda" or b == "torch"]
    if device.type == "cuda" and len(runnable) > 1:
        runnable.append(kernels.AUTO)  # the fastest backend per op
    return runnable


def run_suites(args: Namespace, suites: tuple[str, ...]) -> list[Path]:
    device = _device(args)
    out_dir = args.out_dir or machine.REPO_ROOT / "bench" / "results" / machine.device_slug(device)
    meta = machine.describe(device)
    print(f"device: {meta['device']}; measuring/looking up its peak ...")
    peak = peaks.device_peak(device, meta["cpu"])
    meta["peak"] = None if peak is None else peak.to_json()
    backends = _backends(args)
    # What `python -m gpt.train` trains with by default on this machine.
    dtype = cli.DTYPES[cli.default_dtype()]
    written = []
    for suite in suites:
        if suite == "kernels":
            dtypes = [DTYPES[d] for d in (args.dtypes or (GPU_DTYPES if args.gpu_suite
                                                           else ("fp32",)))]
            ops = args.ops or list(kernels.OPS)
            options = {"ops": ops, "backends": backends, "dtypes": [str(d) for d in dtypes],
                       "compile": not args.no_compile}
            rows = kernel_suite.run(ops, backends, dtypes, device, peak,
                                    use_compile=not args.no_compile, quick=not args.gpu_suite)
        elif suite == "e2e":
            model_backends = _model_backends(backends, device)
            specs = e2e.GPU_SPECS if args.gpu_suite else e2e.CPU_SPECS
            schedule = GPU_E2E if args.gpu_suite else CPU_E2E
            options = {"backends": model_backends, "models": [s.name for s in specs], **schedule}
            rows = e2e.run(specs, model_backends, device, dtype, peak,
                           corpus_for=_corpus_for(args), reimplementation=args.nanogpt is None,
                           sample_dtype=cli.DTYPES[default_sample_dtype()], **schedule)
        elif suite == "nanogpt":
            options, rows = _side_by_side(args)
        else:
            base, values = (sweep.GPU_BASE, sweep.GPU_VALUES) if args.gpu_suite \
                else (sweep.CPU_BASE, sweep.CPU_VALUES)
            budget = {(False, False): sweep.CPU_QUICK, (False, True): sweep.CPU_FULL,
                      (True, False): sweep.GPU_QUICK, (True, True): sweep.GPU_FULL}[
                args.gpu_suite, args.full]
            if args.tokens:
                budget = replace(budget, tokens=args.tokens)
            corpus = _corpus_for(args)(None)
            options = {**asdict(budget), "learning_rate": training.LEARNING_RATE,
                       "backend": "torch", "base": asdict(base), "corpus": corpus.name}
            rows = sweep.run(base, values, corpus, "torch", device, dtype, peak, budget)
        if device.type == "cpu" and suite in PERCENT_FIELDS:
            peak = _remeasure_cpu_peak(suite, rows, peak, meta["cpu"])
            meta["peak"] = peak.to_json()
        doc = results.document(suite, {**meta, "options": options}, rows)
        written += output.write_suite(doc, out_dir)
    return written


# The side-by-side comparison's sizes: (seed iterations, pairs), (sweep configs' iterations,
# pairs). `make bench`: minutes; --full: the seed command as written, ours in its default
# precision, in fp32 and in fp32 without biases, ~1 hour on 2 cores (5 seed pairs each: this
# machine's speed drifts by up to 1.5x within minutes).
SIDE_BY_SIDE_QUICK = ((300, 2), (60, 1))
SIDE_BY_SIDE_FULL = ((2000, 5), (300, 2))


def _side_by_side(args: Namespace) -> tuple[dict, list[dict]]:
    """Whole processes of ours and nanoGPT's train.py, alternated: the seed command, then
    the seed command with each of the sweep's settings."""
    (seed_iters, seed_pairs), (sweep_iters, sweep_pairs) = \
        SIDE_BY_SIDE_FULL if args.full else SIDE_BY_SIDE_QUICK
    others = [s for s in sweep.settings(sweep.CPU_BASE, sweep.CPU_VALUES)
              if s[2] != sweep.CPU_BASE]

    def progress(run):
        print(f"  {run.program:8s} {run.wall_s:6.1f} s  start-up {run.startup_s or 0:.2f} s  "
              f"{run.iter_ms or 0:.1f} ms/iter  val {run.val_loss}", flush=True)

    rows = side_by_side.run_rows(args.nanogpt, [side_by_side.seed_config(seed_iters),
                                                *side_by_side.precision_configs(seed_iters)],
                                 seed_pairs, on_run=progress)
    rows += side_by_side.run_rows(args.nanogpt,
                                  side_by_side.setting_configs(others, sweep_iters),
                                  sweep_pairs, on_run=progress)
    threads = os.environ.get("OMP_NUM_THREADS")
    options = {"nanogpt": str(args.nanogpt.resolve()),
               "nanogpt_commit": side_by_side.checkout_commit(args.nanogpt),
               "python": sys.executable,
               "threads": f"OMP_NUM_THREADS={threads}" if threads else
               f"OMP_NUM_THREADS unset, torch's default of {torch.get_num_threads()}",
               "same_data": side_by_side.same_data(
                   args.nanogpt, machine.REPO_ROOT / "data" / "shakespeare_char"),
               "seed_iters": seed_iters, "seed_pairs": seed_pairs,
               "sweep_iters": sweep_iters, "sweep_pairs": sweep_pairs}
    return options, rows


# The "% of peak" fields of each suite's rows, and which peak each is a fraction of.
PERCENT_FIELDS = {"kernels": ("fwd_pct_peak", "fwd_bwd_pct_peak"), "e2e": ("mfu_pct",),
                  "sweep": ("mfu_pct",)}


def _remeasure_cpu_peak(suite: str, rows: list[dict], peak: peaks.Peak, cpu: str) -> peaks.Peak:
    """Measure the CPU's peak again after a suite and keep the best of both: on a shared
    machine a single measurement can catch a busy moment, and a peak measured too low
    would inflate every percentage. Percentages are rescaled to the best peak (each is
    inversely proportional to it)."""
    best = peaks.best_of(peak, peaks.cpu_peak(cpu))
    for row in rows:
        memory_bound = row.get("bound") == "memory"
        old = peak.bandwidth if memory_bound else peak.flops[row["dtype"]]
        new = best.bandwidth if memory_bound else best.flops[row["dtype"]]
        for field in PERCENT_FIELDS[suite]:
            if row[field] is not None:
                row[field] *= old / new
    return best


def _corpus_for(args: Namespace):
    """spec -> training data: the char-level embedded corpus, or random GPT-2 token ids for
    the GPT-2 models (prepared once per run)."""
    cache = {}

    def corpus_for(spec):
        key = "char" if spec is None or spec.char_level else "gpt2"
        if key not in cache:
            cache[key] = training.char_corpus(args.data_dir or training.DEFAULT_DATA_DIR) \
                if key == "char" else training.random_gpt2_tokens(2_000_000)
        return cache[key]
    return corpus_for
