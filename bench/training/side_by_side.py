"""Our training CLI and nanoGPT's train.py, each run as a whole process on the same command
line, alternately, on the same machine with the same environment (threads included).

What a user waits for is the whole process: imports, data, evals and checkpoints as well
as the iterations. Each pair runs both programs back to back, the order alternating from
pair to pair (ours first, then nanoGPT first, ...) so that a machine that slows down or
speeds up over the measurement favours neither. A pair's ratio is nanoGPT's wall time over
ours; the result is the median of the pairs' ratios and their spread.

nanoGPT is a checkout given by path (`--nanogpt PATH`), never copied into this project:
its train.py runs in its own directory, on its own prepared data/shakespeare_char. It must
be a git checkout with no local changes to its files, so that the record names the
commit that ran and it is nanoGPT as published.

The two programs do not run the same numerics by default, and every row says what each
ran: on the CPU ours trains under bf16 autocast where the CPU multiplies bf16 natively,
with biases (GPT-2's architecture), while nanoGPT's train.py autocasts on CUDA only (fp32
on the CPU) and defaults to no biases. The seed command therefore also runs with ours at
--dtype=float32, and at --dtype=float32 --bias=False, nanoGPT's own model and precision.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OURS, NANOGPT = "ours", "nanoGPT"

# nanoGPT's CPU Shakespeare run, as its README writes it (config file first).
SEED_ARGS = ("config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
             "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
             "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
             "--lr_decay_iters=2000", "--dropout=0.0")
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
NANOGPT_DATA = ("data/shakespeare_char/train.bin", "data/shakespeare_char/val.bin",
                "data/shakespeare_char/meta.pkl")

_STEP = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


class SetupError(RuntimeError):
    """A checkout or dataset the comparison needs is missing; the message says what to do."""


@dataclass(frozen=True)
class Program:
    name: str
    command: tuple[str, ...]  # what precedes the training arguments
    cwd: Path
    commit: str | None = None  # the git commit of nanoGPT's checkout


def ours(python: str = sys.executable) -> Program:
    return Program(OURS, (python, "-m", "gpt.train"), REPO_ROOT)


def checkout_commit(checkout: Path) -> str:
    """The commit of a git checkout with no local changes to its tracked files (untracked
    files, such as the prepared data, are allowed); SetupError otherwise."""
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        raise SetupError(f"--nanogpt {checkout} is not a git checkout, so the commit that runs "
                         f"cannot be recorded: clone https://github.com/karpathy/nanoGPT")
    changes = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    if changes:
        raise SetupError(f"--nanogpt {checkout} has local changes to its files, so it is not "
                         f"nanoGPT as published: {changes.splitlines()[0].strip()}"
                         f"{' ...' if len(changes.splitlines()) > 1 else ''} (git stash or "
                         f"git checkout -- . there)")
    return head.stdout.strip()


def nanogpt(checkout: Path, python: str = sys.executable) -> Program:
    """nanoGPT's train.py in `checkout`, after checking that it can run the comparison."""
    checkout = Path(checkout)
    if not checkout.is_dir():
        raise SetupError(f"--nanogpt {checkout}: no such directory (give the path of a "
                         f"checkout of https://github.com/karpathy/nanoGPT)")
    missing = [f for f in NANOGPT_FILES if not (checkout / f).is_file()]
    if missing:
        raise SetupError(f"--nanogpt {checkout} is not a nanoGPT checkout: it lacks "
                         f"{', '.join(missing)}")
    missing = [f for f in NANOGPT_DATA if not (checkout / f).is_file()]
    if missing:
        raise SetupError(f"nanoGPT's Shakespeare data is not prepared in {checkout} (no "
                         f"{', '.join(missing)}): run `python data/shakespeare_char/prepare.py` "
                         f"there first")
    return Program(NANOGPT, (python, "train.py"), checkout, checkout_commit(checkout))


# ----------------------------------------------------------------------------- what ran

