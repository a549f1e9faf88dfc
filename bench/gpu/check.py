"""The GPU runbook: one command that turns a GPU rental into a record, most valuable
results first, within a time budget.

    make gpu-check                                   # = python3 bench/gpu/check.py
    make gpu-check GPU_CHECK_ARGS="--dry-run"        # the plan and its time estimates only
    make gpu-check GPU_CHECK_ARGS="--nanogpt ../nanoGPT"   # training beside nanoGPT itself
    python3 bench/gpu/check.py --budget 240 --skip train attention memory   # a second call

A rental here is 15 minutes of device time, machine start included, in commands of at most
10 minutes each: the default budget (480 s) is one command with room left for a second one
on the same warm machine, or for a rerun after a fix. nanoGPT's train.py runs beside ours
when a checkout sits in the repository at .nanogpt/ (ignored by git; it travels with the
working tree where the device runner is told to carry it) or is named by --nanogpt.

Stages, in order of value; each runs only if its estimate fits the budget left, and is
stopped when it overruns its time slice (twice its estimate, at most what is left), so one
slow stage cannot starve the rest:
 1. install         offline `pip install -e .`: builds the CUDA extension
 2. train           GPT-2 124M training side by side: nanoGPT's train.py (with --nanogpt)
                    and ours with backend=auto, compiled and eager (`python -m bench gpt2`)
 3. attention       causal attention fwd+bwd, d=64 bf16, T=1k..8k: ours at every kernel
                    version vs torch and every SDPA backend
 4. memory          LayerNorm (+residual) and cross-entropy at GPT-2 124M: GB/s, % of HBM
 5. conformance     tests/test_conformance.py under pytest-xdist: every backend against the spec
 6. gpu-tests       every other test marked `gpu`
 7. train-backends  the training table's other runs: each backend, compiled and eager
 8. kernels / e2e / tests / sweep   the full benchmark suites and test suite, while time remains
Every kernel row is GPU time from CUDA-graph replays with the host's time beside it
(bench/timing/gpu.py) and the static report's prediction (bench/static/predictions.py;
after the kernel suite, kernels-vs-static.md).

Everything goes to bench/results/<device-slug>-<date>-<HHMM>/ (UTC; a folder per call, so
the two calls of one rental keep separate records): each stage's log and results, and
gpu-check.{json,md} (plan, what ran, how long, result), rewritten as each stage ends; with
$OUT set (a remote runner that returns the files under it), the folder's tarball and up to
seven Markdown summaries are copied there after every stage, so a run cut short still
returns what it did. The install leaves a stamp naming the sources it built (build/,
ignored): a later call on the same machine with the same sources skips it. Estimates are
planning figures for an H100 (build included), raised to the durations the records in
bench/results measured. Run with the machine's Python: the project need not be installed
(the install is a stage); --dry-run needs no GPU.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# One command of the device runner may run 10 minutes, and a rental is 15 minutes with the
# machine's start (1-2 minutes) counted in: 8 minutes leave room for a second call or a rerun.
DEFAULT_BUDGET_S = 480
SLICE_FACTOR = 2.0        # a stage may run this many times its estimate before it is stopped
CONFORMANCE_TESTS = "tests/test_conformance.py"
RECORD = "gpu-check.json"
NO_TESTS_COLLECTED = 5    # pytest's exit status when nothing matched: not a failure here
NANOGPT_CHECKOUT = ".nanogpt"  # where a nanoGPT checkout travels with the repository
PUBLISHED_SUMMARIES = 7   # Markdown files copied to $OUT beside the tarball (the runner
                          # returns at most 8 files)
BUILD_SOURCES = ("setup.py", "pyproject.toml", "csrc")  # what the install stage builds from


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]
    estimate_s: float     # planning figure on an H100 (see the module doc)
    what: str             # what the stage answers, for the plan and the record
    needs: str | None = None  # a file an earlier stage writes, without which this one is skipped
    stamp: str | None = None  # a file written when the stage passes: while it exists, the
                              # stage's work is done on this machine and it is skipped


@dataclass
class Outcome:
    stage: str
    status: str           # "passed", "failed", "stopped", "skipped"
    seconds: float
    estimate_s: float
    slice_s: float | None
    returncode: int | None
    detail: str           # the last line of its log, or why it was skipped
    log: str | None


# ----------------------------------------------------------------------------- the plan

def xdist_workers() -> list[str]:
    """pytest-xdist's options for up to 8 worker processes, where it is installed. The GPU
    tests spend most of their time compiling and autotuning Triton kernels, which runs on
    the CPU one kernel at a time per process (the first H200 run got through 27% of the
    conformance suite in 180 s on one process); the GPU itself is mostly idle meanwhile."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, os.cpu_count() or 1))]


