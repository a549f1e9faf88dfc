"""gpt.train under torchrun: 2 CPU processes (gloo) train as one process does with the same
global batch (gradient_accumulation_steps counts micro-batches over all ranks)."""
import json
import os
import subprocess
import sys

import torch

from gpt import train
from gpt.checkpoint import load_checkpoint_file

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom,\n" * 40
RUN = ["--device=cpu", "--compile=False", "--dtype=float32", "--backend=torch", "--n_layer=2",
       "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
       "--log_interval=1", "--warmup_iters=1", "--progress=False", "--max_iters=4",
       "--eval_interval=4", "--always_save_checkpoint=True", "--learning_rate=1e-2",
       "--lr_decay_iters=4", "--gradient_accumulation_steps=2", "--dropout=0.0",
       "--peak_flops=1e12"]  # MFU against a given peak: no CPU peak measured or cached


def losses(out_dir) -> dict[int, float]:
    entries = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["iter"]: e["loss"] for e in entries if e["event"] == "train"}


def test_two_gloo_processes_match_one_process(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text(TEXT)
    args = [*RUN, f"--input={text}", f"--data_dir={tmp_path / 'data'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*args, f"--out_dir={tmp_path / 'single'}"])
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "gpt.train", *args, f"--out_dir={tmp_path / 'ddp'}"]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 4:") == 1  # only rank 0 evaluates and logs

    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(ddp) == sorted(single) == list(range(5))
    for it in single:  # the same global batch: the mean loss over both micro-batches
        assert abs(single[it] - ddp[it]) < 1e-5, (it, single[it], ddp[it])
    single_params = load_checkpoint_file(tmp_path / "single")["model"]
    ddp_params = load_checkpoint_file(tmp_path / "ddp")["model"]
    for name, tensor in single_params.items():
        torch.testing.assert_close(ddp_params[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
