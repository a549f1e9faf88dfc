"""GPT-2 124M training side by side with nanoGPT (bench/training/gpt2.py): it runs on a
GPU only; here its command construction, data, log parsing, arithmetic and table."""
import sys

import numpy as np
import pytest

from bench.training import gpt2
from bench.training.gpt2 import NANOGPT, OURS, Entry, Settings
from gpt.configurator import configure
from gpt.train import TrainConfig


def test_runs_go_in_order_of_value_every_backend_with_and_without_compile():
    names = [e.name for e in gpt2.entries()]
    assert names == ["nanoGPT train.py, torch.compile",
                     "ours, backend=auto, torch.compile", "ours, backend=auto, eager",
                     "ours, backend=torch, torch.compile", "ours, backend=torch, eager",
                     "ours, backend=triton, torch.compile", "ours, backend=triton, eager",
                     "ours, backend=cuda, torch.compile", "ours, backend=cuda, eager"]
    assert [e.program for e in gpt2.entries(nanogpt=False)][:1] == [OURS]


def _args(argv):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--")}


def test_both_programs_get_the_same_training_command_line(tmp_path):
    settings = Settings()
    checkout = tmp_path / "nanoGPT"
    theirs, their_cwd = gpt2.command(Entry(NANOGPT, None, True), settings, tmp_path, checkout,
                                     python="py")
    ours, our_cwd = gpt2.command(Entry(OURS, "triton", False), settings, tmp_path, checkout,
                                 python="py")
    assert theirs[:2] == ["py", str(checkout / "train.py")] and their_cwd == tmp_path
    assert ours[:3] == ["py", "-m", "gpt.train"] and our_cwd == gpt2.REPO_ROOT
    a, b = _args(theirs), _args(ours)
    shared = {"--batch_size": "12", "--block_size": "1024", "--gradient_accumulation_steps": "4",
              "--dtype": "bfloat16", "--n_layer": "12", "--n_head": "12", "--n_embd": "768",
              "--bias": "True", "--dropout": "0.0", "--max_iters": "40",
              "--dataset": gpt2.DATASET}
    assert shared.items() <= a.items() and shared.items() <= b.items()
    assert a["--compile"] == "True" and b["--compile"] == "False"
    assert b["--backend"] == "triton" and "--backend" not in a  # nanoGPT's `backend` is DDP's
    assert b["--data_dir"] == str(tmp_path / "data" / gpt2.DATASET)
    assert a["--out_dir"] != b["--out_dir"]
    with pytest.raises(ValueError, match="needs a checkout"):
        gpt2.command(Entry(NANOGPT, None, True), settings, tmp_path, None)


def test_our_cli_accepts_the_command_line():
    ours, _ = gpt2.command(Entry(OURS, "auto", True), Settings(), gpt2.REPO_ROOT, None)
    config = configure(TrainConfig(), ours[3:], verbose=False)
    assert (config.batch_size, config.block_size, config.gradient_accumulation_steps,
            config.bias, config.compile, config.backend, config.dtype, config.max_iters) == \
        (12, 1024, 4, True, True, "auto", "bfloat16", 40)


