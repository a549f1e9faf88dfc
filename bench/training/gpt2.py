"""GPT-2 124M training on a GPU, side by side in one call: our CLI (`python -m gpt.train`,
each backend and `auto`, with and without torch.compile) against nanoGPT's own train.py
from a checkout given by path (torch.compile on, as nanoGPT runs it).

    python -m bench gpt2 --nanogpt PATH --out-dir DIR [--iters 40] [--batch-size 12]
                         [--accumulation 4] [--backends auto torch triton cuda] [--timeout 300]
    python -m bench gpt2 --out-dir DIR --backends torch triton --append   # more runs, same table

Every program trains the same model (GPT-2 124M: 12 layers, 12 heads, 768 channels,
vocabulary 50304, dropout 0) on the same data (uniform random GPT-2 token ids written once
as nanoGPT's train.bin / val.bin: throughput does not depend on which tokens they are), with
the same micro-batch, block 1024, bf16 autocast and gradient accumulation, for the same
number of iterations, each as a whole process. nanoGPT's train.py runs unmodified from a
scratch working directory holding the data and a link to its configurator.py, so the
checkout itself is never written to.

Per run: tokens/s from the median logged iteration after the first SKIP_ITERS (compiles,
autotuning, allocator warm-up), and MFU against the GPU's bf16 dense peak
(`kernels.gpus`), counted as nanoGPT counts FLOPs (6 N + 12 L C T per token: attention over
the full T x T) with the causal count (6 N + 6 L C T) beside it; both programs' N is the
same model's. nanoGPT's own log divides by the A100's 312 TFLOP/s on any GPU, so its
logged mfu is not used. Runs go in order of value (nanoGPT, then ours with `auto`, then
each backend) and the results are rewritten after each, so a run cut short keeps what ran.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

OURS, NANOGPT = "ours", "nanoGPT"
DATASET = "gpt2_random"
GPT2_TOKENS = 50257
SKIP_ITERS = 10
REPO_ROOT = Path(__file__).resolve().parents[2]
_ITER_PREFIX = "iter "


@dataclass(frozen=True)
class Settings:
    """What every program trains, identically."""
    batch_size: int = 12          # nanoGPT's config/train_gpt2.py micro-batch
    block_size: int = 1024
    accumulation: int = 4
    iters: int = 40
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True             # GPT-2's architecture (nanoGPT's default is False)
    dtype: str = "bfloat16"
    data_tokens: int = 20_000_000
    device: str = "cuda"

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.block_size * self.accumulation

    def train_args(self) -> list[str]:
        """The command line both train.py's take (nanoGPT's key names, which ours shares).
        The only eval is step 0's, on one batch; no checkpoint is written."""
        return [f"--batch_size={self.batch_size}", f"--block_size={self.block_size}",
                f"--gradient_accumulation_steps={self.accumulation}",
                f"--max_iters={self.iters}", f"--lr_decay_iters={self.iters}",
                f"--warmup_iters={min(10, self.iters)}", f"--n_layer={self.n_layer}",
                f"--n_head={self.n_head}", f"--n_embd={self.n_embd}", f"--bias={self.bias}",
                "--dropout=0.0", f"--dtype={self.dtype}", f"--device={self.device}",
                f"--eval_interval={self.iters + 1}", "--eval_iters=1", "--log_interval=1",
                "--always_save_checkpoint=False", f"--dataset={DATASET}"]


@dataclass(frozen=True)
class Entry:
    """One program run: nanoGPT's train.py, or our CLI on one backend."""
    program: str                  # OURS or NANOGPT
    backend: str | None           # ours: torch | triton | cuda | auto
    compile: bool

    @property
    def name(self) -> str:
        compiled = "torch.compile" if self.compile else "eager"
        if self.program == NANOGPT:
            return f"nanoGPT train.py, {compiled}"
        return f"ours, backend={self.backend}, {compiled}"


BACKENDS = ("auto", "torch", "triton", "cuda")


def entries(backends=BACKENDS, nanogpt: bool = True) -> list[Entry]:
    """Every run, most valuable first: nanoGPT (the baseline), then ours on each backend
    (`auto` first), compiled and eager."""
    runs = [Entry(NANOGPT, None, True)] if nanogpt else []
    for backend in backends:
        runs += [Entry(OURS, backend, True), Entry(OURS, backend, False)]
    return runs


def command(entry: Entry, settings: Settings, scratch: Path, checkout: Path | None,
            python: str = sys.executable) -> tuple[list[str], Path]:
    """(argv, working directory) of one run; its out_dir is its own folder in `scratch`."""
    slug = entry.name.replace(", ", "-").replace(" ", "_").replace("=", "-")
    args = settings.train_args() + [f"--compile={entry.compile}", f"--out_dir={scratch / slug}"]
    if entry.program == NANOGPT:
        if checkout is None:
            raise ValueError("nanoGPT's run needs a checkout (--nanogpt PATH)")
        return [python, str(Path(checkout) / "train.py"), *args], scratch
    return ([python, "-m", "gpt.train", *args, f"--backend={entry.backend}",
             f"--data_dir={scratch / 'data' / DATASET}", "--progress=False"], REPO_ROOT)


