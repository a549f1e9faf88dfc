"""Markdown tables from results documents (`python -m bench render FILE.json` re-renders)."""
from __future__ import annotations

from bench.kernels.suite import COMPILE
from bench.output import columns
from bench.output.columns import number as fmt
from bench.output.columns import wall_ms as fmt_timing
from bench.output.results import CHECK_ONLY, FAILED
from bench.timing import gpu
from bench.timing.stats import DISAGREEMENT_LIMIT
from bench.training import side_by_side, sweep
from bench.training.e2e import NANOGPT

IMPL_LEGEND = {
    "torch": "the `torch` backend: PyTorch eager with its fused built-ins (F.layer_norm, "
             "F.scaled_dot_product_attention, F.cross_entropy, ...)",
    "triton": "the `triton` backend (our Triton kernels)",
    "cuda": "the `cuda` backend (our C++/CUDA extension)",
    COMPILE: "`torch.compile` of the `torch` backend (headline shape and dtype only)",
    "eager-math": "attention written out in eager PyTorch, as nanoGPT without flash: "
                  "(T, T) scores, mask, softmax, @ V",
}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _meta_lines(meta: dict) -> list[str]:
    peak = meta["peak"]
    if peak is None:
        peak_line = "no peak known for this device: % of peak is n/a"
    else:
        flops = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in peak["flops"].items())
        peak_line = f"{peak['bandwidth'] / 1e9:,.0f} GB/s, {flops} ({peak['source']})"
    return [
        f"- device: **{meta['device']}** — {meta['machine']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"Python {meta['python']}; commit `{meta['git_commit']}`; {meta['date']}",
        f"- peak: {peak_line}",
    ]


def _time_cells(t: dict | None, cpu: bool) -> list[str]:
    return [columns.wall_ms(t)] if cpu else columns.gpu_columns(t)


def _kernel_cells(row: dict, cpu: bool) -> list[str]:
    head = [row["shape_label"], row["dtype"], row["impl"]]
    width = 2 * len(_time_cells(None, cpu)) + 6
    if row["status"] == FAILED:
        return head + [f"**FAILED**: {row['error']}"] + [""] * (width - 1)
    if row["status"] == CHECK_ONLY:
        return head + ["correctness only (Triton interpreter: checked, never timed)"] \
            + [""] * (width - 2) + [fmt(row["max_error"], 2)]
    return head + [
        *_time_cells(row["fwd"], cpu), fmt(row["fwd_rate"]), fmt(row["fwd_pct_peak"]),
        *_time_cells(row["fwd_bwd"], cpu), fmt(row["fwd_bwd_rate"]),
        fmt(row["fwd_bwd_pct_peak"]),
        f"{fmt(row['fwd_mem_mb'])} / {fmt(row['fwd_bwd_mem_mb'])}", fmt(row["max_error"], 2),
    ]


def _kernel_header(unit: str, cpu: bool) -> list[str]:
    def timed(name: str) -> list[str]:
        time = [f"{name} ms"] if cpu else [f"{name} {h}" for h in columns.GPU_HEADERS]
        return time + [f"{name} {unit}", f"{name} % peak"]
    return ["shape", "dtype", "impl", *timed("fwd"), *timed("fwd+bwd"), "peak MiB", "max err"]


TIME_NOTES = {
    True: ["- time: median (25th–75th percentile) in ms, CPU wall clock"],
    False: [f"- GPU µs: GPU time per call, median (25th–75th percentile) over "
            f"{gpu.TRIALS} trials, each R replays of a CUDA graph of K calls between one "
            f"pair of events, the calls rotating over input sets together at least "
            f"{gpu.ROTATION_L2_MULTIPLE}x the L2 cache (bench/timing/gpu.py); host µs: the "
            f"host's time to issue one eager call, without waiting for the GPU",
            f"- GPU time check: torch.profiler's sum of device time per eager call against "
            f"the graph's; a difference over {100 * DISAGREEMENT_LIMIT:.0f} % is reported "
            f"(empty: they agree)"],
}


