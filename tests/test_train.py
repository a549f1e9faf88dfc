"""gpt.train: nanoGPT's command line, the training loop, checkpoints and exact resume."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from gpt import peak, train
from gpt.checkpoint import load_checkpoint_file
from gpt.configurator import ConfigError, configure
from gpt.step import TrainStep
from gpt.train import TrainConfig, get_lr

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 40
# A tiny model and run; the tests add what they are about.
TINY = ["--device=cpu", "--compile=False", "--dtype=float32", "--backend=torch", "--n_layer=2",
        "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8", "--eval_iters=2",
        "--log_interval=1", "--warmup_iters=2", "--progress=False", "--bias=True"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


def run(tmp_path, text_file, out: str, *overrides: str) -> list[dict]:
    """Train in this process; returns the metrics log's entries."""
    train.main([*TINY, f"--input={text_file}", f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / out}", *overrides])
    lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(entries: list[dict]) -> dict[int, float]:
    return {e["iter"]: e["loss"] for e in entries if e["event"] == "train"}


# ----------------------------------------------------------------------------- command line

def test_parses_nanogpt_command_line():
    argv = [str(CONFIG_DIR / "train_shakespeare_char.py"), "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12",
            "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
            "--lr_decay_iters=2000", "--dropout=0.0"]
    config = configure(TrainConfig(), argv, verbose=False)
    # from the config file (nanoGPT's values) ...
    assert config.out_dir == "out-shakespeare-char" and config.dataset == "shakespeare_char"
    assert (config.eval_interval, config.learning_rate, config.min_lr, config.beta2,
            config.warmup_iters) == (250, 1e-3, 1e-4, 0.99, 100)
    assert config.always_save_checkpoint is False and config.gradient_accumulation_steps == 1
    # ... then the overrides, later ones winning
    assert (config.device, config.compile, config.eval_iters, config.log_interval) == \
        ("cpu", False, 20, 1)
    assert (config.block_size, config.batch_size, config.n_layer, config.n_head,
            config.n_embd) == (64, 12, 4, 4, 128)
    assert (config.max_iters, config.lr_decay_iters, config.dropout) == (2000, 2000, 0.0)


def test_shipped_configs_hold_nanogpt_values_and_parse():
    shakespeare = str(CONFIG_DIR / "train_shakespeare_char.py")
    config = configure(TrainConfig(), [shakespeare], verbose=False)
    assert (config.batch_size, config.block_size, config.n_layer, config.n_head, config.n_embd,
            config.dropout, config.max_iters, config.lr_decay_iters, config.log_interval,
            config.eval_iters) == (64, 256, 6, 6, 384, 0.2, 5000, 5000, 10, 200)
    default = configure(TrainConfig(), [str(CONFIG_DIR / "train_default.py")], verbose=False)
    assert default.dataset == "default" and default.out_dir == "out-default"
    if not torch.cuda.is_available():
        assert (default.device, default.backend, default.dtype) == ("cpu", "torch", "float32")


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown config key 'bogus'"),
    (["--batch_size=twelve"], "batch_size must be of type int"),
    (["--batch_size=1.5"], "batch_size must be of type int"),
    (["--compile=false"], "compile must be of type bool"),
    (["--learning_rate=True"], "learning_rate must be of type float"),
    (["--max_iters"], "expected --key=value"),
    (["no_such_config.py"], "config file 'no_such_config.py' not found"),
])
def test_bad_command_lines_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        configure(TrainConfig(), argv, verbose=False)


def test_config_file_rules(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\ndef _half(x):\n    return x // 2\n"
                    "n_embd = 256\nn_head = _half(16)\nblock_size = 2 * n_embd\ndropout = 0\n")
    config = configure(TrainConfig(), [str(good), "--n_embd=64"], verbose=False)
    assert (config.n_embd, config.n_head, config.block_size, config.dropout) == (64, 8, 512, 0.0)
    bad = tmp_path / "bad.py"
    bad.write_text("n_layers = 4\n")  # a typo of n_layer
    with pytest.raises(ConfigError, match="unknown config key 'n_layers' in config file"):
        configure(TrainConfig(), [str(bad)], verbose=False)