def stages(python: str, folder: Path, repo: Path = REPO_ROOT,
           nanogpt: Path | None = None) -> list[Stage]:
    """Every stage, most valuable first: training right after the install, then the kernel
    headlines, then the conformance suite and the rest."""
    out = str(folder)
    pytest = [python, "-m", "pytest", "-q", "-rs"]
    gpu_pytest = pytest + xdist_workers()
    gpt2 = [python, "-m", "bench", "gpt2", "--out-dir", out]
    beside = ["--nanogpt", str(nanogpt)] if nanogpt is not None else []
    plan = [
        Stage("install", [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                          "--no-index", "-e", "."], 90,
              "the project and its CUDA extension build on this machine",
              stamp=str(install_stamp(repo, python))),
        Stage("train", gpt2 + beside + ["--backends", "auto"], 200,
              "GPT-2 124M tokens/s and MFU, ours (auto, compiled and eager) vs nanoGPT's "
              "train.py" + ("" if nanogpt else " (no --nanogpt: ours only)")),
        Stage("attention", [python, "-m", "bench", "headline", "attention", "--out-dir", out],
              90, "attention fwd+bwd at every kernel version vs torch and every SDPA backend, "
                  "T=1k..8k"),
        Stage("memory", [python, "-m", "bench", "headline", "memory", "--out-dir", out], 60,
              "LayerNorm and cross-entropy: GB/s and % of HBM peak"),
        Stage("variants", [python, "-m", "bench", "variants", "--out-dir", out], 60,
              "attention dropout and the loss variants against their plain calls"),
    ]
    if (repo / CONFORMANCE_TESTS).exists():
        plan.append(Stage("conformance", gpu_pytest + [f"--junitxml={folder / 'conformance.xml'}",
                                                       CONFORMANCE_TESTS], 120,
                          "every backend meets the op specs on the GPU"))
    plan += [
        Stage("gpu-tests", gpu_pytest + ["-m", "gpu", f"--ignore={CONFORMANCE_TESTS}",
                                         f"--junitxml={folder / 'gpu-tests.xml'}"], 150,
              "the GPU tests: kernels, model, memory, GPT-2 shapes, the timing harness"),
        Stage("train-backends", gpt2 + ["--append", "--backends", "torch", "triton", "cuda"],
              330, "the training table's other runs: each backend, compiled and eager"),
        Stage("kernels", [python, "-m", "bench", "kernels", "--gpu-suite", "--out-dir", out], 420,
              "the full kernel suite: every op, dtype and GPT-2 size"),
        Stage("kernels-vs-static", [python, "-m", "bench", "predictions",
                                    str(folder / "kernels.json")], 15,
              "the kernel suite beside the static report's predictions",
              needs=str(folder / "kernels.json")),
        Stage("e2e", [python, "-m", "bench", "e2e", "--gpu-suite", "--out-dir", out], 420,
              "end-to-end training and sampling of the GPT-2 family"),
        Stage("tests", pytest + [f"--junitxml={folder / 'tests.xml'}"], 900,
              "the whole test suite on the GPU machine"),
        Stage("sweep", [python, "-m", "bench", "sweep", "--gpu-suite", "--out-dir", out], 900,
              "the one-knob-at-a-time design sweep"),
    ]
    return plan


def install_stamp(repo: Path, python: str) -> Path:
    """The install stage's stamp: named by a digest of the sources it builds and of the
    Python that builds them, so that changed sources, or another interpreter, build again."""
    digest = hashlib.sha256(python.encode())
    for name in BUILD_SOURCES:
        root = repo / name
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file():
                digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return repo / "build" / f"gpu-check-install-{digest.hexdigest()[:16]}"


def default_nanogpt(repo: Path = REPO_ROOT) -> Path | None:
    """The nanoGPT checkout that travels with the repository (.nanogpt/), if there is one."""
    checkout = repo / NANOGPT_CHECKOUT
    return checkout if (checkout / "train.py").is_file() else None


def record_folder(slug: str, now: datetime.datetime, results_dir: Path = RESULTS_DIR) -> Path:
    """The folder of one call's record: the device, the date and the UTC time (the two
    calls of one rental get one each)."""
    return results_dir / f"{slug}-{now:%Y-%m-%d-%H%M}"


