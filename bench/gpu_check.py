"""The GPU runbook: one command that turns a short GPU lease into a complete record.

    make gpu-check                     # = python3 bench/gpu_check.py
    python3 bench/gpu_check.py --skip-tests --suites kernels

On a GPU machine with torch and triton preinstalled and no network, it
1. installs the project offline (`pip install --no-build-isolation --no-deps -e .`), which
   builds the C++/CUDA extension when nvcc and a CUDA torch are present;
2. runs the whole test suite, GPU tests included (`python -m pytest -q`);
3. runs the GPU benchmark suite (`python -m bench all --gpu-suite`);
and writes every log, JSON, table and plot to bench/results/<device-slug>-<date>/, with
gpu-check.md saying what ran, how long it took and whether it passed. When $OUT is set
(a remote runner that returns the files under it), the folder's tarball, gpu-check.md and
summary.md are copied there after every stage, so a run cut short still returns its record.

Run as a script with the machine's Python (the project need not be installed yet).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _device_slug() -> str:
    import torch  # preinstalled on the GPU machine; the project itself may not be yet

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU, and torch sees none here")
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _run_stage(name: str, command: list[str], log: Path, timeout_s: float | None) -> dict:
    """Run `command` from the repo root, echoing its output and saving it to `log`."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # The output loop blocks until the process ends, so the deadline is a timer.
        deadline = threading.Timer(timeout_s, process.kill) if timeout_s else None
        if deadline:
            deadline.start()
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
        returncode = process.wait()
        if deadline:
            timed_out = not deadline.is_alive()
            deadline.cancel()
            if timed_out:
                returncode = f"stopped after {timeout_s:g} s"
    seconds = time.perf_counter() - start
    last = log.read_text().strip().splitlines()[-1:] or [""]
    return {"stage": name, "command": " ".join(command), "returncode": returncode,
            "seconds": seconds, "last_line": last[0][:200], "log": log.name}


def _write_report(folder: Path, stages: list[dict]) -> Path:
    lines = [f"# gpu-check {folder.name}", "",
             "| stage | result | time | last line of its log |", "|---|---|---|---|"]
    for s in stages:
        result = "passed" if s["returncode"] == 0 else f"**FAILED** ({s['returncode']})"
        lines.append(f"| {s['stage']} (`{s['log']}`) | {result} | {s['seconds']:.0f} s | "
                     f"{s['last_line'].replace('|', '/')} |")
    lines += ["", "Benchmark tables: summary.md; raw results: *.json; plots: *.png."]
    path = folder / "gpu-check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _publish(folder: Path) -> None:
    """Copy the record to $OUT (at most a few files: the tarball and two Markdown files)."""
    out = os.environ.get("OUT")
    if not out:
        return
    tarball = Path(out) / f"{folder.name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for name in ("gpu-check.md", "summary.md"):
        if (folder / name).exists():
            shutil.copy(folder / name, Path(out) / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--suites", nargs="+", default=["all"],
                        choices=("kernels", "e2e", "sweep", "all"))
    parser.add_argument("--tests-timeout", type=float, default=None,
                        help="seconds after which the test stage is stopped")
    args = parser.parse_args(argv)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    folder = REPO_ROOT / "bench" / "results" / f"{_device_slug()}-{date}"
    folder.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    plan = []
    if not args.skip_install:
        plan.append(("install", [python, "-m", "pip", "install", "--no-build-isolation",
                                 "--no-deps", "--no-index", "-e", "."], None))
    if not args.skip_tests:
        plan.append(("tests", [python, "-m", "pytest", "-q", "-rs",
                               f"--junitxml={folder / 'tests.xml'}"], args.tests_timeout))
    if not args.skip_bench:
        for suite in args.suites:
            plan.append((f"bench {suite}", [python, "-m", "bench", suite, "--gpu-suite",
                                            "--out-dir", str(folder)], None))
    stages = []
    for name, command, timeout_s in plan:
        log = folder / f"{name.replace(' ', '-')}.log"
        stages.append(_run_stage(name, command, log, timeout_s))
        _write_report(folder, stages)
        _publish(folder)
    print(f"\nrecord written to {folder}")
    return 0 if all(s["returncode"] == 0 for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