@pytest.mark.parametrize("override, message", [
    ("--bogus=1", "unknown config key 'bogus'"),
    ("--batch_size=0", "batch_size must be positive"),
    ("--dtype=float64", "dtype must be one of"),
    ("--backend=fast", "backend must be one of"),
    ("--init_from=no/such/dir", "init_from must be 'scratch', 'resume'"),
    ("--n_head=3", "must be divisible by n_head"),
    ("--dataset=nowhere", "pass --input=PATH"),
])
def test_cli_errors_exit_2_with_a_message(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_lr_schedule_is_warmup_then_cosine():
    config = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, config) == pytest.approx(1 / 11)
    assert get_lr(9, config) == pytest.approx(10 / 11)
    assert get_lr(10, config) == pytest.approx(1.0)
    assert get_lr(60, config) == pytest.approx(0.55)  # halfway down the cosine
    assert get_lr(110, config) == get_lr(500, config) == 0.1
    decay = [get_lr(i, config) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


# ----------------------------------------------------------------------------- training runs

@pytest.fixture(autouse=True)
def cpu_peak(tmp_path, monkeypatch):
    """A CPU matmul peak of 1 TFLOP/s, 'measured' into a cache of the test's own (never
    the user's, and without the second a real measurement takes)."""
    measured = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dtype: measured.append(dtype) or 1e12)
    return measured