def measured_durations(results_dir: Path = RESULTS_DIR) -> dict[str, float]:
    """Stage -> seconds it took in the newest record in which it passed (a rental's second
    call holds the stages its first did not)."""
    durations = {}
    for record in sorted(results_dir.glob(f"*/{RECORD}"), key=lambda path: path.stat().st_mtime):
        outcomes = json.loads(record.read_text())["outcomes"]
        durations.update({o["stage"]: o["seconds"] for o in outcomes if o["status"] == "passed"})
    return durations


def with_estimates(plan: list[Stage], measured: dict[str, float]) -> list[Stage]:
    """The plan with each stage's estimate raised to what the records measured (never
    lowered: a stage the code has since grown would otherwise be stopped at a slice sized
    for its older self)."""
    return [replace(s, estimate_s=max(s.estimate_s, measured.get(s.name, 0.0))) for s in plan]


def select(plan: list[Stage], only: list[str] | None, skip: list[str]) -> list[Stage]:
    names = {stage.name for stage in plan}
    unknown = sorted((set(only or []) | set(skip)) - names)
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {[s.name for s in plan]}")
    return [s for s in plan if (only is None or s.name in only) and s.name not in skip]


def time_slice(stage: Stage, remaining_s: float) -> float | None:
    """The seconds `stage` may run with `remaining_s` of the budget left, or None when its
    estimate does not fit (it is skipped)."""
    if stage.estimate_s > remaining_s:
        return None
    return min(remaining_s, SLICE_FACTOR * stage.estimate_s)


def render_plan(plan: list[Stage], budget_s: float) -> str:
    """The dry run: every stage with its estimate and whether it fits, in order, assuming
    each takes its estimate."""
    lines = [f"gpu-check plan, budget {budget_s:.0f} s (estimates: H100 planning figures or "
             "the records' measurements):", ""]
    elapsed = 0.0
    for index, stage in enumerate(plan, 1):
        allowed = time_slice(stage, budget_s - elapsed)
        if stage.stamp and Path(stage.stamp).exists():
            verdict = "skip: done on this machine already"
        elif allowed is None:
            verdict = f"skip: needs ~{stage.estimate_s:.0f} s, {budget_s - elapsed:.0f} s left"
        else:
            elapsed += stage.estimate_s
            verdict = f"run, ends at ~{elapsed:.0f} s (stopped after {allowed:.0f} s)"
        lines.append(f"{index:2d}. {stage.name:<18} ~{stage.estimate_s:4.0f} s  {verdict}")
        lines.append(f"      {stage.what}")
        lines.append(f"      $ {' '.join(stage.command)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- running

def _device_slug() -> str:
    import torch  # preinstalled on the GPU machine; the project itself may not be yet

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU, and torch sees none here "
                         "(--dry-run prints the plan without one)")
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def run_stage(stage: Stage, log: Path, timeout_s: float | None) -> Outcome:
    """Run the stage's command from the repo root, echoing its output into `log`."""
    print(f"\n=== {stage.name}: {' '.join(stage.command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        process = subprocess.Popen(stage.command, cwd=REPO_ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # The output loop blocks until the process ends, so the deadline is a timer.
        deadline = threading.Timer(timeout_s, process.kill) if timeout_s else None
        if deadline:
            deadline.start()
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
        returncode = process.wait()
        stopped = deadline is not None and not deadline.is_alive() and returncode != 0
        if deadline:
            deadline.cancel()
    seconds = time.perf_counter() - start
    last = (log.read_text().strip().splitlines() or [""])[-1][:200]
    if stopped:
        status, last = "stopped", f"stopped after its {timeout_s:.0f} s slice; {last}"
    else:
        status = "passed" if returncode in (0, NO_TESTS_COLLECTED) else "failed"
    return Outcome(stage.name, status, seconds, stage.estimate_s, timeout_s, returncode, last,
                   log.name)


def skipped(stage: Stage, why: str) -> Outcome:
    return Outcome(stage.name, "skipped", 0.0, stage.estimate_s, None, None, why, None)


def write_record(folder: Path, plan: list[Stage], outcomes: list[Outcome],
                 budget_s: float) -> Path:
    """gpu-check.json and gpu-check.md: the plan and what each stage did so far."""
    (folder / RECORD).write_text(json.dumps(
        {"budget_s": budget_s, "plan": [asdict(s) for s in plan],
         "outcomes": [asdict(o) for o in outcomes]}, indent=1) + "\n")
    done = {o.stage: o for o in outcomes}
    lines = [f"# gpu-check {folder.name}", "",
             f"Budget {budget_s:.0f} s; used {sum(o.seconds for o in outcomes):.0f} s.", "",
             "| stage | result | time | estimate | what | last line of its log |",
             "|---|---|---|---|---|---|"]
    for stage in plan:
        outcome = done.get(stage.name)
        result = "not reached" if outcome is None else outcome.status
        if outcome is not None and outcome.status == "failed":
            result = f"**FAILED** ({outcome.returncode})"
        log = f" (`{outcome.log}`)" if outcome and outcome.log else ""
        lines.append(f"| {stage.name}{log} | {result} | "
                     f"{'' if outcome is None else f'{outcome.seconds:.0f} s'} | "
                     f"{stage.estimate_s:.0f} s | {stage.what} | "
                     f"{'' if outcome is None else outcome.detail.replace('|', '/')} |")
    lines += ["", "Headline results: headline-*.md (each measurement beside the static "
              "report's prediction); suites: summary.md; raw results: *.json."]
    path = folder / "gpu-check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def publish(folder: Path) -> None:
    """Copy the record to $OUT: the folder's tarball, gpu-check.md and the first of the other
    Markdown summaries by name, PUBLISHED_SUMMARIES in all (the runner returns 8 files)."""
    out = os.environ.get("OUT")
    if not out:
        return
    tarball = Path(out) / f"{folder.name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    summaries = sorted(folder.glob("*.md"), key=lambda path: (path.name != "gpu-check.md",
                                                              path.name))
    for path in summaries[:PUBLISHED_SUMMARIES]:
        shutil.copy(path, Path(out) / path.name)


