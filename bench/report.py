"""Markdown tables from results documents (`python -m bench render FILE.json` re-renders)."""
from __future__ import annotations

from bench.kernel_suite import COMPILE
from bench.results import CHECK_ONLY, FAILED

NANOGPT_COMMAND = (
    "python train.py config/train_shakespeare_char.py --device=cpu --compile=False "
    "--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 "
    "--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0")
NANOGPT_REPORTED = "~42 ms/iter = ~18k tokens/s"

IMPL_LEGEND = {
    "torch": "the `torch` backend: PyTorch eager with its fused built-ins (F.layer_norm, "
             "F.scaled_dot_product_attention, F.cross_entropy, ...)",
    "triton": "the `triton` backend (our Triton kernels)",
    "cuda": "the `cuda` backend (our C++/CUDA extension)",
    COMPILE: "`torch.compile` of the `torch` backend (headline shape and dtype only)",
    "eager-math": "attention written out in eager PyTorch, as nanoGPT without flash: "
                  "(T, T) scores, mask, softmax, @ V",
}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def fmt_timing(t: dict | None) -> str:
    if t is None:
        return "n/a"
    return f"{fmt(t['median_ms'])} ({fmt(t['q1_ms'])}–{fmt(t['q3_ms'])})"


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


def _kernel_cells(row: dict) -> list[str]:
    head = [row["shape_label"], row["dtype"], row["impl"]]
    if row["status"] == FAILED:
        return head + [f"**FAILED**: {row['error']}"] + [""] * 7
    if row["status"] == CHECK_ONLY:
        return head + ["correctness only (Triton interpreter: checked, never timed)"] + [""] * 6 \
            + [fmt(row["max_error"], 2)]
    return head + [
        fmt_timing(row["fwd"]), fmt(row["fwd_rate"]), fmt(row["fwd_pct_peak"]),
        fmt_timing(row["fwd_bwd"]), fmt(row["fwd_bwd_rate"]), fmt(row["fwd_bwd_pct_peak"]),
        f"{fmt(row['fwd_mem_mb'])} / {fmt(row['fwd_bwd_mem_mb'])}", fmt(row["max_error"], 2),
    ]


def render_kernels(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    cpu = meta["device_type"] == "cpu"
    lines = ["# Kernel benchmarks", ""] + _meta_lines(meta) + [
        "- time: median (25th–75th percentile) in ms"
        + (", CPU wall clock" if cpu else ", CUDA events with L2 flushed before each repeat"),
        "- every implementation was checked against `kernels.reference` (outputs and "
        "gradients) before timing; `max err` is its largest error relative to the "
        "reference's magnitude; a FAILED row was not timed",
        "- memory-bound ops report GB/s over compulsory bytes, compute-bound ones TFLOP/s "
        "(attention: 4·B·H·T²·D/2 forward, backward 2.5x forward)",
        "- peak memory: MiB allocated beyond the inputs, forward / forward+backward"
        + (" (n/a on the CPU: torch keeps no allocator statistics there)" if cpu else ""),
        "", "Implementations:", ""]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: list(IMPL_LEGEND).index(i)
                   if i in IMPL_LEGEND else len(IMPL_LEGEND))
    lines += [f"- `{i}`: {IMPL_LEGEND.get(i, 'see bench/problems.py')}" for i in impls]
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
        lines += _table(["shape", "dtype", "impl", "fwd ms", f"fwd {unit}", "fwd % peak",
                         "fwd+bwd ms", f"fwd+bwd {unit}", "fwd+bwd % peak", "peak MiB",
                         "max err"], [_kernel_cells(r) for r in op_rows])
    return "\n".join(lines) + "\n"


def _model_label(row: dict) -> str:
    return f"{row['model']} ({row['n_layer']}L/{row['n_head']}H/{row['n_embd']}d)"


def render_e2e(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    lines = ["# End-to-end benchmarks", ""] + _meta_lines(meta) + [
        "- training: one iteration = get_batch + forward + backward + grad clip + AdamW step; "
        "ms/iter median (25th–75th percentile); MFU = (6·N + 6·L·C·T) FLOPs/token x tokens/s "
        "over the peak above",
        "- dtype: fp32, or the torch.autocast dtype (weights and optimizer state stay fp32)",
        "- inference: `model.generate` from a 1-token prompt, ms per generated token", ""]
    train = [r for r in rows if r["kind"] == "train"]
    lines += ["## Training", ""]
    lines += _table(["model", "impl", "B", "T", "dtype", "ms/iter", "tokens/s", "MFU %", "loss"], [
        [_model_label(r), r["impl"], str(r["batch_size"]), str(r["block_size"]), r["dtype"]]
        + ([f"**FAILED**: {r['error']}", "", "", ""] if r["status"] == FAILED else
           [fmt_timing(r["ms_per_iter"]), fmt(r["tokens_per_s"]), fmt(r["mfu_pct"]),
            fmt(r["loss"])])
        for r in train])
    lines += ["", f"nanoGPT on the seed's CPU config, *reported, not measured by us*: "
                  f"{NANOGPT_REPORTED} on this class of 2-core CPU, with", "",
              f"    {NANOGPT_COMMAND}", "",
              "The `nanoGPT model.py (re-impl.)` rows are measured in this run: a faithful "
              "minimal re-implementation of nanoGPT's model (nn.GELU, SDPA, full logits + "
              "F.cross_entropy) trained by the same loop (bench/nanogpt_baseline.py)."]
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
    lines = ["# Design-parameter sweep", ""] + _meta_lines(meta) + [
        f"- each config trains {opts['steps']} steps from the same seed on the embedded corpus "
        f"(char-level), AdamW lr {opts['learning_rate']}, backend `{opts['backend']}`; "
        "one parameter varies per row, the others stay at the base config "
        f"({opts['base']}); val loss over {opts['eval_batches']} batches", ""]
    lines += _table(["param", "value", "L/H/C", "T", "B", "dropout", "train loss", "val loss",
                     "ms/iter", "tokens/s", "MFU %"], [
        [r["param"], fmt(r["value"]), f"{r['n_layer']}/{r['n_head']}/{r['n_embd']}",
         str(r["block_size"]), str(r["batch_size"]), fmt(r["dropout"])]
        + ([f"**FAILED**: {r['error']}", "", "", "", ""] if r["status"] == FAILED else
           [fmt(r["train_loss"], 4), fmt(r["val_loss"], 4), fmt_timing(r["ms_per_iter"]),
            fmt(r["tokens_per_s"]), fmt(r["mfu_pct"])])
        for r in rows])
    return "\n".join(lines) + "\n"


RENDERERS = {"kernels": render_kernels, "e2e": render_e2e, "sweep": render_sweep}


def render(doc: dict) -> str:
    return RENDERERS[doc["meta"]["suite"]](doc)