def test_loss_decreases_and_logs_match_nanogpt(tmp_path, text_file, capsys, cpu_peak):
    entries = run(tmp_path, text_file, "out", "--max_iters=40", "--eval_interval=20",
                  "--learning_rate=1e-2", "--lr_decay_iters=40", "--min_lr=1e-3")
    evals = [e for e in entries if e["event"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert sorted(train_losses(entries)) == list(range(41))
    logged = [e for e in entries if e["event"] == "train"]
    assert all(e["tokens_per_sec"] > 0 for e in logged)
    # MFU against the CPU's measured fp32 matmul peak, from the 6th iteration on.
    assert all(e["mfu"] is None for e in logged[:5]) and all(e["mfu"] > 0 for e in logged[5:])
    # mfu counts FLOPs as nanoGPT does, the causal mfu beside it the half the mask keeps:
    # the same speed, so every line has the ratio of the two counts.
    ratios = {round(e["mfu"] / e["mfu_causal"], 9) for e in logged[5:]}
    assert len(ratios) == 1 and ratios.pop() > 1
    assert cpu_peak == [torch.float32]
    out = capsys.readouterr().out
    assert re.search(r"^step 40: train loss \d+\.\d{4}, val loss \d+\.\d{4}$", out, re.M)
    assert re.search(r"^iter 40: loss \d+\.\d{4}, time \d+\.\d{2}ms, mfu \d+\.\d{2}%, "
                     r"causal mfu \d+\.\d{2}%$", out, re.M)
    assert re.search(r"^mfu: 1 TFLOP/s, the fp32 matmul peak of this CPU with \d+ threads "
                     r"\(measured \d{4}-\d\d-\d\d; cached in .*cpu_peak_flops.json\)$", out, re.M)
    assert "model backend 'torch' on cpu: torch for every op" in out
    assert re.search(r"^kernels: torch +yes", out, re.M)
    assert "dtype float32 (no autocast); blocks: the modules" in out  # TINY's fp32


@pytest.mark.parametrize("overrides, path", [
    ((), "one autograd node each (kernels.cpu.fused_block"),
    (("--cpu_fused_block=False",), "the modules (--cpu_fused_block=False)"),
    (("--compile=True",), "the modules, compiled"),
])
def test_the_log_says_which_dtype_and_block_path_a_cpu_run_uses(tmp_path, text_file, capsys,
                                                                   overrides, path):
    run(tmp_path, text_file, "out", "--dtype=bfloat16", "--eval_only=True", *overrides)
    out = capsys.readouterr().out
    assert f"dtype bfloat16 (autocast; fp32 weights, optimizer and residual stream); " \
           f"blocks: {path}" in out


def test_cpu_peak_is_measured_once_per_dtype_and_cached(tmp_path, cpu_peak):
    cache = tmp_path / "peaks.json"
    assert peak.cpu_peak_flops(torch.float32, cache)[0] == 1e12
    assert peak.cpu_peak_flops(torch.float32, cache)[0] == 1e12
    assert peak.cpu_peak_flops(torch.bfloat16, cache)[0] == 1e12
    assert cpu_peak == [torch.float32, torch.bfloat16]  # each dtype measured once
    cache.write_text("{not json")  # a damaged cache is measured again, not an error
    assert peak.cpu_peak_flops(torch.float32, cache)[0] == 1e12
    assert len(cpu_peak) == 3


def test_peak_flops_option_wins(tmp_path, text_file, capsys, cpu_peak):
    entries = run(tmp_path, text_file, "out", "--max_iters=7", "--peak_flops=2e12")
    assert cpu_peak == []
    assert "mfu: 2 TFLOP/s (--peak_flops)" in capsys.readouterr().out
    assert [e["mfu"] is not None for e in entries if e["event"] == "train"][-1]


def test_default_dtype_is_bf16_where_the_cpu_multiplies_bf16(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU default")
    monkeypatch.setattr(train, "native_bf16_matmul", lambda: True)
    assert train.default_dtype() == "bfloat16"
    monkeypatch.setattr(train, "native_bf16_matmul", lambda: False)
    assert train.default_dtype() == "float32"


def test_stacked_eval_is_the_mean_of_the_batch_losses(tmp_path, text_file, monkeypatch):
    """Evals stack their batches into few forwards; the mean is the per-batch mean's."""
    from gpt.data import load_split

    run(tmp_path, text_file, "out", "--max_iters=2", "--eval_interval=2", "--eval_iters=5")
    config = configure(TrainConfig(), [*TINY, "--eval_iters=5"], verbose=False)
    model = train.GPT.from_checkpoint(tmp_path / "out")
    splits = {s: load_split(tmp_path / "data", s) for s in ("train", "val")}
    cpu = torch.device("cpu")
    stacked = train.estimate_loss(model, splits, config, cpu, train.nullcontext())
    monkeypatch.setattr(train, "EVAL_TOKENS_PER_FORWARD", 1)  # one batch per forward
    single = train.estimate_loss(model, splits, config, cpu, train.nullcontext())
    assert stacked == pytest.approx(single, rel=1e-6)
    assert model.training  # left in training mode


def test_train_step_schedules_accumulates_and_prefetches():
    """The step sets the iteration's learning rate, averages the micro-batches' losses,
    and fetches each next batch (the next iteration's first included) before the backward."""
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2,
                                      n_embd=16, backend="torch"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    fetched = []

    def batches(iter_num, micro_step):
        fetched.append((iter_num, micro_step))
        generator = torch.Generator().manual_seed(100 * iter_num + micro_step)
        x = torch.randint(0, 16, (2, 8), generator=generator)
        return x, x.roll(-1, 1)

    step = TrainStep(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), batches,
                     lr_at=lambda it: 0.1 * (it + 1), accumulation_steps=2, grad_clip=1.0,
                     autocast=train.nullcontext())
    with torch.no_grad():
        expected = sum(model(*batches(0, m))[1] for m in range(2)) / 2
    fetched.clear()
    loss = step(0)
    assert fetched == [(0, 0), (0, 1), (1, 0)]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert step(1, want_loss=False) is None
    assert fetched == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]  # (1, 0) was prefetched
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert all(p.grad is None for p in model.parameters())  # freed after the step


def test_main_as_a_program_freezes_the_heap_before_exit(tmp_path, text_file, monkeypatch):
    """Only `python -m gpt.train` itself (argv from sys.argv) spares its exit the final
    garbage collections and sets glibc's malloc to keep freed memory; a caller of
    main(argv), or of train(), keeps its process as it was."""
    import gc
    from kernels import cpu
    frozen, kept = [], []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: kept.append(True))
    run(tmp_path, text_file, "out", "--eval_only=True")
    assert frozen == [] and kept == []
    monkeypatch.setattr(sys, "argv", ["gpt-train", *TINY, f"--input={text_file}",
                                      f"--data_dir={tmp_path / 'data'}",
                                      f"--out_dir={tmp_path / 'out'}", "--eval_only=True"])
    train.main()
    assert frozen == [True] and kept == [True]


def test_host_memory_is_kept_on_glibc():
    from kernels.cpu import keep_freed_memory
    import platform
    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_checkpoint_holds_what_resume_and_sampling_need(tmp_path, text_file):
    run(tmp_path, text_file, "out", "--max_iters=2", "--eval_interval=2")
    ckpt = load_checkpoint_file(tmp_path / "out")
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config",
            "meta"} <= set(ckpt)
    assert ckpt["iter_num"] == 2 and ckpt["meta"]["vocab_size"] == len(set(TEXT))
    assert ckpt["config"]["data_dir"] == str(tmp_path / "data")
    assert ckpt["model_args"]["n_layer"] == 2