def run(plan: list[Stage], folder: Path, budget_s: float) -> list[Outcome]:
    start = time.perf_counter()
    outcomes = []
    for stage in plan:
        remaining = budget_s - (time.perf_counter() - start)
        allowed = time_slice(stage, remaining)
        if stage.stamp and Path(stage.stamp).exists():
            outcomes.append(skipped(stage, f"done on this machine already "
                                           f"({Path(stage.stamp).name})"))
        elif allowed is None:
            outcomes.append(skipped(stage, f"estimate {stage.estimate_s:.0f} s > "
                                           f"{max(remaining, 0):.0f} s left in the budget"))
        elif stage.needs and not Path(stage.needs).exists():
            outcomes.append(skipped(stage, f"needs {Path(stage.needs).name}, which no earlier "
                                           "stage wrote"))
        else:
            outcomes.append(run_stage(stage, folder / f"{stage.name}.log", allowed))
            if stage.stamp and outcomes[-1].status == "passed":
                Path(stage.stamp).parent.mkdir(parents=True, exist_ok=True)
                Path(stage.stamp).touch()
        write_record(folder, plan, outcomes, budget_s)
        publish(folder)
    return outcomes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, build included (default "
                             f"{DEFAULT_BUDGET_S}: one device command of a 15-minute rental, "
                             f"with room for a second)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with its time estimates; run nothing")
    parser.add_argument("--nanogpt", type=Path, metavar="PATH", default=default_nanogpt(),
                        help=f"a nanoGPT checkout: the train stage runs its train.py beside ours "
                             f"(default: {NANOGPT_CHECKOUT}/ in the repository, where present)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    parser.add_argument("--skip", nargs="+", metavar="STAGE", default=[],
                        help="leave these stages out")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.nanogpt is not None:
        if not (args.nanogpt / "train.py").is_file():
            parser.error(f"--nanogpt {args.nanogpt}: no train.py there (a checkout of "
                         f"https://github.com/karpathy/nanoGPT)")
        args.nanogpt = args.nanogpt.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = sys.executable
    now = datetime.datetime.now(datetime.timezone.utc)
    if args.dry_run:
        folder = record_folder("<gpu>", now)
        plan = select(with_estimates(stages(python, folder, nanogpt=args.nanogpt),
                                     measured_durations()), args.only, args.skip)
        print(render_plan(plan, args.budget), end="")
        return 0
    folder = record_folder(_device_slug(), now)
    plan = select(with_estimates(stages(python, folder, nanogpt=args.nanogpt),
                                 measured_durations()), args.only, args.skip)
    folder.mkdir(parents=True, exist_ok=True)
    print(render_plan(plan, args.budget), end="")
    outcomes = run(plan, folder, args.budget)
    print(f"\nrecord written to {folder}")
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
