"""The side-by-side comparison's logic, with tiny stand-in programs that sleep and print
nanoGPT-format logs (the real whole-process comparison is a benchmark, not a test)."""
import subprocess
import sys
import textwrap

import pytest

from bench.output import report, results
from bench.training import side_by_side
from bench.training.side_by_side import NANOGPT, OURS, Program

# A stand-in training program: start-up, a step-0 eval, N iterations of SLEEP seconds
# (times FACTOR_<name>), then a last eval; it records its name in ORDER_FILE so the tests
# see the run order.
FAKE = textwrap.dedent("""
    import sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    name, iters = sys.argv[1], int(args["max_iters"])
    sleep = float(args["sleep"]) * float(args.get("factor_" + name, 1))
    with open(args["order_file"], "a") as f:
        f.write(name + "\\n")
    assert args["out_dir"]
    time.sleep(sleep)
    print("step 0: train loss 4.0000, val loss 4.1000")
    for i in range(iters + 1):
        time.sleep(sleep)
        print(f"iter {i}: loss 3.0000, time {1000 * sleep:.2f}ms, mfu n/a")
    print(f"step {iters}: train loss 2.0000, val loss {args.get('val', '1.9000')}")
""")


@pytest.fixture
def programs(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    ours = Program(OURS, (sys.executable, str(script), OURS), tmp_path)
    theirs = Program(NANOGPT, (sys.executable, str(script), NANOGPT), tmp_path)
    return ours, theirs


def _args(tmp_path, sleep, iters=3, **extra):
    return [f"--sleep={sleep}", f"--max_iters={iters}", f"--order_file={tmp_path / 'order'}",
            *(f"--{k}={v}" for k, v in extra.items())]


def test_runs_alternate_and_the_ratio_is_the_median_of_pairs(tmp_path, programs):
    ours, theirs = programs
    pairs = side_by_side.alternate(ours, theirs, _args(tmp_path, 0.02), pairs=3)
    order = (tmp_path / "order").read_text().split()
    assert order == [OURS, NANOGPT, NANOGPT, OURS, OURS, NANOGPT]  # who goes first alternates
    assert [(a.program, b.program) for a, b in pairs] == [(OURS, NANOGPT)] * 3
    for run in (r for pair in pairs for r in pair):
        assert run.iters == 4 and run.val_loss == 1.9 and run.last_eval_step == 3
        assert run.iter_ms == pytest.approx(20.0)  # iteration 0 (after the eval) left out
        assert 0.02 < run.startup_s < run.wall_s


def test_ratio_is_theirs_over_ours_with_spread():
    ratio = side_by_side.ratio([(10.0, 15.0), (10.0, 20.0), (20.0, 24.0)])
    assert (ratio.median, ratio.low, ratio.high, ratio.pairs) == (1.5, 1.2, 2.0, 3)
    assert side_by_side.ratio([(10.0, None)]) is None
    assert side_by_side.ratio([]) is None


def test_a_slower_program_shows_in_the_ratio(tmp_path, programs):
    ours, theirs = programs
    args = _args(tmp_path, 0.01, iters=5, factor_nanoGPT=3)  # nanoGPT's stand-in: 3x slower
    pairs = side_by_side.alternate(ours, theirs, args, pairs=2)
    wall = side_by_side.ratio([(a.wall_s, b.wall_s) for a, b in pairs])
    per_iter = side_by_side.ratio([(a.iter_ms, b.iter_ms) for a, b in pairs])
    assert per_iter.median == pytest.approx(3.0)
    assert 1.5 < wall.median < 3.5


def test_parse_log_skips_iterations_after_an_eval():
    lines = [(0.5, "step 0: train loss 4.0, val loss 4.1"), (0.9, "iter 0: loss 4.0, time 400.00ms, mfu n/a"),
             (1.0, "iter 1: loss 3.9, time 10.00ms, mfu n/a"), (1.1, "step 2: train loss 3.0, val loss 3.5"),
             (1.2, "saving checkpoint to out"), (1.6, "iter 2: loss 3.0, time 300.00ms, mfu 1.00%"),
             (1.7, "iter 3: loss 2.9, time 12.00ms, mfu 1.00%")]
    parsed = side_by_side.parse_log(lines)
    assert parsed == dict(startup_s=0.9, iter_ms=11.0, iters=4, val_loss=3.5, last_eval_step=2)


def test_a_failing_program_is_a_clear_error(tmp_path, programs):
    ours, _ = programs
    broken = Program(NANOGPT, (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"),
                     tmp_path)
    with pytest.raises(RuntimeError, match="nanoGPT exited with 3.*boom"):
        side_by_side.alternate(ours, broken, _args(tmp_path, 0.0), pairs=1)


def _git(cwd, *args):
    subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True)


def test_nanogpt_checkout_is_checked(tmp_path):
    with pytest.raises(side_by_side.SetupError, match="no such directory"):
        side_by_side.nanogpt(tmp_path / "absent")
    with pytest.raises(side_by_side.SetupError, match="not a nanoGPT checkout: it lacks train.py"):
        side_by_side.nanogpt(tmp_path)
    for name in side_by_side.NANOGPT_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(side_by_side.SetupError, match="prepare.py"):
        side_by_side.nanogpt(tmp_path)
    for name in side_by_side.NANOGPT_DATA:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\x01\x00")
    with pytest.raises(side_by_side.SetupError, match="not a git checkout"):
        side_by_side.nanogpt(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", *side_by_side.NANOGPT_FILES)
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "nanoGPT")
    program = side_by_side.nanogpt(tmp_path)  # the prepared data is untracked: allowed
    assert program.cwd == tmp_path and program.command[-1] == "train.py"
    assert len(program.commit) == 40
    (tmp_path / "model.py").write_text("# a local change\n")
    with pytest.raises(side_by_side.SetupError, match="local changes to its files"):
        side_by_side.nanogpt(tmp_path)
    _git(tmp_path, "checkout", "--", ".")
    ours_data = tmp_path / "ours"
    ours_data.mkdir()
    for name in ("train.bin", "val.bin"):
        (ours_data / name).write_bytes(b"\x01\x00")
    assert side_by_side.same_data(tmp_path, ours_data)
    (ours_data / "val.bin").write_bytes(b"\x02\x00")
    assert not side_by_side.same_data(tmp_path, ours_data)


def test_each_row_says_what_each_program_ran(tmp_path):
    """nanoGPT trains in fp32 on the CPU (it autocasts on CUDA only) and without biases by
    default; ours in bf16 where the CPU has it, with biases: each row says so, and the
    precision configs put ours on nanoGPT's terms."""
    from gpt.train import TrainConfig
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train_shakespeare_char.py").write_text("batch_size = 64\n")
    (tmp_path / "train.py").write_text(
        "bias = False\ndtype = 'bfloat16'\n"
        "ctx = nullcontext() if device_type == 'cpu' else torch.amp.autocast()\n")
    theirs = Program(NANOGPT, ("python", "train.py"), tmp_path)
    _, seed = side_by_side.seed_config(10)
    ours_default = "fp32" if TrainConfig().dtype == "float32" else \
        f"{TrainConfig().dtype} autocast"
    assert side_by_side.what_ran(side_by_side.ours(), seed) == f"{ours_default}, biases"
    assert side_by_side.what_ran(theirs, seed) == "fp32 (autocast on CUDA only), no biases"
    fp32, fp32_no_bias = side_by_side.precision_configs(10)
    assert side_by_side.what_ran(side_by_side.ours(), fp32[1]) == "fp32, biases"
    assert side_by_side.what_ran(side_by_side.ours(), fp32_no_bias[1]) == "fp32, no biases"
    assert side_by_side.what_ran(theirs, fp32_no_bias[1]).endswith("no biases")
    assert side_by_side.what_ran(theirs, [*seed, "--bias=True"]).endswith(", biases")


def test_configs_are_the_seed_command_with_overrides():
    name, args = side_by_side.seed_config(300)
    assert name == "seed command, 300 iters"
    assert args[0] == "config/train_shakespeare_char.py" and "--max_iters=300" in args
    assert "--lr_decay_iters=2000" in args and "--compile=False" in args
    from bench.training import sweep
    settings = [s for s in sweep.settings(sweep.CPU_BASE, {"n_embd": (64,)})]
    [(name, args)] = side_by_side.setting_configs(settings, 50)
    assert name == "n_embd=64" and "--n_embd=64" in args and "--max_iters=50" in args
    assert args.index("--n_embd=64") > args.index("--n_embd=128")  # the override wins


def test_rows_summary_and_table(tmp_path, programs, monkeypatch):
    ours, theirs = programs
    monkeypatch.setattr(side_by_side, "ours", lambda: ours)
    monkeypatch.setattr(side_by_side, "nanogpt", lambda checkout: theirs)
    monkeypatch.setattr(side_by_side, "what_ran", lambda program, args: f"{program.name} math")
    rows = side_by_side.run_rows(tmp_path, [("tiny", _args(tmp_path, 0.01))], pairs=2)
    assert [(r["pair"], r["program"]) for r in rows] == [(0, OURS), (0, NANOGPT), (1, OURS),
                                                         (1, NANOGPT)]
    [summary] = side_by_side.summarize_rows(rows)
    assert summary["pairs"] == 2 and summary["wall"].pairs == 2
    meta = {"machine": "m", "cpu": "c", "device": "CPU (test)", "device_type": "cpu",
            "python": "3.11", "torch": "2", "triton": None, "cuda": None, "git_commit": "abc",
            "date": "2026-01-01", "peak": None,
            "options": {"nanogpt": "/x/nanoGPT", "threads": "2", "same_data": True}}
    md = report.render(results.document("nanogpt", meta, rows))
    assert "| tiny | ours math / nanoGPT math | 2 | **" in md and "/x/nanoGPT" in md


def test_bench_cli_requires_a_real_checkout(tmp_path, capsys):
    from bench.__main__ import parse_args, suites_of
    with pytest.raises(SystemExit):
        parse_args(["e2e", "--nanogpt", str(tmp_path / "absent")])
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["nanogpt"])
    assert "pass --nanogpt PATH" in capsys.readouterr().err
    assert suites_of(parse_args(["e2e"])) == ("e2e",)
    assert suites_of(parse_args(["all", "--full"])) == ("kernels", "e2e", "sweep")