def prepare_scratch(scratch: Path, checkout: Path | None, settings: Settings,
                    seed: int = 0) -> None:
    """The shared data (nanoGPT's format: uint16 token ids, no meta.pkl, so both take
    GPT-2's padded vocabulary of 50304) and the link to nanoGPT's configurator.py, which
    its train.py reads from the working directory."""
    data = scratch / "data" / DATASET
    data.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, GPT2_TOKENS, settings.data_tokens,
                                                  dtype=np.uint16)
    split = int(0.9 * len(tokens))
    tokens[:split].tofile(data / "train.bin")
    tokens[split:].tofile(data / "val.bin")
    if checkout is not None:
        (scratch / "configurator.py").symlink_to(Path(checkout).resolve() / "configurator.py")


def iteration_ms(lines: list[str], skip: int = SKIP_ITERS) -> list[float]:
    """The logged time of every iteration from `skip` on ("iter N: loss X, time Yms, ...",
    both programs' format)."""
    times = []
    for line in lines:
        if not line.startswith(_ITER_PREFIX) or "time " not in line:
            continue
        head, _, rest = line.partition(":")
        number = head[len(_ITER_PREFIX):]
        if not number.isdigit() or int(number) < skip:
            continue
        times.append(float(rest.split("time ", 1)[1].split("ms", 1)[0]))
    return times


def flops_per_token(settings: Settings) -> dict[str, int]:
    """Training FLOPs per token of the model every program trains, counted as nanoGPT does
    and causally (`gpt.model.GPT.flops_per_token`)."""
    import torch

    from gpt.model import GPT, GPTConfig

    config = GPTConfig(block_size=settings.block_size, vocab_size=50304,
                       n_layer=settings.n_layer, n_head=settings.n_head,
                       n_embd=settings.n_embd, bias=settings.bias)
    with torch.device("meta"):
        model = GPT(config)
    return {count: model.flops_per_token(settings.block_size, count)
            for count in ("nanogpt", "causal")}


def result_row(entry: Entry, settings: Settings, lines: list[str], wall_s: float,
               returncode: int | None, flops: dict[str, int], peak_flops: float | None,
               error: str | None = None) -> dict:
    """One run's row: its median iteration, tokens/s and both MFUs (or why it failed)."""
    times = iteration_ms(lines)
    failed = error or (f"exited with {returncode}: {_tail(lines)}" if returncode else None) \
        or (None if times else f"no iteration logged past {SKIP_ITERS}: {_tail(lines)}")
    row = {"run": entry.name, **asdict(entry), "status": "FAILED" if failed else "ok",
           "error": failed, "wall_s": wall_s, "iters_timed": len(times), "iter_ms": None,
           "tokens_per_s": None, "mfu_pct": None, "mfu_causal_pct": None}
    if failed:
        return row
    iter_ms = statistics.median(times)
    tokens_per_s = settings.tokens_per_iter / (iter_ms / 1e3)
    row.update(iter_ms=iter_ms, tokens_per_s=tokens_per_s)
    if peak_flops:
        row.update(mfu_pct=100 * flops["nanogpt"] * tokens_per_s / peak_flops,
                   mfu_causal_pct=100 * flops["causal"] * tokens_per_s / peak_flops)
    return row


def _tail(lines: list[str]) -> str:
    return " / ".join(line.strip() for line in lines[-3:])[:300]


def run_one(argv: list[str], cwd: Path, timeout_s: float) -> tuple[list[str], float, int | None,
                                                                      str | None]:
    """(output lines, wall seconds, return code, error) of one whole process."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return output.splitlines(), time.perf_counter() - start, None, \
            f"stopped after its {timeout_s:.0f} s"
    lines = (done.stdout + done.stderr).splitlines()
    return lines, time.perf_counter() - start, done.returncode, None


# ----------------------------------------------------------------------------- the table

def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"


def table(rows: list[dict], settings: Settings, device: str, peak_flops: float | None) -> str:
    """The Markdown record: settings, then one line per run with its speed against
    nanoGPT's (compiled)."""
    baseline = next((r["tokens_per_s"] for r in rows
                     if r["program"] == NANOGPT and r["status"] == "ok"), None)
    peak = "n/a (GPU not in kernels.gpus)" if not peak_flops else f"{peak_flops / 1e12:g} TFLOP/s"
    lines = ["## GPT-2 124M training, side by side with nanoGPT's train.py", "",
             f"{device}; bf16 dense peak {peak}. Every program: {settings.n_layer} layers, "
             f"{settings.n_head} heads, {settings.n_embd} channels, bias={settings.bias}, "
             f"micro-batch {settings.batch_size} x block {settings.block_size}, "
             f"{settings.accumulation} accumulation steps ({settings.tokens_per_iter:,} "
             f"tokens/iteration), {settings.dtype}, {settings.iters} iterations on random "
             f"GPT-2 token ids; ms/iter: median logged iteration from iteration "
             f"{SKIP_ITERS}. MFU counts FLOPs as nanoGPT does (6·N + 12·L·C·T per token), "
             f"causal MFU the half the mask keeps (6·N + 6·L·C·T).", "",
             "| run | ms/iter | tokens/s | vs nanoGPT | MFU % | causal MFU % | wall s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['tokens_per_s'] / baseline:.2f}x"
                 if baseline and r["tokens_per_s"] is not None else "n/a")
        status = r["status"] if r["status"] == "ok" else f"**FAILED**: {r['error']}"
        lines.append(f"| {r['run']} | {_number(r['iter_ms'])} | {_number(r['tokens_per_s'])} "
                     f"| {ratio} | {_number(r['mfu_pct'])} | {_number(r['mfu_causal_pct'])} "
                     f"| {_number(r['wall_s'])} | {status} |")
    return "\n".join(lines) + "\n"