def test_scratch_holds_nanogpts_data_format_and_a_link_to_its_configurator(tmp_path):
    checkout = tmp_path / "nanoGPT"
    checkout.mkdir()
    (checkout / "configurator.py").write_text("# nanoGPT's\n")
    scratch = tmp_path / "scratch"
    gpt2.prepare_scratch(scratch, checkout, Settings(data_tokens=1000))
    train = np.fromfile(scratch / "data" / gpt2.DATASET / "train.bin", dtype=np.uint16)
    val = np.fromfile(scratch / "data" / gpt2.DATASET / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (900, 100) and train.max() < gpt2.GPT2_TOKENS
    assert not (scratch / "data" / gpt2.DATASET / "meta.pkl").exists()  # vocab 50304 for both
    assert (scratch / "configurator.py").read_text() == "# nanoGPT's\n"


def _log(times):
    return ["step 0: train loss 10.9, val loss 10.9"] + [
        f"iter {i}: loss 7.5, time {t:.2f}ms, mfu 40.00%, causal mfu 38.00%"
        for i, t in enumerate(times)]


def test_iterations_before_the_skip_are_left_out():
    times = [5000.0] * gpt2.SKIP_ITERS + [100.0, 102.0, 98.0]
    assert gpt2.iteration_ms(_log(times)) == [100.0, 102.0, 98.0]
    assert gpt2.iteration_ms(["iter x: nonsense", "compiling..."]) == []


def test_a_row_gives_tokens_per_second_and_both_mfus():
    settings = Settings()
    flops = {"nanogpt": 900, "causal": 800}
    lines = _log([5000.0] * gpt2.SKIP_ITERS + [100.0, 100.0, 200.0])
    row = gpt2.result_row(Entry(OURS, "auto", True), settings, lines, 60.0, 0, flops, 1e9)
    assert row["status"] == "ok" and row["iter_ms"] == 100.0 and row["iters_timed"] == 3
    tokens_per_s = settings.tokens_per_iter / 0.1
    assert row["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert row["mfu_pct"] == pytest.approx(100 * 900 * tokens_per_s / 1e9)
    assert row["mfu_causal_pct"] == pytest.approx(100 * 800 * tokens_per_s / 1e9)
    unknown_peak = gpt2.result_row(Entry(OURS, "auto", True), settings, lines, 60.0, 0, flops,
                                   None)
    assert unknown_peak["mfu_pct"] is None and unknown_peak["tokens_per_s"] is not None


def test_failures_are_rows_that_say_why():
    entry = Entry(NANOGPT, None, True)
    crashed = gpt2.result_row(entry, Settings(), ["Traceback", "CUDA out of memory"], 5.0, 1,
                              {}, 1e9)
    assert crashed["status"] == "FAILED" and "exited with 1" in crashed["error"]
    assert "out of memory" in crashed["error"]
    too_short = gpt2.result_row(entry, Settings(), _log([100.0] * 3), 5.0, 0, {}, 1e9)
    assert too_short["status"] == "FAILED" and "no iteration logged" in too_short["error"]
    stopped = gpt2.result_row(entry, Settings(), [], 300.0, None, {}, 1e9, "stopped after 300 s")
    assert stopped["error"] == "stopped after 300 s"


def test_the_flop_counts_are_nanogpts_and_the_causal_half():
    flops = gpt2.flops_per_token(Settings())
    # nanoGPT's "number of parameters: 123.69M" (vocabulary 50304, biases, without the
    # position embeddings)
    n = 123_689_472
    assert flops["nanogpt"] == 6 * n + 12 * 12 * 768 * 1024
    assert flops["causal"] == 6 * n + 6 * 12 * 768 * 1024


def test_the_table_compares_every_run_with_nanogpt():
    settings = Settings()
    rows = [gpt2.result_row(Entry(NANOGPT, None, True), settings,
                            _log([1] * gpt2.SKIP_ITERS + [200.0]), 90.0, 0,
                            {"nanogpt": 1, "causal": 1}, 1e15),
            gpt2.result_row(Entry(OURS, "auto", True), settings,
                            _log([1] * gpt2.SKIP_ITERS + [160.0]), 80.0, 0,
                            {"nanogpt": 1, "causal": 1}, 1e15),
            gpt2.result_row(Entry(OURS, "cuda", False), settings, ["boom"], 3.0, 1, {}, 1e15)]
    text = gpt2.table(rows, settings, "NVIDIA H100", 989e12)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| nanoGPT train.py, torch.compile | 200 |")
    assert "| 1.00x |" in lines[1] and "| 1.25x |" in lines[2]
    assert "**FAILED**: exited with 1" in lines[3]
    assert len({line.count("|") for line in lines}) == 1


def test_a_run_is_a_whole_process_with_its_output():
    lines, wall, code, error = gpt2.run_one(
        [sys.executable, "-c", "print('iter 0: loss 1.0, time 5.00ms, mfu n/a')"], gpt2.REPO_ROOT,
        60)
    assert code == 0 and error is None and wall > 0
    assert lines == ["iter 0: loss 1.0, time 5.00ms, mfu n/a"]
    _, _, code, error = gpt2.run_one([sys.executable, "-c", "import time; time.sleep(5)"],
                                     gpt2.REPO_ROOT, 0.5)
    assert code is None and error == "stopped after its 0 s"


def test_our_cli_runs_the_command_and_its_log_parses(tmp_path, one_thread):
    """A tiny model on the CPU through the very command line the GPU runs use."""
    settings = Settings(batch_size=2, block_size=16, accumulation=2, iters=gpt2.SKIP_ITERS + 2,
                        n_layer=1, n_head=2, n_embd=16, data_tokens=5000, device="cpu",
                        dtype="float32")
    gpt2.prepare_scratch(tmp_path, None, settings)
    argv, cwd = gpt2.command(Entry(OURS, "torch", False), settings, tmp_path, None)
    lines, wall, code, error = gpt2.run_one(argv, cwd, 300)
    row = gpt2.result_row(Entry(OURS, "torch", False), settings, lines, wall, code,
                          {"nanogpt": 2, "causal": 1}, 1e12, error)
    assert row["status"] == "ok", row["error"]
    assert row["iters_timed"] == 3 and row["tokens_per_s"] > 0
    assert row["mfu_pct"] == pytest.approx(2 * row["mfu_causal_pct"])


def test_a_second_call_appends_to_the_same_table_only_with_the_same_settings(tmp_path):
    settings = Settings()
    row = gpt2.result_row(Entry(NANOGPT, None, True), settings,
                          _log([1] * gpt2.SKIP_ITERS + [200.0]), 90.0, 0,
                          {"nanogpt": 1, "causal": 1}, 1e15)
    assert gpt2.earlier_record(tmp_path, settings) == ([], None)
    gpt2.write(tmp_path, [row], settings, "GPU", 1e15, tmp_path / "nanoGPT")
    assert gpt2.earlier_record(tmp_path, settings) == ([row], tmp_path / "nanoGPT")
    with pytest.raises(SystemExit, match="other settings"):
        gpt2.earlier_record(tmp_path, Settings(iters=80))