def render_kernels(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    cpu = meta["device_type"] == "cpu"
    lines = ["# Kernel benchmarks", ""] + _meta_lines(meta) + TIME_NOTES[cpu] + [
        "- every implementation was checked against `kernels.reference` (outputs and "
        "gradients) before timing; `max err` is its largest error relative to the "
        "reference's magnitude; a FAILED row was not timed",
        "- memory-bound ops report GB/s over compulsory bytes, compute-bound ones TFLOP/s "
        "(attention: 4·B·H·T²·D/2 forward, backward 2.5x forward), from the GPU time on a GPU",
        "- peak memory: MiB allocated beyond the inputs, forward / forward+backward"
        + (" (n/a on the CPU: torch keeps no allocator statistics there)" if cpu else ""),
        "", "Implementations:", ""]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: list(IMPL_LEGEND).index(i)
                   if i in IMPL_LEGEND else len(IMPL_LEGEND))
    lines += [f"- `{i}`: {IMPL_LEGEND.get(i, 'see bench/kernels/problems.py')}" for i in impls]
    if cpu:
        lines += ["", "On the CPU only PyTorch runs for real: the `triton` rows (if any) ran "
                      "under the Triton interpreter for correctness and were not timed. The "
                      "CPU shapes fit in the last-level cache, which is faster than the DRAM "
                      "copy bandwidth measured as the peak: memory-bound ops can show more "
                      "than 100 %."]
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        unit = op_rows[0]["unit"]
        lines += ["", f"## {op} ({op_rows[0]['bound']}-bound, {unit})", ""]
        lines += _table(_kernel_header(unit, cpu), [_kernel_cells(r, cpu) for r in op_rows])
    return "\n".join(lines) + "\n"


def _model_label(row: dict) -> str:
    return f"{row['model']} ({row['n_layer']}L/{row['n_head']}H/{row['n_embd']}d)"