RECORD = "gpt2-side-by-side"


def earlier_record(out_dir: Path, settings: Settings) -> tuple[list[dict], Path | None]:
    """The rows (and nanoGPT checkout) an earlier call wrote into out_dir with the same
    settings (--append: a second call adds runs to the same table, nanoGPT's row included)."""
    path = out_dir / f"{RECORD}.json"
    if not path.is_file():
        return [], None
    record = json.loads(path.read_text())
    if record["settings"] != asdict(settings):
        raise SystemExit(f"--append: {path} was measured with other settings "
                         f"({record['settings']})")
    return record["rows"], None if record["nanogpt"] is None else Path(record["nanogpt"])


def write(out_dir: Path, rows: list[dict], settings: Settings, device: str,
          peak_flops: float | None, checkout: Path | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{RECORD}.json", out_dir / f"{RECORD}.md"
    json_path.write_text(json.dumps({"device": device, "peak_flops": peak_flops,
                                     "nanogpt": None if checkout is None else str(checkout),
                                     "settings": asdict(settings), "skip_iters": SKIP_ITERS,
                                     "rows": rows}, indent=1) + "\n")
    md_path.write_text(table(rows, settings, device, peak_flops))
    return [json_path, md_path]


def check_checkout(checkout: Path) -> None:
    missing = [f for f in ("train.py", "model.py", "configurator.py")
               if not (Path(checkout) / f).is_file()]
    if missing:
        raise SystemExit(f"--nanogpt {checkout} is not a nanoGPT checkout: it lacks "
                         f"{', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpt2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (without one, only "
                                                     "our runs)")
    parser.add_argument("--iters", type=int, default=Settings.iters)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--accumulation", type=int, default=Settings.accumulation)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="our backends to run, in this order (default: all, auto first)")
    parser.add_argument("--append", action="store_true",
                        help="add to the table an earlier call wrote into --out-dir")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args = parser.parse_args(argv)
    if args.iters <= SKIP_ITERS:
        parser.error(f"--iters must exceed the {SKIP_ITERS} iterations left out of the median")
    if args.nanogpt is not None:
        check_checkout(args.nanogpt)
    import torch

    from kernels.gpus import gpu_by_name
    if not torch.cuda.is_available():
        raise SystemExit("GPT-2 training side by side needs a CUDA GPU, and torch sees none")
    device = torch.cuda.get_device_name()
    gpu = gpu_by_name(device)
    peak_flops = None if gpu is None else gpu.flops["bf16"]
    settings = Settings(batch_size=args.batch_size, accumulation=args.accumulation,
                        iters=args.iters)
    flops = flops_per_token(settings)
    rows, checkout = earlier_record(args.out_dir, settings) if args.append else ([], None)
    checkout = args.nanogpt or checkout
    with tempfile.TemporaryDirectory(prefix="gpt2-side-by-side-") as scratch:
        prepare_scratch(Path(scratch), args.nanogpt, settings)
        for entry in entries(tuple(args.backends), nanogpt=args.nanogpt is not None):
            argv_, cwd = command(entry, settings, Path(scratch), args.nanogpt)
            print(f"=== {entry.name}: {' '.join(argv_)}", flush=True)
            lines, wall, code, error = run_one(argv_, cwd, args.timeout)
            rows.append(result_row(entry, settings, lines, wall, code, flops, peak_flops,
                                   error))
            print(f"    {rows[-1]['status']}: {_number(rows[-1]['tokens_per_s'])} tokens/s, "
                  f"MFU {_number(rows[-1]['mfu_pct'])} % ({rows[-1]['error'] or ''})", flush=True)
            write(args.out_dir, rows, settings, device, peak_flops, checkout)
    for path in write(args.out_dir, rows, settings, device, peak_flops, checkout):
        print(path)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
