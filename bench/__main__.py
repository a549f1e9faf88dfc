"""Command line of the benchmark suite.

    python -m bench kernels|e2e|sweep|all [--gpu-suite] [--ops ...] [--backends ...]
    python -m bench e2e --nanogpt PATH [--full]  # + whole processes side by side with nanoGPT
    python -m bench nanogpt --nanogpt PATH      # only the side-by-side comparison
    python -m bench render bench/results/<device>/kernels.json [...]
    python -m bench static [--out-dir DIR]      # the static performance report, no GPU
    python -m bench headline attention|memory --out-dir DIR   # the GPU kernel headlines
    python -m bench variants --out-dir DIR      # GPU: dropout, loss variants vs plain calls
    python -m bench gpt2 --out-dir DIR [--nanogpt PATH]  # GPT-2 124M training vs nanoGPT
    python -m bench predictions bench/results/<gpu>-<date>/kernels.json
    python -m bench routes [--check]            # auto's routes from the GPU records
    python -m bench dispatch [--out-dir DIR]    # per-op host overhead over the bare call (CPU)
    python -m bench resources                   # compiled resources of every kernel, no GPU
    python -m bench lce-memory                  # fused lm_head + loss memory vs eager

Without --gpu-suite: the CPU-sized suite on the CPU (small GPT-2 shapes, under 10 minutes),
with the Triton kernels checked under the interpreter but not timed. With it: the full
suite on the GPU (fp32/bf16/fp16, GPT-2 124M..1.5B shapes, GPT-2 models). --full trains
the sweep to the seed command's token budget and runs the side-by-side comparison at the
seed's 2000 iterations (about an hour on 2 cores). Results go to
bench/results/<device-slug>/<suite>.{json,md,png} and a summary.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

SUITE_NAMES = ("kernels", "e2e", "nanogpt", "sweep")
# Commands with a command line of their own: name -> the module whose main(argv) runs it.
TOOLS = {"headline": "bench.kernels.headline", "variants": "bench.kernels.variants",
         "gpt2": "bench.training.gpt2",
         "routes": "bench.kernels.routes", "dispatch": "bench.kernels.dispatch",
         "predictions": "bench.static.predictions", "resources": "bench.static.resources",
         "lce-memory": "bench.kernels.linear_cross_entropy_memory"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=SUITE_NAMES + ("all", "render", "static") + tuple(TOOLS))
    parser.add_argument("files", nargs="*", type=Path, help="render: results JSON files")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="the full GPU suite (needs a CUDA GPU); default: the CPU suite")
    parser.add_argument("--ops", nargs="+", help="kernel ops to run (default: every op)")
    parser.add_argument("--backends", nargs="+",
                        help="backends to run (default: every available one)")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16", "fp16"),
                        help="kernel dtypes, the first one the headline (default: fp32 on "
                             "the CPU; bf16 fp16 fp32 on the GPU)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline (slow to compile on a small CPU)")
    parser.add_argument("--full", action="store_true",
                        help="the long mode: the sweep at the seed's token budget, the "
                             "side-by-side comparison at the seed's 2000 iterations")
    parser.add_argument("--nanogpt", type=Path, metavar="PATH",
                        help="a nanoGPT checkout (with data/shakespeare_char prepared): e2e "
                             "then times both whole processes side by side; without it, "
                             "nanoGPT's model is re-implemented in-process as a fallback")
    parser.add_argument("--tokens", type=int, help="sweep: training tokens per config "
                                                   "(default: see bench/training/sweep.py)")
    parser.add_argument("--out-dir", type=Path,
                        help="where results go (default: bench/results/<device-slug>)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="prepared char-level corpus (default: data/default-char)")
    args = parser.parse_args(argv)
    if args.command == "render" and not args.files:
        parser.error("render needs at least one results JSON file")
    if args.command != "render" and args.files:
        parser.error(f"{args.command} takes no file arguments")
    if args.tokens is not None and args.tokens < 1:
        parser.error(f"--tokens must be at least 1, got {args.tokens}")
    if args.command == "nanogpt" and args.nanogpt is None:
        parser.error("nanogpt compares with a nanoGPT checkout: pass --nanogpt PATH")
    if args.nanogpt is not None:
        from bench.training.side_by_side import SetupError, nanogpt
        try:
            nanogpt(args.nanogpt)  # checked now, not after the other suites ran
        except SetupError as exc:
            parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["static"]:
        # Its traffic count runs the Triton kernels under the interpreter: set before
        # triton is first imported. (Its AOT compiles run in workers without it.)
        os.environ["TRITON_INTERPRET"] = "1"
        from bench.static.report import main as static_main
        return static_main(argv[1:])
    if argv[:1] == ["dispatch"]:
        # Its launch-free triton rows run Triton's launchers on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    if argv[:1] and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    args = parse_args(argv)
    if args.command == "render":
        from bench.output.files import render_files
        for path in render_files(args.files):
            print(path)
        return 0
    if not args.gpu_suite:
        # Before anything imports triton: the CPU suite checks the Triton kernels under
        # the interpreter (never timing them).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.runner import run_suites
    start = time.perf_counter()
    written = run_suites(args, suites_of(args))
    for path in written:
        print(path)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def suites_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The suites a command runs: e2e includes the side-by-side comparison when a nanoGPT
    checkout is given."""
    if args.command == "all":
        chosen = SUITE_NAMES
    elif args.command == "e2e":
        chosen = ("e2e", "nanogpt")
    else:
        chosen = (args.command,)
    return tuple(s for s in chosen if s != "nanogpt" or args.nanogpt is not None)


if __name__ == "__main__":
    sys.exit(main())