def _last_override(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{key}=")]
    return values[-1] if values else None


def _assigned(source: str, key: str):
    """The value a Python file (a config, or train.py's defaults) assigns to `key` at its
    top level, or None."""
    value = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == key for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                value = None
    return value


def what_ran(program: Program, args: list[str]) -> str:
    """What a run computes with: its precision and whether its model has biases, from its
    command line, its config file and its defaults."""
    bias = _last_override(args, "bias")
    dtype = _last_override(args, "dtype")
    device = _last_override(args, "device") or "cuda"
    if program.name == OURS:
        from gpt.train import TrainConfig
        defaults = TrainConfig()
        config = program.cwd / args[0] if args and args[0].endswith(".py") else None
        from_config = _assigned(config.read_text(), "bias") if config and config.is_file() else None
        bias = bias if bias is not None else from_config if from_config is not None \
            else defaults.bias
        dtype = dtype or (defaults.dtype if device == "cpu" else "bfloat16")
        precision = "fp32" if dtype == "float32" else f"{dtype} autocast"
    else:
        train = (program.cwd / "train.py").read_text()
        config = program.cwd / args[0] if args and args[0].endswith(".py") else None
        from_config = _assigned(config.read_text(), "bias") if config and config.is_file() else None
        bias = bias if bias is not None else from_config if from_config is not None \
            else _assigned(train, "bias")
        cpu_without_autocast = "nullcontext() if device_type == 'cpu'" in train
        precision = ("fp32 (autocast on CUDA only)" if device == "cpu" and cpu_without_autocast
                     else f"{dtype or 'its default dtype'} autocast")
    has_bias = str(bias) in ("True", "true", "1")
    return f"{precision}, {'biases' if has_bias else 'no biases'}"


def same_data(checkout: Path, data_dir: Path) -> bool:
    """Whether nanoGPT's prepared Shakespeare is byte for byte ours (train.bin, val.bin)."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return all(digest(Path(checkout) / "data/shakespeare_char" / name) == digest(data_dir / name)
               != "" for name in ("train.bin", "val.bin"))


@dataclass(frozen=True)
class Run:
    """One whole-process run and what its log says."""
    program: str
    wall_s: float                 # process start to exit
    startup_s: float | None       # process start to the first iteration's log line: imports,
                                  # data, model, step-0 eval (and its first iteration)
    iter_ms: float | None         # median logged iteration time, iterations with an eval out
    iters: int                    # iterations logged
    val_loss: float | None        # at the last eval
    last_eval_step: int | None
    load_1m: float                # the 1-minute load average when it started

    def to_json(self) -> dict:
        return asdict(self)


def parse_log(lines: list[tuple[float, str]]) -> dict:
    """(seconds since start, line) pairs of a nanoGPT-format log -> startup_s, iter_ms,
    iters, val_loss, last_eval_step. An iteration's logged time includes the eval (and
    checkpoint) before it, so iterations that follow an eval are left out of iter_ms."""
    startup = val_loss = last_step = None
    times, after_eval, iters = [], True, 0  # iteration 0 follows the step-0 eval
    for at, line in lines:
        if match := _STEP.match(line):
            last_step, val_loss, after_eval = int(match[1]), float(match[3]), True
        elif match := _ITER.match(line):
            iters += 1
            if startup is None:
                startup = at
            if not after_eval:
                times.append(float(match[2]))
            after_eval = False
    return dict(startup_s=startup, iter_ms=statistics.median(times) if times else None,
                iters=iters, val_loss=val_loss, last_eval_step=last_step)


def run_once(program: Program, args: list[str], env: dict[str, str]) -> Run:
    """Run `program` with `args` and an out_dir of its own, to the end; its log is read as
    it is written, each line timed (PYTHONUNBUFFERED: nanoGPT does not flush its prints)."""
    with tempfile.TemporaryDirectory(prefix=f"side-by-side-{program.name}-") as out_dir:
        command = [*program.command, *args, f"--out_dir={out_dir}"]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=program.cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={**env, "PYTHONUNBUFFERED": "1"})
        lines = [(time.perf_counter() - start, line) for line in process.stdout]
        process.wait()
        wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = "".join(line for _, line in lines[-15:])
        raise RuntimeError(f"{program.name} exited with {process.returncode}: "
                           f"{' '.join(command)}\n{tail}")
    return Run(program.name, wall, load_1m=load, **parse_log(lines))


def alternate(first: Program, second: Program, args: list[str], pairs: int,
              env: dict[str, str] | None = None, on_run=None) -> list[tuple[Run, Run]]:
    """`pairs` pairs of runs of both programs with the same arguments and environment,
    `first` leading in even pairs and `second` in odd ones. Returns (first's run,
    second's run) per pair; `on_run(run)` is called after every run (progress)."""
    env = dict(os.environ if env is None else env)
    results = []
    for pair in range(pairs):
        order = (first, second) if pair % 2 == 0 else (second, first)
        runs = {}
        for program in order:
            runs[program.name] = run_once(program, args, env)
            if on_run is not None:
                on_run(runs[program.name])
        results.append((runs[first.name], runs[second.name]))
    return results


@dataclass(frozen=True)
class Ratio:
    """How many times faster `ours` is than the other program, over the pairs."""
    median: float
    low: float
    high: float
    pairs: int


def ratio(pairs: list[tuple[float, float]]) -> Ratio | None:
    """(ours, theirs) durations per pair -> the median of theirs / ours, and its spread;
    None when a duration is missing."""
    ratios = [theirs / ours for ours, theirs in pairs
              if ours is not None and theirs is not None and ours > 0]
    if not ratios or len(ratios) != len(pairs):
        return None
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


# ----------------------------------------------------------------------------- the suite

def with_iters(args: tuple[str, ...], iters: int) -> list[str]:
    """`args` with --max_iters=iters (the seed's lr_decay_iters is kept, as a user who
    stops a run early keeps it)."""
    return [f"--max_iters={iters}" if a.startswith("--max_iters=") else a for a in args]


def seed_config(iters: int) -> tuple[str, list[str]]:
    return f"seed command, {iters} iters", with_iters(SEED_ARGS, iters)


def setting_configs(settings, iters: int) -> list[tuple[str, list[str]]]:
    """The seed command with each (param, value, setting) of a sweep: its model and batch
    (n_layer, n_head, n_embd, block_size, batch_size, dropout), `iters` iterations."""
    configs = []
    for param, value, setting in settings:
        overrides = [f"--{key}={val}" for key, val in asdict(setting).items()]
        configs.append((f"{param}={value}", with_iters(SEED_ARGS, iters) + overrides))
    return configs


def precision_configs(iters: int) -> list[tuple[str, list[str]]]:
    """The seed command with ours in fp32 (nanoGPT's CPU precision), and in fp32 without
    biases (nanoGPT's model and precision): the comparisons on equal terms."""
    args = with_iters(SEED_ARGS, iters)
    return [(f"seed command, {iters} iters, fp32", args + ["--dtype=float32"]),
            (f"seed command, {iters} iters, fp32, no biases",
             args + ["--dtype=float32", "--bias=False"])]


def run_rows(checkout: Path, configs: list[tuple[str, list[str]]], pairs: int,
             on_run=None) -> list[dict]:
    """One row per run: every config, `pairs` alternated pairs of ours and nanoGPT."""
    first, second = ours(), nanogpt(checkout)
    rows = []
    for name, args in configs:
        ran = {p.name: what_ran(p, args) for p in (first, second)}
        try:
            results = alternate(first, second, args, pairs, on_run=on_run)
        except RuntimeError as exc:  # a program that fails is reported, not hidden
            rows.append(_row(name, args, None, None, error=str(exc).splitlines()[0][:300]))
            continue
        for pair, runs in enumerate(results):
            rows += [_row(name, args, pair, run, ran[run.program]) for run in runs]
    return rows


def _row(config: str, args: list[str], pair: int | None, run: Run | None,
         ran: str | None = None, error: str | None = None) -> dict:
    fields = run.to_json() if run is not None else {
        key: None for key in Run.__dataclass_fields__}
    return {"config": config, "args": " ".join(args), "pair": pair, **fields, "ran": ran,
            "status": "ok" if error is None else "FAILED", "error": error}


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Per config: the wall-time and per-iteration ratios (nanoGPT over ours) with their
    spread, and each program's median wall time, start-up and final val loss."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == config and r["status"] == "ok"]
        pairs = {}
        for r in runs:
            pairs.setdefault(r["pair"], {})[r["program"]] = r
        complete = [p for p in pairs.values() if OURS in p and NANOGPT in p]

        def median_of(program, key):
            values = [p[program][key] for p in complete if p[program][key] is not None]
            return statistics.median(values) if values else None

        def ran(program):
            return next((p[program]["ran"] for p in complete if p[program].get("ran")), None)

        out.append({
            "config": config, "pairs": len(complete),
            "ours_ran": ran(OURS), "nanoGPT_ran": ran(NANOGPT),
            "wall": ratio([(p[OURS]["wall_s"], p[NANOGPT]["wall_s"]) for p in complete]),
            "iter": ratio([(p[OURS]["iter_ms"], p[NANOGPT]["iter_ms"]) for p in complete]),
            **{f"{program}_{key}": median_of(program, key)
               for program in (OURS, NANOGPT)
               for key in ("wall_s", "startup_s", "iter_ms", "val_loss")},
            "last_eval_step": median_of(OURS, "last_eval_step"),
        })
    return out