def render_e2e(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    lines = ["# End-to-end benchmarks", ""] + _meta_lines(meta) + [
        "- training: one iteration of `python -m gpt.train`'s own step (`gpt.step.TrainStep`: "
        "learning-rate schedule, forward, backward, grad clip, AdamW, loss read on the host) "
        "with the Shakespeare config's optimizer; ms/iter median (25th–75th percentile); "
        "MFU = (6·N + 6·L·C·T) FLOPs/token x tokens/s over the peak above, in the run's dtype",
        "- dtype: the CLIs' defaults on this device (`gpt.train` for training, `gpt.sample` "
        "for sampling): fp32, or the torch.autocast dtype (weights and optimizer state stay "
        "fp32)",
        "- inference: `model.generate` from a 1-token prompt, ms per generated token"]
    train = [r for r in rows if r["kind"] == "train"]
    cpu = meta["device_type"] == "cpu"
    times = ["ms/iter"] if cpu else list(columns.ITERATION_HEADERS)
    if not cpu:
        lines += ["- on the GPU: ms/iter is the wall time of an iteration (the loss read "
                  "at its end); GPU busy: torch.profiler's sum of device time per "
                  "iteration; host: the time to issue one (until the step returns); GPU "
                  "idle: the share of the iteration the GPU waited, where over "
                  f"{100 * DISAGREEMENT_LIMIT:.0f} %"]
    lines += ["", "## Training", ""]
    lines += _table(["model", "impl", "B", "T", "dtype", *times, "tokens/s", "MFU %", "loss"], [
        [_model_label(r), r["impl"], str(r["batch_size"]), str(r["block_size"]), r["dtype"]]
        + ([f"**FAILED**: {r['error']}"] + [""] * (len(times) + 2) if r["status"] == FAILED else
           [*([fmt_timing(r["ms_per_iter"])] if cpu else
              columns.iteration_columns(r["ms_per_iter"])),
            fmt(r["tokens_per_s"]), fmt(r["mfu_pct"]), fmt(r["loss"])])
        for r in train])
    if any(r["impl"] == NANOGPT for r in train):
        lines += ["", f"`{NANOGPT}`: no nanoGPT checkout was given (`--nanogpt PATH`), so "
                      "a minimal re-implementation of nanoGPT's model (nn.GELU, SDPA, full "
                      "logits + F.cross_entropy; bench/training/nanogpt_baseline.py) is "
                      "trained by our step instead. It is not nanoGPT's code or loop: "
                      "compare with nanoGPT itself side by side (nanogpt.md) where a "
                      "checkout is at hand."]
    else:
        lines += ["", "nanoGPT itself is compared whole process against whole process in "
                      "nanogpt.md (`--nanogpt PATH`)."]
    inference = [r for r in rows if r["kind"] != "train"]
    if inference:
        lines += ["", "## Inference (sampling)", ""]
        lines += _table(["model", "impl", "mode", "B", "dtype", "ms/token", "tokens/s"], [
            [_model_label(r), r["impl"], r["kind"], str(r["batch_size"]), r["dtype"]]
            + ([f"**FAILED**: {r['error']}", ""] if r["status"] == FAILED else
               [fmt_timing(r["ms_per_iter"]), fmt(r["tokens_per_s"])])
            for r in inference])
    return "\n".join(lines) + "\n"


def render_sweep(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    opts = meta["options"]
    base = sweep.TrainSetting(**opts["base"])
    spread = sweep.seed_spread(rows, base)
    base_row = next((r for r in rows if r["status"] != FAILED and r["seed"] == sweep.SEED
                     and sweep.setting_of(r) == base), None)
    noise = ("n/a (one seed)" if spread is None else
             f"{spread[0]:.4f}–{spread[1]:.4f} over {spread[2]} seeds "
             f"(range {spread[1] - spread[0]:.4f})")
    lines = ["# Design-parameter sweep: quality and cost", ""] + _meta_lines(meta) + [
        f"- every config trains on {opts['tokens']:,} tokens of {opts['corpus']} (a larger "
        f"batch or block: fewer iterations) with `python -m gpt.train`'s step and schedule "
        f"(AdamW lr {opts['learning_rate']}, warmup, cosine decay to the last iteration), "
        f"backend `{opts['backend']}`, seed {sweep.SEED}; one parameter varies per row, the "
        f"others stay at the base ({base.label()})",
        f"- val loss: mean over {opts['final_eval_batches']} batches of "
        f"{sweep.EVAL_BATCH_SIZE} windows at the end, ± its standard error; the curves "
        f"(sweep-loss-vs-tokens.png, sweep-loss-vs-time.png) evaluate {opts['eval_batches']} batches at {opts['evals']} "
        f"points; time: training only, evals excluded",
        f"- noise: the base config's val loss across seeds {noise}; a difference from the "
        f"base is beyond the noise when it exceeds both that range and twice the standard "
        f"error of the difference, paired over the same eval batches where the block size "
        f"is the base's (else as if independent)", ""]
    header = ["param", "value", "seed", "L/H/C", "T", "B", "dropout", "iters", "val loss",
              "vs base", "train loss", "time s", "ms/iter", "tokens/s", "MFU %"]
    table = []
    for r in rows:
        head = [r["param"], fmt(r["value"]), str(r["seed"]),
                f"{r['n_layer']}/{r['n_head']}/{r['n_embd']}", str(r["block_size"]),
                str(r["batch_size"]), fmt(r["dropout"]), fmt(r["iters"])]
        if r["status"] == FAILED:
            table.append(head + [f"**FAILED**: {r['error']}"] + [""] * 6)
            continue
        se = f" ± {r['val_loss_se']:.4f}" if r["val_loss_se"] is not None else ""
        table.append(head + [f"{r['val_loss']:.4f}{se}", _versus_base(r, base_row, spread),
                             fmt(r["train_loss"], 4), fmt(r["wall_s"]),
                             fmt_timing(r["ms_per_iter"]), fmt(r["tokens_per_s"]),
                             fmt(r["mfu_pct"])])
    lines += _table(header, table)
    return "\n".join(lines) + "\n"


def _versus_base(row: dict, base_row: dict | None, spread) -> str:
    if base_row is None or row is base_row or sweep.setting_of(row) == sweep.setting_of(base_row):
        return "base" if base_row is not None else "n/a"
    delta = row["val_loss"] - base_row["val_loss"]
    floor = sweep.noise_floor(row, base_row, spread)
    if floor is None:
        return f"{delta:+.4f}"
    return f"{delta:+.4f} ({'beyond' if abs(delta) > floor else 'within'} noise)"


def _ratio(ratio) -> str:
    if ratio is None:
        return "n/a"
    return f"**{ratio.median:.2f}x** ({ratio.low:.2f}–{ratio.high:.2f})"


def render_nanogpt(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    opts = meta["options"]
    lines = ["# Side by side with nanoGPT: whole processes, alternated", ""] + _meta_lines(meta) + [
        f"- nanoGPT: `python train.py` in {opts['nanogpt']} at commit "
        f"`{opts.get('nanogpt_commit') or 'unknown'}` (a git checkout with no local changes: "
        f"checked before the runs); ours: "
        f"`python -m gpt.train`; the same Python and environment (threads: "
        f"{opts['threads']}), each with an out_dir of its own; Tiny Shakespeare prepared "
        f"byte for byte the same: {opts['same_data']}",
        "- a pair runs both processes back to back, which one goes first alternating from "
        "pair to pair; ratio = nanoGPT's time / ours: the median over the pairs (min–max)",
        "- wall: process start to exit (imports, data, model, evals, checkpoints, "
        "iterations); start-up: to the first iteration's log line (the step-0 eval "
        "included); ms/iter: the median logged iteration, iterations with an eval left out; "
        "val: the last eval's val loss",
        "- what each ran: the two programs' defaults differ (ours: bf16 autocast where the CPU "
        "multiplies bf16 natively, biases as GPT-2; nanoGPT: fp32 on the CPU, no biases), so "
        "the seed command also runs with ours in fp32, and in fp32 without biases: nanoGPT's "
        "own model and precision", ""]
    summary = side_by_side.summarize_rows(rows)
    lines += _table(["config", "ran: ours / nanoGPT", "pairs", "wall: nanoGPT / ours",
                     "ms/iter: nanoGPT / ours", "wall s (ours / nanoGPT)", "start-up s",
                     "ms/iter", "val loss (step)"], [
        [s["config"], f"{s['ours_ran'] or 'n/a'} / {s['nanoGPT_ran'] or 'n/a'}",
         str(s["pairs"]), _ratio(s["wall"]), _ratio(s["iter"]),
         f"{fmt(s['ours_wall_s'])} / {fmt(s['nanoGPT_wall_s'])}",
         f"{fmt(s['ours_startup_s'])} / {fmt(s['nanoGPT_startup_s'])}",
         f"{fmt(s['ours_iter_ms'])} / {fmt(s['nanoGPT_iter_ms'])}",
         f"{fmt(s['ours_val_loss'], 4)} / {fmt(s['nanoGPT_val_loss'], 4)}"
         + (f" ({s['last_eval_step']:.0f})" if s["last_eval_step"] is not None else "")]
        for s in summary])
    lines += ["", "## Runs", ""]
    lines += _table(["config", "pair", "program", "wall s", "start-up s", "ms/iter", "iters",
                     "val loss", "load (1 min)"], [
        [r["config"], fmt(r["pair"]), fmt(r["program"])]
        + ([f"**FAILED**: {r['error']}", "", "", "", "", ""] if r["status"] == FAILED else
           [fmt(r["wall_s"]), fmt(r["startup_s"]), fmt(r["iter_ms"]), fmt(r["iters"]),
            fmt(r["val_loss"], 4), fmt(r["load_1m"], 2)])
        for r in rows])
    return "\n".join(lines) + "\n"


RENDERERS = {"kernels": render_kernels, "e2e": render_e2e, "sweep": render_sweep,
             "nanogpt": render_nanogpt}


def render(doc: dict) -> str:
    return RENDERERS[doc["meta"]["suite"]](doc)