def test_resume_continues_with_the_same_losses(tmp_path, text_file):
    """Bit-exact on the CPU, with dropout and gradient accumulation on, so the data order
    and the dropout masks after the resume must be the uninterrupted run's."""
    common = ["--eval_interval=3", "--always_save_checkpoint=True", "--dropout=0.1",
              "--gradient_accumulation_steps=2", "--lr_decay_iters=6", "--learning_rate=1e-2"]
    uninterrupted = train_losses(run(tmp_path, text_file, "full", *common, "--max_iters=6"))
    run(tmp_path, text_file, "parts", *common, "--max_iters=3")  # its checkpoint is at iter 3
    resumed = train_losses(run(tmp_path, text_file, "parts", *common, "--max_iters=6",
                               "--init_from=resume"))
    assert resumed == uninterrupted  # iters 0-3 before the resume, 3-6 after it
    full, parts = load_checkpoint_file(tmp_path / "full"), load_checkpoint_file(tmp_path / "parts")
    assert full["iter_num"] == parts["iter_num"] == 6
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


@pytest.mark.skipif(not __import__("kernels").available_backends()["triton"].available,
                    reason="triton backend unavailable")
def test_resume_with_attention_dropout_on_triton_continues_with_the_same_losses(tmp_path,
                                                                                  text_file):
    """The fused attention's dropout draws its Philox (seed, offset) from the generators
    the loop seeds by (seed, iteration), both of which the checkpoint holds: a resumed run
    continues with the uninterrupted run's losses, bit for bit."""
    common = ["--backend=triton", "--n_layer=1", "--eval_interval=2",
              "--always_save_checkpoint=True", "--dropout=0.3", "--lr_decay_iters=4",
              "--learning_rate=1e-2", "--gradient_accumulation_steps=1", "--eval_iters=1"]
    uninterrupted = train_losses(run(tmp_path, text_file, "full", *common, "--max_iters=4"))
    run(tmp_path, text_file, "parts", *common, "--max_iters=2")
    resumed = train_losses(run(tmp_path, text_file, "parts", *common, "--max_iters=4",
                               "--init_from=resume"))
    assert resumed == uninterrupted
    assert len(set(uninterrupted.values())) == len(uninterrupted)


def test_loss_variants_are_keys_and_the_z_loss_is_logged(tmp_path, text_file, capsys):
    entries = run(tmp_path, text_file, "out", "--max_iters=2", "--eval_interval=2",
                  "--label_smoothing=0.1", "--z_loss=1e-3", "--logit_softcap=30")
    logged = [e for e in entries if e["event"] == "train"]
    assert all(e["z_loss"] > 0 for e in logged)
    assert re.search(r"iter 1: loss \d+\.\d+, time .*, z_loss \d+\.\d+", capsys.readouterr().out)
    ckpt = load_checkpoint_file(tmp_path / "out")
    args = ckpt["model_args"]
    assert (args["label_smoothing"], args["z_loss"], args["logit_softcap"]) == (0.1, 1e-3, 30.0)


def test_eval_only_evaluates_once(tmp_path, text_file):
    entries = run(tmp_path, text_file, "out", "--eval_only=True")
    assert [e["event"] for e in entries] == ["eval"]


def test_shakespeare_char_is_found_or_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shakespeare = tmp_path / "tinyshakespeare.txt"
    shakespeare.write_text(TEXT)
    monkeypatch.setattr(train, "TINY_SHAKESPEARE_FILE", shakespeare)
    train.main([*TINY, "--dataset=shakespeare_char", "--eval_only=True", "--out_dir=out"])
    assert (tmp_path / "data" / "shakespeare_char" / "train.bin").is_file()

    monkeypatch.setattr(train, "TINY_SHAKESPEARE_FILE", tmp_path / "absent.txt")
    monkeypatch.setattr(train, "TINY_SHAKESPEARE_URL", "http://localhost:9/unreachable.txt")
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--dataset=shakespeare_char", "--data_dir=elsewhere",
                    "--eval_only=True"])
    assert exit_info.value.code == 2
    assert "Pass --input=PATH of Tiny Shakespeare's text" in capsys.readouterr().err


def test_sampling_defaults_to_fp32_on_the_cpu(monkeypatch):
    """Decoding's one-token matmuls are too small for bf16 autocast to pay on the CPU, even
    where training defaults to it; on a GPU sampling follows training's default."""
    from gpt import sample
    monkeypatch.setattr(train, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.default_dtype() == "bfloat16"
    assert sample.default_sample_dtype() == "float32"
    assert sample.SampleConfig().dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert sample.default_sample_dtype() == "bfloat16"
